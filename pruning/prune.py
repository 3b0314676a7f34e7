"""``prune``: score groups, choose a plan, apply it.

>>> result = prune(model, ratio=0.2, importance="taylor", tokenizer=tok)   # doctest: +SKIP
>>> result.plan                          # {group_id: [removed units]}       # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from depgraph import DependencyGraph, build_graph

from .apply import apply_plan
from .calibration import calibration_tokens
from .importance import ScoringContext, get_importance, score_groups
from .selection import parse_layers, select_plan

__all__ = ["prune", "PruneResult", "KIND_ALIASES", "RECONSTRUCT_MODES", "expand_kinds",
           "kept_widths"]

#: User-facing kind names and the group kinds they stand for.
KIND_ALIASES = {"attention": {"attention_head", "kv_group"}, "heads": {"attention_head", "kv_group"},
                "mlp": {"mlp"}, "hidden": {"hidden"}, "expert": {"expert"}, "experts": {"expert"},
                "attention_head": {"attention_head"}, "kv_group": {"kv_group"}}


@dataclass
class PruneResult:
    """The pruned model, the plan applied, the scores it came from, and numbers."""

    model: nn.Module
    plan: dict[str, list[int]]
    scores: dict[str, np.ndarray] = field(repr=False)
    stats: dict = field(default_factory=dict)


def expand_kinds(kinds) -> set[str]:
    """``"mlp,attention"`` or an iterable of names -> group kinds; ValueError if unknown."""
    names = [k.strip() for k in kinds.split(",")] if isinstance(kinds, str) else list(kinds)
    out: set[str] = set()
    for name in names:
        if name not in KIND_ALIASES:
            raise ValueError(f"unknown group kind {name!r}; expected some of "
                             f"{', '.join(sorted(KIND_ALIASES))}")
        out |= KIND_ALIASES[name]
    return out


def kept_widths(graph: DependencyGraph, plan: dict) -> dict[str, float]:
    """Mean units kept per group of each kind."""
    widths: dict[str, list[int]] = {}
    for group in graph.groups():
        widths.setdefault(group.kind, []).append(group.num_units - len(set(plan.get(group.id, ()))))
    return {kind: float(np.mean(values)) for kind, values in widths.items()}


def prune(model: nn.Module, ratio: float | None = 0.2, importance: str = "taylor", *,
          tokenizer=None, calib: str = "bundled", n_samples: int = 10, seq_len: int = 128,
          tokens: torch.Tensor | None = None, kinds="mlp,attention", layers: str | None = None,
          ranking: str = "global", round_to: int = 1, aggregation: str = "sum",
          kind_ratios: dict[str, float] | None = None, seed: int = 0, options: dict | None = None,
          graph: DependencyGraph | None = None, progress=None, reconstruct=None,
          recon_samples: int = 32, recon_tokens: torch.Tensor | None = None) -> PruneResult:
    """Prune ``model`` in place and return a :class:`PruneResult`.

    Parameters
    ----------
    ratio : fraction of all parameters to remove, in (0, 1) (or ``kind_ratios``).
    importance : a registered criterion (see ``pruning.importance.available_importance``).
    tokenizer, calib, n_samples, seq_len, tokens : calibration data (``tokens`` wins).
    kinds : which group kinds may shrink (``"mlp,attention"``; add ``hidden``, ``experts``).
    layers : blocks that may shrink, as ``"3:-2"`` (LLM-Pruner keeps the first and last).
    ranking : ``global`` (scores normalised per group, ranked together) or ``local``.
    round_to : kept channel widths are multiples of this.
    reconstruct : ``None`` (one shot), or least-squares reconstruction while pruning block by
        block (arXiv 2407.19126): ``"pre"``, ``"post"``, ``"both"`` or a
        :class:`recovery.SequentialSettings`. The selection above fixes how many units each
        group loses; the sequential pass re-scores each block on refit weights and picks
        which (see :mod:`recovery.sequential`).
    recon_samples, recon_tokens : calibration for the reconstruction (``recon_tokens`` wins;
        otherwise ``recon_samples`` windows of ``seq_len`` tokens from ``calib``).
    """
    criterion_fn, needs_data = get_importance(importance)
    del criterion_fn
    if ratio is not None and not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if reconstruct is not None:
        _sequential_settings(reconstruct)  # fail before any work
    start = time.perf_counter()
    graph = graph or build_graph(model)
    group_kinds = expand_kinds(kinds)
    blocks = sorted({g.layer for g in graph.groups() if g.layer is not None})
    layer_range = parse_layers(layers, len(blocks)) if layers else None
    eligible = [g for g in graph.groups() if g.kind in group_kinds
                and (layer_range is None or g.layer is None or g.layer in layer_range)]
    if not eligible:
        raise ValueError(f"no group of kinds {sorted(group_kinds)} in layers {layers!r}")
    if needs_data and tokens is None:
        if tokenizer is None and calib != "self":
            raise ValueError(f"importance {importance!r} needs calibration data: pass a tokenizer")
        tokens = calibration_tokens(tokenizer, calib, n_samples=n_samples, seq_len=seq_len,
                                    seed=seed, model=model)
    context = ScoringContext(model, graph, eligible, tokens=tokens, aggregation=aggregation,
                             seed=seed, options={**(options or {}), "progress": progress})
    scores = score_groups(context, importance)
    scored_at = time.perf_counter()
    total = sum(p.numel() for p in model.parameters())
    plan = select_plan(eligible, scores, ratio=None if kind_ratios else ratio,
                       kind_ratios=kind_ratios, total_params=total, layers=layer_range,
                       kinds=group_kinds, ranking=ranking, round_to=round_to)
    recon_stats = None
    if reconstruct is not None:
        plan, recon_stats, scores = _prune_sequential(
            model, graph, plan, scores, importance, tokens, reconstruct, recon_tokens,
            dict(tokenizer=tokenizer, source=calib, n_samples=recon_samples, seq_len=seq_len,
                 seed=seed), aggregation=aggregation, seed=seed, options=options,
            progress=progress)
    else:
        apply_plan(model, plan, graph)
    after = sum(p.numel() for p in model.parameters())
    stats = {"criterion": importance, "ratio_requested": ratio, "params_before": total,
             "params_after": after, "ratio_removed": 1 - after / total,
             "kept_widths": kept_widths(graph, plan), "score_seconds": round(scored_at - start, 3),
             "total_seconds": round(time.perf_counter() - start, 3),
             "calibration": None if tokens is None else list(tokens.shape), **context.stats}
    if recon_stats is not None:
        stats["reconstruction"] = recon_stats
    return PruneResult(model, plan, scores, stats)


def _prune_sequential(model, graph, plan, scores, importance, tokens, reconstruct, recon_tokens,
                      calib_args: dict, **kwargs):
    """Re-choose the plan's units block by block with reconstruction (recovery.sequential)."""
    from recovery.sequential import prune_sequential

    settings = _sequential_settings(reconstruct)
    if recon_tokens is None:
        if calib_args["tokenizer"] is None and calib_args["source"] != "self":
            raise ValueError("reconstruction needs calibration data: pass a tokenizer or "
                             "recon_tokens")
        recon_tokens = calibration_tokens(model=model, **calib_args)
    counts = {gid: len(set(units)) for gid, units in plan.items()}
    new_plan, info = prune_sequential(model, graph, counts, importance, tokens, recon_tokens,
                                      settings, **kwargs)
    merged = {**scores, **info["scores"]}
    summary = {k: v for k, v in info["stats"].items() if k != "blocks"}  # per-layer detail
    return new_plan, summary, merged


#: ``reconstruct=`` shorthands: which recovery steps the sequential pass runs.
RECONSTRUCT_MODES = {"pre": {"pre": True, "post": False},
                     "post": {"pre": False, "post": True, "targets": "all"},
                     "both": {"pre": True, "post": True, "targets": "level2"}}


def _sequential_settings(reconstruct):
    from recovery.sequential import SequentialSettings

    if isinstance(reconstruct, SequentialSettings):
        return reconstruct
    if reconstruct in RECONSTRUCT_MODES:
        return SequentialSettings(**RECONSTRUCT_MODES[reconstruct])
    raise ValueError(f"reconstruct must be one of {sorted(RECONSTRUCT_MODES)} or a "
                     f"SequentialSettings, got {reconstruct!r}")
