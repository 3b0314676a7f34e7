"""Pruning block by block with reconstruction before and after (arXiv 2407.19126, Alg. 2–4).

    >>> plan, stats = prune_sequential(model, graph, counts, "second_moment", tokens,
    ...                                recon_tokens)                       # doctest: +SKIP

``counts`` says how many units each group loses (from a first, global selection); this
pass decides *which*, block after block, on up-to-date weights and inputs:

1. keep a copy of block ``l`` as it is (the dense target; one block at a time);
2. **pre-pruning recovery** (``pre``): refit the block's linear layers so that, fed the
   partly pruned model's inputs ``X̂``, they reproduce the dense block's layers on ``X``; all
   but those that step 5 refits again (the layers reading the block's pruned channels,
   o_proj and down_proj): their refit here would only be overwritten, and fit once from
   their dense weights (with the damping halved to 2) they come out as good or better
   (SmolLM2-135M, second_moment, 32 windows: 20% with allocation 111.49 against 111.42,
   20% global 123.18 against 124.58, 30% global 256.33 against 261.96), in a fifth less
   time (down_proj's wide inputs are the largest products of the pass);
3. score the block's groups with the chosen criterion on the current model (so the scores
   see the refit weights and ``X̂``) and take the ``counts[g]`` lowest units of each group;
4. mask them: the units' slices are zeroed (:func:`pruning.zero_plan`), which for the
   block-local, zero-equivalent groups this handles equals removing them;
5. **post-pruning recovery** (``post``): refit the layers reading the masked channels on the
   kept ones (``targets="level2"``, the default), or every layer on its kept rows (``"all"``);
   in both refits the layer whose output passes into the block's output (down_proj) is fit
   to the dense block's *output* too (``correction``, :func:`recovery.refit.refit_block`), so
   the error the pruned inputs carry is cancelled here instead of flowing on;
   the post refit's stages that stop inside the block (o_proj's) take the inputs the pre
   refit's runs recorded on their way (:class:`recovery.refit.InputRecord`) once batch 0
   shows them unchanged on the kept columns, instead of running the block again;
6. run both versions of the block to get the next block's ``X`` and ``X̂`` (``X̂`` comes for
   free when the post refit ended with the block's pass-through layer: that stage ran the
   whole block, :func:`recovery.refit.refit_block`'s ``outputs_after``).

Block runs and the least-squares products are in bfloat16 where the device multiplies it
natively (``SequentialSettings.precision``, :mod:`recovery.precision`): SmolLM2-135M at 20%
on one core, 49 s against 89 s, perplexity 124.58 against 124.11 (global ranking) and 111.45
against 110.86 (allocation).

At the end the whole plan is removed physically with :func:`pruning.apply_plan` (the masked
slices are exactly what it removes), so module attributes and the config are solved once.
Peak memory: the model, one block copy, and one block's activations for the calibration set.
Scoring runs the criterion once per block: criteria that only read activations (the
2nd-moment metric, head similarity) on the model cut after that block, Taylor criteria (a
backward pass of the loss per sample) on the whole model.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from depgraph import build_graph
from depgraph.progress import restart
from pruning.apply import apply_plan, plan_slices, zero_plan
from pruning.checks import check_int
from pruning.importance import ScoringContext, needs_loss, score_groups
from pruning.prune import (
    PruneResult,
    PruneSettings,
    allocation_curves,
    calibration_for,
    curves_record,
    eligible_groups,
    needs_tokens,
    pruned_result,
    score,
    select,
    settings_from,
)

from .blocks import BlockCall, batches, capture_calls, find_blocks, truncated
from .precision import check_precision, resolve_precision
from .reconstruct import TARGETS, check_correction, check_damping, check_tokens, summarize
from .refit import InputRecord, Refit, block_outputs, dense_targets, refit_block
from .structure import CallTrace, block_structure, linear_layers

__all__ = ["SequentialSettings", "prune_sequential", "masked_refits", "prune_and_reconstruct",
           "RECONSTRUCT_MODES", "sequential_settings", "prune_block", "Stream",
           "check_sequential_groups", "sequential_stats"]


@dataclass(frozen=True)
class SequentialSettings:
    """What the sequential pass does around each block's pruning."""

    pre: bool = True
    post: bool = True
    targets: str = "level2"  # after a pre refit, the level-1 rows that stay are already fit
    # SmolLM2, second_moment, pre refit without the post refit's layers: 20% allocation
    # 111.49 (4: 109.05), 128 windows 102.49 (4: 103.26, 1: 104.55); 20% global 123.18
    # (4: 123.11); 30% global 256.33 (4: 268.66, 1: 254.43). Before that change 4 was best
    # of 1, 4 and 12 at 20% (0.1: worse than none)
    damping: float = 2.0
    batch_size: int = 8
    correction: float = 1.0  # share of a block's output error its last projection takes up
    precision: str = "auto"  # block runs and XᵀX in bf16 where native (recovery.precision)

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS}, got {self.targets!r}")
        check_damping(self.damping)
        check_correction(self.correction)
        check_int("batch_size", self.batch_size)


