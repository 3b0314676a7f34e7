"""FLAP's fluctuation metric (An et al., AAAI 2024, arXiv 2312.11983), as a plug-in.

Written against the public API only (``depgraph`` and ``pruning`` top-level names), as any
other author's method would be; a test checks its imports. For a channel ``j`` that a layer
``W`` reads, FLAP asks how well the layer's output can be recovered when the channel goes:
its input's *fluctuation* around the mean over calibration tokens (the mean itself is put
back by bias compensation) times the energy of its weight column,

    S_j = Var(x_j) · ||W[:, j]||²        (WIFV, "weighted input feature variance"),

summed over the channels of a unit and over every layer that reads the group. Scores are
standardised per group (mean 0, standard deviation 1: FLAP standardises per layer and
module) so that all groups rank together by raw value: the criterion is registered with
``ranking="global_raw"``, FLAP's adaptive structure search, where each unit costs its
parameters. Use it with ``compensate=True`` (``--compensate``): FLAP's baseline bias
compensation, :func:`pruning.compensation_biases`. Groups that no layer reads as a plain
projection (stacked experts) are scored by their weights' energy, standardised likewise.
All scores are shifted by one constant so that the lowest is 0 (the order is unchanged).
"""

from __future__ import annotations

import numpy as np
import torch

from depgraph import Group
from pruning import ScoringContext, register_importance

__all__ = ["flap", "fluctuation"]


def _energy(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of w² over every dim but ``dim``: one number per position along ``dim``."""
    squares = weight.detach().double().cpu() ** 2
    others = [d for d in range(squares.dim()) if d != dim]
    return squares.sum(dim=others) if others else squares


def _weight_energy(ctx: ScoringContext, group: Group) -> np.ndarray:
    params = dict(ctx.model.named_parameters())
    return sum(group.unit_sums(m, _energy(params[m.param], m.dim)) for m in group.members)


def fluctuation(ctx: ScoringContext) -> dict[str, np.ndarray]:
    """Per unit, ``Σ Var(x_j) · ||W[:, j]||²`` over the unit's channels and the group's
    consumers (before standardisation); ``ctx.stats["flap_weight_only_groups"]`` counts the
    groups scored by weight energy instead."""
    feeds = ctx.input_stats()
    params = dict(ctx.model.named_parameters())
    scores, weight_only = {}, 0
    for group in ctx.groups:
        if not feeds[group.id]:
            scores[group.id] = _weight_energy(ctx, group)
            weight_only += 1
            continue
        total = np.zeros(group.num_units)
        for feed in feeds[group.id]:
            columns = _energy(params[feed.member.param], feed.member.dim)
            total += group.unit_sums(feed.member, feed.stats.variance * columns)
        scores[group.id] = total
    ctx.stats["flap_weight_only_groups"] = weight_only
    return scores


def _standardised(values: np.ndarray) -> np.ndarray:
    spread = float(values.std())
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


@register_importance("flap", needs_data=True, ranking="global_raw",
                     summary="FLAP (2312.11983): input variance x weight-column energy, "
                             "standardised per group; with --compensate")
def flap(ctx: ScoringContext) -> dict[str, np.ndarray]:
    standard = {gid: _standardised(v) for gid, v in fluctuation(ctx).items()}
    lowest = min((float(v.min()) for v in standard.values()), default=0.0)
    return {gid: v - lowest for gid, v in standard.items()}
