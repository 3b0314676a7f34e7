"""Rules for ops that move, merge, split, cut or join dims without computing anything."""

from __future__ import annotations

import torch.fx

from ..dimmap import (
    Broadcast,
    Concat,
    Coupling,
    DimSpec,
    Flatten,
    InputDim,
    Slice,
    Split,
    normalize_dim,
    view_groups,
)
from ..kinds import Tag
from .common import arg, dim_arg, dims_of, ndim, shape
from .registry import register


def _reshape(source: torch.fx.Node, out_shape: list[int]) -> list[DimSpec]:
    in_shape = shape(source)
    outputs: list[DimSpec] = [Broadcast(1)] * len(out_shape)
    for src, dst in view_groups(in_shape, out_shape):
        merged = InputDim(source, src[0]) if len(src) == 1 else Flatten(
            tuple(InputDim(source, d) for d in src))
        sizes = tuple(out_shape[d] for d in dst)
        for k, d in enumerate(dst):
            outputs[d] = merged if len(dst) == 1 else Split(merged, sizes, k)
    return outputs


@register("aten::view", "aten::_unsafe_view", "aten::reshape", "aten::view_copy",
          "aten::flatten", "aten::unflatten", "aten::squeeze", "aten::unsqueeze",
          "aten::_reshape_alias", "aten::view_as", "aten::reshape_as")
def reshape_like(node: torch.fx.Node) -> Coupling:
    """Any op whose output is its input's elements in the same order under a new shape."""
    return Coupling(outputs=[_reshape(node.args[0], shape(node))], edge_kind="view")


@register("aten::alias", "aten::clone", "aten::contiguous", "aten::detach", "aten::_to_copy",
          "aten::to", "aten::type_as", "aten::lift_fresh_copy", "aten::dropout",
          "aten::native_dropout", "aten::feature_dropout", "aten::alpha_dropout",
          "aten::_assert_tensor_metadata_passthrough", "aten::zeros_like", "aten::ones_like",
          "aten::empty_like", "aten::full_like", "aten::rand_like", "aten::randn_like",
          "aten::tril", "aten::triu", "aten::fill", "aten::zero", "aten::copy",
          "aten::bernoulli", "aten::uniform", "aten::normal")
def identity(node: torch.fx.Node) -> Coupling:
    """Same shape, same channels (copies, casts, dropout, ``*_like`` factories, masks)."""
    source = node.args[0]
    outputs = [dims_of(source)]
    if isinstance(node.meta.get("val"), (tuple, list)):  # native_dropout: (out, mask)
        outputs = [dims_of(source), dims_of(source)]
    same = []
    if len(node.args) > 1 and _is_node(node.args[1]) and shape(node.args[1]) == shape(source):
        same = list(zip(dims_of(source), dims_of(node.args[1]), strict=True))  # copy(self, src)
    return Coupling(outputs=outputs, same=same, edge_kind="identity")


def _is_node(value: object) -> bool:
    return isinstance(value, torch.fx.Node)


@register("aten::permute", "aten::transpose", "aten::t", "aten::swapaxes", "aten::swapdims",
          "aten::movedim", "aten::moveaxis", "aten::numpy_T", "aten::adjoint", "aten::mT",
          "aten::mH")
def permute(node: torch.fx.Node) -> Coupling:
    """Dims reordered: output dim ``i`` is input dim ``order[i]``."""
    source = node.args[0]
    rank = ndim(source)
    order = _permutation(node.target._schema.name, node, rank)
    return Coupling(outputs=[[InputDim(source, d) for d in order]], edge_kind="permute")


def _as_dims(value, rank: int) -> list[int]:
    values = [value] if isinstance(value, int) else list(value)
    return [normalize_dim(int(d), rank) for d in values]