def masked_refits(block_path: str, block: nn.Module, drops: dict, targets: str) -> dict[str, Refit]:
    """Refits of a block whose pruned slices are zeroed: pruned rows and columns stay zero."""
    refits = {}
    for name, module in linear_layers(block).items():
        param = f"{block_path}.{name}.weight"
        out_dim = 1 if type(module).__name__ == "Conv1D" else 0
        shape = tuple(module.weight.shape)
        rows = _kept(drops.get((param, out_dim)), shape[out_dim])
        cols = _kept(drops.get((param, 1 - out_dim)), shape[1 - out_dim])
        if cols is None and (targets == "level2" or rows is None):
            continue
        refits[name] = Refit(rows=rows, targets=rows, cols=cols)
    return refits


def _post_layers(groups: list, block_path: str, block: nn.Module,
                 settings: SequentialSettings) -> set[str]:
    """The layers the post-pruning refit of a block losing units of ``groups`` solves: which
    layers read (or write) a group's slices does not depend on which of its units go."""
    if not (groups and settings.post):
        return set()
    # one unit's slices, unvalidated: a plan of one unit may break a group's own constraints
    # (experts' stacked weights keep multiples of 8), and only which layers they touch counts
    slices = {(param, dim): torch.as_tensor(indices, dtype=torch.long)
              for group in groups for param, dim, indices in group.slices([0])}
    return set(masked_refits(block_path, block, slices, settings.targets))


def _kept(drop: torch.Tensor | None, size: int) -> torch.Tensor | None:
    if drop is None or drop.numel() == 0:
        return None
    mask = torch.ones(size, dtype=torch.bool)
    mask[drop] = False
    return torch.arange(size)[mask]


def refittable(group) -> bool:
    """Whether the sequential pass can prune ``group``: it lies in one block and zeroing its
    units equals removing them."""
    return group.layer is not None and group.zero_equivalent


def check_sequential_groups(graph, counts: dict[str, int]) -> dict[int, list]:
    """The groups of ``counts`` by block; ValueError for one the sequential pass cannot prune."""
    by_block: dict[int, list] = {}
    for group_id, count in counts.items():
        group = graph.group(group_id)
        if not refittable(group):
            raise ValueError(f"sequential reconstruction prunes block-local groups whose zeroing "
                             f"equals removal; {group_id!r} ({group.kind}) is not one: prune it "
                             "in one shot and use recovery.reconstruct afterwards")
        if not 0 <= count < group.num_units:
            raise ValueError(f"count {count} for group {group_id!r} is outside "
                             f"[0, {group.num_units})")
        by_block.setdefault(group.layer, []).append(group)
    return by_block


