"""Least-squares reconstruction of a pruned model against its dense original, block by block.

    >>> stats = reconstruct(pruned, dense, tokens)            # doctest: +SKIP

For each block in order, both models run on the same calibration tokens: the dense model on
its own activations ``X``, the pruned one on its own ``X̂`` (what the pruned, already
reconstructed blocks before it produce). Every linear layer of the pruned block is refit
(:func:`recovery.refit.refit_block`) so that, fed ``X̂``, it reproduces the dense layer's
outputs on the channels it kept; level-1 layers first, then the level-2 layers on the inner
activations the refit level-1 layers produce. ``targets="level2"`` refits only the layers that
read pruned channels (the paper's post-pruning step: o_proj / down_proj on the kept inner
channels).

Which dense channel each pruned output row holds comes from the plans recorded in
``pruned.config.depgraph`` (or the ``plan`` argument), replayed on a meta copy of the dense
model: :func:`kept_channels`.

Memory: both models' weights, plus one block's activations for the calibration set (dense
and pruned) and the normal equations of one layer at a time; it does not grow with depth.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from depgraph import build_graph
from depgraph.trace import meta_copy
from pruning.apply import apply_plan, plan_slices

from .blocks import batches, capture_calls, find_blocks
from .precision import resolve_precision
from .refit import Refit, block_outputs, dense_targets, refit_block
from .structure import block_structure, linear_layers

__all__ = ["TARGETS", "kept_channels", "reconstruct", "check_tokens", "check_damping",
           "check_correction"]

TARGETS = ("all", "level2")


def check_damping(damping: float) -> float:
    if not isinstance(damping, (int, float)) or not damping > 0 or damping != damping:
        raise ValueError(f"damping must be a positive number, got {damping!r}")
    return float(damping)


def check_correction(correction: float) -> float:
    if not isinstance(correction, (int, float)) or not 0 <= correction <= 1:
        raise ValueError(f"correction must be a number in [0, 1], got {correction!r}")
    return float(correction)


def check_tokens(tokens) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.numel() == 0:
        raise ValueError(f"calibration tokens must be a non-empty (samples, seq_len) tensor, "
                         f"got {getattr(tokens, 'shape', type(tokens).__name__)}")
    return tokens.long()


def kept_channels(dense: nn.Module, plans: list[dict]) -> dict[tuple[str, int], torch.Tensor]:
    """``(param, dim) -> dense indices kept`` after applying ``plans`` in order.

    Computed on a meta copy of ``dense`` (no weights are read or copied); only dims that
    lost channels are listed.
    """
    model = meta_copy(dense)
    kept: dict[tuple[str, int], torch.Tensor] = {}
    for index, plan in enumerate(plans):
        graph = build_graph(model)
        for (param, dim), drop in plan_slices(graph, plan).items():
            current = kept.get((param, dim))
            if current is None:
                current = torch.arange(graph.trace.param_shapes[param][dim])
            mask = torch.ones(current.numel(), dtype=torch.bool)
            mask[drop] = False
            kept[(param, dim)] = current[mask]
        if index + 1 < len(plans):
            apply_plan(model, plan, graph)
    return kept


def _recorded_plans(pruned: nn.Module) -> list[dict]:
    record = getattr(getattr(pruned, "config", None), "depgraph", None) or {}
    return list(record.get("plans", []))


def _out_dim(module: nn.Module) -> int:
    return 1 if type(module).__name__ == "Conv1D" else 0


def post_refits(block_path: str, block: nn.Module, kept: dict, targets: str) -> dict[str, Refit]:
    """Refits of one physically pruned block: rows all, targets the kept dense channels."""
    refits = {}
    for name, module in linear_layers(block).items():
        param = f"{block_path}.{name}.weight"
        out_dim = _out_dim(module)
        reads_pruned = (param, 1 - out_dim) in kept
        if targets == "level2" and not reads_pruned:
            continue
        refits[name] = Refit(targets=kept.get((param, out_dim)))
    return refits


def reconstruct(pruned: nn.Module, dense: nn.Module, tokens: torch.Tensor, *,
                plan: dict | None = None, targets: str = "all", damping: float = 4.0,
                correction: float = 1.0, batch_size: int = 8, precision: str = "auto",
                progress=None) -> dict:
    """Refit ``pruned`` in place so that each block reproduces ``dense``; returns numbers.

    Parameters
    ----------
    pruned : the pruned model (by :func:`pruning.apply_plan` or loaded with ``load_pruned``).
    dense : the model it was pruned from (same architecture and module names).
    tokens : (samples, seq_len) calibration token ids.
    plan : the plan that made ``pruned`` from ``dense``; default: the plans recorded in
        ``pruned.config.depgraph``.
    targets : ``"all"`` linear layers of every block, or ``"level2"`` (only those reading
        pruned channels).
    damping : how strongly each layer is held to its present weights, relative to each input
        channel's energy (see :func:`recovery.lstsq.solve`). With the output correction, 4
        was best of 0.1, 1, 4 and 12 on SmolLM2 with the bundled calibration prose (measured
        with the sequential pass, benchmarks/RESULTS.md); less damping fits the 4096
        calibration tokens better and WikiText-2 worse.
    correction : the share of each block's output error (dense output minus pruned output)
        that the layers whose output passes straight into the block's output (a residual
        branch's last projection) take up in their targets, 0 to 1 (see
        :func:`recovery.refit.refit_block`): without it the error the pruned inputs carry
        flows on down the residual stream.
    precision : ``"auto"`` (bfloat16 where the device multiplies it natively), ``"fp32"`` or
        ``"bf16"``: the arithmetic of the block runs and the normal equations' products
        (:mod:`recovery.precision`); solving is float64 either way.

    Raises
    ------
    ValueError
        For bad arguments, or models whose blocks do not correspond.
    ReconstructionError
        When activations or solutions are not finite.
    """
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    damping, tokens = check_damping(damping), check_tokens(tokens)
    correction = check_correction(correction)
    precision = resolve_precision(precision, next(pruned.parameters()).device)
    start = time.perf_counter()
    plans = [plan] if plan is not None else _recorded_plans(pruned)
    kept = kept_channels(dense, plans)
    dense_path, dense_blocks = find_blocks(dense)
    path, blocks = find_blocks(pruned)
    if path != dense_path or len(blocks) != len(dense_blocks):
        raise ValueError(f"the pruned model's blocks ({path!r}, {len(blocks)}) do not match the "
                         f"dense model's ({dense_path!r}, {len(dense_blocks)})")
    chunks = batches(tokens, batch_size)
    dense_states, dense_calls = capture_calls(dense, dense_blocks, chunks, precision=precision)
    states, calls = capture_calls(pruned, blocks, chunks, precision=precision)
    report, probes = [], {}
    for index, (block, dense_block) in enumerate(zip(blocks, dense_blocks, strict=True)):
        refits = post_refits(f"{path}.{index}", block, kept, targets)
        block_calls, block_dense_calls = [c[index] for c in calls], [c[index] for c in dense_calls]
        dense_states, outputs = dense_targets(dense_block, dense_states, block_dense_calls,
                                              list(refits), precision)
        structure = block_structure(block, states[0], block_calls[0], probe=correction > 0,
                                    known=probes, precision=precision) if refits else None
        after: list = []
        layers = refit_block(block, states, block_calls, refits, outputs, damping,
                             dense_states, correction, structure, precision, outputs_after=after)
        states = after or block_outputs(block, states, block_calls, precision)
        del outputs
        report.append({"block": index, "layers": layers})
        if progress is not None:
            progress.update(1)
    return {"method": "reconstruct", "targets": targets, "damping": damping,
            "correction": correction, "precision": precision,
            "samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
            "seconds": round(time.perf_counter() - start, 3), "blocks": report,
            **summarize(report)}


def summarize(report: list[dict]) -> dict:
    """Mean relative output error of the refit layers, before and after (overall and per
    block); the per-layer numbers stay in ``report``."""
    def means(rows: list[dict]) -> dict:
        if not rows:
            return {"layers_refit": 0}
        return {"layers_refit": len(rows),
                "mean_error_before": sum(r["error_before"] for r in rows) / len(rows),
                "mean_error_after": sum(r["error_after"] for r in rows) / len(rows)}

    per_block = [{"block": b["block"], **means(list(b["layers"].values()))} for b in report]
    return {**means([layer for b in report for layer in b["layers"].values()]),
            "per_block": per_block}
