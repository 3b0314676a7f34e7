"""Refitting the linear layers of one block so that it reproduces the dense block.

This is the module-wise reconstruction of arXiv 2407.19126 (Algorithms 2–4), stated for any
block: its linear layers (``nn.Linear`` and GPT-2's transposed ``Conv1D``) are refit in the
order the block calls them. Layers that read the same input tensor form one *stage* (q, k, v;
gate, up). For each stage, the pruned block runs on the pruned model's inputs ``X̂`` (up to the
end of the stage) and every layer of the stage is refit by least squares to the dense twin's
outputs ``Y`` on the dense inputs: ``W = (X̂ᵀX̂ + λI)⁻¹X̂ᵀY``. The next stage then sees the
refit layers' outputs: level-1 layers (q/k/v, gate/up) first, then, on the recomputed inner
activations, the level-2 layers (o, down).

A layer whose output passes unchanged into the block's output (a residual branch's last
projection: down_proj; found by probing, :func:`recovery.structure.passes_through`) can also
take up the block's output error: its target becomes the dense block's output minus the rest
of the pruned block's output, so each block cancels the error its pruned inputs bring along
instead of handing it on (``correction``; on SmolLM2 at 20% it took reconstruction from 132.6 to
124.1 WikiText-2 perplexity, pruned only 143.8).

The refit is damped towards the layer's present weights (:func:`recovery.lstsq.solve` with
the weights as prior, each input channel damped by its own energy): where the calibration
data says little, the layer stays as it was instead of drifting to fit it. (Measured on
SmolLM2: undamped or zero-prior refits fit the calibration text better and WikiText-2
worse.)

A :class:`Refit` says which output rows of a layer are refit, which dense output channels
they must reproduce, and which input columns they may use (the others are set to zero), so
the same routine serves a physically pruned model (rows all, targets = the kept channels)
and a masked one (pruned rows and columns stay zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import BlockCall, StopForward, stop_after
from .lstsq import NormalEquations, fit
from .precision import compute_autocast
from .structure import (
    BlockStructure,
    CallTrace,
    block_structure,
    linear_layers,
    record_io,
    run_quietly,
    weight_rows,
)

__all__ = ["Refit", "InputRecord", "block_outputs", "dense_targets", "refit_block"]


@dataclass(frozen=True)
class Refit:
    """Which part of one linear layer is refit (``None``: everything)."""

    rows: torch.Tensor | None = None  # output rows of the layer to refit
    targets: torch.Tensor | None = None  # dense output channels they reproduce (default: rows)
    cols: torch.Tensor | None = None  # input columns they may use; the others become zero


def block_outputs(block: nn.Module, states: list[torch.Tensor], calls: list[BlockCall],
                  precision: str = "fp32") -> list[torch.Tensor]:
    """The block's outputs on every batch."""
    return [run_quietly(block, hidden, call, precision) for hidden, call in zip(states, calls, strict=True)]


def dense_targets(block: nn.Module, states: list[torch.Tensor], calls: list[BlockCall],
                  names: list[str], precision: str = "fp32", trace: CallTrace | None = None
                  ) -> tuple[list[torch.Tensor], dict[str, list[list[torch.Tensor]]]]:
    """One pass of the dense block over every batch: its outputs, and the outputs of the
    named layers (``[name][batch]``, one tensor per call) that the refits reproduce.
    ``trace``: an empty :class:`CallTrace` the first batch's run fills, for
    :func:`block_structure` of a block wired as this one."""
    layers = linear_layers(block)
    targets: dict[str, list[list[torch.Tensor]]] = {name: [] for name in names}
    following = []
    for index, (hidden, call) in enumerate(zip(states, calls, strict=True)):
        seen, handles = record_io({n: layers[n] for n in names}, "output")
        if index == 0 and trace is not None:
            handles += trace.watch(layers)
        try:
            following.append(run_quietly(block, hidden, call, precision))
            if index == 0 and trace is not None:
                trace.output_shape = tuple(following[-1].shape)
        finally:
            for handle in handles:
                handle.remove()
        for name in names:
            targets[name].append(seen[name])
    return following, targets