def _same(states: list[torch.Tensor], dense_states: list[torch.Tensor]) -> bool:
    """Whether the pruned path still sees the dense inputs (nothing to recover yet)."""
    return all(torch.equal(a, b) for a, b in zip(states, dense_states, strict=True))


def _lowest(scores: np.ndarray, count: int) -> list[int]:
    return sorted(int(u) for u in np.argsort(np.asarray(scores), kind="stable")[:count])


@dataclass
class Stream:
    """Batches flowing through the blocks: their inputs to the current block, and the call
    (``[batch][block]``) each block received in the model's own forward pass."""

    states: list[torch.Tensor]
    calls: list[list[BlockCall]]

    @classmethod
    def capture(cls, model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor,
                batch_size: int, precision: str = "fp32") -> Stream:
        return cls(*capture_calls(model, blocks, batches(tokens, batch_size),
                                  precision=precision))

    def at(self, index: int) -> list[BlockCall]:
        return [per_batch[index] for per_batch in self.calls]

    def run(self, block: nn.Module, index: int, precision: str = "fp32") -> list[torch.Tensor]:
        return block_outputs(block, self.states, self.at(index), precision)


def _scores(model, graph, groups, criterion: str, tokens, stream: Stream | None, path: str,
            index: int, context: dict) -> dict[str, np.ndarray]:
    """Scores of one block's groups on the current model. Criteria that only read
    activations see the block run on the scoring batches' activations in front of it
    (``run_forward``) and, for anything else they run, the model cut after the block."""
    options = dict(context.get("options") or {})
    if stream is not None:
        options["run_forward"] = lambda: stream.run(model.get_submodule(path)[index], index,
                                                    context.get("precision", "fp32"))
    ctx = ScoringContext(model, graph, groups, tokens=tokens, options=options,
                         aggregation=context.get("aggregation", "sum"),
                         seed=context.get("seed", 0))
    if needs_loss(criterion):
        return score_groups(ctx, criterion)
    with truncated(model, path, index + 1):
        return score_groups(ctx, criterion)


def prune_block(model: nn.Module, graph, path: str, index: int, groups: list,
                counts: dict[str, int], criterion: str, tokens: torch.Tensor | None,
                recon: Stream, dense_states: list[torch.Tensor], scoring: Stream | None,
                settings: SequentialSettings, context: dict):
    """Steps 1-6 of the module doc for block ``index`` (its groups ``groups``): returns its
    plan, its scores, the refits' report and the dense inputs of the next block; the
    ``recon`` and ``scoring`` streams move on past the block."""
    block = model.get_submodule(path)[index]
    dense_block, names = copy.deepcopy(block), list(linear_layers(block))
    precision = resolve_precision(settings.precision, recon.states[0].device)
    trace = CallTrace()  # the dense run shows the block's stages (the copy is wired as it)
    next_dense, targets = dense_targets(dense_block, dense_states, recon.at(index), names,
                                        precision, trace)
    layers, local, block_scores, after = {}, {}, {}, []
    groups = [g for g in groups if counts[g.id] > 0]
    pre = settings.pre and not _same(recon.states, dense_states)
    structure = None  # one for both refits: zeroing units changes weights, not wiring
    if pre or (groups and settings.post):
        structure = block_structure(block, recon.states[0], recon.at(index)[0],
                                    probe=settings.correction > 0,
                                    known=context.setdefault("probes", {}),
                                    precision=precision, trace=trace)
    again = _post_layers(groups, f"{path}.{index}", block, settings)
    record = InputRecord(again) if pre and again else None  # o_proj's, for the post refit
    if pre:
        fitted = refit_block(block, recon.states, recon.at(index),
                             {n: Refit() for n in names if n not in again}, targets,
                             settings.damping, next_dense, settings.correction, structure,
                             precision, inputs=record)
        layers.update({f"pre:{k}": v for k, v in fitted.items()})
    if groups:
        block_scores = _scores(model, graph, groups, criterion, tokens, scoring, path, index,
                               {**context, "precision": precision})
        local = {g.id: _lowest(block_scores[g.id], counts[g.id]) for g in groups}
        zero_plan(model, local, graph)
        if settings.post:
            refits = masked_refits(f"{path}.{index}", block, plan_slices(graph, local),
                                   settings.targets)
            post = refit_block(block, recon.states, recon.at(index), refits, targets,
                               settings.damping, next_dense, settings.correction, structure,
                               precision, outputs_after=after, inputs=record)
            layers.update({f"post:{k}": v for k, v in post.items()})
    recon.states = after or recon.run(block, index, precision)
    if scoring is not None:
        scoring.states = scoring.run(block, index, precision)
    return local, block_scores, layers, next_dense


