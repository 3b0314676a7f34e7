"""FLAP's fluctuation metric (An et al., AAAI 2024, arXiv 2312.11983), as a plug-in.

Written against the public API only (``depgraph`` and ``pruning`` top-level names), as any
other author's method would be; a test checks its imports. For a channel ``j`` that a layer
``W`` reads, FLAP asks how well the layer's output can be recovered when the channel goes:
its input's *fluctuation* around the mean over calibration tokens (the mean itself is put
back by bias compensation) times the energy of its weight column,

    S_j = Var(x_j) · ||W[:, j]||²        (WIFV, "weighted input feature variance"),

for every channel every layer that reads the group reads. As in FLAP's adaptive structure
search (``AL-AM``), each channel's score is standardised over the channels of its group
(one layer's MLP, one layer's attention: mean 0, standard deviation 1, as FLAP's code
standardises each layer's row), a unit (a channel, a head, a KV group) scores the mean of
its channels, and all units rank together by that value: the criterion is registered with ``ranking="global_raw"``,
where each unit costs its parameters. Use it with ``compensate=True`` (``--compensate``):
FLAP's baseline bias compensation, :func:`pruning.compensation_biases`. Groups that no layer reads as a plain
projection (stacked experts) are scored by their units' weight energy, standardised
likewise.
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


def _channel_scores(ctx: ScoringContext, group: Group, feed_list: list, params: dict
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(values, units)``: the fluctuation of every channel the group's consumers read, and
    each channel's unit (``-1``: none); a group no plain projection reads (stacked experts)
    gives its units' weight energy, one value per unit."""
    if not feed_list:
        return _weight_energy(ctx, group), np.arange(group.num_units)
    values, units = [], []
    for feed in feed_list:
        columns = _energy(params[feed.member.param], feed.member.dim)
        values.append((feed.stats.variance * columns).numpy())
        units.append(feed.units)
    return np.concatenate(values), np.concatenate(units)


def fluctuation(ctx: ScoringContext) -> dict[str, np.ndarray]:
    """Per unit, ``Σ Var(x_j) · ||W[:, j]||²`` over the unit's channels and the group's
    consumers (before standardisation); ``ctx.stats["flap_weight_only_groups"]`` counts the
    groups scored by weight energy instead."""
    feeds = ctx.input_stats()
    params = dict(ctx.model.named_parameters())
    scores = {}
    for group in ctx.groups:
        values, units = _channel_scores(ctx, group, feeds[group.id], params)
        keep = units >= 0
        scores[group.id] = np.bincount(units[keep], values[keep], minlength=group.num_units)
    ctx.stats["flap_weight_only_groups"] = sum(not feeds[g.id] for g in ctx.groups)
    return scores


@register_importance("flap", needs_data=True, ranking="global_raw",
                     summary="FLAP (2312.11983): input variance x weight-column energy, "
                             "standardised per layer and module; with --compensate")
def flap(ctx: ScoringContext) -> dict[str, np.ndarray]:
    """FLAP's adaptive structure (its ``AL-AM``): every channel's fluctuation is standardised
    over the channels of its group (one layer's MLP, one layer's attention: FLAP's
    per-layer ``standarlization`` along the channel axis), a unit scores the mean of its
    channels (a head: of its ``head_dim`` channels), and all units rank together."""
    feeds = ctx.input_stats()
    params = dict(ctx.model.named_parameters())
    ctx.stats["flap_weight_only_groups"] = sum(not feeds[g.id] for g in ctx.groups)
    scores = {}
    for group in ctx.groups:
        values, units = _channel_scores(ctx, group, feeds[group.id], params)
        keep = units >= 0
        values, units = values[keep], units[keep]
        spread = float(values.std(ddof=1)) if values.size > 1 else 0.0
        standard = (values - values.mean()) / spread if spread > 0 else 0 * values
        counts = np.bincount(units, minlength=group.num_units)
        scores[group.id] = (np.bincount(units, standard, minlength=group.num_units)
                            / np.maximum(counts, 1))
    lowest = min((float(v.min()) for v in scores.values()), default=0.0)
    return {gid: v - lowest for gid, v in scores.items()}
