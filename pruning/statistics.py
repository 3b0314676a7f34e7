"""What feeds a group: statistics of the inputs its consumers read, in one streamed pass.

A group's *consumers* are the projections that read its channels (members with
:attr:`depgraph.Role.CONSUMER`: ``down_proj`` for an MLP group, ``o_proj`` for attention
heads, every projection after a norm for the hidden stream). Their input is exactly the
group's channels, so the statistics of that input, position by position along the
consumer's dim, are what activation-aware criteria (Wanda, FLAP) and bias compensation
need:

>>> stats = input_statistics(model, groups, tokens)                     # doctest: +SKIP
>>> for feed in stats["model.layers.3.mlp"]:                            # doctest: +SKIP
...     feed.module, feed.stats.mean.shape, feed.stats.variance.shape   # doctest: +SKIP
('model.layers.3.mlp.down_proj', torch.Size([1536]), torch.Size([1536]))

Every statistic is accumulated in float64 over all calibration tokens (every position of
every row) by forward pre-hooks during one pass, so memory holds the sums only: two vectors
per consumer, plus ``in × in`` per consumer with ``gram=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from depgraph import Group, Member, Role

__all__ = ["InputStats", "GroupInput", "consumers", "input_statistics",
           "module_input_statistics"]


@dataclass
class InputStats:
    """Statistics of one module's input over calibration tokens (float64, on the CPU).

    ``count`` tokens; ``mean`` and ``second_moment`` (``E[x²]``) per input channel;
    ``gram`` (``E[x xᵀ]``, in × in) when asked for; ``variance`` = ``E[x²] − E[x]²``.
    """

    module: str
    count: int
    mean: torch.Tensor
    second_moment: torch.Tensor
    gram: torch.Tensor | None = None

    @property
    def variance(self) -> torch.Tensor:
        """Per-channel variance over tokens (the population variance, never negative)."""
        return (self.second_moment - self.mean * self.mean).clamp_min(0)


@dataclass
class GroupInput:
    """One consumer of a group and what it reads: ``member`` (the consumer's weight and the
    dim along which it reads the group's channels), ``module`` (its path), ``stats`` (of the
    module's whole input; position ``i`` of ``stats.mean`` is position ``i`` along
    ``member.dim``) and ``units`` (the group's unit of every position, ``-1``: none)."""

    member: Member
    module: str
    stats: InputStats
    units: np.ndarray


def consumers(model: nn.Module, group: Group) -> list[tuple[Member, str]]:
    """``(member, module path)`` of every consumer of ``group`` whose input is the group's
    channel space: a module that holds the member's parameter as its 2-D ``weight`` and
    reads it along ``member.dim`` (``nn.Linear``, GPT-2's ``Conv1D`` and their kin; a stacked
    expert weight, read inside a larger module, is not one)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    found = []
    for member in group.members_with(Role.CONSUMER):
        for path in member.modules(Role.CONSUMER):
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            weight = getattr(module, "weight", None)
            if (isinstance(weight, torch.Tensor) and weight.dim() == 2
                    and weight is params.get(member.param) and (member, path) not in found):
                found.append((member, path))
    return found


def _run_tokens(model: nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        device = next(model.parameters()).device
        with torch.no_grad():
            for row in range(tokens.shape[0]):
                model(input_ids=tokens[row:row + 1].to(device), use_cache=False)
    return run


def module_input_statistics(model: nn.Module, modules: Iterable[str], run: Callable[[], None],
                            gram: bool = False) -> dict[str, InputStats]:
    """:class:`InputStats` of the first input of each module in ``modules`` while ``run()``
    feeds the model (one pass; hooks removed afterwards, also on error).

    Raises
    ------
    ValueError
        A path that names no module of ``model``, or a module ``run`` never called.
    """
    sums: dict[str, list] = {}
    handles = []

    def hook(path: str):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            entry = sums.setdefault(path, [0, 0.0, 0.0, 0.0])
            entry[0] += x.shape[0]
            entry[1] = entry[1] + x.sum(0)
            entry[2] = entry[2] + (x * x).sum(0)
            if gram:
                entry[3] = entry[3] + x.T @ x
        return record

    paths = list(dict.fromkeys(modules))
    try:
        for path in paths:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"no module {path!r} in the model") from None
            handles.append(module.register_forward_pre_hook(hook(path)))
        run()
    finally:
        for handle in handles:
            handle.remove()
    missing = [p for p in paths if p not in sums]
    if missing:
        raise ValueError(f"the calibration pass never called module(s) {missing[:3]}")
    return {path: InputStats(path, int(count), (total / count).cpu(), (squares / count).cpu(),
                             (outer / count).cpu() if gram else None)
            for path, (count, total, squares, outer) in sums.items()}


def input_statistics(model: nn.Module, groups: Sequence[Group],
                     tokens: torch.Tensor | None = None, *, run: Callable[[], None] | None = None,
                     gram: bool = False) -> dict[str, list[GroupInput]]:
    """Statistics of what feeds each group's consumers, in one pass over calibration data.

    Parameters
    ----------
    model : the model the groups were built from (its weights are only read).
    groups : groups of ``build_graph(model)``.
    tokens : ``(samples, seq_len)`` calibration token ids, run one row at a time; or
    run : a callable that runs the calibration data through ``model`` (e.g.
        ``ScoringContext.run_forward``); exactly one of ``tokens`` and ``run``.
    gram : also accumulate ``E[x xᵀ]`` per consumer (``in × in`` float64 each).

    Returns
    -------
    dict
        ``{group_id: [GroupInput, ...]}``, one entry per consumer (:func:`consumers`); a
        group without one (stacked experts) maps to ``[]``.

    Raises
    ------
    ValueError
        Neither or both of ``tokens`` and ``run``, tokens that are not a 2-D integer tensor,
        or a consumer the pass never reached.
    """
    if (tokens is None) == (run is None):
        raise ValueError("pass exactly one of tokens (calibration ids) and run (a callable "
                         "that runs the calibration data through the model)")
    if tokens is not None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"tokens must be a 2-D tensor of token ids (samples, seq_len), got "
                             f"{getattr(tokens, 'shape', type(tokens).__name__)}")
        run = _run_tokens(model, tokens)
    feeds = {group.id: consumers(model, group) for group in groups}
    modules = [path for pairs in feeds.values() for _, path in pairs]
    stats = module_input_statistics(model, modules, run, gram=gram) if modules else {}
    out: dict[str, list[GroupInput]] = {}
    for group in groups:
        out[group.id] = [GroupInput(member, path, stats[path], group.units_of(member))
                         for member, path in feeds[group.id]
                         if stats[path].mean.numel() == member.size]
    return out
