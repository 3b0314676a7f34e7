"""Module attributes for pruned models whose config cannot describe them.

GPT-2, OPT, Bloom, Falcon and GPT-NeoX derive ``head_dim = hidden / heads``, and Bloom fixes
its MLP at ``4 × hidden``: no config says "10 heads of 64" or "an MLP of 2900". For those,
the sizes that modules keep as integer attributes (``num_heads``, ``split_size`` ...) are
updated from the graph itself (:mod:`pruning.extents`): each attribute of a module in a
pruned group's scope that equals an old extent is a candidate for the new value.

Blocks are alike, so candidates are *patterns* (``transformer.h.*.attn.split_size``) tried
on every block at once. Coincidences (``embed_dim == heads × head_dim``) make some
candidates wrong, so each choice is verified: a forward pass on the meta device must run,
and the re-traced graph must hold the old groups with exactly the removed units gone.
Attributes of standard layers (``Linear``, ``Embedding``, ``LayerNorm``, ``Conv1D``) are
set from their weights and are not candidates.
"""

from __future__ import annotations

import itertools
import re

import torch
from torch import nn

from depgraph import DependencyGraph, build_graph
from depgraph.errors import DepGraphError, PlanError
from depgraph.trace import meta_copy

from .extents import expected_signatures, group_extents

__all__ = ["sync_by_extent", "STANDARD_LAYERS"]

STANDARD_LAYERS = ("Linear", "Embedding", "LayerNorm", "Conv1D")
_MAX_TRIALS = 256
_INDEX = re.compile(r"\.\d+(?=\.|$)")


def _pattern(path: str) -> str:
    return _INDEX.sub(".*", path)


def _scope(graph: DependencyGraph, group_id: str) -> str:
    group = graph.group(group_id)
    parts = [m.param.split(".")[:-1] for m in group.members]
    prefix = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return ".".join(prefix)


def _candidates(model: nn.Module, graph: DependencyGraph, plan: dict) -> dict:
    """``{(pattern, attr): {path: {new values}}}`` for attributes equal to an old extent."""
    found: dict = {}
    for group_id, units in plan.items():
        if not len(set(units)):
            continue
        extents = group_extents(graph, group_id, len(set(units)))
        scope = _scope(graph, group_id)
        for path, module in model.named_modules():
            if type(module).__name__ in STANDARD_LAYERS:
                continue
            if scope and not (path == scope or path.startswith(scope + ".")):
                continue
            for key, value in vars(module).items():
                if key.startswith("_") or isinstance(value, bool) or not isinstance(value, int):
                    continue
                if value in extents:
                    slot = found.setdefault((_pattern(path), key), {})
                    slot.setdefault(path, set()).add(extents[value])
    return found


def sync_by_extent(model: nn.Module, graph: DependencyGraph, plan: dict) -> None:
    """Set module attributes after slicing (see module docs); ``PlanError`` if none verify."""
    candidates = _candidates(model, graph, plan)
    modules = dict(model.named_modules())
    original = {(path, key): getattr(modules[path], key)
                for (_, key), paths in candidates.items() for path in paths}
    expected = expected_signatures(graph, plan)
    patterns = sorted(candidates)
    choices = [[None, *_assignments(candidates[p])] for p in patterns]
    trials = sorted(itertools.product(*choices), key=lambda combo: -sum(c is not None for c in combo))
    for combo in trials[:_MAX_TRIALS]:
        for (path, key), value in original.items():
            setattr(modules[path], key, value)
        for (_, attr), assignment in zip(patterns, combo, strict=True):
            for path, value in (assignment or {}).items():
                setattr(modules[path], attr, value)
        if _runs(model) and _same_groups(model, expected):
            return
    for (path, key), value in original.items():
        setattr(modules[path], key, value)
    raise PlanError("no setting of module attributes makes the pruned model trace with the "
                    "expected groups; this plan cannot be applied to this architecture")


def _assignments(allowed: dict[str, set[int]]) -> list[dict[str, int]]:
    """Ways to set one attribute pattern: the k-th smallest new value in every block.

    Blocks pruned differently have different new values, so an assignment gives each
    block its own; where a block has several candidates (coincident extents), the k-th
    assignment takes its k-th (or its largest).
    """
    ordered = {path: sorted(values) for path, values in allowed.items()}
    depth = max(len(values) for values in ordered.values())
    found: list[dict[str, int]] = []
    for rank in range(depth):
        assignment = {path: values[min(rank, len(values) - 1)] for path, values in ordered.items()}
        if assignment not in found:
            found.append(assignment)
    return found


def _runs(model: nn.Module) -> bool:
    """A forward pass of a meta copy (cheap) works."""
    try:
        clone = meta_copy(model)
        with torch.no_grad():
            clone(input_ids=torch.zeros(1, 5, dtype=torch.long, device="meta"))
        return True
    except Exception:  # noqa: BLE001 - any failure rejects the candidate
        return False


def _same_groups(model: nn.Module, expected: dict[tuple[str, int], str]) -> bool:
    """The re-traced model has every parameter dim laid out as expected (sizes included):
    this rejects attribute choices that run but split heads or rotary dims differently."""
    try:
        rebuilt = build_graph(model)
    except (DepGraphError, RuntimeError, ValueError):
        return False
    found = expected_signatures(rebuilt, {})
    return found == expected
