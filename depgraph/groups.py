"""Coupled groups: what a pruner consumes.

After propagation, every atom that appears in a parameter and is not pinned is one coupled
group: removing unit ``u`` of the atom removes, in every member ``(param, dim)``, the
positions whose coordinate on that atom is ``u``. That is exactly LLM-Pruner's trigger
traversal (start at any channel, follow the couplings), computed for all channels at once.

Kinds come from what the graph shows, never from module names:

* ``attention_head``: the head axis of an attention op; ``kv_group`` when the query heads are
  ``kv_heads × repeat`` (grouped-query attention: one unit = one KV head and its query heads);
* ``query_head``: the ``repeat`` axis of grouped-query attention: unit ``r`` is the ``r``-th
  query head of *every* KV group (removed equally from each, so the heads stay
  ``kv_heads × repeat'`` and the config a valid one; see :mod:`depgraph.graph`);
* ``expert``: an axis whose rows are looked up by routing indices (``topk`` over a router);
* ``hidden``: an axis whose members span several blocks (the residual stream);
* ``mlp``: any other block-local axis (the inner channels of a depth-2 module).

Each member also says what it does with the channels (:class:`Use`, from the traced ops,
see :mod:`depgraph.roles`): a projection that *produces* them (its output axis), one that
*consumes* them (its input axis: the columns a Wanda score or a bias compensation
multiplies), a bias, a norm's scale or shift, an embedding table. ``group.units_of(member)``
maps each position along the member's dim to its unit; ``group.unit_sums(member, values)``
sums a per-position vector per unit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from .errors import PlanError
from .kinds import Kind, Role, Tag
from .layout import AxisStore, Layout

__all__ = ["Group", "Member", "Use", "ZERO_UNSAFE_TAGS", "block_index"]

ZERO_UNSAFE_TAGS = frozenset({Tag.NORMALIZING, Tag.ACTIVATION_CONTRACTION, Tag.ATTENTION_LOGITS})
_BLOCK = re.compile(r"\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The first integer path component of a parameter name (``model.layers.3.x`` -> 3)."""
    match = _BLOCK.search(f".{name}.")
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Use:
    """One way the traced forward uses a parameter dim: its :class:`~depgraph.kinds.Role`
    and the module whose forward made the call (``"lm_head"`` for a tied embedding read by
    the output projection; ``""`` at the top level)."""

    role: Role
    module: str


@dataclass(frozen=True)
class Member:
    """One parameter dim of a group.

    ``param`` (a name of ``model.named_parameters()``), ``dim`` (the axis the group's
    channels run along), ``size`` (positions along it), ``uses`` (what the forward does with
    them: :class:`Use`).
    """

    param: str
    dim: int
    size: int
    layout: Layout
    uses: tuple[Use, ...] = ()

    @property
    def roles(self) -> tuple[Role, ...]:
        """The distinct roles of :attr:`uses`, in order (e.g. ``(Role.CONSUMER,)``)."""
        return tuple(dict.fromkeys(use.role for use in self.uses))

    def modules(self, role: Role | str) -> list[str]:
        """Paths of the modules that use this member in ``role`` (e.g. the projection that
        reads a consumer's channels: ``"model.layers.3.mlp.down_proj"``)."""
        return [use.module for use in self.uses if use.role == role]


