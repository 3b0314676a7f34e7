"""Attention-head redundancy by Jensen–Shannon divergence (arXiv 2407.19126, Algorithm 1).

For each attention group the attention maps of its units (a head, or the mean map of the
query heads that share one KV head) are compared over calibration tokens: the JS divergence
between two units is the mean over samples and query positions of ``JS(P_a[q] || P_b[q])``.
Pairs closer than ``tau`` are redundant; from each such pair (closest first) the unit with
the lower 2nd-moment score is removed first. Everything else keeps its 2nd-moment score, so
the ``retraining_free`` criterion ranks redundant heads ahead of merely weak ones.
"""

from __future__ import annotations

import numpy as np
import torch

from depgraph.kinds import Kind

from .registry import ScoringContext, register_importance
from .second_moment import second_moment_scores

__all__ = ["attention_divergences", "DEFAULT_TAU"]

DEFAULT_TAU = 0.05  # nats; JS divergence lies in [0, ln 2]
_REDUNDANT_FACTOR = 1e-9
_HEAD_KINDS = (Kind.ATTENTION_HEAD, Kind.KV_GROUP)


def _js(p: torch.Tensor) -> torch.Tensor:
    """Pairwise JS divergence between the rows' distributions: p is (units, q, s)."""
    eps = 1e-12
    m = 0.5 * (p[:, None] + p[None, :])
    log_p = (p + eps).log()
    kl_pm = (p[:, None] * (log_p[:, None] - (m + eps).log())).sum(-1)
    kl_qm = (p[None, :] * (log_p[None, :] - (m + eps).log())).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).mean(-1)


def attention_divergences(model, tokens: torch.Tensor, units_per_layer: dict[int, int]
                          ) -> dict[int, np.ndarray]:
    """Mean pairwise JS divergence between units of each block's attention."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    sums: dict[int, torch.Tensor] = {}
    try:
        config._attn_implementation = "eager"  # the only implementation that returns maps
        for module in model.modules():
            sub = getattr(module, "config", None)
            if sub is not None and sub is not config and hasattr(sub, "_attn_implementation"):
                sub._attn_implementation = "eager"
        with torch.no_grad():
            device = next(model.parameters()).device
            for index in range(tokens.shape[0]):
                out = model(input_ids=tokens[index:index + 1].to(device), output_attentions=True,
                            use_cache=False)
                for layer, units in units_per_layer.items():
                    maps = out.attentions[layer][0].double()  # (heads, q, s)
                    unit_maps = maps.reshape(units, maps.shape[0] // units, *maps.shape[1:]).mean(1)
                    sums[layer] = sums.get(layer, 0) + _js(unit_maps.cpu())
    finally:
        config._attn_implementation = previous
        for module in model.modules():
            sub = getattr(module, "config", None)
            if sub is not None and sub is not config and hasattr(sub, "_attn_implementation"):
                sub._attn_implementation = previous
    return {layer: (total / tokens.shape[0]).numpy() for layer, total in sums.items()}


def _redundant(divergence: np.ndarray, base: np.ndarray, tau: float) -> set[int]:
    """Algorithm 1: closest pairs first, drop the weaker of each pair under ``tau``."""
    pairs = sorted((divergence[a, b], a, b) for a in range(len(base)) for b in range(a + 1, len(base))
                   if divergence[a, b] < tau)
    dropped: set[int] = set()
    for _, a, b in pairs:
        if a in dropped or b in dropped:
            continue
        dropped.add(a if base[a] <= base[b] else b)
    if len(dropped) >= len(base):  # never mark every unit
        dropped.discard(int(np.argmax(base)))
    return dropped


@register_importance("retraining_free", needs_data=True, options=("tau",),
                     summary="2407.19126: JS head redundancy (tau) first, then the 2nd-moment metric")
def retraining_free(ctx: ScoringContext) -> dict[str, np.ndarray]:
    scores = second_moment_scores(ctx, use_data=True)
    heads = [g for g in ctx.groups if g.kind in _HEAD_KINDS and g.layer is not None]
    if not heads:
        return scores
    tau = float(ctx.options.get("tau", DEFAULT_TAU))
    divergences = attention_divergences(ctx.model, ctx.tokens, {g.layer: g.num_units for g in heads})
    redundant_total = 0
    for group in heads:
        base = np.asarray(scores[group.id], dtype=np.float64)
        dropped = _redundant(divergences[group.layer], base, tau)
        redundant_total += len(dropped)
        adjusted = base.copy()
        for unit in dropped:
            adjusted[unit] = base[unit] * _REDUNDANT_FACTOR
        scores[group.id] = adjusted
    ctx.stats["redundant_heads"] = redundant_total
    ctx.stats["tau"] = tau
    return scores
