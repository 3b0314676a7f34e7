"""Which sizes a plan changes: every extent that a pruned group's units span.

For a KV group whose query projection is ``Prod(kv, repeat, head_dim)``, removing one unit
changes the sizes ``kv``, ``kv × repeat`` (the query heads) and ``kv × repeat × head_dim``
(the projection width). Config keys and module attributes holding one of those old values
are the candidates for the new value.
"""

from __future__ import annotations

from collections import defaultdict

from depgraph import DependencyGraph

__all__ = ["group_extents", "plan_extents"]


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