@dataclass
class Group:
    """A set of channels that must be removed together (see :mod:`depgraph.groups`)."""

    id: str
    kind: str
    layer: int | None
    num_units: int
    zero_equivalent: bool
    members: list[Member]
    store: AxisStore = field(repr=False)
    root: int = field(repr=False)
    param_shapes: dict[str, tuple[int, ...]] = field(repr=False, default_factory=dict)
    min_units: int = 1
    multiple: int = 1
    constraints: list[str] = field(default_factory=list)
    zero_reason: str = ""  # why zeroing is not removal, where a probe found out beyond the graph

    def allows(self, kept: int) -> bool:
        """Whether keeping ``kept`` units satisfies the group's constraints: at least
        ``min_units`` (e.g. the experts a router picks per token) and, unless nothing is
        removed, a multiple of ``multiple`` (e.g. rows a grouped-GEMM kernel needs aligned)."""
        if kept == self.num_units:
            return True
        return kept >= self.min_units and kept % self.multiple == 0

    @cached_property
    def _coords(self) -> list[np.ndarray]:
        return [self.store.coords(m.layout, self.root) for m in self.members]

    def _check_units(self, units) -> np.ndarray:
        array = np.asarray(sorted({int(u) for u in units}), dtype=np.int64)
        if array.size and (array[0] < 0 or array[-1] >= self.num_units):
            bad = int(array[0] if array[0] < 0 else array[-1])
            raise PlanError(f"unit {bad} is out of range for group {self.id!r} "
                            f"(expected 0 <= unit < {self.num_units})")
        return array

    def slices(self, units) -> list[tuple[str, int, torch.Tensor]]:
        """``(param_name, dim, indices)`` of everything that goes when ``units`` go."""
        array = self._check_units(units)
        out = []
        for member, coords in zip(self.members, self._coords, strict=True):
            indices = np.nonzero(np.isin(coords, array))[0]
            out.append((member.param, member.dim, torch.from_numpy(indices)))
        return out

    def members_with(self, role: Role | str) -> list[Member]:
        """The members used in ``role`` (``Role.CONSUMER``: the weights that read the
        group's channels along ``member.dim``; ``Role.PRODUCER``: those that write them)."""
        return [m for m in self.members if role in m.roles]

    def _member_index(self, member: Member | int) -> int:
        if isinstance(member, int) and not isinstance(member, bool):
            if not 0 <= member < len(self.members):
                raise ValueError(f"member index {member} is out of range for group "
                                 f"{self.id!r} (expected 0 <= index < {len(self.members)})")
            return member
        for index, candidate in enumerate(self.members):
            if candidate == member:
                return index
        raise ValueError(f"{member!r} is not a member of group {self.id!r}")

    def units_of(self, member: Member | int) -> np.ndarray:
        """For each position along ``member.dim``: the unit it belongs to (``-1``: none).

        ``np.nonzero(group.units_of(m) == u)[0]`` are the positions of unit ``u`` in that
        member (what ``slices([u])`` lists for it).

        Raises
        ------
        ValueError
            ``member`` is neither one of :attr:`members` nor an index into them.
        """
        return self._coords[self._member_index(member)].copy()

    def unit_sums(self, member: Member | int, values) -> np.ndarray:
        """``values`` (one number per position along ``member.dim``) summed per unit:
        an array of :attr:`num_units` float64 (a per-channel score -> a per-unit score).

        Raises
        ------
        ValueError
            ``values`` does not have one entry per position of the member.
        """
        index = self._member_index(member)
        array = (values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor)
                 else np.asarray(values, dtype=np.float64)).reshape(-1)
        coords = self._coords[index]
        if array.shape != coords.shape:
            raise ValueError(f"values for member {self.members[index].param!r} of group "
                             f"{self.id!r} have {array.size} entries, expected "
                             f"{coords.size} (one per position along dim "
                             f"{self.members[index].dim})")
        out = np.zeros(self.num_units, dtype=np.float64)
        keep = coords >= 0
        np.add.at(out, coords[keep], array[keep])
        return out

    @cached_property
    def channels_per_unit(self) -> list[int]:
        """For each member, how many positions along its dim one unit covers."""
        return [int((coords == 0).sum()) for coords in self._coords]

    @cached_property
    def params_per_unit(self) -> int:
        """Parameters removed per unit (members counted independently)."""
        total = 0
        for member, per_unit in zip(self.members, self.channels_per_unit, strict=True):
            shape = self.param_shapes.get(member.param, ())
            others = int(np.prod([s for d, s in enumerate(shape) if d != member.dim], dtype=np.int64))
            total += per_unit * others
        return total

    def to_dict(self) -> dict:
        """A JSON-serialisable description."""
        return {
            "id": self.id, "kind": self.kind, "layer": self.layer, "num_units": self.num_units,
            "zero_equivalent": self.zero_equivalent, "params_per_unit": self.params_per_unit,
            "min_units": self.min_units, "multiple": self.multiple,
            "constraints": list(self.constraints),
            "members": [{"param": m.param, "dim": m.dim, "size": m.size,
                         "channels_per_unit": c, "layout": str(self.store.resolve(m.layout)),
                         "roles": [str(r) for r in m.roles],
                         "uses": [{"role": str(u.role), "module": u.module} for u in m.uses]}
                        for m, c in zip(self.members, self.channels_per_unit, strict=True)],
        }


def classify(store: AxisStore, root: int, members: list[Member]) -> tuple[str, int | None]:
    """The kind and block index of the group of atom ``root``."""
    tags = store.tags.get(root, set())
    layers = {block_index(m.param) for m in members}
    layer = layers.pop() if len(layers) == 1 else None
    if Tag.ATTENTION_HEADS in tags:
        return (Kind.KV_GROUP if _has_repeat(store, root, members) else Kind.ATTENTION_HEAD), layer
    if Tag.LOOKED_UP in tags:
        return Kind.EXPERT, layer
    if layer is None:
        return Kind.HIDDEN, None
    return Kind.MLP, layer


def _has_repeat(store: AxisStore, root: int, members: list[Member]) -> bool:
    """Whether some member's layout holds another head axis right after ``root``."""
    for member in members:
        atoms = store.atoms(member.layout)
        if root in atoms:
            after = atoms[atoms.index(root) + 1:]
            if any(Tag.REPEAT in store.tags.get(a, ()) or Tag.ATTENTION_HEADS in store.tags.get(a, ())
                   for a in after):
                return True
    return False
