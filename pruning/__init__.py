"""Pruning: calibration data, importance criteria, selection, applying plans, save/load.

Everything a pruning method needs, as public names (see README, "Writing a pruning method"):
criteria (:func:`register_importance`, :class:`ScoringContext`), the statistics of what feeds
a group (:func:`input_statistics`), choosing a plan without applying it (:func:`select`,
:func:`select_plan`, :data:`RANKINGS`), applying it with bias compensation
(:func:`compensation_biases`, :func:`apply_plan`), saving and loading.
"""

from .apply import apply_plan, plan_slices, zero_plan
from .compensation import compensation_biases
from .importance import (
    ScoringContext,
    available_importance,
    register_importance,
    resolve_importance,
    score_groups,
)
from .io import load_pruned, save_pruned
from .prune import PruneResult, PruneSettings, eligible_groups, prune, score, select
from .selection import RANKINGS, select_plan
from .statistics import GroupInput, InputStats, input_statistics

__all__ = ["apply_plan", "plan_slices", "zero_plan", "load_pruned", "save_pruned", "prune",
           "PruneResult", "PruneSettings", "eligible_groups", "score", "select",
           "available_importance", "register_importance", "resolve_importance", "score_groups",
           "ScoringContext", "select_plan", "RANKINGS", "input_statistics", "InputStats",
           "GroupInput", "compensation_biases"]

# The built-in FLAP and Wanda-sp criteria use only the names above (and depgraph's): they
# register here, after every public name exists.
from .importance import flap, wanda_sp  # noqa: E402, F401  (registration)
