"""depgraph: trace any causal LM, derive its coupled channels, heads and experts.

>>> from depgraph import build_graph            # doctest: +SKIP
>>> graph = build_graph(model)                  # doctest: +SKIP
>>> [g.id for g in graph.groups()][:3]          # doctest: +SKIP
"""

from .errors import (
    DepGraphError,
    LayoutError,
    NonFiniteError,
    PlanError,
    RuleError,
    TraceError,
    UnsupportedOpError,
)
from .graph import DependencyGraph, build_graph
from .groups import Group, Member, Use
from .kinds import Kind, Role, Tag

__all__ = ["build_graph", "DependencyGraph", "Group", "Member", "Use", "Kind", "Role", "Tag",
           "DepGraphError", "UnsupportedOpError", "RuleError", "LayoutError", "TraceError",
           "PlanError", "NonFiniteError"]
