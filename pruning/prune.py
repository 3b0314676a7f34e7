"""``prune``: score groups, choose a plan, apply it — three public steps and their composition.

>>> result = prune(model, ratio=0.2, importance="taylor", tokenizer=tok)   # doctest: +SKIP
>>> result.plan                          # {group_id: [removed units]}       # doctest: +SKIP

The same with the steps one by one (what a plug-in or another pruner calls):

>>> settings = PruneSettings(ratio=0.2, importance="taylor")               # doctest: +SKIP
>>> graph = build_graph(model)                                             # doctest: +SKIP
>>> groups = eligible_groups(graph, settings)                              # doctest: +SKIP
>>> scores, stats = score(model, graph, groups, settings, tokenizer=tok)   # doctest: +SKIP
>>> plan = select(model, groups, scores, settings)                         # doctest: +SKIP
>>> apply_plan(model, plan, graph)                                         # doctest: +SKIP

Pruning block by block with least-squares reconstruction composes these steps too; it lives
in :func:`recovery.prune_and_reconstruct`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch import nn

from depgraph import DependencyGraph, Group, Kind, build_graph

from .allocation import FRACTIONS, SAMPLES, allocate_plan, sensitivity_curves
from .apply import apply_plan, plan_slices
from .calibration import calibration_tokens
from .checks import check_int
from .compensation import compensation_biases
from .importance import ScoringContext, importance_name, resolve_importance, score_groups
from .probe import exclude_unprunable
from .selection import RANKINGS, parse_layers, select_plan
from .statistics import input_statistics

__all__ = ["prune", "PruneResult", "PruneSettings", "KIND_ALIASES", "expand_kinds",
           "kept_widths", "eligible_groups", "score", "select", "calibration_for",
           "settings_from", "pruned_result", "compensation_for", "apply_given_plan",
           "allocation_curves", "needs_tokens", "curves_record"]

#: User-facing kind names and the group kinds they stand for.
KIND_ALIASES = {"attention": {Kind.ATTENTION_HEAD, Kind.KV_GROUP},
                "heads": {Kind.ATTENTION_HEAD, Kind.KV_GROUP}, "mlp": {Kind.MLP},
                "hidden": {Kind.HIDDEN}, "expert": {Kind.EXPERT}, "experts": {Kind.EXPERT},
                "attention_head": {Kind.ATTENTION_HEAD}, "kv_group": {Kind.KV_GROUP},
                "query_head": {Kind.QUERY_HEAD}, "query_heads": {Kind.QUERY_HEAD}}


def expand_kinds(kinds) -> frozenset[Kind]:
    """``"mlp,attention"`` or an iterable of names -> group kinds; ValueError if unknown."""
    names = [k.strip() for k in kinds.split(",")] if isinstance(kinds, str) else list(kinds)
    out: set[Kind] = set()
    for name in names:
        key = name.value if isinstance(name, Kind) else name
        if key not in KIND_ALIASES:
            raise ValueError(f"unknown group kind {name!r}; expected some of "
                             f"{', '.join(sorted(KIND_ALIASES))}")
        out |= KIND_ALIASES[key]
    return frozenset(out)


@dataclass(frozen=True)
class PruneSettings:
    """How :func:`prune` chooses what goes; every value is checked here, before any work.

    ratio : fraction of all parameters to remove, in (0, 1); ``None`` with ``kind_ratios``.
    importance : a registered criterion (``pruning.available_importance()``), a
        ``"package.module:function"`` or a callable (``pruning.importance.resolve_importance``).
    calib, n_samples, seq_len : calibration data when the criterion needs some.
    kinds : which group kinds may shrink (``"mlp,attention"``; add ``hidden``, ``experts``).
    layers : blocks that may shrink, as ``"3:-2"`` (LLM-Pruner keeps the first and last).
    ranking : ``global`` (scores normalised per group, ranked together), ``global_raw``,
        ``local`` (see :mod:`pruning.selection`) or ``allocate`` (counts measured on the
        model's outputs, :mod:`pruning.allocation`; ``options`` may set
        ``allocation_fractions`` and ``allocation_samples``); ``None``: the ranking the
        criterion was registered with (``flap``: ``global_raw``, ``wanda_sp``: ``local``),
        else ``global``.
    round_to : kept channel widths are multiples of this.
    aggregation : how a group's per-parameter scores combine (``sum``, ``max`` ...).
    kind_ratios : ``{kind: fraction of each group's units}`` instead of ``ratio``.
    seed : calibration sampling and any randomness of the criterion.
    options : criterion options (``{"tau": 0.3}``).
    compensate : add to each layer that reads removed channels the bias those channels
        contributed on average (their mean input over the calibration tokens times their
        weight columns; FLAP's baseline bias compensation, :mod:`pruning.compensation`).
    """

    ratio: float | None = 0.2
    importance: str | Callable = "taylor"
    calib: str = "bundled"
    n_samples: int = 10
    seq_len: int = 128
    kinds: frozenset[Kind] | str = "mlp,attention"
    layers: str | None = None
    ranking: str | None = None
    round_to: int = 1
    aggregation: str = "sum"
    kind_ratios: Mapping[str, float] | None = None
    seed: int = 0
    options: Mapping = field(default_factory=dict)
    compensate: bool = False
    #: whether ``ranking`` was taken from the criterion (so a new criterion brings its own)
    ranking_from_criterion: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "kinds", expand_kinds(self.kinds))
        if self.kind_ratios is None and (self.ratio is None or isinstance(self.ratio, bool)
                                         or not 0 < self.ratio < 1):
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio!r}")
        spec = resolve_importance(self.importance)  # unknown: ValueError naming the known ones
        if self.ranking is None:
            object.__setattr__(self, "ranking", spec.ranking or "global")
            object.__setattr__(self, "ranking_from_criterion", True)
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if not isinstance(self.compensate, bool):
            raise ValueError(f"compensate must be True or False, got {self.compensate!r}")
        for name in ("n_samples", "seq_len", "round_to"):
            check_int(name, getattr(self, name))


@dataclass
class PruneResult:
    """The pruned model, the plan applied, the scores it came from, and numbers."""

    model: nn.Module
    plan: dict[str, list[int]]
    scores: dict[str, np.ndarray] = field(repr=False)
    stats: dict = field(default_factory=dict)


def kept_widths(graph: DependencyGraph, plan: dict) -> dict[str, float]:
    """Mean units kept per group of each kind."""
    widths: dict[str, list[int]] = {}
    for group in graph.groups():
        widths.setdefault(str(group.kind), []).append(group.num_units - len(set(plan.get(group.id, ()))))
    return {kind: float(np.mean(values)) for kind, values in widths.items()}


# ------------------------------------------------------------------------ the steps
def eligible_groups(graph: DependencyGraph, settings: PruneSettings,
                    model: nn.Module | None = None) -> list[Group]:
    """The groups ``settings`` lets shrink (kinds and blocks); ValueError if none. With
    ``model``, groups whose removal its code cannot follow are first excluded from ``graph``
    (:func:`pruning.probe.exclude_unprunable`, once per graph)."""
    if model is not None:
        exclude_unprunable(model, graph)
    blocks = sorted({g.layer for g in graph.groups() if g.layer is not None})
    layer_range = parse_layers(settings.layers, len(blocks)) if settings.layers else None
    eligible = [g for g in graph.groups() if g.kind in settings.kinds
                and (layer_range is None or g.layer is None or g.layer in layer_range)]
    if not eligible:
        raise ValueError(f"no group of kinds {sorted(settings.kinds)} in layers {settings.layers!r}")
    return eligible


def calibration_for(model: nn.Module, settings: PruneSettings, tokenizer=None,
                    n_samples: int | None = None) -> torch.Tensor:
    """Calibration windows as ``settings`` asks (``n_samples`` overrides its count)."""
    if tokenizer is None and settings.calib != "self":
        spec = resolve_importance(settings.importance)
        what = (f"importance {spec.name!r}" if spec.needs_data
                else f"ranking {settings.ranking!r}" if settings.ranking == "allocate"
                else "compensation")
        raise ValueError(f"{what} needs calibration data: pass a tokenizer (or tokens)")
    return calibration_tokens(tokenizer, settings.calib, n_samples=n_samples or settings.n_samples,
                              seq_len=settings.seq_len, seed=settings.seed, model=model)


def score(model: nn.Module, graph: DependencyGraph, groups: list[Group], settings: PruneSettings,
          *, tokenizer=None, tokens: torch.Tensor | None = None, progress=None
          ) -> tuple[dict[str, np.ndarray], dict]:
    """Per-unit importance of every group in ``groups`` (higher = keep), and the scoring's
    own numbers (``calibration`` shape, criterion statistics)."""
    if resolve_importance(settings.importance).needs_data and tokens is None:
        tokens = calibration_for(model, settings, tokenizer)
    context = ScoringContext(model, graph, groups, tokens=tokens, aggregation=settings.aggregation,
                             seed=settings.seed, options={**settings.options, "progress": progress})
    scores = score_groups(context, settings.importance)
    stats = {"calibration": None if tokens is None else list(tokens.shape), **context.stats}
    return scores, stats


def needs_tokens(settings: PruneSettings) -> bool:
    """Whether scoring or selecting reads calibration windows."""
    return resolve_importance(settings.importance).needs_data or settings.ranking == "allocate"


def allocation_curves(model: nn.Module, groups: list[Group], scores: Mapping[str, np.ndarray],
                      settings: PruneSettings, tokens: torch.Tensor, progress=None) -> dict:
    """The measured damage curves ``ranking="allocate"`` spends the budget by
    (:func:`pruning.allocation.sensitivity_curves` on the first ``allocation_samples``
    windows)."""
    if tokens is None:
        raise ValueError("ranking 'allocate' measures the model on calibration windows: pass "
                         "tokens (or a tokenizer to prune)")
    samples = int(settings.options.get("allocation_samples", SAMPLES))
    fractions = tuple(settings.options.get("allocation_fractions", FRACTIONS))
    return sensitivity_curves(model, groups, scores, tokens[:samples], fractions=fractions,
                              round_to=settings.round_to, progress=progress)


def select(model: nn.Module, groups: list[Group], scores: Mapping[str, np.ndarray],
           settings: PruneSettings, *, tokens: torch.Tensor | None = None,
           curves: Mapping | None = None) -> dict[str, list[int]]:
    """The plan ``{group_id: [units]}`` that ``settings`` asks for (:func:`select_plan`) over
    ``groups`` (already limited to its kinds and blocks by :func:`eligible_groups`).
    ``ranking="allocate"`` measures ``curves`` on ``tokens`` unless they are given."""
    total = sum(p.numel() for p in model.parameters())
    if settings.ranking == "allocate":
        if settings.kind_ratios:
            raise ValueError("ranking 'allocate' chooses the share of every group itself; it "
                             "takes a ratio, not kind_ratios")
        curves = curves or allocation_curves(model, groups, scores, settings, tokens)
        return allocate_plan(groups, scores, curves, ratio=settings.ratio, total_params=total,
                             round_to=settings.round_to)
    return select_plan(groups, scores, ratio=None if settings.kind_ratios else settings.ratio,
                       kind_ratios=settings.kind_ratios, total_params=total, layers=None,
                       kinds=settings.kinds, ranking=settings.ranking, round_to=settings.round_to)


def curves_record(curves: Mapping) -> dict[str, dict[str, list]]:
    """Measured allocation curves as JSON-ready lists (``stats["allocation"]``)."""
    return {gid: {"removed": [int(c) for c in counts], "kl": [float(v) for v in kl]}
            for gid, (counts, kl) in curves.items()}


def settings_from(settings: PruneSettings | None, **overrides) -> PruneSettings:
    """``settings`` (or the defaults) with ``overrides``; unknown names are a ValueError."""
    known = {f.name for f in fields(PruneSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        hint = ("; reconstruction while pruning is recovery.prune_and_reconstruct"
                if "reconstruct" in unknown else "")
        raise ValueError(f"unknown prune settings {unknown}; expected some of {sorted(known)}{hint}")
    given = {k: v for k, v in overrides.items() if v is not None or k in ("ratio", "layers")}
    if settings is None:
        return PruneSettings(**given)
    if settings.ranking_from_criterion and "ranking" not in given:
        given["ranking"] = None  # a new criterion brings its own ranking
    return replace(settings, **given)


# ------------------------------------------------------------------------ composed
def prune(model: nn.Module, ratio: float | None = None, importance: str | None = None, *,
          settings: PruneSettings | None = None, tokenizer=None, tokens: torch.Tensor | None = None,
          graph: DependencyGraph | None = None, progress=None, **options) -> PruneResult:
    """Prune ``model`` in place and return a :class:`PruneResult`: the composition of
    :func:`eligible_groups`, :func:`score`, :func:`select` and :func:`pruning.apply_plan`.

    ``settings`` (a :class:`PruneSettings`) says what to remove; ``ratio``, ``importance``
    and any other :class:`PruneSettings` field given as a keyword override it
    (``prune(model, ratio=0.2, importance="taylor", tokenizer=tok)``). ``tokens`` (samples ×
    seq_len ids) replaces sampling calibration text with ``tokenizer``.
    """
    if ratio is not None:
        options["ratio"] = ratio
    if importance is not None:
        options["importance"] = importance
    settings = settings_from(settings, **options)
    start = time.perf_counter()
    graph = graph or build_graph(model)
    groups = eligible_groups(graph, settings, model)
    total = sum(p.numel() for p in model.parameters())
    if tokens is None and needs_tokens(settings):
        tokens = calibration_for(model, settings, tokenizer)
    scores, score_stats = score(model, graph, groups, settings, tokenizer=tokenizer,
                                tokens=tokens, progress=progress)
    score_stats["score_seconds"] = round(time.perf_counter() - start, 3)
    curves = None
    if settings.ranking == "allocate":
        measured = time.perf_counter()
        curves = allocation_curves(model, groups, scores, settings, tokens)
        score_stats["allocation"] = curves_record(curves)
        score_stats["allocation_estimated"] = [g.id for g in groups if not g.zero_equivalent]
        score_stats["allocation_seconds"] = round(time.perf_counter() - measured, 3)
    plan = select(model, groups, scores, settings, tokens=tokens, curves=curves)
    biases = None
    if settings.compensate:
        if tokens is None:
            tokens = calibration_for(model, settings, tokenizer)
        biases, score_stats["compensation"] = compensation_for(model, graph, plan, tokens)
    apply_plan(model, plan, graph, biases=biases)
    return pruned_result(model, graph, plan, scores, settings, total, start, score_stats)


def compensation_for(model: nn.Module, graph: DependencyGraph, plan: dict,
                     tokens: torch.Tensor) -> tuple[dict, dict]:
    """The biases that compensate ``plan`` (:func:`pruning.compensation_biases`) from the
    inputs of its groups' consumers over ``tokens``, measured on ``model`` before the plan
    is applied; and numbers to report (layers compensated, tokens, groups without a layer
    that reads them as a plain projection)."""
    pruned = [graph.group(group_id) for group_id in plan]
    stats = input_statistics(model, pruned, tokens)
    biases = compensation_biases(model, plan, stats, graph)
    return biases, {"modules": len(biases), "tokens": int(tokens.numel()),
                    "groups_without_consumer": sorted(g.id for g in pruned if not stats[g.id])}


def apply_given_plan(model: nn.Module, plan: dict, graph: DependencyGraph | None = None, *,
                     tokens: torch.Tensor | None = None) -> PruneResult:
    """:func:`pruning.apply_plan` of a plan made elsewhere, with :func:`prune`'s result:
    compensated (:func:`compensation_for`) when calibration ``tokens`` are given.

    Raises
    ------
    PlanError
        What :func:`pruning.apply_plan` refuses (the model is then left as it was).
    """
    start = time.perf_counter()
    graph = graph or build_graph(model)
    total = sum(p.numel() for p in model.parameters())
    stats: dict = {}
    biases = None
    if tokens is not None:
        plan_slices(graph, plan)  # refuse a bad plan before the calibration pass
        biases, stats["compensation"] = compensation_for(model, graph, plan, tokens)
    apply_plan(model, plan, graph, biases=biases)
    return pruned_result(model, graph, plan, {}, None, total, start, stats)


def pruned_result(model: nn.Module, graph: DependencyGraph, plan: dict, scores: dict,
                  settings: PruneSettings | None, params_before: int, start: float, stats: dict
                  ) -> PruneResult:
    """The :class:`PruneResult` of a finished pruning run (``start``: its perf_counter;
    ``settings`` ``None`` for a plan made elsewhere)."""
    after = sum(p.numel() for p in model.parameters())
    chosen = ({"criterion": importance_name(settings.importance),
               "ratio_requested": settings.ratio, "ranking": settings.ranking,
               "compensate": settings.compensate} if settings is not None else
              {"criterion": "given plan", "ratio_requested": None,
               "compensate": "compensation" in stats})
    summary = {**chosen,
               "params_before": params_before, "params_after": after,
               "ratio_removed": 1 - after / params_before, "kept_widths": kept_widths(graph, plan),
               "total_seconds": round(time.perf_counter() - start, 3), **stats}
    return PruneResult(model, plan, scores, summary)
