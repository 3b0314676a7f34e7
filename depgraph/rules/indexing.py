"""Rules for lookups and scatters: embeddings, advanced indexing, gather, MoE dispatch.

An integer tensor may carry a *value axis*: the axis its values point at (``topk`` over the
router's expert dim, ``arange`` over its own dim). Indexing a table with such a tensor makes
the table's dim the same axis as the value axis; that is how the router's expert rows and the
experts' stacked weights end up in one group. Indexing with values of unknown origin (token
ids) pins the table dim: its rows cannot be pruned.
"""

from __future__ import annotations

import torch.fx

from ..dimmap import Broadcast, Coupling, DimSpec, InputDim, ValueAxis, normalize_dim
from .common import arg, broadcast_dims, dims_of, is_tensor, ndim, shape
from .registry import register


def _lookup(table_dim: DimSpec, index: torch.fx.Node, coupling: Coupling) -> None:
    """``table_dim`` is addressed by the values of ``index``."""
    coupling.same.append((table_dim, ValueAxis(index)))


@register("aten::embedding")
def embedding(node: torch.fx.Node) -> Coupling:
    weight, indices = node.args[0], node.args[1]
    coupling = Coupling(outputs=[dims_of(indices) + [InputDim(weight, 1)]], edge_kind="embedding")
    _lookup(InputDim(weight, 0), indices, coupling)
    return coupling


@register("aten::index", "aten::_unsafe_index")
def index(node: torch.fx.Node) -> Coupling:
    """``x[i0, i1, ...]`` with tensor indices (``None`` keeps a dim as a slice would)."""
    x, indices = node.args[0], list(node.args[1])
    indexed = [d for d, i in enumerate(indices) if i is not None]
    index_tensors = [indices[d] for d in indexed]
    index_dims, same = broadcast_dims(_Shaped(node, _broadcast_shape(index_tensors)), index_tensors)
    coupling = Coupling(same=same, edge_kind="index")
    for d in indexed:
        _lookup(InputDim(x, d), indices[d], coupling)
    rest = [InputDim(x, d) for d in range(ndim(x)) if d not in indexed]
    contiguous = indexed == list(range(indexed[0], indexed[-1] + 1))
    if contiguous:
        before = [InputDim(x, d) for d in range(indexed[0])]
        after = [InputDim(x, d) for d in range(indexed[-1] + 1, ndim(x))]
        coupling.outputs = [before + index_dims + after]
    else:
        coupling.outputs = [index_dims + rest]
    return coupling


class _Shaped:
    """A stand-in node with a given shape (for the broadcast of index tensors)."""

    def __init__(self, node: torch.fx.Node, out_shape: list[int]):
        import torch

        self.meta = {"val": torch.empty(out_shape, device="meta")}
        self.name = node.name


def _broadcast_shape(tensors: list[torch.fx.Node]) -> list[int]:
    import torch

    return list(torch.broadcast_shapes(*[tuple(shape(t)) for t in tensors]))


@register("aten::index_select")
def index_select(node: torch.fx.Node) -> Coupling:
    x, index_tensor = node.args[0], node.args[2]
    dim = normalize_dim(int(node.args[1]), ndim(x))
    outputs = dims_of(x)
    outputs[dim] = InputDim(index_tensor, 0) if ndim(index_tensor) else Broadcast(1)
    coupling = Coupling(outputs=[outputs], edge_kind="index")
    _lookup(InputDim(x, dim), index_tensor, coupling)
    return coupling


@register("aten::gather", "aten::take_along_dim")
def gather(node: torch.fx.Node) -> Coupling:
    x = node.args[0]
    dim_value = arg(node, 1, "dim") if "gather" in str(node.target) else arg(node, 2, "dim")
    index_tensor = node.args[2] if "gather" in str(node.target) else node.args[1]
    dim = normalize_dim(int(dim_value), ndim(x))
    coupling = Coupling(outputs=[dims_of(index_tensor)], edge_kind="gather")
    for d in range(ndim(x)):
        if d != dim and shape(x)[d] == shape(index_tensor)[d] != 1:
            coupling.same.append((InputDim(x, d), InputDim(index_tensor, d)))
    _lookup(InputDim(x, dim), index_tensor, coupling)
    return coupling


@register("aten::index_add", "aten::index_copy", "aten::index_fill")
def index_add(node: torch.fx.Node) -> Coupling:
    """``out = self; out[..., index[i], ...] (+)= source[..., i, ...]`` along ``dim``."""
    x = node.args[0]
    dim = normalize_dim(int(node.args[1]), ndim(x))
    index_tensor = node.args[2]
    coupling = Coupling(outputs=[dims_of(x)], edge_kind="scatter")
    _lookup(InputDim(x, dim), index_tensor, coupling)
    source = node.args[3] if len(node.args) > 3 and is_tensor(node.args[3]) else None
    if source is not None:
        for d in range(ndim(source)):
            if d != dim and shape(source)[d] == shape(x)[d] != 1:
                coupling.same.append((InputDim(x, d), InputDim(source, d)))
    return coupling


@register("aten::scatter", "aten::scatter_add", "aten::scatter_reduce")
def scatter(node: torch.fx.Node) -> Coupling:
    x = node.args[0]
    dim = normalize_dim(int(node.args[1]), ndim(x))
    index_tensor = node.args[2]
    coupling = Coupling(outputs=[dims_of(x)], edge_kind="scatter")
    _lookup(InputDim(x, dim), index_tensor, coupling)
    for other in (index_tensor, node.args[3] if len(node.args) > 3 else None):
        if is_tensor(other):
            for d in range(ndim(other)):
                if d != dim and shape(other)[d] == shape(x)[d] != 1:
                    coupling.same.append((InputDim(x, d), InputDim(other, d)))
    return coupling


@register("aten::index_put")
def index_put(node: torch.fx.Node) -> Coupling:
    x, indices, values = node.args[0], list(node.args[1]), node.args[2]
    coupling = Coupling(outputs=[dims_of(x)], edge_kind="scatter")
    for d, i in enumerate(indices):
        if i is not None:
            _lookup(InputDim(x, d), i, coupling)
    for d in range(1, min(ndim(values), ndim(x)) + 1):
        if shape(values)[-d] == shape(x)[-d] != 1 and (ndim(x) - d) >= len(indices):
            coupling.same.append((InputDim(x, ndim(x) - d), InputDim(values, ndim(values) - d)))
    return coupling


@register("aten::one_hot")
def one_hot(node: torch.fx.Node) -> Coupling:
    """The new last dim is the axis the indices' values point at."""
    indices = node.args[0]
    return Coupling(outputs=[dims_of(indices) + [ValueAxis(indices)]], edge_kind="one_hot")


@register("aten::arange")
def arange(node: torch.fx.Node) -> Coupling:
    """A fresh axis; the values of ``arange(n)`` point at that same axis."""
    return Coupling(outputs=[[Broadcast(shape(node)[0])]], value_axes=[_OWN_DIM], created=True)


_OWN_DIM = "own"

__all__ = ["embedding", "index", "gather", "scatter", "one_hot", "arange"]