def _permutation(name: str, node: torch.fx.Node, rank: int) -> list[int]:
    order = list(range(rank))
    if name == "aten::permute":
        return _as_dims(node.args[1], rank)
    if name in ("aten::movedim", "aten::moveaxis"):
        sources, targets = _as_dims(node.args[1], rank), _as_dims(node.args[2], rank)
        rest = iter(d for d in order if d not in sources)
        placed = dict(zip(targets, sources, strict=True))
        return [placed[i] if i in placed else next(rest) for i in range(rank)]
    if name == "aten::numpy_T":
        return order[::-1]
    if rank < 2:
        return order
    if name in ("aten::adjoint", "aten::mT", "aten::mH"):
        first, second = rank - 2, rank - 1
    else:  # transpose / swapaxes / swapdims (dims given) and t (2-D)
        first = normalize_dim(int(arg(node, 1, "dim0", 0)), rank)
        second = normalize_dim(int(arg(node, 2, "dim1", 1)), rank)
    order[first], order[second] = order[second], order[first]
    return order


@register("aten::expand", "aten::expand_as", "aten::broadcast_to")
def expand(node: torch.fx.Node) -> Coupling:
    source = node.args[0]
    in_shape, out_shape = shape(source), shape(node)
    offset = len(out_shape) - len(in_shape)
    outputs: list[DimSpec] = []
    for d, size in enumerate(out_shape):
        keep = d >= offset and in_shape[d - offset] == size
        outputs.append(InputDim(source, d - offset) if keep else Broadcast(size))
    tags = [(0, d, Tag.REPEAT) for d, spec in enumerate(outputs) if isinstance(spec, Broadcast)]
    return Coupling(outputs=[outputs], edge_kind="expand", output_tags=tags)


@register("aten::repeat")
def repeat(node: torch.fx.Node) -> Coupling:
    """``x.repeat(r)``: output index ``t * n + i`` holds input index ``i`` (tiling)."""
    source, repeats = node.args[0], list(node.args[1])
    offset = len(repeats) - ndim(source)
    outputs: list[DimSpec] = []
    for d, times in enumerate(repeats):
        if d < offset:
            outputs.append(Broadcast(times))
        elif times == 1:
            outputs.append(InputDim(source, d - offset))
        else:
            outputs.append(Flatten((Broadcast(times), InputDim(source, d - offset))))
    return Coupling(outputs=[outputs], edge_kind="repeat")


@register("aten::repeat_interleave")
def repeat_interleave(node: torch.fx.Node) -> Coupling:
    """``x.repeat_interleave(r, dim)``: output index ``i * r + t`` holds input index ``i``."""
    source = node.args[0]
    repeats = arg(node, 1, "repeats")
    if not isinstance(repeats, int):
        raise NotImplementedError("repeat_interleave with a tensor of repeats")
    dim = arg(node, 2, "dim")
    if dim is None:
        return Coupling(outputs=[[Broadcast(shape(node)[0])]], pinned=[
            (spec, "flattened by repeat_interleave") for spec in dims_of(source)])
    dim = normalize_dim(dim, ndim(source))
    outputs = dims_of(source)
    outputs[dim] = Flatten((InputDim(source, dim), Broadcast(repeats)))
    return Coupling(outputs=[outputs], edge_kind="repeat")


@register("aten::select")
def select(node: torch.fx.Node) -> Coupling:
    source = node.args[0]
    dim = dim_arg(node, 1, "dim", source)
    given, size = int(node.args[2]), shape(source)[dim]
    index = normalize_dim(given, size)
    outputs = dims_of(source)
    picked = Slice(InputDim(source, dim), index, index + 1)
    # the index is a constant in the code: the channels it counts from may not shrink
    counted = (index + 1, size) if given < 0 else (0, index)
    pinned = [(Slice(InputDim(source, dim), *counted), "a constant index into this dim counts "
               "from them")] if counted[1] > counted[0] else []
    return Coupling(outputs=[outputs[:dim] + outputs[dim + 1:]], edge_kind="select",
                    same=[(picked, picked)], pinned=pinned)


def _bounds(start, stop, size: int) -> tuple[int, int]:
    start = 0 if start is None else int(start)
    stop = size if stop is None else int(stop)
    start = max(0, start + size if start < 0 else start)
    stop = max(0, stop + size if stop < 0 else stop)
    return min(start, size), min(stop, size)


