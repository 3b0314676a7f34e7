"""Pruning a model bigger than memory: one block at a time, from disk to disk.

    >>> result = prune_streamed("llama-8b", "llama-8b-pruned",
    ...                         PruneSettings(ratio=0.2, importance="second_moment"),
    ...                         tokenizer=tok)                                # doctest: +SKIP

The same steps as :func:`pruning.prune` (eligible groups, score, select, apply), with the
model held as a skeleton whose parameters live on ``meta``
(:func:`pruning.checkpoint.skeleton_model`) and its graph built from that skeleton:

1. **inputs**: the calibration rows run through the modules in front of the blocks (loaded
   only for their call) to the first block (:func:`recovery.stream_inputs.capture_streamed`);
2. **scoring pass**, block after block: load the block's weights (memory-mapped safetensors),
   run the calibration activations through it (the hooks of the criterion collect what it
   reads, e.g. the input covariances of the 2nd-moment metric), score its groups, carry the
   activations to the next block, free it. Scores and activations are saved after each block;
3. **select** over every score at once (global, global_raw and local rankings, kind ratios:
   whatever :func:`pruning.select` offers), and apply the plan to the meta skeleton, which
   solves the config and records the plan for :func:`pruning.load_pruned`;
4. **writing pass**, block after block: read the block's tensors, cut them as the plan says
   (the slices :func:`pruning.apply_plan` cuts), write them as one shard. With
   ``reconstruct``, the pass is instead :func:`recovery.prune_and_reconstruct`'s sequential
   pass (:func:`recovery.sequential.prune_block`: refit, re-score, choose the counts the
   selection gave, refit) on each loaded block, which is then written from its refit weights.

The output is a normal folder: sharded safetensors with an index, config, ``pruning.json``,
the tokenizer. It is built in ``.<out>.partial`` beside ``out`` and renamed to ``out`` when
complete. A run that stops (killed, interrupted, failed) leaves that folder; the next run with
the same input, settings and calibration resumes after the last finished block of either pass
(a different run clears it). Peak memory: one block (as stored, plus what the criterion
computes on it), the calibration activations and the largest tensor outside the blocks.

Refused, each with a one-line reason: criteria that differentiate the loss (Taylor: a
backward pass through the whole model), head similarity (attention maps of the whole model),
self-generated calibration, groups outside the blocks (the hidden stream couples every block
and the embeddings), and checkpoints whose tensors are not stored under the model's names.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from depgraph import build_graph
from pruning.apply import apply_plan, cut, library_class, plan_slices
from pruning.checkpoint import LazyCheckpoint, materialized, parameter_aliases, skeleton_model
from pruning.importance import ScoringContext, get_importance, needs_loss, score_groups
from pruning.io import write_pruning_files
from pruning.prune import (
    PruneSettings,
    calibration_for,
    eligible_groups,
    kept_widths,
    score,
    select,
)
from pruning.shards import shard_name, write_index, write_shard

from .blocks import find_blocks, run_block
from .reconstruct import check_tokens
from .sequential import (
    SequentialSettings,
    Stream,
    check_sequential_groups,
    prune_block,
    refittable,
    sequential_settings,
    sequential_stats,
)
from .stream_inputs import block_parameter_names, capture_streamed
from .stream_state import PartialFolder, run_key

__all__ = ["prune_streamed", "StreamResult", "check_streamable", "STREAM_REFUSED"]

#: Criteria the streamed pipeline refuses, and why.
STREAM_REFUSED = {
    "retraining_free": "head similarity compares attention maps the whole model returns; "
                       "use second_moment (the same metric without the head redundancy)"}

BlockCallback = Callable[[str, int, int], None]


@dataclass
class StreamResult:
    """Where the pruned folder is, the plan, the scores it came from, and numbers."""

    out: Path
    plan: dict[str, list[int]]
    scores: dict[str, np.ndarray] = field(repr=False)
    stats: dict = field(default_factory=dict)


def check_streamable(settings: PruneSettings) -> None:
    """``ValueError`` with the reason when ``settings`` cannot be streamed block by block."""
    name = settings.importance
    if needs_loss(name):
        raise ValueError(f"importance {name!r} cannot be streamed: it needs the gradient of "
                         "the loss, a backward pass through every block at once; use "
                         "second_moment, l2, l1 or random with --stream")
    if name in STREAM_REFUSED:
        raise ValueError(f"importance {name!r} cannot be streamed: {STREAM_REFUSED[name]}")
    if settings.ranking == "allocate":
        raise ValueError("ranking 'allocate' measures the whole model's outputs at candidate "
                         "widths; --stream holds one block (use global, global_raw or local)")
    if getattr(settings, "compensate", False):
        raise ValueError("bias compensation needs every consumer's inputs after the whole plan; "
                         "--stream does not offer it yet (drop --compensate)")
    if settings.calib == "self" and get_importance(name)[1]:
        raise ValueError("calibration 'self' generates text with the whole model; give "
                         "calibration text (bundled, wikitext2, a file) with --stream")


def _check_groups(groups) -> dict[int, list]:
    outside = [g for g in groups if g.layer is None]
    if outside:
        raise ValueError(f"group {outside[0].id!r} ({outside[0].kind}) spans every block; "
                         "streaming prunes groups inside one block (kinds mlp, attention, "
                         "experts)")
    by_block: dict[int, list] = {}
    for group in groups:
        by_block.setdefault(group.layer, []).append(group)
    return by_block


@dataclass
class _Run:
    """What both passes share."""

    model: nn.Module
    checkpoint: LazyCheckpoint
    path: str
    count: int
    device: torch.device
    partial: PartialFolder
    on_block: BlockCallback | None

    def block_names(self, index: int) -> list[str]:
        return block_parameter_names(self.model, self.path, index)

    def report(self, phase: str, index: int) -> None:
        if self.on_block is not None:
            self.on_block(phase, index, self.count)


def _score_pass(run: _Run, graph, by_block: dict, settings: PruneSettings, tokens) -> tuple[dict, dict]:
    """Scores of every eligible group, block after block (resuming after the last saved)."""
    scores, stats = run.partial.load_scores(), {}
    needs_data = get_importance(settings.importance)[1]
    last = max(by_block)
    start = run.partial.state["scored"]
    if start > last:
        return scores, stats
    states = calls = None
    if needs_data:
        states, calls = capture_streamed(run.model, run.path, run.checkpoint, tokens, run.device)
        if start > 0:
            states = run.partial.load_states(run.device)
    blocks = run.model.get_submodule(run.path)
    for index in range(start, last + 1):
        block = blocks[index]
        with materialized(run.model, run.block_names(index), run.checkpoint, run.device), \
                torch.no_grad():
            groups = by_block.get(index, [])
            block_scores: dict = {}
            if groups:
                here = [call[index] for call in calls] if calls else []
                options = {**settings.options, "run_forward": (
                    lambda block=block, states=states, here=here:
                    [run_block(block, s, c) for s, c in zip(states, here, strict=True)])}
                ctx = ScoringContext(run.model, graph, groups, tokens=tokens, options=options,
                                     aggregation=settings.aggregation, seed=settings.seed)
                block_scores = score_groups(ctx, settings.importance)
                for key, value in ctx.stats.items():
                    if isinstance(value, (int, float)):
                        stats[key] = stats.get(key, 0) + value
            if states is not None and index < last:
                states = [run_block(block, s, call[index])
                          for s, call in zip(states, calls, strict=True)]
        scores.update(block_scores)
        run.partial.save_scored(index, block_scores, states)
        run.report("score", index)
    return scores, stats


def check_names(model: nn.Module, checkpoint: LazyCheckpoint) -> None:
    """The checkpoint stores every parameter under one of its names, and nothing else."""
    aliases = parameter_aliases(model)
    missing = [name for name, names in aliases.items()
               if name == names[0] and not any(n in checkpoint.files for n in names)]
    if missing:
        raise ValueError(f"{str(checkpoint.folder)!r} lacks {len(missing)} parameter(s) under the "
                         f"model's names, e.g. {missing[0]!r} (transformers converts some "
                         "layouts, e.g. per-expert MoE weights, while loading); streaming reads "
                         "tensors by the model's own names: prune this model in memory")
    buffers = {name for name, _ in model.named_buffers()}
    unknown = [key for key in checkpoint.keys() if key not in aliases and key not in buffers]
    if unknown:
        raise ValueError(f"{str(checkpoint.folder)!r} holds {len(unknown)} tensor(s) the "
                         f"model does not create, e.g. {unknown[:3]}; prune it in memory")


def _output_layout(run: _Run, drops: dict) -> list[list[tuple[str, torch.dtype, tuple]]]:
    """Shards (outside the blocks first, then one per block) of (key, dtype, pruned shape)."""
    aliases = parameter_aliases(run.model)
    shards: list[list] = [[] for _ in range(run.count + 1)]
    prefix = f"{run.path}."
    for key in run.checkpoint.keys():
        dtype, shape = run.checkpoint.meta[key]
        canonical = aliases[key][0] if key in aliases else key
        shape = list(shape)
        for (name, dim), indices in drops.items():
            if name == canonical:
                shape[dim] -= len(indices)
        index = int(key[len(prefix):].split(".")[0]) + 1 if key.startswith(prefix) else 0
        shards[index].append((key, dtype, tuple(shape)))
    return shards


def _shard_writer(run: _Run, drops: dict, read) -> callable:
    """``produce(key)`` for :func:`write_shard`: ``read(key)`` cut by ``drops``, stored dtype."""
    aliases = parameter_aliases(run.model)

    def produce(key):
        canonical = aliases[key][0] if key in aliases else key
        tensor = read(key, canonical).to(run.checkpoint.meta[key][0])
        dims = {dim: ids for (param, dim), ids in drops.items() if param == canonical}
        return cut(tensor, dims) if dims else tensor

    return produce


def _write_pass(run: _Run, drops: dict) -> None:
    """One shard for everything outside the blocks, then one per block, each cut by ``drops``
    (shards already written are kept), and the index."""
    shards = _output_layout(run, drops)
    produce = _shard_writer(run, drops, lambda key, _name: run.checkpoint.read([key])[key])
    weight_map, total = {}, 0
    for index, entries in enumerate(shards):
        name = shard_name(index, len(shards))
        weight_map.update({key: name for key, _, _ in entries})
        total += sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
                     for _, d, s in entries)
        if index in run.partial.state["written"]:
            continue
        write_shard(run.partial.folder / name, entries, produce)
        run.partial.mark_written(index)
        if index > 0:
            run.report("write", index - 1)
    write_index(run.partial.folder, weight_map, total)


def _sequential_pass(run: _Run, graph, counts: dict, settings: PruneSettings,
                     recon: SequentialSettings, tokens, recon_tokens) -> tuple[dict, dict, dict]:
    """:func:`recovery.prune_block` on each block in turn, each written as soon as it is
    pruned and refit (from its refit weights): the plan, the scores and the stats."""
    start = time.perf_counter()
    by_block = check_sequential_groups(graph, counts)

    def capture(ids):
        return Stream(*capture_streamed(run.model, run.path, run.checkpoint, ids, run.device,
                                        recon.batch_size))

    stream = capture(check_tokens(recon_tokens))
    scoring = None if tokens is None else capture(check_tokens(tokens))
    done = {"plan": {}, "scores": {}, "report": [], "dense": list(stream.states)}
    first = next((i for i in range(run.count) if i + 1 not in run.partial.state["written"]),
                 run.count)
    if first > 0:
        done = run.partial.load_sequential(first - 1)
        stream.states = [s.to(run.device) for s in done["recon"]]
        done["dense"] = [s.to(run.device) for s in done["dense"]]
        if scoring is not None:
            scoring.states = [s.to(run.device) for s in done["scoring"]]
    context = {"aggregation": settings.aggregation, "seed": settings.seed,
               "options": dict(settings.options)}
    for index in range(first, run.count):
        with materialized(run.model, run.block_names(index), run.checkpoint, run.device,
                          writable=True) as params:
            local, block_scores, layers, done["dense"] = prune_block(
                run.model, graph, run.path, index, by_block.get(index, []), counts,
                settings.importance, tokens, stream, done["dense"], scoring, recon, context)
            drops = plan_slices(graph, local)
            entries = _output_layout(run, drops)[index + 1]
            write_shard(run.partial.folder / shard_name(index + 1, run.count + 1), entries,
                        _shard_writer(run, drops, lambda _key, name: params[name].data))
        done["plan"].update(local)
        done["scores"].update(block_scores)
        done["report"].append({"block": index, "layers": layers})
        run.partial.save_sequential(index, {
            **done, "recon": [s.cpu() for s in stream.states],
            "dense": [s.cpu() for s in done["dense"]],
            "scoring": None if scoring is None else [s.cpu() for s in scoring.states]})
        run.report("block", index)
    stats = sequential_stats(recon, recon_tokens, start, done["report"], torch.device(run.device))
    return done["plan"], done["scores"], {k: v for k, v in stats.items() if k != "blocks"}


def _finish(run: _Run, source: Path, tokenizer, extra: dict) -> None:
    import shutil

    model = run.model
    model.config.architectures = [library_class(model).__name__]
    model.config.save_pretrained(run.partial.folder)
    generation = source / "generation_config.json"
    if generation.is_file():
        shutil.copy2(generation, run.partial.folder / generation.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(run.partial.folder)
    write_pruning_files(run.partial.folder, model, extra)


def prune_streamed(source: str | Path, out: str | Path, settings: PruneSettings | None = None, *,
                   tokenizer=None, tokens: torch.Tensor | None = None, device: str = "cpu",
                   dtype: torch.dtype | None = None, overwrite: bool = False,
                   reconstruct: str | SequentialSettings | None = None, recon_samples: int = 32,
                   recon_tokens: torch.Tensor | None = None, extra: dict | None = None,
                   on_block: BlockCallback | None = None) -> StreamResult:
    """Prune the model in folder ``source`` into folder ``out`` block by block (module doc).

    ``settings`` as for :func:`pruning.prune`; ``tokens`` (rows × seq_len ids) replaces
    sampling the calibration text with ``tokenizer``; ``device`` runs each block there, in
    ``dtype`` (default: the checkpoint's; the written weights keep the checkpoint's dtype);
    ``reconstruct`` (``"pre"``, ``"post"``, ``"both"`` or a :class:`SequentialSettings`)
    refits while pruning on ``recon_tokens`` (or ``recon_samples`` calibration windows), as
    :func:`recovery.prune_and_reconstruct`. ``on_block(phase, index, blocks)`` is called after
    each block of the ``"score"`` pass and of the ``"write"`` (or, reconstructing, ``"block"``)
    pass, for progress. ``FileExistsError`` if ``out`` exists and not ``overwrite``.
    """
    start = time.perf_counter()
    settings = settings or PruneSettings()
    check_streamable(settings)
    recon = None if reconstruct is None else sequential_settings(reconstruct)
    source, out = Path(source), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {str(out)!r} exists; pass overwrite=True to replace it")
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ValueError(f"output {str(out)!r} lies in the input model folder {str(source)!r}")
    checkpoint = LazyCheckpoint(source)
    stored = checkpoint.dtype()
    model = skeleton_model(source, dtype or stored)
    check_names(model, checkpoint)
    graph = build_graph(model)
    groups = eligible_groups(graph, settings, model)  # the probe runs on meta as it is
    kept_whole = [g.id for g in groups if not refittable(g)] if recon is not None else []
    groups = [g for g in groups if recon is None or refittable(g)]  # as prune_and_reconstruct
    by_block = _check_groups(groups)
    if get_importance(settings.importance)[1] and tokens is None:
        tokens = calibration_for(model, settings, tokenizer)
    path, blocks = find_blocks(model)
    if recon is not None and recon_tokens is None:
        recon_tokens = calibration_for(model, settings, tokenizer, n_samples=recon_samples)
    partial = PartialFolder(out, run_key(source, checkpoint, settings, tokens, dtype or stored,
                                         (recon, recon_tokens)))
    run = _Run(model, checkpoint, path, len(blocks), torch.device(device), partial, on_block)
    resumed = {"scored": partial.state["scored"], "written": len(partial.state["written"])}
    total = sum(p.numel() for p in model.parameters())
    if settings.importance == "random":  # reads no weight; one draw over all groups, as in memory
        scores, score_stats = score(model, graph, groups, settings)
    else:
        scores, score_stats = _score_pass(run, graph, by_block, settings, tokens)
    plan = select(model, groups, scores, settings)
    if recon is not None:  # which units: re-chosen block by block on refit weights
        counts = {group_id: len(units) for group_id, units in plan.items()}
        score_stats["kept_whole"] = kept_whole
        plan, block_scores, score_stats["reconstruction"] = _sequential_pass(
            run, graph, counts, settings, recon, tokens, recon_tokens)
        scores = {**scores, **block_scores}
    apply_plan(model, plan, graph)  # on meta: shapes, config and the plan record
    _write_pass(run, plan_slices(graph, plan))
    after = sum(p.numel() for p in model.parameters())
    stats = {"criterion": settings.importance, "ratio_requested": settings.ratio,
             "params_before": total, "params_after": after, "ratio_removed": 1 - after / total,
             "kept_widths": kept_widths(graph, plan), "streamed": True, "blocks": len(blocks),
             "resumed": resumed, "compute_dtype": str(dtype or stored), "calibration": None if tokens is None else list(tokens.shape),
             **score_stats, "total_seconds": round(time.perf_counter() - start, 3)}
    model.config.dtype = stored  # the weights are written as stored, whatever ran them
    _finish(run, source, tokenizer, {**{k: v for k, v in stats.items() if k != "kept_widths"},
                                     **(extra or {})})
    partial.complete(out)
    return StreamResult(out, plan, scores, stats)
