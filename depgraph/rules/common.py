"""Small helpers shared by the rule modules."""

from __future__ import annotations

import torch
import torch.fx

from ..dimmap import Broadcast, DimSpec, InputDim, normalize_dim

__all__ = ["shape", "ndim", "arg", "dims_of", "broadcast_dims", "is_tensor"]


def is_tensor(value: object) -> bool:
    return isinstance(value, torch.fx.Node) and isinstance(value.meta.get("val"), torch.Tensor)


def shape(value: torch.fx.Node) -> list[int]:
    """The concrete shape of a traced tensor value."""
    return [int(size) for size in value.meta["val"].shape]


def ndim(value: torch.fx.Node) -> int:
    return len(shape(value))


def arg(node: torch.fx.Node, index: int, name: str, default: object = None) -> object:
    """Argument ``index`` (positional) or ``name`` (keyword) of a call; a scalar the graph
    computes (``end = n // 2`` of a symbolic size) comes as its traced value (an ``int`` or a
    ``SymInt``, whose ``int()`` is refused as data-dependent where no value is known)."""
    value = node.args[index] if len(node.args) > index else node.kwargs.get(name, default)
    if isinstance(value, list | tuple):
        return type(value)(_scalar(item) for item in value)
    return _scalar(value)


def _scalar(value: object) -> object:
    if isinstance(value, torch.fx.Node) and not isinstance(value.meta.get("val"), torch.Tensor) \
            and value.meta.get("val") is not None:
        return value.meta["val"]
    return value


def dims_of(value: torch.fx.Node) -> list[DimSpec]:
    """Every dim of ``value``, unchanged."""
    return [InputDim(value, d) for d in range(ndim(value))]


def dim_arg(node: torch.fx.Node, index: int, name: str, of: torch.fx.Node, default: int = 0) -> int:
    return normalize_dim(int(arg(node, index, name, default)), ndim(of))


def broadcast_dims(node: torch.fx.Node, operands: list[torch.fx.Node]):
    """Output dims of a broadcasting op, and the pairs of operand dims it makes identical."""
    out_shape = shape(node)
    outputs: list[DimSpec] = []
    same: list[tuple[DimSpec, DimSpec]] = []
    for out_dim, size in enumerate(out_shape):
        members = []
        for operand in operands:
            offset = len(out_shape) - ndim(operand)
            in_dim = out_dim - offset
            if in_dim >= 0 and shape(operand)[in_dim] == size:
                members.append(InputDim(operand, in_dim))
        if size == 1:  # one channel: the first holder's (it may be a real one-channel atom);
            members = members[:1]  # a size-1 dim may be broadcast, so nothing is unified
        outputs.append(members[0] if members else Broadcast(size))
        same.extend((members[0], other) for other in members[1:])
    return outputs, same