@register("aten::slice")
def slice_(node: torch.fx.Node) -> Coupling:
    source = node.args[0]
    dim = dim_arg(node, 1, "dim", source)
    start, stop = _bounds(arg(node, 2, "start"), arg(node, 3, "end"), shape(source)[dim])
    step = int(arg(node, 4, "step", 1) or 1)
    outputs = dims_of(source)
    outputs[dim] = Slice(InputDim(source, dim), start, stop, step)
    return Coupling(outputs=[outputs], edge_kind="slice")


@register("aten::narrow")
def narrow(node: torch.fx.Node) -> Coupling:
    source = node.args[0]
    dim = dim_arg(node, 1, "dim", source)
    start = normalize_dim(int(node.args[2]), shape(source)[dim])
    outputs = dims_of(source)
    outputs[dim] = Slice(InputDim(source, dim), start, start + int(node.args[3]))
    return Coupling(outputs=[outputs], edge_kind="slice")


def _pieces(node: torch.fx.Node, sizes: list[int], dim: int) -> Coupling:
    source = node.args[0]
    outputs, start = [], 0
    for size in sizes:
        dims = dims_of(source)
        dims[dim] = Slice(InputDim(source, dim), start, start + size)
        outputs.append(dims)
        start += size
    return Coupling(outputs=outputs, edge_kind="split")


@register("aten::split", "aten::split_with_sizes", "aten::chunk", "aten::tensor_split",
          "aten::unsafe_split", "aten::unsafe_chunk", "aten::split_copy")
def split(node: torch.fx.Node) -> Coupling:
    source = node.args[0]
    dim = dim_arg(node, 2, "dim", source)
    sizes = [int(value.shape[dim]) for value in node.meta["val"]]
    return _pieces(node, sizes, dim)


@register("aten::unbind")
def unbind(node: torch.fx.Node) -> Coupling:
    source = node.args[0]
    dim = dim_arg(node, 1, "dim", source)
    coupling = _pieces(node, [1] * shape(source)[dim], dim)
    coupling.outputs = [dims[:dim] + dims[dim + 1:] for dims in coupling.outputs]
    coupling.pinned = [(InputDim(source, dim), "unbound into one tensor per channel, each of "
                        "which the code names")]
    return coupling


@register("aten::cat", "aten::concat", "aten::concatenate")
def cat(node: torch.fx.Node) -> Coupling:
    tensors = [t for t in node.args[0] if shape(t) != [0]]  # legacy empty tensors are skipped
    rank = ndim(node)
    dim = normalize_dim(int(arg(node, 1, "dim", 0)), rank)
    first = tensors[0]
    outputs = dims_of(first)
    outputs[dim] = Concat(tuple(InputDim(t, dim) for t in tensors))
    same = [(InputDim(first, d), InputDim(t, d)) for t in tensors[1:] for d in range(rank)
            if d != dim and shape(first)[d] != 1 and shape(t)[d] == shape(first)[d]]
    return Coupling(outputs=[outputs], same=same, edge_kind="cat")


@register("aten::stack")
def stack(node: torch.fx.Node) -> Coupling:
    tensors = list(node.args[0])
    dim = normalize_dim(int(arg(node, 1, "dim", 0)), ndim(node))
    first = tensors[0]
    outputs = dims_of(first)
    outputs.insert(dim, Concat(tuple(Broadcast(1) for _ in tensors)))
    same = [(InputDim(first, d), InputDim(t, d)) for t in tensors[1:] for d in range(ndim(first))
            if shape(first)[d] != 1]
    return Coupling(outputs=[outputs], same=same, edge_kind="stack")


@register("aten::view_as_complex")
def view_as_complex(node: torch.fx.Node) -> Coupling:
    """``(..., n, 2)`` reals as ``(...,  n)`` complex numbers: the pair dim goes into the dtype."""
    return Coupling(outputs=[dims_of(node.args[0])[:-1]], edge_kind="view")


