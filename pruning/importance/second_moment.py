"""The 2nd-moment metric of "Greedy Output Approximation" (arXiv 2407.19126, section 3).

For a depth-2 module ``f(X) = B σ(A X)`` the output energy carried by inner channel ``i`` is
approximated by ``M_i = ||B_{:,i}||² · A_i Σ_X A_iᵀ`` (``Σ_X`` the covariance of the module's
input over calibration tokens, the identity when there is no data). For a gated MLP,
``B (σ(G X) ⊙ U X)``, the gate and up metrics multiply. ReLU-like activations halve the
second moment (a constant per group; it only matters when groups are ranked together).

Roles come from the graph and the module types: a member slicing the output dim of a
``Linear`` (or the input dim of GPT-2's transposed ``Conv1D``) is a producer ``A``; one slicing
the input dim is a consumer ``B``. Only producers whose layout equals the consumer's are on
the linear path (an attention head's values, not its queries and keys, whose layout differs).
A unit's score sums its channels. Groups without such a producer/consumer pair (the hidden
stream, experts, fused qkv) fall back to the L2 magnitude, counted in ``ctx.stats``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from depgraph import Group
from depgraph.layout import Atom, Prod

from .magnitude import l2
from .registry import ScoringContext, register_importance

__all__ = ["input_covariances", "depth2_roles", "second_moment_scores"]

_RELU_LIKE = {"aten::relu", "aten::gelu", "aten::silu", "aten::leaky_relu", "aten::elu",
              "aten::mish", "aten::hardswish"}


def _orientation(module: nn.Module) -> int | None:
    """Which weight dim is the output: 0 for Linear, 1 for Conv1D (stored (in, out))."""
    if isinstance(module, nn.Linear):
        return 0
    if type(module).__name__ == "Conv1D":
        return 1
    return None


def depth2_roles(model: nn.Module, group: Group):
    """(linear-path producers, consumer) for a depth-2 group, or ([], None).

    Each producer comes with, for every consumer position, the matching producer position:
    a producer is on the linear path when its layout is a product of atoms that all appear
    in the consumer's layout (values ``(kv, d)`` for outputs ``(kv, repeat, d)`` under GQA).
    """
    modules = dict(model.named_modules())
    producers, consumers = [], []
    for member, coords in zip(group.members, group._coords, strict=True):
        path, _, attr = member.param.rpartition(".")
        module = modules.get(path)
        out_dim = _orientation(module) if attr == "weight" and module is not None else None
        if out_dim is not None:
            (producers if member.dim == out_dim else consumers).append((member, module, coords))
    if not consumers:
        return [], None
    consumer = consumers[0]
    linear = []
    for member, module, _ in producers:
        index = _position_map(group.store, member.layout, consumer[0].layout)
        if index is not None:
            linear.append((member, module, index))
    return linear, consumer


def _position_map(store, producer, consumer) -> np.ndarray | None:
    """For each consumer position, the producer position with the same atom coordinates."""
    layout = store.resolve(producer)
    parts = layout.parts if isinstance(layout, Prod) else (layout,)
    if not all(isinstance(part, Atom) for part in parts):
        return None
    index = np.zeros(consumer.size, dtype=np.int64)
    for part in parts:
        coords = store.coords(consumer, part.id)
        if (coords < 0).any():
            return None
        index = index * part.size + coords
    return index


def input_covariances(ctx: ScoringContext, modules: dict[str, nn.Module]
                      ) -> dict[str, torch.Tensor]:
    """``Σ_X = E[x xᵀ]`` of each module's input over all calibration tokens (float64)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    if ctx.tokens is None and "run_forward" not in ctx.options:
        return {}

    def hook(name):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        ctx.run_forward()
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).cpu() for name in sums}


def _producer_energy(module: nn.Module, sigma: torch.Tensor | None) -> torch.Tensor:
    """``A_i Σ A_iᵀ`` for every output channel i."""
    weight = module.weight.detach().double().cpu()
    rows = weight if _orientation(module) == 0 else weight.T
    if sigma is None:
        return (rows * rows).sum(1)
    return ((rows @ sigma) * rows).sum(1)


def _consumer_energy(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach().double().cpu()
    return (weight * weight).sum(0 if _orientation(module) == 0 else 1)


def _relu_like(ctx: ScoringContext, group: Group) -> bool:
    scope = group.id.rsplit(".", 1)[0] if group.layer is not None else ""
    return any(data.get("op") in _RELU_LIKE and str(data.get("module", "")).startswith(scope)
               for _, data in ctx.graph.nx.nodes(data=True)) if scope else False


def second_moment_scores(ctx: ScoringContext, use_data: bool) -> dict[str, np.ndarray]:
    roles = {g.id: depth2_roles(ctx.model, g) for g in ctx.groups}
    modules = dict(ctx.model.named_modules())
    producer_modules = {p[0].param.rpartition(".")[0]: p[1] for producers, _ in roles.values()
                        for p in producers}
    sigmas = input_covariances(ctx, producer_modules) if use_data else {}
    fallback = [g for g in ctx.groups if not roles[g.id][0]]
    scores = l2(ScoringContext(ctx.model, ctx.graph, fallback, aggregation=ctx.aggregation)) if fallback else {}
    for group in ctx.groups:
        producers, consumer = roles[group.id]
        if not producers:
            continue
        coords = torch.from_numpy(consumer[2])
        energy = _consumer_energy(consumer[1])
        for member, _module, index in producers:
            path = member.param.rpartition(".")[0]
            energy = energy * _producer_energy(modules[path], sigmas.get(path))[torch.from_numpy(index)]
        if _relu_like(ctx, group):
            energy = energy * 0.5
        unit = torch.zeros(group.num_units, dtype=torch.float64)
        keep = coords >= 0
        unit.index_add_(0, coords[keep], energy[keep])
        scores[group.id] = unit.numpy()
    ctx.stats["magnitude_fallback_groups"] = len(fallback)
    return scores


@register_importance("second_moment", needs_data=True,
                     summary="2407.19126 2nd-moment metric ||B_i||²·A_iΣ_XA_iᵀ (gated: product)")
def second_moment(ctx: ScoringContext) -> dict[str, np.ndarray]:
    return second_moment_scores(ctx, use_data=True)


@register_importance("second_moment_datafree", needs_data=False,
                     summary="2nd-moment metric with Σ_X = I (no calibration data)")
def second_moment_datafree(ctx: ScoringContext) -> dict[str, np.ndarray]:
    return second_moment_scores(ctx, use_data=False)
