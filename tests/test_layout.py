"""Unit and property tests of the layout algebra (depgraph.layout) and view_groups."""

from __future__ import annotations

import doctest
import math
from math import gcd

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from rule_harness import time_limit

import depgraph.dimmap
import depgraph.layout
from depgraph.dimmap import view_groups
from depgraph.errors import DepGraphError
from depgraph.layout import UNIT, Atom, AxisStore, Cat, Prod, make_cat, make_prod

torch.set_num_threads(1)

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def index_in(store: AxisStore, whole, part) -> np.ndarray:
    """For each position of ``whole``: its index along layout ``part`` (-1 where absent).

    ``part`` is a layout built from atoms that ``whole`` refines into: an atom gives its
    coordinate, a product the row-major combination of its parts, a concatenation the
    offset of whichever part holds the position.
    """
    part = store.resolve(part)
    if isinstance(part, Atom):
        return store.coords(whole, part.id)
    children = [index_in(store, whole, p) for p in part.parts]
    size = store.resolve(whole).size
    if isinstance(part, Prod):
        if not children:
            return np.zeros(size, dtype=np.int64)
        out = np.zeros(size, dtype=np.int64)
        present = np.ones(size, dtype=bool)
        for p, child in zip(part.parts, children, strict=True):
            out = out * p.size + child
            present &= child >= 0
        return np.where(present, out, -1)
    out = np.full(size, -1, dtype=np.int64)
    offset = 0
    for p, child in zip(part.parts, children, strict=True):
        # a position that two parts claim (Cat(a, a)) has no single index: -2
        clash = (child >= 0) & (out != -1) & (out != child + offset)
        out = np.where(clash, -2, np.where(child >= 0, child + offset, out))
        offset += p.size
    return out


def signatures(store: AxisStore, layout, atoms=None) -> list[tuple]:
    """For each position: its coordinate on every atom (positions with equal signatures are
    one channel as far as the store can tell)."""
    atoms = store.atoms(layout) if atoms is None else atoms
    grid = np.stack([store.coords(layout, a) for a in atoms], 1) if atoms else np.zeros(
        (layout.size, 0), dtype=np.int64)
    return [tuple(row) for row in grid.tolist()]


# ----------------------------------------------------------------- basics


def test_new_and_unit():
    store = AxisStore()
    assert store.new(1) == UNIT and store.new(1).size == 1
    a = store.new(5)
    assert isinstance(a, Atom) and a.size == 5
    assert store.atoms(a) == [a.id]
    assert np.array_equal(store.coords(a, a.id), np.arange(5))
    assert np.array_equal(store.coords(a, a.id + 1), np.full(5, -1))


def test_make_prod_and_cat_canonical():
    store = AxisStore()
    a, b, c = store.new(2), store.new(3), store.new(4)
    assert make_prod([a, make_prod([b, c])]) == Prod((a, b, c), 24)
    assert make_prod([UNIT, a, UNIT]) == a
    assert make_prod([]) == UNIT
    assert make_cat([a, make_cat([b, c])]) == Cat((a, b, c), 9)
    assert make_cat([make_cat([]), a]) == a
    assert str(make_prod([a, b])) == f"(a{a.id}[2]×a{b.id}[3])"


