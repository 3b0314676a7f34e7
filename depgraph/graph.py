"""``build_graph``: trace a model, run the rules, and hold the result.

The networkx graph (``DependencyGraph.nx``, a ``MultiDiGraph``) has one node per dimension
of every traced value ("channel space"), keyed ``"<value>:<dim>"``. Node attributes:

``value``   name of the fx value;      ``dim``    the dim index;
``size``    channels along the dim;    ``op``     the aten op that produced the value;
``module``  module path of the op;     ``param``  canonical parameter name, for parameters;
``layout``  the resolved layout (a string once exported; see :mod:`depgraph.layout`);
``groups``  ids of the coupled groups whose atoms the layout holds.

Edges go from input dims to the output dims they map to, with ``kind`` naming the rule's
mapping (``view``, ``linear``, ``slice``, ``cat`` ...); ``kind="same"`` joins two input dims
that an op makes identical (the operands of ``add``, the contracted dims of ``linear``).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import networkx as nx
import torch
from torch import nn

from .groups import ZERO_UNSAFE_TAGS, Group, Member, classify
from .kinds import Kind, Tag
from .layout import AxisStore
from .paths import atomic_files, write_text_atomically
from .propagate import Propagator, Value
from .roles import parameter_uses
from .trace import Trace, trace_model

__all__ = ["DependencyGraph", "build_graph", "graph_of_trace"]

REPEAT_REASON = "query heads that share one KV head: prune whole KV groups instead"
#: Suffix of the id of a layer's ``query_head`` group (its KV groups keep their own id).
QUERY_HEAD_SUFFIX = "query_head"
CREATED_REASON = ("meets a tensor the model creates at run time from this size (e.g. ALiBi "
                  "slopes): removing channels would change its values")


class DependencyGraph:
    """The dependency graph of one model and its coupled groups."""

    def __init__(self, trace: Trace, store: AxisStore, graph: nx.MultiDiGraph,
                 param_layouts: dict[tuple[str, int], object], model_name: str):
        self.trace = trace
        self.store = store
        self.nx = graph
        self.model_name = model_name
        self._param_layouts = param_layouts
        self._groups, self._fixed = self._find_groups()
        self._by_id = {g.id: g for g in self._groups}
        self._excluded: dict[str, str] = {}
        self._annotate()

    # ---------------------------------------------------------------- groups
    def groups(self) -> list[Group]:
        """Coupled groups, in a deterministic order (first member's parameter order)."""
        return list(self._groups)

    def group(self, group_id: str) -> Group:
        """The group with this id; ``KeyError`` naming the valid ids' count if unknown."""
        if group_id in self._excluded:
            raise KeyError(f"group {group_id!r} was excluded: {self._excluded[group_id]}")
        if group_id not in self._by_id:
            raise KeyError(f"no group {group_id!r} (the graph has {len(self._by_id)} groups)")
        return self._by_id[group_id]

    def exclude(self, reasons: dict[str, str]) -> None:
        """Take groups out of :meth:`groups` for good, each with its reason (a pruner found
        that the model's code cannot follow their removal); :meth:`excluded` lists them."""
        for group_id, reason in reasons.items():
            self.group(group_id)  # a KeyError for an unknown id
            self._excluded[group_id] = reason
        self._groups = [g for g in self._groups if g.id not in self._excluded]

    def excluded(self) -> dict[str, str]:
        """``{group id: reason}`` of the groups taken out by :meth:`exclude`."""
        return dict(self._excluded)

    def fixed(self) -> list[dict]:
        """Parameter dims that no group may shrink, each with the reasons."""
        return list(self._fixed)

    def _find_groups(self) -> tuple[list[Group], list[dict]]:
        store = self.store
        order = {name: i for i, name in enumerate(self.trace.param_shapes)}
        members: dict[int, list[Member]] = defaultdict(list)
        uses = parameter_uses(self.trace)
        fixed = []
        for (param, dim), layout in sorted(self._param_layouts.items(),
                                           key=lambda item: (order[item[0][0]], item[0][1])):
            atoms = [a for a in store.atoms(layout) if store.sizes[a] > 1]
            for root in atoms:
                members[root].append(Member(param, dim, layout.size, layout,
                                           uses.get((param, dim), ())))
            reasons = sorted({r for a in atoms for r in store.pins.get(a, [])})
            free = [a for a in atoms if a not in store.pins]
            if not free:
                fixed.append({"param": param, "dim": dim, "size": layout.size,
                              "reasons": reasons or ["a single channel"]})
        query_heads = set()
        for root, group_members in members.items():
            if root not in store.pins and _is_repeat(store, root, group_members):
                if _query_slots(store, root, group_members):
                    query_heads.add(root)
                else:
                    store.pins[root] = [REPEAT_REASON]
            if root not in store.pins and Tag.CREATED in store.tags.get(root, ()):
                store.pins[root] = [CREATED_REASON]
        raw = []
        for root, group_members in members.items():
            if root in store.pins:
                continue
            kind, layer = classify(store, root, group_members)
            kind = Kind.QUERY_HEAD if root in query_heads else kind
            tags = store.tags.get(root, set())
            raw.append((root, kind, layer, not (tags & ZERO_UNSAFE_TAGS), group_members))
        raw.sort(key=lambda item: (order[item[4][0].param], item[4][0].dim, item[0]))
        return self._name_groups(raw), fixed

    def _name_groups(self, raw: list) -> list[Group]:
        """Ids are a function of the architecture, the config and the current shapes only:
        the common module path of the members (``model.layers.3.mlp``), with the kind
        appended where several groups share it and ``#n`` for repeats; model-wide groups
        are named by their kind alone (``hidden``), since their members (a tied
        ``lm_head`` or not) differ between builds of the same model."""
        prefixes = [_common_prefix([m.param for m in item[4]]) if item[2] is not None else ""
                    for item in raw]
        counts = defaultdict(int)
        for prefix, item in zip(prefixes, raw, strict=True):
            counts[prefix] += item[1] != Kind.QUERY_HEAD  # KV groups keep the ids they had
        stacked = _stacked_expert_params(self.store, self._param_layouts, self.trace)
        groups, seen = [], defaultdict(int)
        for (root, kind, layer, zero_eq, members), prefix in zip(raw, prefixes, strict=True):
            if kind == Kind.QUERY_HEAD:
                base = f"{prefix}.{QUERY_HEAD_SUFFIX}"
            else:
                base = prefix if counts[prefix] == 1 and prefix else f"{prefix}.{kind}" if prefix else kind
            seen[base] += 1
            group_id = base if seen[base] == 1 else f"{base}#{seen[base]}"
            group = Group(id=group_id, kind=kind, layer=layer, num_units=store_size(self.store, root),
                          zero_equivalent=zero_eq, members=members, store=self.store,
                          root=root, param_shapes=self.trace.param_shapes)
            _constrain(group, self.store, stacked)
            groups.append(group)
        return groups

    def _annotate(self) -> None:
        by_root = {g.root: g.id for g in self._groups}
        for _key, data in self.nx.nodes(data=True):
            layout = data.get("layout")
            if layout is not None:
                data["groups"] = [by_root[a] for a in self.store.atoms(layout) if a in by_root]
                data["layout"] = str(self.store.resolve(layout))

    # ------------------------------------------------------------- inspection
    def coverage(self) -> dict[str, dict[int, list[str]]]:
        """For every parameter dim: ids of the groups that can shrink it (may be empty)."""
        out: dict[str, dict[int, list[str]]] = defaultdict(dict)
        for param, dim in self._param_layouts:
            out[param][dim] = []
        for group in self._groups:
            for member in group.members:
                out[member.param][member.dim].append(group.id)
        return dict(out)

    def summary(self) -> list[dict]:
        """One row per (layer, kind): groups, units and parameters covered."""
        rows: dict[tuple, dict] = {}
        for group in self._groups:
            key = (-1 if group.layer is None else group.layer, group.kind)
            row = rows.setdefault(key, {"layer": group.layer, "kind": group.kind, "groups": 0,
                                        "units": 0, "params": set()})
            row["groups"] += 1
            row["units"] += group.num_units
            row["params"].update(m.param for m in group.members)
        return [{**row, "params": len(row["params"])} for _, row in sorted(rows.items())]

    def neuron_graph(self, group_id: str, max_units: int | None = None) -> nx.Graph:
        """Neuron-level view of one group: a node per (param, dim, index), edges per unit."""
        group = self.group(group_id)
        view = nx.Graph()
        units = range(group.num_units if max_units is None else min(max_units, group.num_units))
        for unit in units:
            nodes = [(param, dim, int(i)) for param, dim, idx in group.slices([unit]) for i in idx]
            view.add_nodes_from(nodes, unit=unit)
            view.add_edges_from((nodes[0], other) for other in nodes[1:])
        return view

    def to_dict(self) -> dict:
        return {"model": self.model_name, "groups": [g.to_dict() for g in self._groups],
                "fixed": self._fixed, "excluded": self.excluded(), "summary": self.summary()}

    def write_json(self, path: str | Path) -> None:
        data = self.to_dict()
        data["graph"] = nx.node_link_data(self._plain_graph(), edges="edges")
        write_text_atomically(path, json.dumps(data, indent=1))

    def write_graphml(self, path: str | Path) -> None:
        plain = self._plain_graph()
        for _, data in plain.nodes(data=True):
            data["groups"] = ",".join(data.get("groups", []))
        with atomic_files(path) as (staged,):
            nx.write_graphml(plain, staged)

    def write_dot(self, path: str | Path) -> None:
        lines = ["digraph depgraph {", "  node [shape=box, fontsize=9];"]
        for key, data in self._plain_graph().nodes(data=True):
            label = f"{key}\\n{data.get('op', '')} [{data.get('size')}]\\n{data.get('layout', '')}"
            lines.append(f'  "{key}" [label="{label}"];')
        for src, dst, data in self.nx.edges(data=True):
            lines.append(f'  "{src}" -> "{dst}" [label="{data.get("kind", "")}"];')
        lines.append("}")
        write_text_atomically(path, "\n".join(lines) + "\n")

    def _plain_graph(self) -> nx.MultiDiGraph:
        plain = nx.MultiDiGraph()
        for key, data in self.nx.nodes(data=True):
            plain.add_node(key, **{k: (v if isinstance(v, (int, float, str, list)) else str(v))
                                   for k, v in data.items() if v is not None})
        plain.add_edges_from(self.nx.edges(data=True))
        return plain


#: Elements a row of a stacked-experts weight is aligned to: grouped-GEMM kernels
#: (``torch._grouped_mm``, cuBLAS) need 16-byte strides, 8 elements at 16-bit precision.
EXPERT_ROW_ALIGN = 8


def _stacked_expert_params(store: AxisStore, param_layouts: dict, trace: Trace) -> set[str]:
    """Parameters that stack one weight per expert (3-d or more, one dim looked up by
    routing indices): kernels run them as grouped GEMMs. A single expert's stack has no
    looked-up axis of its own (a dim of size 1): rows picked by a tensor of indices tell."""
    found = set()
    for (param, _dim), layout in param_layouts.items():
        if any(Tag.LOOKED_UP in store.tags.get(a, ()) for a in store.atoms(layout)
               if store.sizes[a] > 1):
            found.add(param)
    found |= _indexed_params(trace)
    rank = defaultdict(int)
    for param, _dim in param_layouts:
        rank[param] += 1
    return {param for param in found if rank[param] >= 3}


_INDEX_OPS = ("aten.index.Tensor", "aten.index_select.default")


def _indexed_params(trace: Trace) -> set[str]:
    """Parameters whose rows a tensor of indices picks (``weight[top_k_index]``)."""
    found = set()
    for node in trace.program.graph_module.graph.nodes:
        if node.op == "placeholder" and node.name in trace.params and any(
                str(user.target) in _INDEX_OPS and user.args[0] is node for user in node.users):
            found.add(trace.params[node.name])
    return found


def _constrain(group: Group, store: AxisStore, stacked: set[str]) -> None:
    """Set ``min_units`` and ``multiple`` of ``group`` from what its axes meet."""
    for tag in store.tags.get(group.root, ()):
        if isinstance(tag, tuple) and tag[0] == Tag.SELECTS:
            picked = tag[1]
            group.min_units = max(group.min_units, picked)
            group.constraints.append(f"it must keep at least {picked} units (topk picks {picked})")
    multiple = 1
    for member, per_unit in zip(group.members, group.channels_per_unit, strict=True):
        if member.param not in stacked or Tag.LOOKED_UP in store.tags.get(group.root, ()):
            continue
        align = math.gcd(EXPERT_ROW_ALIGN, member.size)
        multiple = math.lcm(multiple, align // math.gcd(align, per_unit))
    if multiple > 1:
        group.multiple = multiple
        group.constraints.append(f"it must keep a multiple of {multiple} units (stacked expert "
                                 f"weights run through grouped-GEMM kernels that need 16-byte rows)")


def store_size(store: AxisStore, root: int) -> int:
    return store.sizes[root]


def _is_repeat(store: AxisStore, root: int, members: list[Member]) -> bool:
    """A query-head axis made by repeating KV heads (``expand`` in ``repeat_kv``, or the
    repeat factor of ``enable_gqa``); also one that directly follows another head axis."""
    tags = store.tags.get(root, ())
    if Tag.ATTENTION_HEADS not in tags:
        return False
    if Tag.REPEAT in tags:
        return True
    for member in members:
        atoms = [a for a in store.atoms(member.layout) if store.sizes[a] > 1]
        position = atoms.index(root) if root in atoms else -1
        if position > 0 and Tag.ATTENTION_HEADS in store.tags.get(atoms[position - 1], ()):
            return True
    return False


def _query_slots(store: AxisStore, root: int, members: list[Member]) -> bool:
    """Whether a repeat axis is the query-head slot inside KV groups that can go on its own:
    an attention-head axis that follows the KV-head axis in the query projection (``[kv,
    repeat, head_dim]``) and meets no parameter but the query and output projections (a
    member whose layout holds it without the KV axis would be a KV-side weight)."""
    if Tag.ATTENTION_HEADS not in store.tags.get(root, ()):
        return False
    for member in members:
        atoms = [a for a in store.atoms(member.layout) if store.sizes[a] > 1]
        position = atoms.index(root)
        if position > 0 and Tag.ATTENTION_HEADS not in store.tags.get(atoms[position - 1], ()):
            return False
    return True


def _common_prefix(names: list[str]) -> str:
    parts = [name.split(".")[:-1] for name in names]
    prefix = []
    for column in zip(*parts, strict=False):
        if all(c == column[0] for c in column):
            prefix.append(column[0])
        else:
            break
    return ".".join(prefix)


def build_graph(model: nn.Module, seq_len: int = 7) -> DependencyGraph:
    """Trace ``model`` (weights untouched) and derive its coupled groups.

    Parameters
    ----------
    model : a transformers ``PreTrainedModel`` or any module that ``torch.export`` can trace
        when called with ``input_ids``; it is never modified.
    seq_len : tokens in the (meta) example input.

    Returns
    -------
    DependencyGraph

    Raises
    ------
    TraceError
        When ``torch.export`` cannot trace the model.
    UnsupportedOpError
        When the graph holds an op without a coupling rule (names op, node, module, source).
    """
    return graph_of_trace(trace_model(model, seq_len=seq_len), type(model).__name__)


def graph_of_trace(trace: Trace, model_name: str) -> DependencyGraph:
    """The dependency graph of an exported model (:func:`build_graph` after tracing)."""
    store, graph = AxisStore(), nx.MultiDiGraph()
    inputs, param_layouts = _placeholder_layouts(trace, store)
    module = trace.program.graph_module
    _pin_unused(trace, store, param_layouts)
    env = Propagator(store, graph).run(module, inputs)
    output = next(n for n in module.graph.nodes if n.op == "output")
    for value in _values(env[output]):
        for layout in value.dims:
            store.pin(layout, "model output")
    for _key, data in graph.nodes(data=True):
        param = _placeholder_param(trace, data["value"])
        if param is not None:
            data["param"] = param
    return DependencyGraph(trace, store, graph, param_layouts, model_name)


def _placeholder_layouts(trace: Trace, store: AxisStore):
    inputs: dict[str, Value] = {}
    by_param: dict[str, Value] = {}
    param_layouts = {}
    for node in trace.program.graph_module.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        if node.name in trace.params:
            name = trace.params[node.name]
            node.meta["depgraph_kind"] = "parameter"
            if name not in by_param:  # tied weights: one parameter, one set of layouts
                by_param[name] = Value([store.new(s) for s in val.shape])
                for dim, layout in enumerate(by_param[name].dims):
                    param_layouts[(name, dim)] = layout
            inputs[node.name] = by_param[name]
            continue
        value = Value([store.new(s) for s in val.shape])
        if node.name in trace.inputs:
            for layout in value.dims:
                store.pin(layout, "model input")
        if node.name in trace.buffers:
            for layout in value.dims:
                store.pin(layout, f"buffer {trace.buffers[node.name]} (recomputed from the config)")
        inputs[node.name] = value
    return inputs, param_layouts


def _pin_unused(trace: Trace, store: AxisStore, param_layouts: dict) -> None:
    """Parameters that the traced forward never reads (a vision tower, cross-attention
    without an encoder): nothing couples their channels, so no group may shrink them."""
    used: set[str] = set()
    for node in trace.program.graph_module.graph.nodes:
        if node.op == "placeholder" and node.name in trace.params and node.users:
            used.add(trace.params[node.name])
    for (param, _dim), layout in param_layouts.items():
        if param not in used:
            store.pin(layout, "a parameter the traced forward (input_ids only) never reads")


def _placeholder_param(trace: Trace, value_name: str) -> str | None:
    return trace.params.get(value_name)


def _values(item) -> list[Value]:
    if isinstance(item, Value):
        return [item]
    if isinstance(item, (list, tuple)):
        return [v for sub in item for v in _values(sub)]
    return []