def prune_sequential(model: nn.Module, graph, counts: dict[str, int], criterion: str,
                     tokens: torch.Tensor | None, recon_tokens: torch.Tensor,
                     settings: SequentialSettings = SequentialSettings(), *,
                     aggregation: str = "sum", seed: int = 0, options: dict | None = None,
                     progress=None) -> tuple[dict[str, list[int]], dict]:
    """Prune ``model`` in place block by block (see the module docs); returns plan and stats."""
    recon_tokens = check_tokens(recon_tokens)
    start = time.perf_counter()
    by_block = check_sequential_groups(graph, counts)
    path, blocks = find_blocks(model)
    precision = resolve_precision(settings.precision, next(model.parameters()).device)
    recon = Stream.capture(model, blocks, recon_tokens, settings.batch_size, precision)
    scoring = None if tokens is None or needs_loss(criterion) else Stream.capture(
        model, blocks, check_tokens(tokens), settings.batch_size, precision)
    dense_states = list(recon.states)
    context = {"aggregation": aggregation, "seed": seed, "options": options}
    plan: dict[str, list[int]] = {}
    scores: dict[str, np.ndarray] = {}
    report = []
    restart(progress, len(blocks), "blocks (score, prune, refit)")
    for index in range(len(blocks)):
        local, block_scores, layers, dense_states = prune_block(
            model, graph, path, index, by_block.get(index, []), counts, criterion, tokens,
            recon, dense_states, scoring, settings, context)
        plan.update(local)
        scores.update(block_scores)
        report.append({"block": index, "layers": layers})
        if progress is not None:
            progress.update(1)
    stats = sequential_stats(settings, recon_tokens, start, report, recon.states[0].device)
    removal = time.perf_counter()
    apply_plan(model, plan, graph)
    stats["apply_seconds"] = round(time.perf_counter() - removal, 3)
    return plan, {"stats": stats, "scores": scores}


def sequential_stats(settings: SequentialSettings, recon_tokens: torch.Tensor, start: float,
                     report: list, device: torch.device) -> dict:
    """The numbers a sequential pass reports (``report``: per block, its refits).
    ``seconds``: the block-by-block pass (scoring, masking, refitting), not the physical
    removal of the plan that follows it (``apply_seconds``, as any prune has)."""
    return {"method": "sequential", "pre": settings.pre, "post": settings.post,
            "targets": settings.targets, "damping": settings.damping,
            "correction": settings.correction, "precision": resolve_precision(settings.precision, device),
            "samples": int(recon_tokens.shape[0]), "seq_len": int(recon_tokens.shape[1]),
            "seconds": round(time.perf_counter() - start, 3), "blocks": report,
            **summarize(report)}


#: ``reconstruct=`` shorthands: which recovery steps the sequential pass runs.
RECONSTRUCT_MODES = {"pre": {"pre": True, "post": False},
                     "post": {"pre": False, "post": True, "targets": "all"},
                     "both": {"pre": True, "post": True, "targets": "level2"}}


