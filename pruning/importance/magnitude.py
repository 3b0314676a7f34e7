"""Data-free criteria: random, and L1 / L2 magnitude of each unit's weights."""

from __future__ import annotations

import numpy as np
import torch

from .common import member_params, per_unit, unit_index
from .registry import ScoringContext, aggregate, register_importance


@register_importance("random", needs_data=False, summary="uniform random scores (a baseline)")
def random_scores(ctx: ScoringContext) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(ctx.seed)
    return {g.id: rng.random(g.num_units) for g in ctx.groups}


def _magnitude(ctx: ScoringContext, power: int) -> dict[str, np.ndarray]:
    params = member_params(ctx.model, ctx.groups)
    scores = {}
    with torch.no_grad():
        for group in ctx.groups:
            members = [per_unit(params[name].detach().float().abs().pow(power), dim, units,
                                group.num_units) for name, dim, units in unit_index(group)]
            scores[group.id] = aggregate(members, ctx.aggregation)
    return scores


@register_importance("l1", needs_data=False, summary="sum of |w| over each unit's weights")
def l1(ctx: ScoringContext) -> dict[str, np.ndarray]:
    return _magnitude(ctx, 1)


@register_importance("l2", needs_data=False, summary="sum of w² over each unit's weights")
def l2(ctx: ScoringContext) -> dict[str, np.ndarray]:
    return _magnitude(ctx, 2)
