"""Wanda-sp: Wanda's weight × activation score on whole channels, as a plug-in.

Wanda (Sun et al., arXiv 2306.11695) scores a weight by ``|W_ij| · ||x_j||₂``; its
structured extension, Wanda-sp (the baseline of FLAP, arXiv 2312.11983), scores each input
channel ``j`` of a layer that reads a group by the sum over its column,

    S_j = ||x_j||₂ · Σ_i |W_ij|,

summed over the channels of a unit and over every layer that reads the group
(``||x_j||`` is taken as the root mean square over calibration tokens; the token count is
the same for every channel). Wanda-sp prunes every layer by the same ratio, so the
criterion is registered with ``ranking="local"``. Groups that no layer reads as a plain
projection (stacked experts) are scored by their weights' L1 norm.

Written against the public API only (``depgraph`` and ``pruning`` top-level names); a test
checks its imports.
"""

from __future__ import annotations

import numpy as np
import torch

from depgraph import Group
from pruning import ScoringContext, register_importance

__all__ = ["wanda_sp"]


def _abs_sum(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of |w| over every dim but ``dim``: one number per position along ``dim``."""
    magnitude = weight.detach().double().cpu().abs()
    others = [d for d in range(magnitude.dim()) if d != dim]
    return magnitude.sum(dim=others) if others else magnitude


def _weight_l1(ctx: ScoringContext, group: Group) -> np.ndarray:
    params = dict(ctx.model.named_parameters())
    return sum(group.unit_sums(m, _abs_sum(params[m.param], m.dim)) for m in group.members)


@register_importance("wanda_sp", needs_data=True, ranking="local",
                     summary="Wanda-sp: ||x_j|| x sum |W[:, j]| of the channels each "
                             "consumer reads; same ratio per group")
def wanda_sp(ctx: ScoringContext) -> dict[str, np.ndarray]:
    feeds = ctx.input_stats()
    params = dict(ctx.model.named_parameters())
    scores = {}
    for group in ctx.groups:
        if not feeds[group.id]:
            scores[group.id] = _weight_l1(ctx, group)
            continue
        total = np.zeros(group.num_units)
        for feed in feeds[group.id]:
            norms = feed.stats.second_moment.sqrt()
            total += group.unit_sums(feed.member, norms * _abs_sum(params[feed.member.param],
                                                                    feed.member.dim))
        scores[group.id] = total
    return scores