@register("aten::view_as_real")
def view_as_real(node: torch.fx.Node) -> Coupling:
    """``(..., n)`` complex numbers as ``(..., n, 2)`` reals (a fresh real/imaginary dim)."""
    return Coupling(outputs=[[*dims_of(node.args[0]), Broadcast(2)]], edge_kind="view")


@register("aten::broadcast_tensors")
def broadcast_tensors(node: torch.fx.Node) -> Coupling:
    """Every operand expanded to the common shape (as ``expand`` does, one output each)."""
    operands = list(node.args[0])
    out_shape = [int(s) for s in node.meta["val"][0].shape]
    outputs, tags = [], []
    for index, source in enumerate(operands):
        offset = len(out_shape) - ndim(source)
        dims: list[DimSpec] = []
        for d, size in enumerate(out_shape):
            keep = d >= offset and shape(source)[d - offset] == size
            dims.append(InputDim(source, d - offset) if keep else Broadcast(size))
            if not keep:
                tags.append((index, d, Tag.REPEAT))
        outputs.append(dims)
    return Coupling(outputs=outputs, edge_kind="expand", output_tags=tags)


@register("aten::pad", "aten::constant_pad_nd")
def pad(node: torch.fx.Node) -> Coupling:
    """Constant padding (``(left, right)`` pairs from the last dim back; negative ones crop):
    the kept channels keep their place between fresh padding channels."""
    source, pads = node.args[0], [int(p) for p in node.args[1]]
    if arg(node, 2, "mode", "constant") not in ("constant", None):
        raise NotImplementedError("only constant padding has a coupling rule")
    outputs = dims_of(source)
    for pair in range(len(pads) // 2):
        dim = ndim(source) - 1 - pair
        left, right = pads[2 * pair], pads[2 * pair + 1]
        if left == right == 0:
            continue
        size = shape(source)[dim]
        inner: DimSpec = InputDim(source, dim)
        start, stop = max(0, -left), size - max(0, -right)
        if (start, stop) != (0, size):
            inner = Slice(inner, start, stop)
        parts = [p for p in (Broadcast(left) if left > 0 else None, inner,
                             Broadcast(right) if right > 0 else None) if p is not None]
        outputs[dim] = parts[0] if len(parts) == 1 else Concat(tuple(parts))
    return Coupling(outputs=[outputs], edge_kind="pad")


@register("aten::unfold")
def unfold(node: torch.fx.Node) -> Coupling:
    """Sliding windows of ``size`` every ``step`` along ``dim``: that dim becomes the windows
    and a new last dim the positions in a window; positions repeat across windows, so the
    unfolded dim's channels can never shrink."""
    source = node.args[0]
    dim = dim_arg(node, 1, "dimension", source)
    out = shape(node)
    outputs = dims_of(source)
    outputs[dim] = Broadcast(out[dim])
    # the positions in a window are as many as the code asks for (a convolution's taps):
    # a weight that meets them cannot lose one
    return Coupling(outputs=[[*outputs, Broadcast(out[-1])]], edge_kind="unfold",
                    pinned=[(InputDim(source, dim), "unfolded into overlapping windows")],
                    output_tags=[(0, len(outputs), Tag.CREATED)])


@register("aten::flip")
def flip(node: torch.fx.Node) -> Coupling:
    """Reverses the order along ``dims``: no layout says "channel i is channel n-1-i", so
    a reversed dim is a fresh axis of its size, which nothing may prune, and the input's
    channels there are pinned (reversed windows of a short convolution; other dims map
    through)."""
    source = node.args[0]
    flipped = {normalize_dim(int(d), ndim(source)) for d in arg(node, 1, "dims")}
    outputs = dims_of(source)
    for dim in flipped:
        outputs[dim] = Broadcast(shape(source)[dim])
    return Coupling(outputs=[outputs], edge_kind="flip",
                    pinned=[(InputDim(source, dim), "reversed by flip") for dim in sorted(flipped)],
                    output_tags=[(0, dim, Tag.CREATED) for dim in sorted(flipped)])
