"""The pass that runs every op's rule over an exported graph.

Like ``torch.fx.passes.shape_prop``: one walk over the nodes, one dispatch point
(:func:`depgraph.rules.lookup`), results kept per node, and every failure re-raised with the
node, the op, the module path and the source line. What it produces:

* for each tensor value, one :class:`~depgraph.layout.Layout` per dim (and, for integer
  tensors, the axis its values point at);
* the networkx graph of channel spaces (see :mod:`depgraph.graph` for its attributes).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from .dimmap import Broadcast, Concat, Coupling, Flatten, InputDim, Slice, Split, ValueAxis
from .errors import RuleError, UnsupportedOpError
from .kinds import Tag, selects
from .layout import AxisStore, Layout, make_cat, make_prod
from .rules import lookup, op_name

__all__ = ["Value", "Propagator", "describe_node", "node_key"]

_CARRY_VALUE_AXIS = {"view", "identity", "permute", "expand", "slice", "select", "split",
                     "pointwise", "repeat", "stack", "cat"}


@dataclass
class Value:
    """Layouts of one tensor value."""

    dims: list[Layout]
    value_axis: Layout | None = None


def node_key(prefix: str, name: str, dim: int) -> str:
    """The networkx key of dim ``dim`` of value ``name``."""
    return f"{prefix}{name}:{dim}"


def module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self___", "")


def describe_node(node: torch.fx.Node) -> str:
    """``node=..., op=..., module=..., source=...`` for error messages."""
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    source = " | ".join(line.strip() for line in trace[-2:]) if trace else "unknown"
    return (f"node={node.format_node()}, op={op_name(node.target)}, "
            f"module={module_path(node) or '<top>'}, source={source}")


class Propagator:
    """Runs the rules over a graph, filling an :class:`AxisStore` and a networkx graph."""

    def __init__(self, store: AxisStore, graph: nx.MultiDiGraph):
        self.store = store
        self.graph = graph

    # ------------------------------------------------------------------ walk
    def run(self, module: torch.fx.GraphModule, inputs: dict[str, object], prefix: str = ""
            ) -> dict[torch.fx.Node, object]:
        """Propagate layouts; ``inputs`` maps placeholder names to their :class:`Value`."""
        env: dict[torch.fx.Node, object] = {}
        placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
        for node in placeholders:
            env[node] = inputs.get(node.name)
            self._add_nodes(prefix, node, env[node])
        for node in module.graph.nodes:
            if node.op == "call_function":
                env[node] = self._call(module, node, env, prefix)
            elif node.op == "get_attr":
                env[node] = self._get_attr(module, node, prefix)
            elif node.op == "output":
                env[node] = _map_args(node.args[0], env)
        return env

    def _get_attr(self, module: torch.fx.GraphModule, node: torch.fx.Node, prefix: str):
        target = getattr(module, node.target)
        if isinstance(target, torch.Tensor):
            value = Value([self.store.new(size) for size in target.shape])
            self._add_nodes(prefix, node, value)
            return value
        return target

    def _call(self, module, node: torch.fx.Node, env: dict, prefix: str) -> object:
        if node.target is operator.getitem:
            container = env.get(node.args[0])
            if not isinstance(container, (list, tuple)):
                return None
            item = container[node.args[1]]
            self._add_nodes(prefix, node, item)
            if isinstance(item, Value):
                for dim in range(len(item.dims)):
                    self._edge(prefix, (f"{node.args[0].name}.{node.args[1]}", dim),
                               (node.name, dim), "getitem", env)
            return item
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            return self._higher_order(module, node, env, prefix)
        if _is_python_scalar_op(node):  # `item >= 0`, `math.ceil(n / 2)`: sizes, not channels
            return None
        rule = lookup(node.target)
        if rule is None:
            raise UnsupportedOpError(
                f"Operator {op_name(node.target)} does not have a coupling rule registered; "
                f"{describe_node(node)}")
        try:
            coupling = rule(node)
            return self._apply(node, coupling, env, prefix)
        except UnsupportedOpError:
            raise
        except GuardOnDataDependentSymNode as error:  # sizes known only when data flows
            raise UnsupportedOpError(
                f"Operator {op_name(node.target)} has data-dependent sizes (e.g. MoE routing "
                f"that splits tokens by count), which no coupling rule can map; "
                f"{describe_node(node)}") from error
        except NotImplementedError as error:  # a rule that does not cover this use of its op
            raise UnsupportedOpError(f"Operator {op_name(node.target)}: {error}; "
                                     f"{describe_node(node)}") from error
        except Exception as error:
            raise RuleError(
                f"Coupling rule for {op_name(node.target)} failed ({type(error).__name__}: "
                f"{error}); {describe_node(node)}") from error

    def _higher_order(self, module, node: torch.fx.Node, env: dict, prefix: str) -> object:
        """``wrap_with_set_grad_enabled``/``wrap_with_autocast``: recurse into the submodule."""
        args = list(node.args)
        for index, item in enumerate(args):
            sub = env.get(item) if isinstance(item, torch.fx.Node) else None
            if isinstance(sub, torch.fx.GraphModule):
                operands = args[index + 1:]
                holders = [n for n in sub.graph.nodes if n.op == "placeholder"]
                inputs = {h.name: env.get(a) if isinstance(a, torch.fx.Node) else None
                          for h, a in zip(holders, operands, strict=False)}
                inner = f"{prefix}{node.name}."
                sub_env = self.run(sub, inputs, prefix=inner)
                for holder, operand in zip(holders, operands, strict=False):
                    value = env.get(operand) if isinstance(operand, torch.fx.Node) else None
                    for dim in range(len(value.dims) if isinstance(value, Value) else 0):
                        src, dst = node_key(prefix, operand.name, dim), node_key(inner, holder.name, dim)
                        if src in self.graph and dst in self.graph:
                            self.graph.add_edge(src, dst, kind="call")
                output = next(n for n in sub.graph.nodes if n.op == "output")
                return sub_env[output]
        raise UnsupportedOpError(f"Higher-order op without a traceable body; {describe_node(node)}")

    # -------------------------------------------------------------- coupling
    def _apply(self, node: torch.fx.Node, coupling: Coupling, env: dict, prefix: str) -> object:
        where = describe_node(node)
        resolve = _Resolver(self.store, env, where)
        for first, second in coupling.same:
            left, right = resolve(first), resolve(second)
            if left is not None and right is not None and left.size != right.size and (
                    isinstance(first, ValueAxis) or isinstance(second, ValueAxis)):
                table = resolve(second if isinstance(first, ValueAxis) else first)
                self.store.pin(table, f"rows looked up by positions ({module_path(node) or node.name})")
                self.store.tag(table, Tag.LOOKED_UP)  # pinned, but still a stacked table
                continue
            if left is None or right is None:
                known = left if left is not None else right
                if known is not None:
                    self.store.pin(known, f"rows looked up by data of unknown origin ({module_path(node) or node.name})")
                    self.store.tag(known, Tag.LOOKED_UP)
                continue
            self.store.unify(left, right, where)
            if isinstance(first, ValueAxis) or isinstance(second, ValueAxis):
                self.store.tag(left, Tag.LOOKED_UP)
            self._edge(prefix, first, second, "same", env)
        for spec, tag in coupling.reduced:
            layout = resolve(spec)
            if layout is not None:
                self.store.tag(layout, tag)
        for spec, reason in coupling.pinned:
            layout = resolve(spec)
            if layout is not None:
                self.store.pin(layout, reason)
        values = []
        for index, dims in enumerate(coupling.outputs):
            layouts = [resolve(spec) for spec in dims]
            layouts = [lay if lay is not None else self._unknown(node, index, dim)
                       for dim, lay in enumerate(layouts)]
            axis = self._value_axis(node, coupling, index, layouts, env, resolve)
            values.append(Value(layouts, axis))
            if coupling.created:
                for layout in layouts:
                    self.store.tag(layout, Tag.CREATED)
        for out_index, dim, tag in coupling.output_tags:
            self.store.tag(values[out_index].dims[dim], tag)
        result = _package(node, values)
        self._add_nodes(prefix, node, result)
        for index, dims in enumerate(coupling.outputs):
            for dim, spec in enumerate(dims):
                name = f"{node.name}.{index}" if len(coupling.outputs) > 1 or isinstance(
                    node.meta.get("val"), (tuple, list)) else node.name
                for source in _sources(spec):
                    self._edge(prefix, source, (name, dim), coupling.edge_kind or "map", env)
        return result

    def _unknown(self, node: torch.fx.Node, index: int, dim: int) -> Layout:
        """A fresh, pinned layout for an output dim whose channels come from nowhere known
        (``one_hot`` of token ids): its real size, never pruned."""
        val = node.meta.get("val")
        val = val[index] if isinstance(val, (tuple, list)) else val
        size = int(val.shape[dim]) if isinstance(val, torch.Tensor) and dim < val.dim() else 1
        layout = self.store.new(size)
        self.store.pin(layout, f"channels indexed by data of unknown origin "
                               f"({module_path(node) or node.name})")
        return layout

    def _value_axis(self, node, coupling, index, layouts, env, resolve) -> Layout | None:
        if index < len(coupling.value_axes) and coupling.value_axes[index] is not None:
            spec = coupling.value_axes[index]
            return layouts[0] if spec == "own" else resolve(spec)
        if coupling.edge_kind not in _CARRY_VALUE_AXIS:
            return None
        axes = [v.value_axis for a in _flat_nodes(node.args) if isinstance(v := env.get(a), Value)
                and v.value_axis is not None]
        # indices of one axis stay so when combined (the top-2 of a router, concatenated)
        distinct = {str(self.store.resolve(axis)) for axis in axes}
        if len(distinct) != 1:
            return None
        if len(axes) > 1 and coupling.edge_kind in ("cat", "stack"):
            # picks joined along a dim (two max() calls, concatenated): that many per row
            joined = [d for d, spec in enumerate(coupling.outputs[index]) if isinstance(spec, Concat)]
            if joined == [len(layouts) - 1]:  # the picks dim; joining along tokens picks nothing more
                self.store.tag(axes[0], selects(layouts[-1].size))
        return axes[0]

    # ---------------------------------------------------------- networkx graph
    def _add_nodes(self, prefix: str, node: torch.fx.Node, value: object) -> None:
        values = value if isinstance(value, (list, tuple)) else [value]
        for index, item in enumerate(values):
            if not isinstance(item, Value):
                continue
            name = node.name if len(values) == 1 and not isinstance(value, (list, tuple)) else f"{node.name}.{index}"
            for dim, layout in enumerate(item.dims):
                self.graph.add_node(node_key(prefix, name, dim), value=f"{prefix}{node.name}",
                                    dim=dim, size=layout.size, op=op_name(node.target)
                                    if node.op == "call_function" else node.op,
                                    module=module_path(node), layout=layout)

    def _edge(self, prefix: str, source, target, kind: str, env: dict) -> None:
        src, dst = _endpoint(prefix, source), _endpoint(prefix, target)
        if src and dst and src in self.graph and dst in self.graph:
            self.graph.add_edge(src, dst, kind=kind)


class _Resolver:
    """Turns a :data:`DimSpec` into a layout, refining atoms as the spec demands."""

    def __init__(self, store: AxisStore, env: dict, where: str):
        self.store, self.env, self.where = store, env, where

    def __call__(self, spec) -> Layout | None:
        store = self.store
        if isinstance(spec, InputDim):
            value = self.env.get(spec.arg)
            return value.dims[spec.dim] if isinstance(value, Value) else None
        if isinstance(spec, Broadcast):
            return store._atom(spec.size) if spec.size > 0 else make_cat([])
        if isinstance(spec, ValueAxis):
            value = self.env.get(spec.arg)
            return value.value_axis if isinstance(value, Value) else None
        if isinstance(spec, Flatten):
            parts = [self(s) for s in spec.dims]
            return None if any(p is None for p in parts) else make_prod(parts)
        if isinstance(spec, Concat):
            parts = [self(s) for s in spec.dims]
            return None if any(p is None for p in parts) else make_cat(parts)
        if isinstance(spec, Split):
            whole = self(spec.dim)
            return None if whole is None else store.split(whole, list(spec.sizes), self.where)[spec.index]
        if isinstance(spec, Slice):
            whole = self(spec.dim)
            if whole is None:
                return None
            return store.slice(whole, spec.start, spec.stop, spec.step, self.where)
        raise TypeError(f"unknown dim spec {spec!r}")


def _is_python_scalar_op(node: torch.fx.Node) -> bool:
    """A call of Python's ``operator`` / ``math`` functions or ``torch.sym_*`` on symbolic
    scalars: export keeps them in the graph, and they make no tensor."""
    module = getattr(node.target, "__module__", None) or ""
    name = getattr(node.target, "__name__", "") or ""
    return (not isinstance(node.meta.get("val"), torch.Tensor)
            and (module in ("_operator", "operator", "math") or name.startswith("sym_")))


def _sources(spec) -> list[tuple]:
    if isinstance(spec, InputDim):
        return [(spec.arg, spec.dim)]
    inner = getattr(spec, "dims", None) or ([spec.dim] if hasattr(spec, "dim") else [])
    return [src for item in inner for src in _sources(item)]


def _endpoint(prefix: str, item) -> str | None:
    if isinstance(item, tuple) and isinstance(item[0], torch.fx.Node):
        return node_key(prefix, item[0].name, item[1])
    if isinstance(item, tuple):
        return node_key(prefix, item[0], item[1])
    sources = _sources(item)
    return _endpoint(prefix, sources[0]) if sources else None


def _package(node: torch.fx.Node, values: list[Value]) -> object:
    if isinstance(node.meta.get("val"), (tuple, list)):
        return tuple(values)
    return values[0] if values else None


def _flat_nodes(args) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    for item in args:
        if isinstance(item, torch.fx.Node):
            out.append(item)
        elif isinstance(item, (list, tuple)):
            out.extend(_flat_nodes(item))
    return out


def _map_args(args, env: dict) -> object:
    if isinstance(args, torch.fx.Node):
        return env.get(args)
    if isinstance(args, (list, tuple)):
        return type(args)(_map_args(a, env) for a in args)
    return None