def _partial_run(block: nn.Module, hidden: torch.Tensor, call: BlockCall,
                 modules: dict[str, nn.Module], last: nn.Module, calls: int,
                 precision: str, also: dict[str, nn.Module] | None = None) -> tuple[dict, dict]:
    """Run ``block`` up to the end of a stage, keeping the stage layers' inputs and outputs
    (and the inputs of the layers ``also`` names that run before the stage ends)."""
    inputs, in_handles = record_io({**(also or {}), **modules}, "input")
    outputs, out_handles = record_io(modules, "output")
    try:
        with stop_after(last, calls):
            run_quietly(block, hidden, call, precision)
    except StopForward:
        pass
    finally:
        for handle in in_handles + out_handles:
            handle.remove()
    return inputs, outputs


def _share_key(module: nn.Module, refit: Refit) -> tuple:
    """Layers of a stage with the same key read the same design matrix."""
    cols = None if refit.cols is None else tuple(refit.cols.tolist())
    return (module.bias is not None, cols)


def _full_run(block: nn.Module, hidden: torch.Tensor, call: BlockCall,
              modules: dict[str, nn.Module], precision: str) -> tuple[dict, dict, torch.Tensor]:
    """Run the whole block, keeping the named layers' inputs and outputs and its output."""
    inputs, in_handles = record_io(modules, "input")
    outputs, out_handles = record_io(modules, "output")
    try:
        result = run_quietly(block, hidden, call, precision)
    finally:
        for handle in in_handles + out_handles:
            handle.remove()
    return inputs, outputs, result


@dataclass
class _Stage:
    """What one pass over the batches gathered for a stage's refit."""

    equations: dict[str, NormalEquations]  # by layer (shared by the layers of one input)
    before: dict[str, float]  # ||present output - target||² by layer
    runs: list[tuple] | None  # per batch (block output, inputs, outputs) when it ran whole


class InputRecord:
    """Layer inputs per batch kept from one refit's stage runs for another refit of the same
    block on the same batches (the sequential pass's post refit of o_proj reads what its pre
    refit's MLP stage computed on the way; only the units zeroed in between differ)."""

    def __init__(self, names: set[str]):
        self.names = set(names)
        self.batches: dict[str, dict[int, list[torch.Tensor]]] = {n: {} for n in self.names}

    def keep(self, seen: dict[str, list], index: int) -> None:
        for name in self.names & set(seen):
            if seen[name]:  # called before the run stopped
                self.batches[name][index] = seen[name]

    def holds(self, names: list[str], seen: dict[str, list], refits: dict[str, Refit],
              count: int) -> bool:
        """Whether every batch of ``names`` is kept and batch 0's kept inputs equal ``seen``
        (a fresh run's) on the columns each refit reads."""
        if not all(n in self.names and len(self.batches[n]) == count for n in names):
            return False
        for name in names:
            kept, fresh, cols = self.batches[name][0], seen[name], refits[name].cols
            if len(kept) != len(fresh):
                return False
            for a, b in zip(kept, fresh, strict=True):
                if cols is not None:
                    a, b = a.index_select(-1, cols.to(a.device)), b.index_select(-1, cols.to(b.device))
                if a.shape != b.shape or not torch.equal(a, b):
                    return False
        return True


def _outputs(modules: dict[str, nn.Module], seen: dict[str, list], precision: str) -> dict:
    """The layers' present outputs on recorded inputs."""
    with torch.no_grad():
        found = {}
        for name, xs in seen.items():
            with compute_autocast(precision, xs[0].device):
                found[name] = [modules[name](x) for x in xs]
        return found


