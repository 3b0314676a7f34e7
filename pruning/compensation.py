"""Bias compensation: what removed channels contributed on average, added back as a bias.

A layer ``y = W x + b`` that reads a group's channels loses, when channels ``P`` go,
``W[:, P] x[P]``. Its average over calibration tokens, ``W[:, P] · E[x[P]]``, is a constant
the layer can keep adding: FLAP's *baseline bias compensation* (arXiv 2312.11983, §3.3).
What remains is only the fluctuation of the removed inputs around their mean, which is
what FLAP's criterion scores.

>>> stats = input_statistics(model, [graph.group(g) for g in plan], tokens)   # doctest: +SKIP
>>> biases = compensation_biases(model, plan, stats, graph)                  # doctest: +SKIP
>>> apply_plan(model, plan, graph, biases=biases)                            # doctest: +SKIP

:func:`compensation_biases` computes the bias changes from the dense weights (before the
plan is applied); :func:`pruning.apply_plan` adds them after slicing, creating a bias
parameter where the layer had none and recording the added tensor in the config, so
that both ``save_pretrained`` and :func:`pruning.save_pruned` keep it and
:func:`pruning.load_pruned` restores it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from depgraph import DependencyGraph, PlanError

from .statistics import GroupInput

__all__ = ["compensation_biases", "takes_bias", "output_dim"]


def takes_bias(module: nn.Module) -> bool:
    """Whether ``module``'s forward adds ``module.bias`` to its output (``nn.Linear`` and
    its subclasses, GPT-2's ``Conv1D``): a bias registered there is used and saved."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def output_dim(module: nn.Module) -> int:
    """The weight dim of ``module``'s output channels: 0 (``nn.Linear``) or 1 (``Conv1D``,
    which stores its weight as (in, out))."""
    return 1 if type(module).__name__ == "Conv1D" else 0


def compensation_biases(model: nn.Module, plan: Mapping[str, Sequence[int]],
                        stats: Mapping[str, Sequence[GroupInput]],
                        graph: DependencyGraph | None = None) -> dict[str, torch.Tensor]:
    """Bias changes that compensate ``plan``: for each consumer of each pruned group,
    ``W[:, P] @ mean[P]`` over the positions ``P`` of the removed units.

    Parameters
    ----------
    model : the model *before* the plan is applied (its weights are only read).
    plan : ``{group_id: [units to remove]}``.
    stats : :func:`pruning.input_statistics` of (at least) the plan's groups.
    graph : the graph of ``model``; only used to check the plan's group ids and units.

    Returns
    -------
    dict
        ``{module path: float64 change of its bias over its current outputs}``, summed when
        a layer reads several pruned groups; layers whose bias would not be read
        (:func:`takes_bias`) are left out. Pass it to ``apply_plan(..., biases=...)``.

    Raises
    ------
    PlanError
        A plan group missing from ``graph``, or a unit out of range.
    ValueError
        Statistics with non-finite means.
    """
    if graph is not None:
        for group_id, units in plan.items():
            try:
                graph.group(group_id).slices(units)  # checks the units' range
            except KeyError:
                raise PlanError(f"unknown group {group_id!r} in plan (expected one of the "
                                f"{len(graph.groups())} ids of graph.groups())") from None
    biases: dict[str, torch.Tensor] = {}
    for group_id, units in plan.items():
        removed = np.asarray(sorted({int(u) for u in units}), dtype=np.int64)
        for feed in stats.get(group_id, ()):
            module = model.get_submodule(feed.module)
            positions = np.nonzero(np.isin(feed.units, removed))[0]
            if not takes_bias(module) or positions.size == 0:
                continue
            mean = feed.stats.mean.double()
            if not torch.isfinite(mean).all():
                raise ValueError(f"input statistics of {feed.module!r} are not finite")
            index = torch.from_numpy(positions)
            columns = module.weight.detach().double().cpu().index_select(feed.member.dim, index)
            if feed.member.dim == 0:  # stored (in, out)
                columns = columns.T
            delta = columns @ mean[index]
            biases[feed.module] = biases.get(feed.module, 0) + delta
    return biases
