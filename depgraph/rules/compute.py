"""Rules for ops that compute: pointwise math, matrix products, attention, norms, reductions."""

from __future__ import annotations

import torch
import torch.fx

from ..dimmap import Broadcast, Coupling, DimSpec, InputDim, Slice, Split, normalize_dim
from ..kinds import Tag, selects
from .common import arg, broadcast_dims, dims_of, is_tensor, ndim, shape
from .registry import register, register_pointwise

# Reductions after which zeroing a channel is not the same as removing it.
NORMALIZING = Tag.NORMALIZING


@register_pointwise
@register("aten::where", "aten::masked_fill", "aten::clamp", "aten::clamp_min",
          "aten::clamp_max", "aten::pow", "aten::__and__", "aten::__or__", "aten::__xor__",
          "aten::lerp", "aten::addcmul", "aten::addcdiv", "aten::logical_not", "aten::isnan",
          "aten::nan_to_num", "aten::masked_fill_", "aten::hardtanh", "aten::gelu", "aten::silu",
          "aten::relu", "aten::leaky_relu", "aten::elu", "aten::mish", "aten::softplus",
          "aten::hardswish", "aten::hardsigmoid", "aten::glu_jvp", "aten::threshold",
          "aten::floor_divide", "aten::remainder", "aten::fmod", "aten::bitwise_and",
          "aten::bitwise_or", "aten::bitwise_xor", "aten::bitwise_not", "aten::logical_and",
          "aten::logical_or", "aten::logical_xor", "aten::eq", "aten::ne", "aten::lt", "aten::le",
          "aten::gt", "aten::ge", "aten::maximum", "aten::minimum", "aten::polar",
          "aten::complex", "aten::log_sigmoid", "aten::multiply", "aten::divide",
          "aten::subtract", "aten::true_divide", "aten::greater", "aten::less",
          "aten::greater_equal", "aten::less_equal", "aten::not_equal")
def pointwise(node: torch.fx.Node) -> Coupling:
    """Elementwise with broadcasting: equal-sized dims aligned from the right are one."""
    operands = [a for a in [*node.args, *node.kwargs.values()] if is_tensor(a)]
    outputs, same = broadcast_dims(node, operands)
    return Coupling(outputs=[outputs], same=same, edge_kind="pointwise")


@register("aten::linear")
def linear(node: torch.fx.Node) -> Coupling:
    """``x @ W.T + b``: x's last dim is contracted with W's dim 1; output last dim is W's dim 0."""
    x, weight, bias = node.args[0], node.args[1], arg(node, 2, "bias")
    outputs = dims_of(x)[:-1] + [InputDim(weight, 0)]
    same = [(InputDim(x, ndim(x) - 1), InputDim(weight, 1))]
    if is_tensor(bias):
        same.append((InputDim(weight, 0), InputDim(bias, ndim(bias) - 1)))
    return Coupling(outputs=[outputs], same=same, edge_kind="linear")


def _matmul(a: torch.fx.Node, b: torch.fx.Node, out: torch.fx.Node) -> Coupling:
    """``a @ b`` with batch broadcasting (1-D operands as in ``torch.matmul``)."""
    rank_a, rank_b = ndim(a), ndim(b)
    same: list[tuple[DimSpec, DimSpec]] = [(InputDim(a, rank_a - 1), InputDim(b, max(rank_b - 2, 0)))]
    outputs: list[DimSpec] = []
    out_shape = shape(out)
    batch = len(out_shape) - (rank_a >= 2) - (rank_b >= 2)
    for d in range(batch):
        members = [InputDim(t, d - (batch - (ndim(t) - 2))) for t in (a, b)
                   if ndim(t) >= 2 and d - (batch - (ndim(t) - 2)) >= 0
                   and shape(t)[d - (batch - (ndim(t) - 2))] == out_shape[d] != 1]
        outputs.append(members[0] if members else Broadcast(out_shape[d]))
        same.extend((members[0], m) for m in members[1:])
    if rank_a >= 2:
        outputs.append(InputDim(a, rank_a - 2))
    if rank_b >= 2:
        outputs.append(InputDim(b, rank_b - 1))
    return Coupling(outputs=[outputs], same=same, edge_kind="matmul")