def _stage_equations(names: list[str], refits: dict[str, Refit], block: nn.Module,
                     layers: dict[str, nn.Module], states: list[torch.Tensor],
                     calls: list[BlockCall], targets: dict, end: tuple[str, int],
                     corrected: set[str], outputs: list[torch.Tensor] | None,
                     correction: float, precision: str,
                     inputs: InputRecord | None = None) -> _Stage:
    """Normal equations of a stage's layers (shared where they read the same design matrix),
    accumulated batch by batch: the pruned block's inputs against the dense layers' outputs,
    and the present outputs' squared error against the same targets.

    ``corrected``: the layers whose output passes through to the block's output;
    ``outputs``: the dense block's outputs per batch. Their target also takes up the block's present output
    error: with ``R = out - Y`` the rest of the dense block's output and ``R̂`` the same for
    the pruned block with the layer's present weights, the target is
    ``Y + correction · (R - R̂)``: the refit layer cancels (a share of) the error that the
    pruned inputs bring along instead of passing it on down the residual stream.

    ``inputs``: per layer, its inputs per batch as an earlier run recorded them
    (:class:`InputRecord`); a stage that does not run the whole block records its layers'
    inputs there, and takes the recorded ones instead of running the block when batch 0's run
    shows them unchanged on the columns the refit reads.
    """
    members: dict[tuple, list[str]] = {}
    for name in names:
        members.setdefault(_share_key(layers[name], refits[name]), []).append(name)
    shared = {key: NormalEquations(group[0], bias=key[0], precision=precision)
              for key, group in members.items()}
    modules = {n: layers[n] for n in names}
    before = dict.fromkeys(names, 0.0)
    whole = any(n in corrected for n in names)
    runs: list[tuple] | None = [] if whole else None
    record = None if whole or inputs is None else inputs
    also = None if record is None else {n: layers[n] for n in record.names if n in layers}
    reuse = False
    for index, (hidden, call) in enumerate(zip(states, calls, strict=True)):
        if whole:
            seen, present, result = _full_run(block, hidden, call, modules, precision)
            runs.append((result, seen, present))
        elif reuse:
            seen = {n: record.batches[n][index] for n in names}
            present = _outputs(modules, seen, precision)
        else:
            seen, present = _partial_run(block, hidden, call, modules, layers[end[0]], end[1],
                                         precision, also)
            if index == 0 and record is not None:
                reuse = record.holds(names, seen, refits, len(states))
        if record is not None and not reuse:
            record.keep(seen, index)
        for key, group in members.items():
            cols = refits[group[0]].cols
            for number, x in enumerate(seen[group[0]]):  # a group's layers read one x
                if cols is not None:
                    x = x.index_select(-1, cols.to(x.device))
                wanted = {}
                for name in group:
                    y = _wanted(targets[name][index][number], refits[name])
                    if name in corrected:  # dense residual minus the pruned one
                        residual = _wanted(outputs[index], refits[name]) - y
                        pruned = _rows(result, refits[name]) - _rows(present[name][number],
                                                                      refits[name])
                        y = y + correction * (residual - pruned)
                    wanted[name] = y
                    before[name] += _squared_gap(_rows(present[name][number], refits[name]), y)
                shared[key].add(x, wanted)
    return _Stage({name: shared[key] for key, group in members.items() for name in group},
                  before, runs)


def _squared_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b||²`` in float32 at least (float64 for float64 tensors): one dot product."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    gap = (a.to(dtype) - b.to(dtype)).reshape(-1)
    return float(torch.dot(gap, gap))


def _rows(y: torch.Tensor, refit: Refit) -> torch.Tensor:
    return y if refit.rows is None else y.index_select(-1, refit.rows.to(y.device))


def _wanted(y: torch.Tensor, refit: Refit) -> torch.Tensor:
    wanted = refit.targets if refit.targets is not None else refit.rows
    return y if wanted is None else y.index_select(-1, wanted.to(y.device))


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