def sequential_settings(reconstruct: str | SequentialSettings) -> SequentialSettings:
    """``"pre"``, ``"post"``, ``"both"`` or a :class:`SequentialSettings` as settings."""
    if isinstance(reconstruct, SequentialSettings):
        return reconstruct
    if reconstruct in RECONSTRUCT_MODES:
        return SequentialSettings(**RECONSTRUCT_MODES[reconstruct])
    raise ValueError(f"reconstruct must be one of {sorted(RECONSTRUCT_MODES)} or a "
                     f"SequentialSettings, got {reconstruct!r}")


def prune_and_reconstruct(model: nn.Module, ratio: float | None = None,
                          importance: str | None = None, *, settings: PruneSettings | None = None,
                          reconstruct: str | SequentialSettings = "both", tokenizer=None,
                          tokens: torch.Tensor | None = None, recon_samples: int = 32,
                          recon_tokens: torch.Tensor | None = None, graph=None, progress=None,
                          **options) -> PruneResult:
    """:func:`pruning.prune` with least-squares reconstruction while pruning block by block
    (arXiv 2407.19126): pruning's public steps choose how many units each group loses
    (:func:`pruning.prune.eligible_groups`, :func:`~pruning.prune.score`,
    :func:`~pruning.prune.select`), then :func:`prune_sequential` re-scores each block on
    refit weights and picks which. ``recon_tokens`` (or ``recon_samples`` windows of the
    settings' calibration text) feed the refits. Only groups the pass can refit shrink
    (:func:`refittable`); the others keep every unit and are listed in
    ``stats["kept_whole"]`` (OLMo-2's attention, whose q and k are normalised over all heads
    at once). Returns a :class:`pruning.PruneResult` whose ``stats["reconstruction"]``
    summarises the refits.
    """
    if ratio is not None:
        options["ratio"] = ratio
    if importance is not None:
        options["importance"] = importance
    settings = settings_from(settings, **options)
    recon = sequential_settings(reconstruct)  # fail before any work
    if settings.compensate:
        raise ValueError("compensate=True does not combine with reconstruction: the "
                         "least-squares refit of the layers that read removed channels "
                         "replaces the compensation; use one or the other")
    start = time.perf_counter()
    graph = graph or build_graph(model)
    eligible = eligible_groups(graph, settings, model)
    groups = [g for g in eligible if refittable(g)]
    if not groups:
        raise ValueError(f"none of the {len(eligible)} groups that may shrink can be pruned with "
                         f"sequential reconstruction (e.g. {eligible[0].id!r}: it spans blocks or "
                         "zeroing it is not removing it): prune in one shot and use "
                         "recovery.reconstruct afterwards")
    total = sum(p.numel() for p in model.parameters())
    if needs_tokens(settings) and tokens is None:
        tokens = calibration_for(model, settings, tokenizer)
    scores, stats = score(model, graph, groups, settings, tokens=tokens, progress=progress)
    stats["kept_whole"] = [g.id for g in eligible if not refittable(g)]
    stats["score_seconds"] = round(time.perf_counter() - start, 3)
    curves = None
    if settings.ranking == "allocate":
        curves = allocation_curves(model, groups, scores, settings, tokens)
        stats["allocation"] = curves_record(curves)
    plan = select(model, groups, scores, settings, tokens=tokens, curves=curves)
    counts = {gid: len(set(units)) for gid, units in plan.items()}
    if recon_tokens is None:
        recon_tokens = calibration_for(model, settings, tokenizer, n_samples=recon_samples)
    plan, info = prune_sequential(model, graph, counts, settings.importance, tokens, recon_tokens,
                                  recon, aggregation=settings.aggregation, seed=settings.seed,
                                  options=dict(settings.options), progress=progress)
    stats["reconstruction"] = {k: v for k, v in info["stats"].items() if k != "blocks"}
    return pruned_result(model, graph, plan, {**scores, **info["scores"]}, settings, total,
                         start, stats)