def _activation_contraction(coupling: Coupling, a: torch.fx.Node, b: torch.fx.Node) -> Coupling:
    """Contracting two activations (attention scores, attention-weighted values).

    The contracted dim is tagged (zeroing is not removing there) and, when both operands
    come from parameters through projections, pinned: its size sets the attention scale.
    Batch dims of such products are the attention heads.
    """
    if _is_parameter(a) or _is_parameter(b):
        return coupling
    contracted = coupling.same[0][0]
    coupling.reduced.append((contracted, Tag.ACTIVATION_CONTRACTION))
    coupling.pinned.append((contracted, "contracted between two activations (attention "
                                        "scores over head_dim): the scale depends on its size"))
    out_rank = len(coupling.outputs[0])
    for spec in coupling.outputs[0][:max(out_rank - 2, 0)]:
        coupling.reduced.append((spec, Tag.ATTENTION_HEADS))
    if out_rank >= 1:  # the per-head features of the second operand (the values' head_dim)
        coupling.pinned.append((coupling.outputs[0][-1], "per-head features of an attention "
                                "product (value head_dim): configs tie it to head_dim"))
    return coupling


_SAME_DATA = {"aten::index", "aten::view", "aten::reshape", "aten::_unsafe_view", "aten::transpose",
              "aten::permute", "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze",
              "aten::squeeze", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone",
              "aten::t", "aten::alias", "aten::detach", "aten::index_select", "aten::numpy_T",
              "aten::mT", "aten::adjoint", "aten::swapaxes", "aten::movedim", "aten::flatten"}


def _is_parameter(value: torch.fx.Node) -> bool:
    """Whether a value is (a view or a row selection of) a parameter.

    Then zeroing the parameter's slice zeroes its part of any product with it.
    """
    for _ in range(12):
        if not isinstance(value, torch.fx.Node):
            return False
        if value.op == "placeholder":
            return value.meta.get("depgraph_kind") == "parameter"
        name = getattr(getattr(value.target, "_schema", None), "name", "")
        if name not in _SAME_DATA or not value.args:
            return False
        value = value.args[0]
    return False


@register("aten::matmul", "aten::mm", "aten::bmm")
def matmul(node: torch.fx.Node) -> Coupling:
    a, b = node.args[0], node.args[1]
    return _activation_contraction(_matmul(a, b, node), a, b)


@register("aten::addmm", "aten::baddbmm", "aten::addbmm")
def addmm(node: torch.fx.Node) -> Coupling:
    """``bias + a @ b`` (GPT-2's Conv1D is ``addmm(bias, x, W)`` with W stored (in, out))."""
    bias, a, b = node.args[0], node.args[1], node.args[2]
    coupling = _activation_contraction(_matmul(a, b, node), a, b)
    outputs = coupling.outputs[0]
    offset = len(outputs) - ndim(bias)
    for d in range(ndim(bias)):
        if shape(bias)[d] == shape(node)[d + offset] != 1:
            coupling.same.append((outputs[d + offset], InputDim(bias, d)))
    return coupling


@register("aten::einsum")
def einsum(node: torch.fx.Node) -> Coupling:
    equation, operands = node.args[0].replace(" ", ""), list(node.args[1])
    inputs, output = equation.split("->")
    letters: dict[str, list[DimSpec]] = {}
    for term, operand in zip(inputs.split(","), operands, strict=True):
        if "." in term:
            raise NotImplementedError("einsum with ellipsis")
        for d, letter in enumerate(term):
            if shape(operand)[d] != 1:
                letters.setdefault(letter, []).append(InputDim(operand, d))
    same = [(dims[0], other) for dims in letters.values() for other in dims[1:]]
    outputs = [letters[c][0] if c in letters else Broadcast(1) for c in output]
    coupling = Coupling(outputs=[outputs], same=same, edge_kind="einsum")
    for letter, dims in letters.items():
        if letter not in output and not any(_is_parameter(d.arg) for d in dims):
            coupling.reduced.append((dims[0], Tag.ACTIVATION_CONTRACTION))
    return coupling


