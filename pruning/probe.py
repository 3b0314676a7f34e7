"""Which groups a model's own code can follow: a probe on a meta copy, before any scoring.

The graph is read off one trace, with fixed sizes: it cannot see code that re-derives a width
from another one at run time (TrOCR's attention reshapes its output to the size of its
*input*, so no head can go while the hidden size stays). :func:`exclude_unprunable` applies,
to a weightless copy of the model, one small plan per *pattern* of groups (the same module in
every block, one kind): the fewest units each group allows, removed from every group of the
pattern at once. Patterns whose plan ``apply_plan`` refuses (no config and no attribute
setting expresses it) are excluded from the graph with that reason, so that no pruner is
offered a group that cannot be applied. Costs one ``apply_plan`` on meta tensors per pattern.
"""

from __future__ import annotations

import re
import weakref
from collections import defaultdict

from torch import nn

from depgraph import DependencyGraph, Group, PlanError
from depgraph.trace import meta_copy

from .apply import apply_plan

__all__ = ["exclude_unprunable", "probe_plan"]

_PROBED: weakref.WeakSet = weakref.WeakSet()  # graphs already probed: once is enough


def _pattern(group: Group) -> tuple[str, str]:
    return group.kind, re.sub(r"\.\d+(?=\.|$)", ".*", group.id)


def probe_plan(groups: list[Group]) -> dict[str, list[int]]:
    """The smallest removal each group allows (its last units), for every group given."""
    plan = {}
    for group in groups:
        step = next((n for n in range(1, group.num_units) if group.allows(group.num_units - n)), None)
        if step is not None:
            plan[group.id] = list(range(group.num_units - step, group.num_units))
    return plan


def exclude_unprunable(model: nn.Module, graph: DependencyGraph) -> dict[str, str]:
    """Probe every pattern of ``graph``'s groups on a meta copy of ``model`` (module doc);
    exclude the groups whose probe is refused and return ``{group id: reason}`` (of every
    exclusion so far: a graph is probed once)."""
    if graph in _PROBED:
        return graph.excluded()
    patterns: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in graph.groups():
        patterns[_pattern(group)].append(group)
    refused: dict[str, str] = {}
    for (kind, pattern), groups in patterns.items():
        plan = probe_plan(groups)
        if not plan:
            continue
        try:
            apply_plan(meta_copy(model), plan, graph)
        except PlanError as error:
            reason = f"the model's code cannot follow removing {kind} units of {pattern} ({error})"
            refused.update({group.id: reason for group in groups})
    graph.exclude(refused)
    _PROBED.add(graph)
    return graph.excluded()
