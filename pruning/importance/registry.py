"""The table of importance criteria, by name; users can register their own.

A criterion is ``fn(ctx: ScoringContext) -> {group_id: scores}`` with one score per unit
(higher = more important). Register it with :func:`register_importance` (a decorator), or
pass the function itself wherever a criterion name goes; ``"package.module:function"``
imports one, and installed packages declare theirs in the entry-point group
``depgraph.importance`` (:data:`ENTRY_POINT_GROUP`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from depgraph import DependencyGraph, Group
from depgraph.progress import restart

from ..selection import RANKINGS
from ..statistics import GroupInput, input_statistics

__all__ = ["ScoringContext", "Importance", "register_importance", "resolve_importance",
           "get_importance", "importance_options", "importance_name", "needs_loss",
           "available_importance", "AGGREGATIONS", "aggregate", "ENTRY_POINT_GROUP"]

AGGREGATIONS = ("sum", "mean", "max", "prod", "last")


@dataclass
class ScoringContext:
    """What a criterion may use: the model, its graph, the groups to score, calibration.

    ``tokens`` are ``(n_samples, seq_len)`` ids (``None`` for data-free runs); ``options``
    the caller's criterion options; ``stats`` a dict the criterion may fill with numbers it
    wants reported. :meth:`run_forward` runs the calibration data through the model (hooks
    see the activations) and :meth:`input_stats` gives the statistics of what feeds each
    group's consumers.
    """

    model: nn.Module
    graph: DependencyGraph
    groups: list[Group]
    tokens: torch.Tensor | None = None  # (n_samples, seq_len) calibration token ids
    aggregation: str = "sum"
    seed: int = 0
    options: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # criteria report peak memory, time ...

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")

    def run_forward(self) -> None:
        """Run the calibration data through the model so that hooks see the activations.

        By default every calibration row goes through the whole model, one at a time. A
        caller that already holds the activations in front of the scored groups (the
        block-by-block pruner) passes ``options["run_forward"]`` to run just that part.
        """
        custom = self.options.get("run_forward")
        if custom is not None:
            custom()
            return
        device = next(self.model.parameters()).device
        bar = self.options.get("progress")  # a tqdm bar (or None), shared by every pass
        restart(bar, self.tokens.shape[0], "calibration forward")
        with torch.no_grad():
            for index in range(self.tokens.shape[0]):
                self.model(input_ids=self.tokens[index:index + 1].to(device), use_cache=False)
                if bar is not None:
                    bar.update(1)


    def input_stats(self, groups: list[Group] | None = None, gram: bool = False
                    ) -> dict[str, list[GroupInput]]:
        """:func:`pruning.statistics.input_statistics` of ``groups`` (default: the groups to
        score) over this context's calibration data, in one pass of :meth:`run_forward`.

        Raises
        ------
        ValueError
            The context has no calibration data.
        """
        if self.tokens is None and "run_forward" not in self.options:
            raise ValueError("input statistics need calibration data (tokens)")
        return input_statistics(self.model, self.groups if groups is None else groups,
                                run=self.run_forward, gram=gram)


Criterion = Callable[[ScoringContext], dict[str, np.ndarray]]

#: Entry-point group of installed plug-ins: ``name = "package.module:function"``.
ENTRY_POINT_GROUP = "depgraph.importance"
_SPEC_ATTRIBUTE = "__depgraph_importance__"


@dataclass(frozen=True)
class Importance:
    """A criterion and what it needs (see :func:`register_importance`)."""

    name: str
    fn: Criterion
    needs_data: bool
    summary: str
    needs_loss: bool = False
    options: tuple[str, ...] = ()
    ranking: str | None = None  # the ranking the criterion's scores are made for


_CRITERIA: dict[str, Importance] = {}


def register_importance(name: str, needs_data: bool, summary: str, needs_loss: bool = False,
                        options: tuple[str, ...] = (), *, ranking: str | None = None,
                        replace: bool = False) -> Callable[[Criterion], Criterion]:
    """A decorator that registers a criterion ``fn(ctx: ScoringContext) -> {group_id: scores}``
    (one score per unit, higher = keep) under ``name``.

    Parameters
    ----------
    name : the name ``prune(importance=...)``, ``PruneSettings`` and ``--importance`` use.
    needs_data : it reads calibration tokens (``ctx.tokens``, ``ctx.run_forward``,
        ``ctx.input_stats``).
    summary : one line for ``available_importance()`` and ``depgraph prune --help``.
    needs_loss : it differentiates the model's loss (so it needs the whole model); criteria
        without it only read activations up to the blocks they score, which lets a
        block-by-block pruner run a truncated model.
    options : the keys of ``ScoringContext.options`` it reads (e.g. ``("tau",)``), so that a
        caller can refuse an option the chosen criterion would ignore.
    ranking : the selection ranking its scores are made for (``"global_raw"`` for scores
        already comparable across groups, ``"local"`` for per-layer ratios); ``PruneSettings``
        uses it when no ranking is given, else ``"global"``.
    replace : replace a criterion already registered under ``name`` (e.g. after reloading
        the module that registers it); without it a second registration is an error.

    Returns
    -------
    The decorator; it returns ``fn`` unchanged apart from a ``__depgraph_importance__``
    attribute, so the function itself can also be passed as ``importance=fn``.

    Raises
    ------
    ValueError
        A name that is empty or holds ``":"`` (reserved for ``"module:function"``), a name
        already registered without ``replace=True``, or an unknown ``ranking``.
    """
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise ValueError(f"importance name must be a non-empty string without ':', got {name!r}")
    if ranking is not None and ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS} or None, got {ranking!r}")

    def decorate(fn: Criterion) -> Criterion:
        if not callable(fn):
            raise ValueError(f"importance {name!r} must be a callable, got {fn!r}")
        if name in _CRITERIA and not replace:
            raise ValueError(f"importance criterion {name!r} is already registered; pass "
                             f"replace=True to replace it")
        spec = Importance(name, fn, bool(needs_data), summary, bool(needs_loss),
                          tuple(options), ranking)
        _CRITERIA[name] = spec
        try:
            setattr(fn, _SPEC_ATTRIBUTE, spec)
        except (AttributeError, TypeError):  # a builtin or a bound method: the name works
            pass
        return fn

    return decorate


def resolve_importance(criterion: str | Criterion | Importance) -> Importance:
    """The :class:`Importance` that ``criterion`` names.

    ``criterion`` is a registered name; ``"package.module:function"`` (imported; a function
    registered by its module's import is used with its registration); a name an installed
    plug-in declares in the entry-point group ``depgraph.importance``; or a callable. A
    callable or an imported function that was never registered is taken to need data and
    the loss (the safe assumptions: calibration tokens are passed, and a block-by-block
    pruner runs the whole model for it).

    Raises
    ------
    ValueError
        An unknown name (listing the known ones), a module or attribute that cannot be
        imported, or something that is not callable.
    """
    if isinstance(criterion, Importance):
        return criterion
    if callable(criterion) and not isinstance(criterion, str):
        return _of_callable(criterion, getattr(criterion, "__qualname__", repr(criterion)))
    if not isinstance(criterion, str):
        raise ValueError(f"importance must be a criterion name or a callable, got {criterion!r}")
    if criterion in _CRITERIA:
        return _CRITERIA[criterion]
    if ":" in criterion:
        return _of_callable(_import(criterion), criterion)
    plugin = _entry_point(criterion)
    if plugin is not None:
        return plugin
    raise ValueError(f"unknown importance criterion {criterion!r}; expected one of "
                     f"{', '.join(sorted(set(_CRITERIA) | set(_entry_point_names())))} or "
                     f"'package.module:function'")


def _of_callable(fn: object, name: str) -> Importance:
    if not callable(fn):
        raise ValueError(f"importance {name!r} is not callable (got {type(fn).__name__})")
    spec = getattr(fn, _SPEC_ATTRIBUTE, None)
    if isinstance(spec, Importance):
        return spec
    doc = (getattr(fn, "__doc__", None) or "").strip().splitlines()
    return Importance(name, fn, needs_data=True, summary=doc[0] if doc else "", needs_loss=True)


def _import(target: str) -> object:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"importance {target!r}: expected 'package.module:function'")
    try:
        found: object = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure, said in one line
        raise ValueError(f"importance {target!r}: cannot import {module_name!r} "
                         f"({type(error).__name__}: {error})") from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ValueError(f"importance {target!r}: {module_name!r} has no attribute "
                             f"{attribute!r}")
        found = getattr(found, part)
    return found


def _entry_points() -> list:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _entry_point_names() -> list[str]:
    return [point.name for point in _entry_points()]


def _entry_point(name: str) -> Importance | None:
    """Load the installed plug-in ``name`` and register it under that name."""
    for point in _entry_points():
        if point.name != name:
            continue
        try:
            fn = point.load()
        except Exception as error:  # noqa: BLE001 - a broken plug-in, said in one line
            raise ValueError(f"importance {name!r}: cannot load entry point {point.value!r} "
                             f"({type(error).__name__}: {error})") from None
        base = _of_callable(fn, point.value)
        spec = Importance(name, base.fn, base.needs_data, base.summary or point.value,
                          base.needs_loss, base.options, base.ranking)
        _CRITERIA.setdefault(name, spec)
        return _CRITERIA[name]
    return None


def get_importance(criterion: str | Criterion) -> tuple[Criterion, bool]:
    """The criterion and whether it needs data (:func:`resolve_importance`); ``ValueError``
    listing the valid names."""
    spec = resolve_importance(criterion)
    return spec.fn, spec.needs_data


def needs_loss(criterion: str | Criterion) -> bool:
    """Whether ``criterion`` differentiates the whole model's loss."""
    return resolve_importance(criterion).needs_loss


def importance_options(criterion: str | Criterion) -> tuple[str, ...]:
    """The options ``criterion`` reads (see :func:`register_importance`)."""
    return resolve_importance(criterion).options


def importance_name(criterion: str | Criterion) -> str:
    """The name ``criterion`` is known by (for reports and saved records)."""
    return resolve_importance(criterion).name


def available_importance() -> dict[str, str]:
    """``{name: one-line summary}`` of every registered criterion and of every installed
    plug-in (entry-point group ``depgraph.importance``; those are not imported here)."""
    found = {name: spec.summary for name, spec in _CRITERIA.items()}
    for point in _entry_points():
        found.setdefault(point.name, f"installed plug-in ({point.value})")
    return dict(sorted(found.items()))


def aggregate(per_member: list[np.ndarray], how: str) -> np.ndarray:
    """Combine per-member unit scores into one score per unit."""
    stacked = np.stack(per_member)
    if how == "sum":
        return stacked.sum(0)
    if how == "mean":
        return stacked.mean(0)
    if how == "max":
        return stacked.max(0)
    if how == "prod":
        return np.prod(stacked, axis=0)
    return stacked[-1]