@register("aten::scaled_dot_product_attention")
def scaled_dot_product_attention(node: torch.fx.Node) -> Coupling:
    """softmax(q kᵀ · scale + mask) v over (..., heads, seq, dim) operands.

    q/k's last dim is contracted (and sets the default scale, so it is pinned); the head
    dims of q, k, v are one axis (with ``enable_gqa``, q's heads are ``kv_heads × repeat``).
    """
    q, k, v = node.args[0], node.args[1], node.args[2]
    rank = ndim(q)
    same: list[tuple[DimSpec, DimSpec]] = [(InputDim(q, rank - 1), InputDim(k, rank - 1)),
                                           (InputDim(k, rank - 2), InputDim(v, rank - 2))]
    heads_q, heads_k = shape(q)[rank - 3] if rank >= 3 else 1, shape(k)[rank - 3] if rank >= 3 else 1
    repeats: list[tuple[DimSpec, str]] = []
    for d in range(rank - 2):
        if d == rank - 3 and heads_q != heads_k:
            group = (heads_k, heads_q // heads_k)
            same.append((Split(InputDim(q, d), group, 0), InputDim(k, d)))
            repeats.append((Split(InputDim(q, d), group, 1), Tag.REPEAT))
            same.append((InputDim(k, d), InputDim(v, d)))
            continue
        for other in (k, v):
            if shape(other)[d] == shape(q)[d] != 1:
                same.append((InputDim(q, d), InputDim(other, d)))
    mask = arg(node, 3, "attn_mask")
    if is_tensor(mask):
        offset = rank - ndim(mask)
        for d in range(ndim(mask)):
            if d + offset < rank - 2 and shape(mask)[d] == shape(q)[d + offset] != 1:
                same.append((InputDim(q, d + offset), InputDim(mask, d)))
    outputs = dims_of(q)[:-1] + [InputDim(v, rank - 1)]
    reduced = [(InputDim(q, rank - 1), Tag.ATTENTION_LOGITS)]
    reduced += [(InputDim(q, rank - 3), Tag.ATTENTION_HEADS)] if rank >= 3 else []
    reduced += repeats
    return Coupling(outputs=[outputs], same=same, reduced=reduced, edge_kind="attention",
                    pinned=[(InputDim(q, rank - 1), "head_dim: the attention scale depends on it"),
                            (InputDim(v, rank - 1), "value head_dim: configs tie it to head_dim")])


_NORM_ARGS = {"aten::layer_norm": (1, 2, 3), "aten::rms_norm": (1, 2, None),
              "aten::native_layer_norm": (1, 2, 3), "aten::group_norm": (None, 2, 3)}


@register(*_NORM_ARGS)
def norm(node: torch.fx.Node) -> Coupling:
    """Normalisation over the trailing dims; weight and bias are indexed by those dims."""
    x = node.args[0]
    name = node.target._schema.name
    shape_index, weight_index, bias_index = _NORM_ARGS[name]
    if shape_index is None:  # group_norm: (N, C, *) normalised per group over C and all of *
        trailing, mixed = [1], list(range(1, ndim(x)))
    else:
        count = len(node.args[shape_index])
        trailing = mixed = list(range(ndim(x) - count, ndim(x)))
    same: list[tuple[DimSpec, DimSpec]] = []
    for index in (weight_index, bias_index):
        param = node.args[index] if index is not None and len(node.args) > index else None
        if is_tensor(param):
            same += [(InputDim(x, d), InputDim(param, d - trailing[0])) for d in trailing]
    outputs = [dims_of(x)]
    if isinstance(node.meta.get("val"), (tuple, list)):
        stats = [d if i not in trailing else Broadcast(1) for i, d in enumerate(dims_of(x))]
        outputs += [stats, stats]
    reduced = [(InputDim(x, d), NORMALIZING) for d in mixed]
    return Coupling(outputs=outputs, same=same, reduced=reduced, edge_kind="norm")


_REDUCTIONS = {
    "aten::sum": Tag.SUM, "aten::mean": NORMALIZING, "aten::amax": NORMALIZING,
    "aten::amin": NORMALIZING, "aten::var": NORMALIZING, "aten::std": NORMALIZING,
    "aten::var_mean": NORMALIZING, "aten::std_mean": NORMALIZING, "aten::logsumexp": NORMALIZING,
    "aten::norm": NORMALIZING, "aten::linalg_vector_norm": NORMALIZING, "aten::prod": NORMALIZING,
    "aten::all": NORMALIZING, "aten::any": NORMALIZING, "aten::nansum": Tag.SUM,
    "aten::count_nonzero": NORMALIZING,
}


@register(*_REDUCTIONS)
def reduction(node: torch.fx.Node) -> Coupling:
    x = node.args[0]
    kind = _REDUCTIONS[node.target._schema.name]
    rank = ndim(x)
    dims = arg(node, 1, "dim")
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or len(dims) == 0:
        dims = list(range(rank))  # sum(x), mean(x, dtype=...), norm(x, p)
    if node.target._schema.name in ("aten::norm", "aten::linalg_vector_norm"):
        dims = arg(node, 2, "dim") or list(range(rank))
        dims = [dims] if isinstance(dims, int) else dims
    dims = sorted({normalize_dim(int(d), rank) for d in dims})
    keep = len(shape(node)) == rank if not isinstance(node.meta["val"], (tuple, list)) else (
        len(node.meta["val"][0].shape) == rank)
    kept = [Broadcast(1) if d in dims else InputDim(x, d) for d in range(rank)]
    kept = kept if keep else [s for d, s in enumerate(kept) if d not in dims]
    count = len(node.meta["val"]) if isinstance(node.meta["val"], (tuple, list)) else 1
    return Coupling(outputs=[kept] * count, reduced=[(InputDim(x, d), kind) for d in dims],
                    edge_kind="reduce")


@register("aten::_softmax", "aten::softmax", "aten::_log_softmax", "aten::log_softmax",
          "aten::cumsum", "aten::cumprod", "aten::logcumsumexp", "aten::_safe_softmax")
def softmax(node: torch.fx.Node) -> Coupling:
    x = node.args[0]
    dim = normalize_dim(int(arg(node, 1, "dim")), ndim(x))
    return Coupling(outputs=[dims_of(x)], reduced=[(InputDim(x, dim), NORMALIZING)],
                    edge_kind="softmax")


@register("aten::max", "aten::min", "aten::argmax", "aten::argmin", "aten::topk", "aten::sort",
          "aten::argsort", "aten::kthvalue", "aten::median", "aten::mode")
def select_by_value(node: torch.fx.Node) -> Coupling:
    """Ops whose integer outputs point at channels of the reduced dim."""
    if torch.Tag.pointwise in getattr(node.target, "tags", ()):  # max/min(a, b): elementwise
        return pointwise(node)
    x = node.args[0]
    name = node.target._schema.name
    rank = ndim(x)
    values = node.meta["val"]
    if not isinstance(values, (tuple, list)) and name in ("aten::max", "aten::min") and len(node.args) == 1:
        return Coupling(outputs=[[]], reduced=[(d, NORMALIZING) for d in dims_of(x)])
    dim_index = 2 if name in ("aten::topk", "aten::kthvalue") else 1
    dim = normalize_dim(int(arg(node, dim_index, "dim", -1)), rank)
    count = len(values) if isinstance(values, (tuple, list)) else 1
    first = values[0] if count > 1 else values
    keep = len(first.shape) == rank
    outputs = []
    for _ in range(count):
        dims = dims_of(x)
        dims[dim] = Broadcast(int(first.shape[dim])) if keep else None
        outputs.append([d for d in dims if d is not None])
    value_axes = [None] * count
    value_axes[-1] = InputDim(x, dim)  # the indices output (argmax's only output)
    reduced = [(InputDim(x, dim), NORMALIZING)]
    if name == "aten::topk":  # k channels are picked: at least k must stay (experts per token)
        reduced.append((InputDim(x, dim), selects(int(arg(node, 1, "k")))))
    return Coupling(outputs=outputs, reduced=reduced, value_axes=value_axes,
                    edge_kind="select_by_value")


@register("aten::glu")
def glu(node: torch.fx.Node) -> Coupling:
    """``a * sigmoid(b)`` for the two halves of ``dim``: channel i pairs with i + n/2."""
    x = node.args[0]
    dim = normalize_dim(int(arg(node, 1, "dim", -1)), ndim(x))
    half = shape(x)[dim] // 2
    outputs = dims_of(x)
    first, second = Slice(InputDim(x, dim), 0, half), Slice(InputDim(x, dim), half, 2 * half)
    outputs[dim] = first
    return Coupling(outputs=[outputs], same=[(first, second)], edge_kind="glu")


__all__ = ["NORMALIZING"]


@register("aten::diff")
def diff(node: torch.fx.Node) -> Coupling:
    """Differences of neighbours along ``dim``: that dim mixes channels (a fresh axis)."""
    x = node.args[0]
    dim = normalize_dim(int(arg(node, 2, "dim", -1)), ndim(x))
    outputs = dims_of(x)
    outputs[dim] = Broadcast(shape(node)[dim])
    same = []
    for extra in (arg(node, 3, "prepend"), arg(node, 4, "append")):
        if is_tensor(extra):
            same += [(InputDim(x, d), InputDim(extra, d)) for d in range(ndim(x))
                     if d != dim and shape(extra)[d] == shape(x)[d] != 1]
    return Coupling(outputs=[outputs], same=same, reduced=[(InputDim(x, dim), NORMALIZING)],
                    edge_kind="diff")
