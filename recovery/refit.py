"""Refitting the linear layers of one block so that it reproduces the dense block.

This is the module-wise reconstruction of arXiv 2407.19126 (Algorithms 2–4), stated for any
block: its linear layers (``nn.Linear`` and GPT-2's transposed ``Conv1D``) are refit in the
order the block calls them. Layers that read the same input tensor form one *stage* (q, k, v;
gate, up). For each stage, the pruned block runs on the pruned model's inputs ``X̂`` (up to the
end of the stage) and every layer of the stage is refit by least squares to the dense twin's
outputs ``Y`` on the dense inputs: ``W = (X̂ᵀX̂ + λI)⁻¹X̂ᵀY``. The next stage then sees the
refit layers' outputs: level-1 layers (q/k/v, gate/up) first, then, on the recomputed inner
activations, the level-2 layers (o, down).

A :class:`Refit` says which output rows of a layer are refit, which dense output channels
they must reproduce, and which input columns they may use (the others are set to zero), so
the same routine serves a physically pruned model (rows all, targets = the kept channels)
and a masked one (pruned rows and columns stay zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import BlockCall, StopForward, run_block, stop_after
from .lstsq import NormalEquations, solve

__all__ = ["Refit", "linear_layers", "dense_pass", "refit_block", "weight_rows"]


@dataclass(frozen=True)
class Refit:
    """Which part of one linear layer is refit (``None``: everything)."""

    rows: torch.Tensor | None = None  # output rows of the layer to refit
    targets: torch.Tensor | None = None  # dense output channels they reproduce (default: rows)
    cols: torch.Tensor | None = None  # input columns they may use; the others become zero


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The block's linear layers by path inside the block."""
    return {name: module for name, module in block.named_modules()
            if isinstance(module, nn.Linear) or _is_conv1d(module)}


