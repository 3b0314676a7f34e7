"""Which sizes a plan changes: every extent that a pruned group's units span.

For a KV group whose query projection is ``Prod(kv, repeat, head_dim)``, removing one unit
changes the sizes ``kv``, ``kv × repeat`` (the query heads) and ``kv × repeat × head_dim``
(the projection width); for a query-head group (the ``repeat`` axis) ``repeat``,
``kv × repeat`` (the query heads again: products over the axes *before* the group's too)
and the widths. Config keys and module attributes holding one of those old values are the
candidates for the new value.
"""

from __future__ import annotations

from collections import defaultdict

from depgraph import DependencyGraph
from depgraph.kinds import Tag
from depgraph.layout import Atom, Prod

__all__ = ["group_extents", "plan_extents", "kept_sizes", "layout_signature", "expected_signatures"]


def group_extents(graph: DependencyGraph, group_id: str, removed: int,
                  left: dict[int, int] | None = None) -> dict[int, int]:
    """Old -> new value of every extent the group's units span in some member.

    ``left`` (``{root: units left}``, :func:`kept_sizes`) holds what the rest of the plan leaves of other
    axes: a layer that loses a KV group *and* a query head per KV group goes from ``kv ×
    repeat`` query heads to ``(kv - 1) × (repeat - 1)``, not to either group's own value.
    """
    group = graph.group(group_id)
    store = graph.store
    sizes = {**(left or {}), group.root: group.num_units - removed}
    pairs = {group.num_units: sizes[group.root]}
    for member in group.members:
        atoms = [a for a in store.atoms(member.layout) if store.sizes[a] > 1]
        if group.root not in atoms:
            continue
        at = atoms.index(group.root)
        for first in range(at, -1, -1):  # every contiguous span of axes holding the root
            for last in range(at + 1, len(atoms) + 1):
                span = atoms[first:last]
                pairs.setdefault(_product(store.sizes[a] for a in span),
                                 _product(sizes.get(a, store.sizes[a]) for a in span))
        pairs[member.size] = _size(store.resolve(member.layout), sizes)
    return {old: new for old, new in pairs.items() if old != new}


def plan_extents(graph: DependencyGraph, plan: dict) -> dict[int, set[int]]:
    """``old -> {new, ...}`` over all groups of the plan."""
    merged: dict[int, set[int]] = defaultdict(set)
    kept = kept_sizes(graph, plan)
    for group_id, units in plan.items():
        if len(set(units)):
            for old, new in group_extents(graph, group_id, len(set(units)), kept).items():
                merged[old].add(new)
    return dict(merged)


def kept_sizes(graph: DependencyGraph, plan: dict) -> dict[int, int]:
    """``{root atom: units left}`` for every group the plan prunes."""
    return {graph.group(gid).root: graph.group(gid).num_units - len(set(units))
            for gid, units in plan.items() if len(set(units))}


def _product(values) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def _size(layout, sizes: dict[int, int]) -> int:
    """A resolved layout's size once the atoms in ``sizes`` have those sizes."""
    if isinstance(layout, Atom):
        return sizes.get(layout.id, layout.size)
    parts = [_size(part, sizes) for part in layout.parts]
    return _product(parts) if isinstance(layout, Prod) else sum(parts)


def layout_signature(store, layout, sizes: dict[int, int] | None = None) -> str:
    """A layout with atom ids replaced by sizes: ``(2×[4|4])`` (structure, not identity).

    ``sizes`` overrides atom sizes (what a plan leaves); the result is canonical in the same
    way as layouts are (size-1 factors dropped, nested products and concatenations merged),
    so an expected signature compares equal to the one of a re-traced pruned model.
    """
    return _render(_canonical(store, store.resolve(layout), sizes or {}))


def _canonical(store, layout, sizes: dict[int, int]):
    if isinstance(layout, Atom):
        size = sizes.get(layout.id, layout.size)
        # a head axis is marked: "1 head of 8" and "8 heads of 1" both drop their size-1
        # factor and would otherwise read alike, though attention computes them differently
        heads = size > 1 and Tag.ATTENTION_HEADS in store.tags.get(store.find(layout.id), ())
        return ("a", f"{size}h" if heads else size)
    kind = "p" if isinstance(layout, Prod) else "c"
    parts = []
    for part in (_canonical(store, p, sizes) for p in layout.parts):
        if kind == "p" and part == ("a", 1):
            continue
        parts.extend(part[1] if part[0] == kind else [part])
    if kind == "p" and not parts:
        return ("a", 1)
    return parts[0] if len(parts) == 1 else (kind, parts)


def _render(tree) -> str:
    kind, body = tree
    if kind == "a":
        return str(body)
    joined = ("×" if kind == "p" else "|").join(_render(part) for part in body)
    return f"({joined})" if kind == "p" else f"[{joined}]"


def expected_signatures(graph: DependencyGraph, plan: dict) -> dict[tuple[str, int], str]:
    """Every parameter dim's layout signature once the plan's units are gone."""
    sizes = kept_sizes(graph, plan)
    return {key: layout_signature(graph.store, layout, sizes)
            for key, layout in graph._param_layouts.items()}
