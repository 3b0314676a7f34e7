"""LLM-Pruner's Taylor criteria (arXiv 2305.11627, section 3.2).

With ``g`` the gradient of the calibration loss (summed over samples) and ``H ≈ Σ g_s²`` the
diagonal Fisher approximation of the Hessian:

* ``taylor`` (vector-wise): for each member, ``|Σ_{w in unit} g·w|``;
* ``taylor_element`` (element-wise, first order): ``Σ_{w in unit} |g·w|``;
* ``taylor_second`` (element-wise, second order): ``Σ_{w in unit} |g·w − ½·w·H·w|``.

Members are combined by the context's aggregation (sum by default, as in the paper).
"""

from __future__ import annotations

import numpy as np
import torch

from .common import member_params, per_unit, unit_index
from .gradients import accumulate_gradients
from .registry import ScoringContext, aggregate, register_importance


def _taylor(ctx: ScoringContext, mode: str) -> dict[str, np.ndarray]:
    params = member_params(ctx.model, ctx.groups)
    stats = accumulate_gradients(ctx.model, params, ctx.tokens, fisher=mode == "second",
                                 progress=ctx.options.get("progress"))
    ctx.stats.update(samples=stats.samples, gradient_seconds=round(stats.seconds, 3),
                     peak_rss_bytes=stats.peak_rss_bytes)
    scores = {}
    with torch.no_grad():
        for group in ctx.groups:
            members = []
            for name, dim, units in unit_index(group):
                weight, grad = params[name].detach().float(), stats.grad_sum[name]
                first = grad * weight
                if mode == "vector":
                    members.append(np.abs(per_unit(first, dim, units, group.num_units)))
                elif mode == "element":
                    members.append(per_unit(first.abs(), dim, units, group.num_units))
                else:
                    hessian = stats.grad_sq[name]
                    members.append(per_unit((first - 0.5 * weight * hessian * weight).abs(), dim,
                                            units, group.num_units))
            scores[group.id] = aggregate(members, ctx.aggregation)
    return scores


@register_importance("taylor", needs_data=True, needs_loss=True,
                     summary="LLM-Pruner vector-wise |Σ g·w| per member (first order)")
def taylor_vector(ctx: ScoringContext) -> dict[str, np.ndarray]:
    return _taylor(ctx, "vector")


@register_importance("taylor_element", needs_data=True, needs_loss=True,
                     summary="LLM-Pruner element-wise Σ|g·w| (first order)")
def taylor_element(ctx: ScoringContext) -> dict[str, np.ndarray]:
    return _taylor(ctx, "element")


@register_importance("taylor_second", needs_data=True, needs_loss=True,
                     summary="LLM-Pruner element-wise Σ|g·w − ½ w·H·w|, H = diagonal Fisher")
def taylor_second(ctx: ScoringContext) -> dict[str, np.ndarray]:
    return _taylor(ctx, "second")
