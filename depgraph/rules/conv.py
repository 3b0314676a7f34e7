"""Rules for convolutions (the short causal convolutions of state-space and hybrid blocks).

``conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)``: ``x`` is
``(batch, C_in, *spatial)``, ``weight`` is ``(C_out, C_in / groups, *kernel)``. Channels
split into ``groups`` blocks: block ``g`` of the input feeds block ``g`` of the output, and
inside a block every input channel meets every output channel (a contraction, as in
``linear``). A depthwise convolution (``groups == C_in == C_out``) thus ties input channel
``c`` to output channel ``c``. Spatial positions mix (kernel taps): those axes are fresh, and
the kernel dims of the weight are never pruned.
"""

from __future__ import annotations

import torch.fx

from ..dimmap import Broadcast, Coupling, DimSpec, InputDim, Split
from .common import arg, is_tensor, ndim, shape
from .registry import register

#: schema name -> (index of groups, index of transposed or None)
_ARGS = {"aten::conv1d": (6, None), "aten::conv2d": (6, None), "aten::conv3d": (6, None),
         "aten::convolution": (8, 6), "aten::_convolution": (8, 6)}


def _blocks(spec: InputDim, size: int, groups: int) -> tuple[DimSpec | None, DimSpec | None]:
    """(block axis, within-block axis) of a channel dim cut into ``groups`` blocks; ``None``
    for an axis of one channel."""
    if groups == 1:
        return None, spec
    if size == groups:
        return spec, None
    return Split(spec, (groups, size // groups), 0), Split(spec, (groups, size // groups), 1)


@register(*_ARGS)
def convolution(node: torch.fx.Node) -> Coupling:
    x, weight, bias = node.args[0], node.args[1], arg(node, 2, "bias")
    groups_index, transposed_index = _ARGS[node.target._schema.name]
    if transposed_index is not None and arg(node, transposed_index, "transposed", False):
        raise NotImplementedError("transposed convolution has no coupling rule yet")
    groups = int(arg(node, groups_index, "groups", 1))
    in_block, in_inner = _blocks(InputDim(x, 1), shape(x)[1], groups)
    out_block, _ = _blocks(InputDim(weight, 0), shape(weight)[0], groups)
    same: list[tuple[DimSpec, DimSpec]] = []
    if in_block is not None and out_block is not None:
        same.append((in_block, out_block))
    if in_inner is not None:
        same.append((in_inner, InputDim(weight, 1)))
    if is_tensor(bias):
        same.append((InputDim(weight, 0), InputDim(bias, 0)))
    outputs = [InputDim(x, 0), InputDim(weight, 0)] + [Broadcast(s) for s in shape(node)[2:]]
    pinned = [(InputDim(weight, d), "convolution kernel taps") for d in range(2, ndim(weight))
              if shape(weight)[d] > 1]
    return Coupling(outputs=[outputs], same=same, pinned=pinned, edge_kind="convolution")
