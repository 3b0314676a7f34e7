"""Importance criteria, registered by name (see :func:`available_importance`).

Data-free: ``random``, ``l1``, ``l2``, ``second_moment_datafree``. With calibration data:
LLM-Pruner's ``taylor`` (vector-wise), ``taylor_element`` and ``taylor_second`` (diagonal
Fisher), and arXiv 2407.19126's ``second_moment`` and ``retraining_free`` (JS head redundancy
then the 2nd-moment metric). FLAP (arXiv 2312.11983) and Wanda-sp, written against the public
API only, register as ``flap`` and ``wanda_sp`` when :mod:`pruning` is imported. Register
your own with :func:`register_importance`, or pass a function wherever a name goes.
"""

import numpy as np

from . import head_similarity, magnitude, second_moment, taylor  # noqa: F401  (registration)
from .registry import (
    AGGREGATIONS,
    ENTRY_POINT_GROUP,
    Importance,
    ScoringContext,
    aggregate,
    available_importance,
    get_importance,
    importance_name,
    importance_options,
    needs_loss,
    register_importance,
    resolve_importance,
)

__all__ = ["AGGREGATIONS", "ENTRY_POINT_GROUP", "Importance", "ScoringContext", "aggregate",
           "available_importance", "get_importance", "importance_name", "importance_options",
           "needs_loss", "register_importance", "resolve_importance", "score_groups"]


def score_groups(ctx: ScoringContext, criterion) -> dict:
    """Scores of every group in ``ctx`` by ``criterion`` (a name, ``"module:function"`` or a
    callable, see :func:`resolve_importance`), checked: one finite score per unit of every
    group in ``ctx.groups``.

    Raises
    ------
    ValueError
        The criterion needs calibration data and ``ctx`` has none, or it returned scores
        that are missing, of the wrong length or not finite.
    """
    spec = resolve_importance(criterion)
    if spec.needs_data and ctx.tokens is None and "run_forward" not in ctx.options:
        raise ValueError(f"importance {spec.name!r} needs calibration data (pass tokens / --calib)")
    scores = spec.fn(ctx)
    if not isinstance(scores, dict):
        raise ValueError(f"importance {spec.name!r} returned {type(scores).__name__}, expected "
                         f"a dict {{group_id: one score per unit}}")
    checked = {}
    for group in ctx.groups:
        if group.id not in scores:
            raise ValueError(f"importance {spec.name!r} gave no scores for group {group.id!r}")
        values = np.asarray(scores[group.id], dtype=np.float64).reshape(-1)
        if values.shape != (group.num_units,) or not np.isfinite(values).all():
            raise ValueError(f"importance {spec.name!r}: scores of group {group.id!r} must be "
                             f"{group.num_units} finite numbers, got {values.size} "
                             f"({'finite' if np.isfinite(values).all() else 'not finite'})")
        checked[group.id] = values
    return checked
