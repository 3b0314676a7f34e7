"""Channel layouts: how the indices of one tensor dimension decompose into atomic axes.

Every dimension of every traced value gets a *layout*, an expression over *atoms*:

* ``Atom``: an indivisible axis of ``size`` channels (a head, a head_dim, an MLP channel ...
  until something shows it is finer);
* ``Prod(parts)``: the row-major product of its parts (``view(b, s, heads, head_dim)`` makes
  the projection's output ``Prod(heads, head_dim)``);
* ``Cat(parts)``: the concatenation of its parts (``cat``, ``slice``, ``chunk``, fused qkv).

Rules never compare sizes to guess couplings. They *unify* layouts that must hold the same
channels (the two operands of ``add``, the contracted dims of ``linear``); unification refines
atoms on demand (an atom unified with ``Prod(h, d)`` becomes that product) and merges atoms
that are the same axis. When all rules have run, each remaining atom that appears in a
parameter is one coupled group, and its index in a parameter dimension follows from the
resolved layout (``coords``).

Layouts that cannot be reconciled (say a product split at a non-aligned boundary) never
raise: the atoms involved are *pinned* with the reason, so they are reported as fixed and
never pruned. Being conservative is always safe; a silent guess never is.

Complexity: union-find with path halving; ``resolve`` is linear in the size of the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import LayoutError

__all__ = ["Atom", "Prod", "Cat", "Layout", "AxisStore", "UNIT"]


@dataclass(frozen=True)
class Atom:
    id: int
    size: int

    def __str__(self) -> str:
        return f"a{self.id}[{self.size}]"


@dataclass(frozen=True)
class Prod:
    parts: tuple
    size: int

    def __str__(self) -> str:
        return "(" + "×".join(map(str, self.parts)) + ")" if self.parts else "1"


@dataclass(frozen=True)
class Cat:
    parts: tuple
    size: int

    def __str__(self) -> str:
        return "[" + "|".join(map(str, self.parts)) + "]"


Layout = Atom | Prod | Cat
UNIT = Prod((), 1)


class _Conflict(Exception):
    """Raised inside unification when two layouts cannot be reconciled."""


def make_prod(parts) -> Layout:
    """A canonical product: nested products flattened, size-1 factors dropped."""
    flat: list = []
    for part in parts:
        if isinstance(part, Prod):
            flat.extend(part.parts)
        elif part.size != 1:
            flat.append(part)
    if len(flat) == 1:
        return flat[0]
    return Prod(tuple(flat), int(np.prod([p.size for p in flat], dtype=np.int64))) if flat else UNIT


def make_cat(parts) -> Layout:
    """A canonical concatenation: nested concatenations flattened, empty parts dropped."""
    flat: list = []
    for part in parts:
        if isinstance(part, Cat):
            flat.extend(part.parts)
        elif part.size != 0:
            flat.append(part)
    if len(flat) == 1:
        return flat[0]
    return Cat(tuple(flat), sum(p.size for p in flat))


@dataclass
class AxisStore:
    """All atoms of one trace, their unions, refinements, tags and pins."""

    sizes: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    definition: dict[int, Layout] = field(default_factory=dict)
    tags: dict[int, set] = field(default_factory=dict)  # Tag members, (Tag.SELECTS, k)
    pins: dict[int, list[str]] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)

    # ----------------------------------------------------------------- atoms
    def new(self, size: int) -> Layout:
        """A fresh atom of ``size`` channels (``UNIT`` for size 1)."""
        return UNIT if size == 1 else self._atom(size)

    def _atom(self, size: int) -> Atom:
        self.sizes.append(int(size))
        self.parent.append(len(self.parent))
        return Atom(len(self.parent) - 1, int(size))

    def find(self, atom_id: int) -> int:
        parent = self.parent
        while parent[atom_id] != atom_id:
            parent[atom_id] = parent[parent[atom_id]]
            atom_id = parent[atom_id]
        return atom_id

    def resolve(self, layout: Layout) -> Layout:
        """The layout with every atom replaced by its current root or refinement."""
        if isinstance(layout, Atom):
            root = self.find(layout.id)
            if root in self.definition:
                resolved = self.resolve(self.definition[root])
                self.definition[root] = resolved
                return resolved
            return layout if root == layout.id else Atom(root, layout.size)
        parts = [self.resolve(p) for p in layout.parts]
        return make_prod(parts) if isinstance(layout, Prod) else make_cat(parts)

    def atoms(self, layout: Layout) -> list[int]:
        """Root ids of the atoms in ``layout``, in order of appearance, without repeats."""
        found: dict[int, None] = {}
        stack = [self.resolve(layout)]
        while stack:
            item = stack.pop(0)
            if isinstance(item, Atom):
                found.setdefault(item.id)
            else:
                stack[0:0] = list(item.parts)
        return list(found)

    # ----------------------------------------------------------- annotations
    def tag(self, layout: Layout, tag: str) -> None:
        for root in self.atoms(layout):
            self.tags.setdefault(root, set()).add(tag)

    def pin(self, layout: Layout, reason: str) -> None:
        for root in self.atoms(layout):
            reasons = self.pins.setdefault(root, [])
            if reason not in reasons:
                reasons.append(reason)

    def _inherit(self, root: int, layout: Layout) -> None:
        """Atoms that replace ``root`` inherit its tags and pins."""
        for tag in self.tags.get(root, ()):
            self.tag(layout, tag)
        for reason in self.pins.get(root, ()):
            self.pin(layout, reason)

    def _define(self, root: int, layout: Layout) -> None:
        if root in self.atoms(layout):
            raise _Conflict(f"a{root} would contain itself")
        self.definition[root] = layout
        self._inherit(root, layout)

    def _union(self, a: int, b: int) -> None:
        if a == b:
            return
        self.parent[b] = a
        for tag in self.tags.pop(b, set()):
            self.tags.setdefault(a, set()).add(tag)
        for reason in self.pins.pop(b, []):
            reasons = self.pins.setdefault(a, [])
            if reason not in reasons:
                reasons.append(reason)

    # ----------------------------------------------------------- unification
    def unify(self, first: Layout, second: Layout, where: str = "") -> None:
        """Declare that two layouts hold the same channels in the same order."""
        if first.size != second.size:
            self._give_up(first, second, f"sizes {first.size} and {second.size} differ", where)
            return
        try:
            self._unify(first, second)
        except _Conflict as conflict:
            self._give_up(first, second, str(conflict), where)

    def _give_up(self, first: Layout, second: Layout, why: str, where: str) -> None:
        reason = f"irregular channel mapping at {where}: {why}" if where else why
        self.conflicts.append(reason)
        self.pin(first, reason)
        self.pin(second, reason)

    def _unify(self, first: Layout, second: Layout) -> None:
        a, b = self.resolve(first), self.resolve(second)
        if a == b:
            return
        if isinstance(a, Atom) and isinstance(b, Atom):
            self._union(a.id, b.id)
        elif isinstance(a, Atom):
            self._define(a.id, b)
        elif isinstance(b, Atom):
            self._define(b.id, a)
        elif isinstance(a, Prod) and isinstance(b, Prod):
            self._align(list(a.parts), list(b.parts), self._split_prod)
        else:
            self._align(_cat_parts(a), _cat_parts(b), self._split_cat)

    def _align(self, left: list, right: list, split) -> None:
        """Unify two sequences piece by piece, splitting the larger piece at each step."""
        while left and right:
            x, y = self.resolve(left.pop(0)), self.resolve(right.pop(0))
            if x.size == y.size:
                self._unify(x, y)
            elif x.size < y.size:
                head, tail = split(y, x.size)
                self._unify(x, head)
                right.insert(0, tail)
            else:
                head, tail = split(x, y.size)
                self._unify(head, y)
                left.insert(0, tail)
        if left or right:
            raise _Conflict("pieces left over")

    def _split_prod(self, layout: Layout, outer: int) -> tuple[Layout, Layout]:
        """``layout == Prod(first, second)`` with ``first.size == outer``."""
        layout = self.resolve(layout)
        if layout.size % outer:
            raise _Conflict(f"{layout.size} channels do not split by {outer}")
        if isinstance(layout, Atom):
            first, second = self.new(outer), self.new(layout.size // outer)
            self._define(layout.id, make_prod([first, second]))
            return first, second
        if isinstance(layout, Prod):
            taken: list = []
            rest = list(layout.parts)
            while rest and int(np.prod([p.size for p in taken])) < outer:
                have = int(np.prod([p.size for p in taken]))
                if outer % have:
                    raise _Conflict(f"{layout} does not split at an outer size of {outer}")
                part = rest.pop(0)
                if have * part.size <= outer:
                    taken.append(part)
                else:
                    head, tail = self._split_prod(part, outer // have)
                    taken.append(head)
                    rest.insert(0, tail)
            return make_prod(taken), make_prod(rest)
        raise _Conflict(f"concatenation {layout} is not a product with outer size {outer}")

    def _split_cat(self, layout: Layout, at: int) -> tuple[Layout, Layout]:
        """``layout == Cat(first, second)`` with ``first.size == at``."""
        layout = self.resolve(layout)
        if isinstance(layout, Atom):
            # real atoms even for one channel: a segment of a concatenation still matters
            first, second = self._atom(at), self._atom(layout.size - at)
            self._define(layout.id, make_cat([first, second]))
            return first, second
        if isinstance(layout, Cat):
            before: list = []
            rest = list(layout.parts)
            while sum(p.size for p in before) < at:
                part = rest.pop(0)
                have = sum(p.size for p in before)
                if have + part.size <= at:
                    before.append(part)
                else:
                    head, tail = self._split_cat(part, at - have)
                    before.append(head)
                    rest.insert(0, tail)
            return make_cat(before), make_cat(rest)
        outer, inner = layout.parts[0], layout.size // layout.parts[0].size
        if at % inner:
            raise _Conflict(f"cut at {at} falls inside a block of {inner} in {layout}")
        head, tail = self._split_cat(outer, at // inner)
        return make_prod([head, *layout.parts[1:]]), make_prod([tail, *layout.parts[1:]])


    # ------------------------------------------------------------ operations
    def split(self, layout: Layout, sizes: list[int], where: str = "") -> list[Layout]:
        """Layouts of the dims that ``layout`` is reshaped into (row-major)."""
        pieces = [self.new(size) for size in sizes]
        self.unify(layout, make_prod(pieces), where)
        return [self.resolve(p) for p in pieces]

    def slice(self, layout: Layout, start: int, stop: int, step: int = 1, where: str = "") -> Layout:
        """Layout of ``x[start:stop:step]`` along a dim of this layout."""
        size = layout.size
        start, stop = max(0, min(start, size)), max(0, min(stop, size))
        if start == 0 and stop == size and step == 1:
            return layout
        if stop <= start:
            return make_cat([])  # an empty dimension
        try:
            if step == 1:
                return self._cut(layout, start, stop)
            if size % step:
                raise _Conflict(f"step {step} does not divide {size}")
            rows, phases = self._split_prod(layout, size // step)
            phase = self._cut(phases, start % step, start % step + 1)
            count = len(range(start, stop, step))
            return make_prod([self._cut(rows, start // step, start // step + count), phase])
        except _Conflict as conflict:
            fresh = self.new(len(range(start, stop, step)))
            self._give_up(layout, fresh, str(conflict), where)
            return fresh

    def _cut(self, layout: Layout, start: int, stop: int) -> Layout:
        if start:
            _, layout = self._split_cat(layout, start)
        if stop - start < layout.size:
            layout, _ = self._split_cat(layout, stop - start)
        return self.resolve(layout)

    def coords(self, layout: Layout, root: int) -> np.ndarray:
        """For each position along a dim of this layout, the index of atom ``root`` (or -1)."""
        layout = self.resolve(layout)
        if isinstance(layout, Atom):
            if layout.id == root:
                return np.arange(layout.size, dtype=np.int64)
            return np.full(layout.size, -1, dtype=np.int64)
        children = [self.coords(part, root) for part in layout.parts]
        if isinstance(layout, Cat):
            return np.concatenate(children) if children else np.zeros(0, dtype=np.int64)
        holders = [k for k, child in enumerate(children) if (child >= 0).any()]
        if not holders:
            return np.full(layout.size, -1, dtype=np.int64)
        if len(holders) > 1:
            raise LayoutError(f"atom a{root} appears twice in product {layout}: its "
                              "coordinates are ambiguous")
        k = holders[0]
        shape = [1] * len(children)
        shape[k] = layout.parts[k].size
        full = [part.size for part in layout.parts]
        return np.broadcast_to(children[k].reshape(shape), full).reshape(-1).copy()


def _cat_parts(layout: Layout) -> list:
    return list(layout.parts) if isinstance(layout, Cat) else [layout]