def weight_rows(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever the storage (a view for GPT-2's Conv1D)."""
    return module.weight.T if _is_conv1d(module) else module.weight


def _record(modules: dict[str, nn.Module], take: str) -> tuple[dict[str, list], list]:
    """Forward hooks keeping each module's input (``take="input"``) or output per call."""
    seen: dict[str, list] = {name: [] for name in modules}

    def hook(name):
        def keep(_module, args, output):
            seen[name].append((args[0] if take == "input" else output).detach())
        return keep

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    return seen, handles


def _stages(block: nn.Module, hidden: torch.Tensor, call: BlockCall
            ) -> tuple[list[list[str]], dict[str, int]]:
    """Linear layers in call order, grouped by the input tensor they read; calls per layer."""
    order: list[tuple[str, int]] = []
    alive: list[torch.Tensor] = []  # held so that no id is reused during the pass

    def hook(name):
        def note(_module, args):
            alive.append(args[0])
            order.append((name, id(args[0])))
        return note

    layers = linear_layers(block)
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            run_block(block, hidden, call)
    finally:
        for handle in handles:
            handle.remove()
    stages: list[list[str]] = []
    last_input = None
    for name, source in order:
        if stages and source == last_input and name not in stages[-1]:
            stages[-1].append(name)
        elif not any(name in stage for stage in stages):
            stages.append([name])
        last_input = source
    counts = {name: sum(1 for n, _ in order if n == name) for name, _ in order}
    return stages, counts


def dense_pass(block: nn.Module, states: list[torch.Tensor], calls: list[BlockCall],
               names: list[str]) -> tuple[list[torch.Tensor], dict[str, list[list[torch.Tensor]]]]:
    """Run the dense block on every batch: its outputs and the named layers' outputs."""
    layers = linear_layers(block)
    outputs: dict[str, list[list[torch.Tensor]]] = {name: [] for name in names}
    following = []
    for hidden, call in zip(states, calls, strict=True):
        seen, handles = _record({n: layers[n] for n in names}, "output")
        try:
            with torch.no_grad():
                following.append(run_block(block, hidden, call))
        finally:
            for handle in handles:
                handle.remove()
        for name in names:
            outputs[name].append(seen[name])
    return following, outputs


def _equations(name: str, module: nn.Module, refit: Refit, inputs: list, targets: list
               ) -> NormalEquations:
    equations = NormalEquations(name, bias=module.bias is not None)
    for x, y in zip(inputs, targets, strict=True):
        if refit.cols is not None:
            x = x.index_select(-1, refit.cols.to(x.device))
        wanted = refit.targets if refit.targets is not None else refit.rows
        if wanted is not None:
            y = y.index_select(-1, wanted.to(y.device))
        equations.add(x, y)
    return equations


def _write(module: nn.Module, refit: Refit, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    rows_view = weight_rows(module)
    out_features, in_features = rows_view.shape
    rows = refit.rows if refit.rows is not None else torch.arange(out_features)
    if weight.shape[0] != rows.numel():
        raise ValueError(f"refit of {rows.numel()} rows got targets for {weight.shape[0]}")
    full = torch.zeros(rows.numel(), in_features, dtype=torch.float64)
    cols = refit.cols if refit.cols is not None else torch.arange(in_features)
    full[:, cols] = weight
    with torch.no_grad():
        device, dtype = rows_view.device, rows_view.dtype
        rows_view[rows.to(device)] = full.to(device=device, dtype=dtype)
        if bias is not None:
            module.bias[rows.to(device)] = bias.to(device=device, dtype=module.bias.dtype)


def _residual(equations: NormalEquations, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
    """``||X W - Y||² / ||Y||²`` from the normal equations (no tokens needed)."""
    stacked = weight.T if bias is None else torch.cat([weight.T, bias[None]], dim=0)
    gram, cross = equations.xtx, equations.xty
    error = (stacked * (gram @ stacked)).sum() - 2 * (stacked * cross).sum() + equations.yty
    return float(error / max(equations.yty, 1e-300))


def refit_block(pruned_block: nn.Module, states: list[torch.Tensor], calls: list[BlockCall],
                refits: dict[str, Refit], dense_outputs: dict[str, list[list[torch.Tensor]]],
                damping: float) -> dict[str, dict[str, float]]:
    """Refit the layers named in ``refits`` (paths inside the block), stage by stage.

    ``states``/``calls``: the pruned model's inputs to this block, per batch;
    ``dense_outputs[name][batch]``: the dense twin's outputs of that layer, per call.
    Returns, per layer, the relative output error before and after the refit.
    """
    if not refits:
        return {}
    layers = linear_layers(pruned_block)
    unknown = sorted(set(refits) - set(layers))
    if unknown:
        raise ValueError(f"no linear layer {unknown[0]!r} in the block")
    report: dict[str, dict[str, float]] = {}
    stages, counts = _stages(pruned_block, states[0], calls[0])
    for stage in stages:
        names = [n for n in stage if n in refits]
        if not names:
            continue
        inputs = {n: [] for n in names}
        for hidden, call in zip(states, calls, strict=True):
            seen, handles = _record({n: layers[n] for n in names}, "input")
            try:
                with stop_after(layers[stage[-1]], counts[stage[-1]]), torch.no_grad():
                    run_block(pruned_block, hidden, call)
            except StopForward:
                pass
            finally:
                for handle in handles:
                    handle.remove()
            for name in names:
                inputs[name].append(seen[name])
        for name in names:
            module, refit = layers[name], refits[name]
            x = [t for batch in inputs[name] for t in batch]
            y = [t for batch in dense_outputs[name] for t in batch]
            equations = _equations(name, module, refit, x, y)
            before = _current(module, refit)
            weight, bias = solve(equations, damping)
            report[name] = {"error_before": _residual(equations, *before),
                            "error_after": _residual(equations, weight, bias),
                            "tokens": equations.tokens}
            _write(module, refit, weight, bias)
    return report


def _current(module: nn.Module, refit: Refit) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's present weight (and bias) restricted to the refit's rows and columns."""
    weight = weight_rows(module).detach().double().cpu()
    if refit.rows is not None:
        weight = weight[refit.rows]
    if refit.cols is not None:
        weight = weight[:, refit.cols]
    bias = None
    if module.bias is not None:
        bias = module.bias.detach().double().cpu()
        bias = bias[refit.rows] if refit.rows is not None else bias
    return weight, bias