def refit_block(block: nn.Module, states: list[torch.Tensor], calls: list[BlockCall],
                refits: dict[str, Refit], targets: dict[str, list[list[torch.Tensor]]],
                damping: float, outputs: list[torch.Tensor] | None = None,
                correction: float = 0.0, structure: BlockStructure | None = None,
                precision: str = "fp32", outputs_after: list | None = None,
                inputs: InputRecord | None = None) -> dict[str, dict[str, float]]:
    """Refit the layers named in ``refits`` (paths inside the block), stage by stage.

    ``states``/``calls``: the pruned model's inputs to this block, per batch;
    ``targets[name][batch]``: the dense layer's outputs (:func:`dense_targets`). For each
    stage the block runs batch by batch up to the stage's end; the stage's layers are
    solved before the next stage reads their outputs. ``outputs``: the dense block's outputs
    per batch; with ``correction > 0`` the layers whose output passes through to the block's
    output (:func:`recovery.structure.passes_through`) also take up that share of the block's output error
    (:func:`_stage_equations`). ``structure``: the block's :func:`block_structure` when the
    caller already has it (the sequential pass refits each block twice). ``precision``
    (``"fp32"`` or ``"bf16"``, :mod:`recovery.precision`): the arithmetic of the block runs and
    of the normal equations' products; the solve is float64 either way, the structure probe
    float32. ``outputs_after``: a list this fills with the block's outputs per batch after the
    refit when they come for free: its last refit stage is a pass-through layer's, whose
    stage ran the whole block, so the outputs are that run's with the layer's change added
    (left empty otherwise; saves the caller a pass). ``inputs``: an :class:`InputRecord`
    the stage runs fill (its layers) and take from (:func:`_stage_equations`). Returns, per layer, the relative output
    error before and after the refit.
    """
    if not 0.0 <= correction <= 1.0:
        raise ValueError(f"correction must be in [0, 1], got {correction!r}")
    if not refits:
        return {}
    layers = linear_layers(block)
    unknown = sorted(set(refits) - set(layers))
    if unknown:
        raise ValueError(f"no linear layer {unknown[0]!r} in the block")
    report: dict[str, dict[str, float]] = {}
    correcting = correction > 0 and outputs is not None
    if structure is None:
        structure = block_structure(block, states[0], calls[0], probe=correcting,
                                    precision=precision)
    stages, counts = structure.stages, structure.counts
    corrected = set(refits) & structure.through if correcting else set()
    stage = None
    for stage_names in stages:
        names = [n for n in stage_names if n in refits]
        if not names:
            continue
        stage = _stage_equations(names, refits, block, layers, states, calls, targets,
                                 (stage_names[-1], counts[stage_names[-1]]), corrected, outputs,
                                 correction, precision, inputs)
        for name in names:
            module, refit, equations = layers[name], refits[name], stage.equations[name]
            weight, bias = _current(module, refit)
            prior = weight if bias is None else torch.cat([weight, bias[:, None]], 1)
            found = fit(equations, damping, prior=prior, key=name)
            yty = max(equations.yty[name], 1e-300)
            report[name] = {"error_before": stage.before[name] / yty,
                            "error_after": found.error, "tokens": equations.tokens}
            _write(module, refit, found.weight, found.bias)
        if stage.runs is None or not set(names) <= corrected:
            stage = None
    if outputs_after is not None and stage is not None:
        outputs_after.extend(_moved_outputs(stage, [layers[n] for n in stage.before], precision))
    return report


def _moved_outputs(stage: _Stage, moved: list[nn.Module], precision: str) -> list[torch.Tensor]:
    """The block's outputs after its last stage's pass-through layers were refit: the run's
    outputs, each layer's old output taken out and its new one (on the same input) put in."""
    names = list(stage.before)
    found = []
    for result, inputs, present in stage.runs:
        total = result
        for name, module in zip(names, moved, strict=True):
            with torch.no_grad(), compute_autocast(precision, result.device):
                new = module(inputs[name][0])
            total = total - present[name][0] + new
        found.append(total)
    return found


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
