"""What each parameter dim does with its channels: the roles of a group's members.

A pruner that is not ours needs to know, for a group, which weights *write* its channels
(a projection's output axis), which *read* them (an input axis, the columns a bias
compensation or a Wanda score multiplies), and which scale, shift or look them up. The
traced graph shows it without any module type: the op that consumes a parameter and the
operand position it sits in.

:func:`parameter_uses` follows every parameter placeholder through ops that only move its
dims (dtype casts, ``t``, ``transpose``, ``permute``; ``index`` of its first dim, as stacked
expert weights are picked per token) to the op that uses it, and records a
:class:`~depgraph.groups.Use` (the :class:`~depgraph.kinds.Role` and the module whose forward
made the call) for each of its dims:

=====================================  =============================================
op (operand)                           roles
=====================================  =============================================
``linear(x, W, b)``                    W dim 0 producer, dim 1 consumer; b bias
``addmm(b, x, W)`` (GPT-2's Conv1D)    W dim 0 consumer, dim 1 producer; b bias
``mm`` / ``matmul`` / ``bmm``          right operand: dim -2 consumer, -1 producer;
                                       left operand: dim -1 consumer, -2 producer
``embedding(W, ids)``                  W dim 0 lookup, dim 1 embedding
``layer_norm`` / ``rms_norm`` (w, b)   norm
``add`` / ``sub`` with a product       bias
other elementwise ops with a tensor    norm (RMSNorm's ``w * x``, Gemma's ``(1 + w) * x``)
anything else                          other
=====================================  =============================================
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx

from .groups import Use
from .kinds import Role
from .propagate import module_path
from .rules import op_name
from .trace import Trace

__all__ = ["parameter_uses"]

_IDENTITY = {"aten::to", "aten::_to_copy", "aten::alias", "aten::detach", "aten::contiguous",
             "aten::clone", "aten::lift_fresh_copy"}
_IGNORED = {"aten::_assert_tensor_metadata", "aten::sym_size", "aten::sym_numel",
            "aten::sym_stride", "aten::_assert_scalar"}
_PRODUCTS = {"aten::linear", "aten::mm", "aten::matmul", "aten::bmm", "aten::addmm",
             "aten::baddbmm", "aten::addbmm"}
_NORMS = {"aten::layer_norm": (2, 3), "aten::native_layer_norm": (2, 3),
          "aten::rms_norm": (2,), "aten::group_norm": (2, 3)}
_ADDITIVE = {"aten::add", "aten::sub", "aten::add_", "aten::sub_"}
_SCALAR_FOLLOW = {"aten::add", "aten::sub", "aten::mul", "aten::div", "aten::rsub",
                  "aten::neg", "aten::add_", "aten::mul_"}

Dims = list  # for each dim of a traced value, the parameter dim it carries (or None)


def parameter_uses(trace: Trace) -> dict[tuple[str, int], tuple[Use, ...]]:
    """``{(param, dim): uses}`` for every parameter of ``trace`` (see the module doc).

    Parameters
    ----------
    trace : the exported model (:func:`depgraph.trace.trace_model`).

    Returns
    -------
    dict
        For each parameter dim, the distinct :class:`~depgraph.groups.Use` s in graph order;
        a dim no op reads is absent.
    """
    found: dict[tuple[str, int], list[Use]] = defaultdict(list)
    for node in trace.program.graph_module.graph.nodes:
        if node.op != "placeholder" or node.name not in trace.params:
            continue
        param = trace.params[node.name]
        rank = len(node.meta["val"].shape)
        for dim, use in _follow(node, list(range(rank))):
            if use not in found[(param, dim)]:
                found[(param, dim)].append(use)
    return {key: tuple(uses) for key, uses in found.items()}


def _follow(value: torch.fx.Node, dims: Dims, depth: int = 0):
    """``(param dim, use)`` pairs for every user of ``value`` (whose dims carry ``dims``)."""
    for user in value.users:
        name = op_name(user.target)
        if name in _IGNORED:
            continue
        moved = _moved(user, name, value, dims) if depth < 16 else None
        if moved is not None:
            yield from _follow(user, moved, depth + 1)
            continue
        module = module_path(user)
        looked_up = _looked_up(user, name, value, dims) if depth < 16 else None
        if looked_up is not None:  # W[ids]: the first dim is looked up, the rest carry on
            yield dims[0], Use(Role.LOOKUP, module)
            yield from _follow(user, looked_up, depth + 1)
            continue
        for dim, role in _terminal(user, name, value, dims):
            if dim is not None:
                yield dim, Use(role, module)


def _moved(user: torch.fx.Node, name: str, value: torch.fx.Node, dims: Dims) -> Dims | None:
    """The dims of ``user``'s output when it only moves ``value``'s dims, else None."""
    if name in _IDENTITY:
        return list(dims)
    if name in ("aten::t", "aten::numpy_T"):
        return dims[::-1]
    if name in ("aten::mT", "aten::adjoint") and len(dims) >= 2:
        return [*dims[:-2], dims[-1], dims[-2]]
    if name in ("aten::transpose", "aten::swapaxes"):
        a, b = (int(d) % len(dims) for d in user.args[1:3])
        out = list(dims)
        out[a], out[b] = out[b], out[a]
        return out
    if name == "aten::permute":
        return [dims[int(d) % len(dims)] for d in user.args[1]]
    if name in _SCALAR_FOLLOW and _only_tensor(user, value):
        return list(dims)  # w + 1, -w: the same channels, elementwise
    return None


def _only_tensor(user: torch.fx.Node, value: torch.fx.Node) -> bool:
    operands = [*user.args, *user.kwargs.values()]
    return all(a is value or not _is_tensor(a) for a in operands)


def _is_tensor(value: object) -> bool:
    return isinstance(value, torch.fx.Node) and isinstance(value.meta.get("val"), torch.Tensor)


def _terminal(user: torch.fx.Node, name: str, value: torch.fx.Node, dims: Dims):
    positions = [i for i, a in enumerate(user.args) if a is value]
    position = positions[0] if positions else None
    if name == "aten::embedding" and position == 0 and len(dims) == 2:
        return [(dims[0], Role.LOOKUP), (dims[1], Role.EMBEDDING)]
    if name in _PRODUCTS:
        return _product(name, position, dims)
    if name in _NORMS and position in _NORMS[name]:
        return [(d, Role.NORM) for d in dims]
    if name in _ADDITIVE and any(_from_product(a) for a in user.args if a is not value):
        return [(d, Role.BIAS) for d in dims]
    if torch.Tag.pointwise in getattr(user.target, "tags", ()) or name in _SCALAR_FOLLOW:
        return [(d, Role.NORM) for d in dims]
    return [(d, Role.OTHER) for d in dims]


def _looked_up(user: torch.fx.Node, name: str, value: torch.fx.Node, dims: Dims) -> Dims | None:
    """The dims of ``W[ids]`` (one index tensor on the first dim, as stacked expert weights
    are picked per token), else None."""
    if name != "aten::index" or not user.args or user.args[0] is not value or not dims:
        return None
    indices = user.args[1]
    if len(indices) != 1 or not _is_tensor(indices[0]):
        return None
    return [None] * len(indices[0].meta["val"].shape) + list(dims[1:])


def _product(name: str, position: int | None, dims: Dims):
    if name == "aten::linear":
        if position == 1 and len(dims) == 2:
            return [(dims[0], Role.PRODUCER), (dims[1], Role.CONSUMER)]
        if position == 2:
            return [(d, Role.BIAS) for d in dims]
        return [(d, Role.OTHER) for d in dims]
    if name in ("aten::addmm", "aten::baddbmm", "aten::addbmm"):
        if position == 0:
            return [(d, Role.BIAS) for d in dims]
        position -= 1
    if len(dims) < 2 or position not in (0, 1):
        return [(d, Role.OTHER) for d in dims]
    batch = [(d, Role.OTHER) for d in dims[:-2]]
    if position == 0:  # W @ x: W's last dim is contracted
        return batch + [(dims[-2], Role.PRODUCER), (dims[-1], Role.CONSUMER)]
    return batch + [(dims[-2], Role.CONSUMER), (dims[-1], Role.PRODUCER)]


_VIEWS = {"aten::view", "aten::reshape", "aten::_unsafe_view", "aten::squeeze",
          "aten::unsqueeze", "aten::to", "aten::_to_copy"}


def _from_product(value: object, depth: int = 0) -> bool:
    """Whether ``value`` is the output of a matrix product (through views and casts)."""
    if not isinstance(value, torch.fx.Node) or value.op != "call_function" or depth > 4:
        return False
    name = op_name(value.target)
    if name in _PRODUCTS:
        return True
    return name in _VIEWS and _from_product(value.args[0], depth + 1)
