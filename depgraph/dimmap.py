"""The vocabulary in which op rules state how output dims map to input dims.

Modelled on the dim maps of PyTorch's DTensor view ops (``InputDim``, ``Flatten``, ``Split``,
``Broadcast``), written anew here and extended with the cases that coupling analysis needs:
``Slice`` (offset / strided pieces), ``Concat`` and ``ValueAxis`` (the axis whose channels an
integer tensor's *values* point at: the indices from ``topk`` over experts, ``arange`` ...).

A rule returns a :class:`Coupling`: one list of :data:`DimSpec` per output tensor, plus
pairs of dims that must be identical (pointwise operands, contracted dims), dims that are
reduced (tagged; a normalising reduction makes zeroing differ from removing), and dims that
must never be pruned (pinned, with the reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import torch.fx

__all__ = [
    "InputDim", "Flatten", "Split", "Broadcast", "Slice", "Concat", "ValueAxis", "DimSpec",
    "Coupling", "view_groups", "normalize_dim",
]


@dataclass(frozen=True)
class InputDim:
    """Output dim is dim ``dim`` of tensor argument ``arg`` (an fx node), unchanged."""

    arg: torch.fx.Node
    dim: int


@dataclass(frozen=True)
class Flatten:
    """Output dim is the row-major product of these dims."""

    dims: tuple


@dataclass(frozen=True)
class Split:
    """Output dim is piece ``index`` of ``dim`` reshaped row-major into ``sizes``."""

    dim: object
    sizes: tuple[int, ...]
    index: int


@dataclass(frozen=True)
class Broadcast:
    """A new dim of ``size`` channels that no input channel maps to (expand, factories)."""

    size: int


@dataclass(frozen=True)
class Slice:
    """Output dim is ``dim[start:stop:step]``."""

    dim: object
    start: int
    stop: int
    step: int = 1


@dataclass(frozen=True)
class Concat:
    """Output dim is these dims one after another."""

    dims: tuple


@dataclass(frozen=True)
class ValueAxis:
    """The axis that the integer values of tensor argument ``arg`` index into."""

    arg: torch.fx.Node


DimSpec = InputDim | Flatten | Split | Broadcast | Slice | Concat | ValueAxis


@dataclass
class Coupling:
    """What one op does to channels; see the module docstring."""

    outputs: list[list[DimSpec]] = field(default_factory=list)
    same: list[tuple[DimSpec, DimSpec]] = field(default_factory=list)
    reduced: list[tuple[DimSpec, str]] = field(default_factory=list)
    pinned: list[tuple[DimSpec, str]] = field(default_factory=list)
    value_axes: list[DimSpec | None] = field(default_factory=list)
    edge_kind: str = ""
    # True for tensors the model makes at run time from sizes (arange, zeros, ALiBi slopes):
    # their axes are tagged "created", and a parameter axis that meets one is never pruned.
    created: bool = False
    # (output index, dim, tag): tags for output dims, e.g. "repeat" on expanded dims.
    output_tags: list[tuple[int, int, str]] = field(default_factory=list)


def normalize_dim(dim: int, ndim: int) -> int:
    """``dim`` as a non-negative index into ``ndim`` dims (``ndim`` 0 counts as 1)."""
    return dim + max(ndim, 1) if dim < 0 else dim


def view_groups(source: list[int], target: list[int]) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of source dims and target dims that hold the same elements.

    Size-1 dims belong to no run (they carry no channels). Each pair lists source dim
    indices and target dim indices whose sizes have equal products.

    >>> view_groups([2, 3, 4], [2, 12])
    [([0], [0]), ([1, 2], [1])]
    >>> view_groups([2, 7, 32], [2, 7, 4, 8])
    [([0], [0]), ([1], [1]), ([2], [2, 3])]
    """
    src = [i for i, size in enumerate(source) if size != 1]
    dst = [i for i, size in enumerate(target) if size != 1]
    groups: list[tuple[list[int], list[int]]] = []
    while src or dst:
        run_src, run_dst = [src.pop(0)] if src else [], [dst.pop(0)] if dst else []
        while prod(source[i] for i in run_src) != prod(target[i] for i in run_dst):
            if prod(source[i] for i in run_src) < prod(target[i] for i in run_dst):
                if not src:
                    raise ValueError(f"cannot view {source} as {target}")
                run_src.append(src.pop(0))
            else:
                if not dst:
                    raise ValueError(f"cannot view {source} as {target}")
                run_dst.append(dst.pop(0))
        groups.append((run_src, run_dst))
    return groups
