"""The table of importance criteria, by name; users can register their own.

A criterion is ``fn(ctx: ScoringContext) -> {group_id: scores}`` with one score per unit
(higher = more important). Register with :func:`register_importance`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from depgraph import DependencyGraph, Group
from depgraph.progress import restart

__all__ = ["ScoringContext", "register_importance", "get_importance", "importance_options",
           "needs_loss", "available_importance", "AGGREGATIONS", "aggregate"]

AGGREGATIONS = ("sum", "mean", "max", "prod", "last")


@dataclass
class ScoringContext:
    """What a criterion may use: the model, its graph, the groups to score, calibration."""

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


Criterion = Callable[[ScoringContext], dict[str, np.ndarray]]
_CRITERIA: dict[str, tuple[Criterion, bool, str, bool]] = {}
_OPTIONS: dict[str, tuple[str, ...]] = {}


def register_importance(name: str, needs_data: bool, summary: str, needs_loss: bool = False,
                        options: tuple[str, ...] = ()) -> Callable[[Criterion], Criterion]:
    """Register a criterion under ``name``.

    ``needs_data``: it needs calibration tokens. ``needs_loss``: it differentiates the
    model's loss (so it needs the whole model); criteria without it only read activations
    up to the blocks they score, which lets a block-by-block pruner run a truncated model.
    ``options``: the keys of ``ScoringContext.options`` it reads (e.g. ``("tau",)``), so that
    a caller can refuse an option the chosen criterion would ignore.
    """

    def decorate(fn: Criterion) -> Criterion:
        if name in _CRITERIA:
            raise ValueError(f"importance criterion {name!r} is already registered")
        _CRITERIA[name] = (fn, needs_data, summary, needs_loss)
        _OPTIONS[name] = tuple(options)
        return fn

    return decorate


def _entry(name: str) -> tuple[Criterion, bool, str, bool]:
    if name not in _CRITERIA:
        raise ValueError(f"unknown importance criterion {name!r}; expected one of "
                         f"{', '.join(sorted(_CRITERIA))}")
    return _CRITERIA[name]


def get_importance(name: str) -> tuple[Criterion, bool]:
    """The criterion and whether it needs data; ``ValueError`` listing the valid names."""
    fn, needs_data, _, _ = _entry(name)
    return fn, needs_data


def needs_loss(name: str) -> bool:
    """Whether criterion ``name`` differentiates the whole model's loss."""
    return _entry(name)[3]


def importance_options(name: str) -> tuple[str, ...]:
    """The options criterion ``name`` reads (see :func:`register_importance`)."""
    _entry(name)
    return _OPTIONS[name]


def available_importance() -> dict[str, str]:
    """``{name: one-line summary}`` of every registered criterion."""
    return {name: entry[2] for name, entry in sorted(_CRITERIA.items())}


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