def test_unify_atom_with_prod_refines_it():
    store = AxisStore()
    a = store.new(12)
    heads, dim = store.new(3), store.new(4)
    store.unify(a, make_prod([heads, dim]))
    assert store.resolve(a) == Prod((heads, dim), 12)
    assert store.atoms(a) == [heads.id, dim.id]
    assert np.array_equal(store.coords(a, heads.id), np.arange(12) // 4)
    assert np.array_equal(store.coords(a, dim.id), np.arange(12) % 4)
    assert not store.conflicts and not store.pins


def test_unify_prod_with_atom_refines_it_too():
    store = AxisStore()
    a = store.new(6)
    pieces = make_prod([store.new(2), store.new(3)])
    store.unify(pieces, a)
    assert store.resolve(a) == store.resolve(pieces)


def test_unify_atom_with_cat_refines_it():
    store = AxisStore()
    a = store.new(5)
    left, right = store.new(2), store.new(3)
    store.unify(make_cat([left, right]), a)
    assert store.resolve(a) == Cat((left, right), 5)
    assert np.array_equal(store.coords(a, left.id), [0, 1, -1, -1, -1])
    assert np.array_equal(store.coords(a, right.id), [-1, -1, 0, 1, 2])


def test_unify_two_atoms_merges_tags_and_pins():
    store = AxisStore()
    a, b = store.new(4), store.new(4)
    store.tag(a, "normalizing")
    store.pin(b, "model input")
    store.unify(a, b)
    assert store.find(a.id) == store.find(b.id)
    root = store.find(a.id)
    assert store.tags[root] == {"normalizing"}
    assert store.pins[root] == ["model input"]
    assert store.resolve(a) == store.resolve(b)


def test_refined_atom_passes_tags_and_pins_on():
    store = AxisStore()
    a = store.new(6)
    store.tag(a, "sum")
    store.pin(a, "why not")
    first, second = store.split(a, [2, 3])
    for part in (first, second):
        assert store.tags[part.id] == {"sum"}
        assert store.pins[part.id] == ["why not"]


def test_unify_is_idempotent_and_symmetric():
    store = AxisStore()
    a, b = store.new(6), make_prod([store.new(2), store.new(3)])
    store.unify(a, b)
    before = store.resolve(a)
    store.unify(b, a)
    store.unify(a, a)
    assert store.resolve(a) == before and not store.conflicts


# ------------------------------------------------------------------- split


def test_split_12_into_3_by_4():
    store = AxisStore()
    a = store.new(12)
    rows, cols = store.split(a, [3, 4])
    assert (rows.size, cols.size) == (3, 4)
    assert np.array_equal(store.coords(a, rows.id), np.arange(12) // 4)
    assert np.array_equal(store.coords(a, cols.id), np.arange(12) % 4)


@PROPS
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_split_is_row_major(sizes):
    store = AxisStore()
    n = math.prod(sizes)
    a = store.new(n)
    pieces = store.split(a, sizes)
    assert [p.size for p in pieces] == sizes
    expected = np.unravel_index(np.arange(n), sizes)
    for piece, want in zip(pieces, expected, strict=True):
        assert np.array_equal(index_in(store, a, piece), want)
    assert not store.conflicts


@st.composite
def two_factorizations(draw):
    factors = draw(st.lists(st.sampled_from([2, 3, 4]), min_size=1, max_size=4))
    n = math.prod(factors)

    def factorization():
        out, remaining = [], n
        while remaining > 1:
            divisors = [d for d in range(2, remaining + 1) if remaining % d == 0]
            out.append(draw(st.sampled_from(divisors)))
            remaining //= out[-1]
        return out

    return n, factorization(), factorization()


@PROPS
@given(two_factorizations())
def test_two_splits_agree_or_conflict(case):
    """Splitting one axis two ways refines it to both, or pins it with a recorded reason."""
    n, first, second = case
    store = AxisStore()
    a = store.new(n)
    with time_limit(5, "split"):
        first_pieces = store.split(a, first, where="first")
        second_pieces = store.split(a, second, where="second")
    aligned = _aligned(first, second)
    if store.conflicts:
        assert not aligned
        assert all("second" in c for c in store.conflicts)
        assert store.pins and all(root in store.pins for root in store.atoms(a))
        return
    for sizes, pieces in ((first, first_pieces), (second, second_pieces)):
        expected = np.unravel_index(np.arange(n), sizes)
        for piece, want in zip(pieces, expected, strict=True):
            assert np.array_equal(index_in(store, a, piece), want)
    # one position, one signature: the refinement never merges two channels of one axis
    assert len(set(signatures(store, a))) == n


def _aligned(first: list[int], second: list[int]) -> bool:
    """Whether two row-major factorizations of one number can be refined to a common one."""
    cuts = lambda sizes: {math.prod(sizes[i:]) for i in range(len(sizes) + 1)}  # noqa: E731
    # refining a product means splitting each factor outer-to-inner: every partial product of
    # one factorization must divide into the other's blocks evenly
    a, b = sorted(cuts(first)), sorted(cuts(second))
    return all(x % y == 0 or y % x == 0 for x in a for y in b)


# ------------------------------------------------------------------ slices


@st.composite
def slices(draw):
    n = draw(st.integers(1, 12))
    start = draw(st.integers(0, n))
    stop = draw(st.integers(start, n))
    step = draw(st.integers(1, 4))
    refine = draw(st.sampled_from([None] + [d for d in range(2, n) if n % d == 0]))
    return n, start, stop, step, refine


@PROPS
@given(slices())
def test_slice_offsets_and_steps(case):
    n, start, stop, step, refine = case
    store = AxisStore()
    a = store.new(n)
    if refine:  # slicing a product: cuts must fall on block boundaries or pin
        store.split(a, [refine, n // refine])
    assume(not _strided_slice_hangs(store, a, step))
    before_pins = dict(store.pins)
    with time_limit(5, "slice"):
        part = store.slice(a, start, stop, step, where="slice")
    kept = list(range(start, stop, step))
    assert part.size == len(kept)
    if not kept:
        return
    if store.conflicts:
        assert all(c.startswith("irregular channel mapping at slice") for c in store.conflicts)
        assert (step > 1 and n % step) or refine  # or a cut inside a block of the product
        if n > 1:  # the source is pinned (a one-channel source has no atom to pin)
            assert store.pins != before_pins
        if len(kept) > 1:
            assert store.atoms(part) and all(r in store.pins for r in store.atoms(part))
        return
    where = index_in(store, a, part)
    # the kept positions are, in order, the positions of the slice
    assert np.array_equal(where[kept], np.arange(len(kept)))
    if step == 1 and not refine:  # and, cut from an atom, no other position is in it
        others = np.setdiff1d(np.arange(n), kept)
        assert (where[others] == -1).all()
    for root in store.atoms(part):
        assert np.array_equal(store.coords(part, root), store.coords(a, root)[kept])


def test_slice_with_step_not_dividing_pins():
    store = AxisStore()
    a = store.new(5)
    part = store.slice(a, 0, 5, 2, where="x[::2]")
    assert part.size == 3 and isinstance(part, Atom)
    assert store.conflicts == ["irregular channel mapping at x[::2]: step 2 does not divide 5"]
    assert store.pins[store.find(a.id)] == store.conflicts
    assert store.pins[part.id] == store.conflicts


def test_strided_slices_share_rows():
    """``x[0::2]`` and ``x[1::2]`` keep the row axis of ``n // 2``: a pair is one unit."""
    store = AxisStore()
    a = store.new(8)
    even, odd = store.slice(a, 0, 8, 2), store.slice(a, 1, 8, 2)
    assert store.resolve(even) == store.resolve(odd)
    rows = store.atoms(even)
    assert len(rows) == 1
    assert np.array_equal(store.coords(a, rows[0]), np.arange(8) // 2)


def test_full_and_empty_slices():
    store = AxisStore()
    a = store.new(4)
    assert store.slice(a, 0, 4) is a
    assert store.slice(a, 0, 9) is a
    assert store.slice(a, 3, 2).size == 0
    assert store.resolve(a) == a  # nothing refined


def test_slice_of_prod_on_block_boundaries():
    store = AxisStore()
    a = store.new(12)
    heads, dim = store.split(a, [3, 4])
    both = store.slice(a, 4, 12)  # heads 1 and 2
    assert store.atoms(both)[-1] == dim.id and both.size == 8
    assert np.array_equal(index_in(store, a, both), [-1] * 4 + list(range(8)))
    # a single head keeps only the head_dim axis: make_prod drops the one-row factor, so the
    # slice's channel j is head_dim channel j (of every head, as far as the layout tells)
    middle = store.slice(a, 4, 8)
    assert store.resolve(middle) == store.resolve(dim)
    assert np.array_equal(index_in(store, a, middle)[4:8], np.arange(4))
    assert not store.conflicts
    store.slice(a, 2, 6, where="mid-head")  # not on a head boundary
    assert store.conflicts and "mid-head" in store.conflicts[0]


def _split_prod_hangs(parts: list[tuple[int, bool]], outer: int) -> bool:
    """Whether ``AxisStore._split_prod(Prod(parts), outer)`` runs into the endless loop of
    test_strided_slice_of_a_product_returns. ``parts``: (size, is_atom) of the factors.

    A faithful simulation of its ``while`` loop on sizes: a factor that overshoots is split
    by ``outer // have``; when ``have`` does not divide ``outer`` that split makes no progress.
    """
    have, rest = 1, list(parts)
    for _ in range(64):
        if not rest or have >= outer:
            return False
        size, is_atom = rest.pop(0)
        if have * size <= outer:
            have *= size
            continue
        factor = outer // have
        if not is_atom or size % factor:
            return False  # _Conflict: a clean pin
        have *= factor
        rest.insert(0, (size // factor, True))
    return True


def _strided_slice_hangs(store: AxisStore, layout, step: int) -> bool:
    layout = store.resolve(layout)
    if step == 1 or layout.size % step or not isinstance(layout, Prod):
        return False
    parts = [(p.size, isinstance(p, Atom)) for p in layout.parts]
    return _split_prod_hangs(parts, layout.size // step)


_SPLIT_PROD_BUG = (
    "depgraph/layout.py AxisStore._split_prod, Prod branch (line ~243-251): when the parts "
    "taken so far multiply to `have` with have < outer and outer % have != 0, it recurses "
    "with outer // have; when that is 1 the part splits into (UNIT, part), nothing is taken "
    "and the while loop never ends (an endless loop, not a conflict). Reached e.g. by "
    "AxisStore.slice(Prod(a2, b3), 0, 6, step=2), i.e. x.reshape(6)[::2] for x of shape "
    "(2, 3); expected: a _Conflict (pin), as for any other non-aligned cut")


def test_strided_slice_of_a_product_returns():
    store = AxisStore()
    flat = make_prod([store.new(2), store.new(3)])
    with time_limit(1, "AxisStore.slice(Prod(2, 3), 0, 6, 2)"):
        part = store.slice(flat, 0, 6, 2, where="x.reshape(6)[::2]")
    assert part.size == 3
    assert store.conflicts  # positions 0, 2, 4 cut the inner block of 3: pinned


def test_strided_slice_of_a_product_when_the_prefix_divides():
    """The same loop when the prefix divides: Prod(4, 6)[::3] splits the 6 into 2×3."""
    store = AxisStore()
    layout = make_prod([store.new(4), store.new(6)])
    with time_limit(2, "slice"):
        part = store.slice(layout, 0, 24, 3)
    assert not store.conflicts and part.size == 8
    assert np.array_equal(index_in(store, layout, part)[::3], np.arange(8))


# ------------------------------------------------------------- rotate half


def test_rotate_half_couples_i_with_i_plus_half():
    store = AxisStore()
    n = 8
    x = store.new(n)
    x1, x2 = store.slice(x, 0, n // 2), store.slice(x, n // 2, n)
    store.unify(x, make_cat([x2, x1]), where="x * cos + rotate_half(x) * sin")
    assert not store.conflicts
    (atom,) = store.atoms(x)
    assert np.array_equal(store.coords(x, atom), np.arange(n) % (n // 2))


def test_unify_cat_ab_with_cat_ba_fresh():
    store = AxisStore()
    a, b, a2, b2 = (store.new(3) for _ in range(4))
    store.unify(make_cat([a, b]), make_cat([b2, a2]))
    assert store.find(a.id) == store.find(b2.id) and store.find(b.id) == store.find(a2.id)


@PROPS
@given(st.integers(2, 16), st.data())
def test_rotation_couples_orbits(n, data):
    """``x == roll(x, k)`` makes positions ``i`` and ``j`` one channel iff ``i ≡ j (mod gcd)``."""
    k = data.draw(st.integers(1, n - 1))
    store = AxisStore()
    x = store.new(n)
    store.unify(x, make_cat([store.slice(x, k, n), store.slice(x, 0, k)]), where="roll")
    if store.conflicts:  # allowed (conservative), but then x is pinned
        assert all(root in store.pins for root in store.atoms(x))
        return
    for root in store.atoms(x):
        coords = store.coords(x, root)
        assert np.array_equal(coords, np.roll(coords, -k))
    g = gcd(n, k)
    sig = signatures(store, x)
    for i in range(n):
        for j in range(n):
            assert (sig[i] == sig[j]) == (i % g == j % g), (i, j, store.resolve(x))


# --------------------------------------------------------------- conflicts


def test_sizes_differ_pins_instead_of_raising():
    store = AxisStore()
    a, b = store.new(4), store.new(6)
    store.unify(a, b, where="somewhere")
    assert store.conflicts == ["irregular channel mapping at somewhere: sizes 4 and 6 differ"]
    assert store.pins[a.id] == store.conflicts and store.pins[b.id] == store.conflicts
    assert store.find(a.id) != store.find(b.id)


def test_misaligned_products_pin_instead_of_raising():
    store = AxisStore()
    left = make_prod([store.new(2), store.new(3)])
    right = make_prod([store.new(3), store.new(2)])
    store.unify(left, right, where="view")
    assert len(store.conflicts) == 1 and "do not split" in store.conflicts[0]
    for root in store.atoms(left) + store.atoms(right):
        assert store.pins[root] == store.conflicts


def test_cat_against_misaligned_prod_pins():
    store = AxisStore()
    cat = make_cat([store.new(3), store.new(3)])
    prod = make_prod([store.new(2), store.new(3)])
    store.unify(cat, prod)
    assert not store.conflicts  # [3|3] == (2×3): the outer factor indexes the halves
    cat2 = make_cat([store.new(2), store.new(4)])
    prod2 = make_prod([store.new(2), store.new(3)])
    store.unify(cat2, prod2, where="bad cut")
    assert store.conflicts and "falls inside a block" in store.conflicts[0]
    assert all(r in store.pins for r in store.atoms(cat2) + store.atoms(prod2))


def test_unifying_the_factors_of_a_product():
    """``(h0 × h1)`` with ``h0 == h1``: both factors become one atom (a square)."""
    store = AxisStore()
    a = store.new(4)
    h0, h1 = store.split(a, [2, 2])
    store.unify(h0, h1)
    assert store.resolve(a) == make_prod([h0, h0])
    assert store.atoms(a) == [store.find(h0.id)]
    assert not store.conflicts


# Regression: AxisStore.coords raised the private layout._Conflict here, not a DepGraphError.
def test_coords_of_repeated_atom_raises_a_depgraph_error():
    store = AxisStore()
    a, b = store.new(2), store.new(2)
    square = make_prod([a, b])
    store.unify(a, b)
    with pytest.raises(DepGraphError):
        store.coords(square, store.find(a.id))


@st.composite
def layouts(draw, store: AxisStore, depth: int = 2):
    """A random layout expression over fresh atoms."""
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return store.new(draw(st.integers(2, 4)))
    parts = [draw(layouts(store, depth - 1)) for _ in range(draw(st.integers(2, 3)))]
    return make_prod(parts) if draw(st.booleans()) else make_cat(parts)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_unifications_never_raise(data):
    """Whatever is unified with whatever, unify never raises and sizes never change; when no
    conflict is recorded both sides have identical signatures at every position."""
    store = AxisStore()
    first = data.draw(layouts(store))
    second = data.draw(layouts(store)) if data.draw(st.booleans()) else store.new(first.size)
    with time_limit(5, "unify"):
        store.unify(first, second, where="random")
    assert store.resolve(first).size == first.size
    assert store.resolve(second).size == second.size
    if first.size != second.size:
        assert store.conflicts
        return
    if store.conflicts:
        assert all(r in store.pins for r in store.atoms(first) + store.atoms(second))
        return
    _assert_same_channels(store, first, second)


def _signatures_or_none(store: AxisStore, layout, atoms=None):
    """``signatures``, or ``None`` for a layout in which an atom multiplies itself (a square:
    ``coords`` cannot give one coordinate, see test_coords_of_repeated_atom_...)."""
    try:
        return signatures(store, layout, atoms)
    except Exception as error:  # layout._Conflict
        if "appears twice in product" in str(error):
            return None
        raise


def _assert_same_channels(store: AxisStore, first, second) -> None:
    """Two unified layouts agree at every position on every atom of more than one channel
    that they both show. One-channel atoms are left out: they vanish from a product (see
    make_prod), so one side may show one at some positions and not at others (CI,
    2026-12-02: cat(4, 2, 2) unified with prod(2, 2, 2)); no group is ever made of one."""
    second_atoms = set(store.atoms(second))
    common = [a for a in store.atoms(first) if a in second_atoms and store.sizes[a] > 1]
    left = _signatures_or_none(store, first, common)
    right = _signatures_or_none(store, second, common)
    if left is not None and right is not None:
        assert left == right, (store.resolve(first), store.resolve(second))
    if any(store.sizes[a] > 1 for a in store.atoms(first)) and \
            any(store.sizes[a] > 1 for a in second_atoms):
        assert common, (store.resolve(first), store.resolve(second))


def test_a_concatenation_unified_with_a_product_keeps_its_channels():
    """The CI case of 2026-12-02: cat(4, 2, 2) = prod(2, 2, 2); the 4-wide part is the
    product of the two inner factors, the two 2-wide parts are both the innermost factor."""
    store = AxisStore()
    first = make_cat([store.new(4), store.new(2), store.new(2)])
    second = make_prod([store.new(2), store.new(2), store.new(2)])
    store.unify(first, second, where="test")
    assert not store.conflicts
    _assert_same_channels(store, first, second)
    a, b, c = first.parts
    inner = second.parts[2]
    assert store.resolve(b) == store.resolve(inner) == store.resolve(c)
    assert store.resolve(a).size == 4 and store.resolve(inner) in store.resolve(a).parts


@pytest.mark.xfail(strict=True, reason="known gap: the outer piece of split(cat(b, c), [2, 2]) "
                   "is two one-channel atoms that vanish from the product, so unifying it "
                   "with the inner piece is not seen to contradict the split")
def test_split_piece_that_x_does_not_show_keeps_its_promise():
    """Found by test_random_operation_sequences (CI, 2026-12-02): x = cat(b, c) split 2 x 2
    makes b and c one atom and the outer piece two one-channel atoms; unifying outer with
    inner should record a conflict (x's outer and inner coordinates differ) but does not."""
    store = AxisStore()
    x = make_cat([store.new(2), store.new(2)])
    outer, inner = store.split(x, [2, 2], where="test")
    store.unify(outer, inner, where="test")
    if not store.conflicts:
        got = index_in(store, x, outer)
        assert np.array_equal(got[got >= 0], np.array([0, 0, 1, 1])[got >= 0])


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_operation_sequences(data):
    """Sequences of unify / split / slice on random layouts keep every promise made so far:
    sizes never change, slices and splits index their source row-major, unified pairs stay
    equal, and every conflict pins."""
    store = AxisStore()
    pool = [data.draw(layouts(store)) for _ in range(3)]
    equal: list[tuple] = []
    splits: list[tuple] = []
    cut: list[tuple] = []
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["unify", "unify", "split", "slice"]))
        x = data.draw(st.sampled_from(pool))
        conflicts = len(store.conflicts)
        with time_limit(5, op):
            if op == "unify":
                same = [y for y in pool if y.size == x.size and y is not x]
                y = data.draw(st.sampled_from(same)) if same else store.new(x.size)
                store.unify(x, y, where="random")
                if len(store.conflicts) == conflicts:
                    equal.append((x, y))
                else:
                    assert all(r in store.pins for r in store.atoms(x) + store.atoms(y))
            elif op == "split":
                divisors = [d for d in range(2, x.size) if x.size % d == 0]
                if not divisors:
                    continue
                outer = data.draw(st.sampled_from(divisors))
                pieces = store.split(x, [outer, x.size // outer], where="random")
                pool += pieces
                # a piece made only of one-channel atoms vanishes from x's product, and x
                # then cannot hold it to its promise (test_split_piece_that_x_does_not_show);
                # a square (an atom times itself: its pieces unified) has no one coordinate
                # to compare, as in the checks below
                if len(store.conflicts) == conflicts and _signatures_or_none(store, x) is not None \
                        and all((index_in(store, x, piece) >= 0).any() for piece in pieces):
                    splits.append((x, pieces))
            else:
                start = data.draw(st.integers(0, x.size - 1))
                stop = data.draw(st.integers(start + 1, x.size))
                step = data.draw(st.integers(1, 3))
                if _strided_slice_hangs(store, x, step):
                    continue
                part = store.slice(x, start, stop, step, where="random")
                assert part.size == len(range(start, stop, step))
                pool.append(part)
                if len(store.conflicts) == conflicts:
                    cut.append((x, part, range(start, stop, step)))
        for layout in pool:
            assert store.resolve(layout).size == layout.size
        for x, y in equal:
            _assert_same_channels(store, x, y)
        for x, (outer, inner) in splits:
            if _signatures_or_none(store, x) is None:
                continue
            for piece, want in zip((outer, inner), np.unravel_index(
                    np.arange(x.size), (outer.size, inner.size)), strict=True):
                # one-channel atoms vanish from products (make_prod drops size-1 factors), so
                # a piece may be finer than what x still shows: compare where x shows it
                got = index_in(store, x, piece)
                assert np.array_equal(got[got >= 0], want[got >= 0])
        for x, part, kept in cut:
            if _signatures_or_none(store, x) is None:
                continue
            for root in store.atoms(part):
                assert np.array_equal(store.coords(part, root), store.coords(x, root)[list(kept)])


# -------------------------------------------------------------- view_groups


def test_view_groups_doctests():
    result = doctest.testmod(depgraph.dimmap, verbose=False)
    assert result.attempted >= 2 and result.failed == 0
    result = doctest.testmod(depgraph.layout, verbose=False)
    assert result.failed == 0


def brute_force_groups(source: list[int], target: list[int]):
    """The finest pairing: cut wherever the running products of non-1 dims coincide."""
    src = [i for i, s in enumerate(source) if s != 1]
    dst = [i for i, s in enumerate(target) if s != 1]

    def prefixes(dims, sizes):
        out, run = [], 1
        for d in dims:
            run *= sizes[d]
            out.append(run)
        return out

    ps, pd = prefixes(src, source), prefixes(dst, target)
    cuts = sorted(set(ps) & set(pd))
    groups, i, j = [], 0, 0
    for cut in cuts:
        gi, gj = [], []
        while i < len(src) and ps[i] <= cut:
            gi.append(src[i])
            i += 1
        while j < len(dst) and pd[j] <= cut:
            gj.append(dst[j])
            j += 1
        groups.append((gi, gj))
    return groups


@st.composite
def reshapes(draw):
    source = draw(st.lists(st.integers(1, 6), min_size=0, max_size=5))
    remaining, target = math.prod(source), []
    while remaining > 1:
        divisors = [d for d in range(2, remaining + 1) if remaining % d == 0]
        target.append(draw(st.sampled_from(divisors)))
        remaining //= target[-1]
    for _ in range(draw(st.integers(0, 2))):
        target.insert(draw(st.integers(0, len(target))), 1)
    if draw(st.booleans()):
        source, target = target, source
    return source, target


@settings(max_examples=200, deadline=None)
@given(reshapes())
def test_view_groups_matches_brute_force(case):
    source, target = case
    groups = view_groups(source, target)
    assert groups == brute_force_groups(source, target)
    for src, dst in groups:
        assert src and dst
        assert math.prod(source[i] for i in src) == math.prod(target[i] for i in dst)
    assert [i for src, _ in groups for i in src] == [i for i, s in enumerate(source) if s != 1]
    assert [i for _, dst in groups for i in dst] == [i for i, s in enumerate(target) if s != 1]
    assert torch.empty(source).reshape(target).shape == tuple(target)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 6), max_size=4), st.lists(st.integers(1, 6), max_size=4))
def test_view_groups_rejects_other_sizes(source, target):
    if math.prod(source) == math.prod(target):
        assert view_groups(source, target) == brute_force_groups(source, target)
    else:
        with pytest.raises(ValueError, match="cannot view"):
            view_groups(source, target)


def test_view_groups_examples():
    assert view_groups([2, 3, 4], [6, 4]) == [([0, 1], [0]), ([2], [1])]
    assert view_groups([6], [2, 3]) == [([0], [0, 1])]
    assert view_groups([4, 6], [2, 12]) == [([0, 1], [0, 1])]
    assert view_groups([1, 5, 1], [5]) == [([1], [0])]
    assert view_groups([1, 1], []) == []
