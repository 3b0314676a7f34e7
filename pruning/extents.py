"""Which sizes a plan changes: every extent that a pruned group's units span.

For a KV group whose query projection is ``Prod(kv, repeat, head_dim)``, removing one unit
changes the sizes ``kv``, ``kv × repeat`` (the query heads) and ``kv × repeat × head_dim``
(the projection width). Config keys and module attributes holding one of those old values
are the candidates for the new value.
"""

from __future__ import annotations

from collections import defaultdict

from depgraph import DependencyGraph
from depgraph.kinds import Tag
from depgraph.layout import Atom, Prod

__all__ = ["group_extents", "plan_extents", "layout_signature", "expected_signatures"]


def group_extents(graph: DependencyGraph, group_id: str, removed: int) -> dict[int, int]:
    """Old -> new value of every extent the group's units span in some member."""
    group = graph.group(group_id)
    store, kept = graph.store, group.num_units - removed
    pairs = {group.num_units: kept}
    for member, per_unit in zip(group.members, group.channels_per_unit, strict=True):
        atoms = [a for a in store.atoms(member.layout) if store.sizes[a] > 1]
        if group.root not in atoms:
            continue
        product = 1
        for atom in atoms[atoms.index(group.root) + 1:]:
            product *= store.sizes[atom]
            pairs[group.num_units * product] = kept * product
        pairs[member.size] = member.size - per_unit * removed
    return {old: new for old, new in pairs.items() if old != new}


def plan_extents(graph: DependencyGraph, plan: dict) -> dict[int, set[int]]:
    """``old -> {new, ...}`` over all groups of the plan."""
    merged: dict[int, set[int]] = defaultdict(set)
    for group_id, units in plan.items():
        if len(set(units)):
            for old, new in group_extents(graph, group_id, len(set(units))).items():
                merged[old].add(new)
    return dict(merged)


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
    sizes = {graph.group(gid).root: graph.group(gid).num_units - len(set(units))
             for gid, units in plan.items()}
    return {key: layout_signature(graph.store, layout, sizes)
            for key, layout in graph._param_layouts.items()}
