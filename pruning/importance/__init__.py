"""Importance criteria, registered by name (see :func:`available_importance`).

Data-free: ``random``, ``l1``, ``l2``, ``second_moment_datafree``. With calibration data:
LLM-Pruner's ``taylor`` (vector-wise), ``taylor_element`` and ``taylor_second`` (diagonal
Fisher), and arXiv 2407.19126's ``second_moment`` and ``retraining_free`` (JS head redundancy
then the 2nd-moment metric). Register your own with :func:`register_importance`.
"""

from . import head_similarity, magnitude, second_moment, taylor  # noqa: F401  (registration)
from .registry import (
    AGGREGATIONS,
    ScoringContext,
    aggregate,
    available_importance,
    get_importance,
    importance_options,
    needs_loss,
    register_importance,
)

__all__ = ["AGGREGATIONS", "ScoringContext", "aggregate", "available_importance",
           "get_importance", "importance_options", "needs_loss", "register_importance", "score_groups"]


def score_groups(ctx: ScoringContext, name: str):
    """Scores of every group in ``ctx`` by criterion ``name``."""
    criterion, needs_data = get_importance(name)
    if needs_data and ctx.tokens is None:
        raise ValueError(f"importance {name!r} needs calibration data (pass tokens / --calib)")
    return criterion(ctx)
