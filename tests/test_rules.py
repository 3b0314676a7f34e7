"""Every coupling rule checked by running its op (see ``rule_harness``).

Perturb input channel ``c``; only the output positions that the propagated layouts couple to
``c`` may change (soundness). For the structural ops, every predicted position does change
(exactness), except where the layout vocabulary cannot say which input a position comes
from (the new dim of ``stack``, the dropped dim of ``select``, other phases of a strided
slice, the rows of an embedding or ``index_select``): there exactness is checked only on the
region where it holds.
"""

from __future__ import annotations

import math
import warnings

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rule_harness import check_op, trace_op
from torch import nn

from depgraph import build_graph
from depgraph.dimmap import Coupling, InputDim
from depgraph.errors import UnsupportedOpError
from depgraph.rules import lookup, registry
from depgraph.rules.common import dims_of
from depgraph.rules.registry import registered

torch.set_num_threads(1)

FEW = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
SOME = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))

SIZE = st.integers(1, 5)


def shapes(min_rank: int = 1, max_rank: int = 4, size=SIZE):
    return st.lists(size, min_size=min_rank, max_size=max_rank).map(tuple)


def _tensor(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _tensors(seed: int, *shape_list) -> list[torch.Tensor]:
    """Random float64 tensors of these shapes (a tensor in the list is passed through)."""
    gen = torch.Generator().manual_seed(seed)
    return [s if isinstance(s, torch.Tensor) else _tensor(s, gen) for s in shape_list]


SEED = st.integers(0, 2**20)


def _no_conflicts(traced) -> None:
    assert not traced.store.conflicts, traced.describe()


# ------------------------------------------------------------------ views


@st.composite
def aligned_reshapes(draw):
    """An input and an output shape that group one list of factors two ways (plus 1s)."""
    factors = draw(st.lists(st.integers(2, 4), min_size=0, max_size=4))

    def group():
        cuts = [draw(st.booleans()) for _ in range(max(len(factors) - 1, 0))]
        out, run = [], factors[:1]
        for factor, cut in zip(factors[1:], cuts, strict=True):
            if cut:
                out.append(math.prod(run))
                run = [factor]
            else:
                run.append(factor)
        if run:
            out.append(math.prod(run))
        for _ in range(draw(st.integers(0, 2))):
            out.insert(draw(st.integers(0, len(out))), 1)
        return tuple(out) or (1,)

    return group(), group()


@FEW
@given(aligned_reshapes(), SEED, st.booleans())
def test_view_split_and_merge_is_exact(shapes_, seed, use_view):
    source, target = shapes_
    (x,) = _tensors(seed, source)
    fn = (lambda t: t.view(target)) if use_view else (lambda t: t.reshape(target))
    _no_conflicts(check_op(fn, [x], exact=True, seed=seed))


@st.composite
def any_reshape(draw):
    source = draw(shapes(1, 4))
    remaining, target = math.prod(source), []
    while remaining > 1 and len(target) < 5:
        divisors = [d for d in range(2, remaining + 1) if remaining % d == 0]
        size = draw(st.sampled_from(divisors))
        target.append(size)
        remaining //= size
    if remaining > 1:
        target.append(remaining)
    if draw(st.booleans()):
        target.insert(draw(st.integers(0, len(target))), 1)
    return source, tuple(target) or (1,)


@FEW
@given(any_reshape(), SEED)
def test_any_reshape_is_sound(shapes_, seed):
    """Misaligned reshapes may pin (a conflict) but never miss a coupling."""
    source, target = shapes_
    (x,) = _tensors(seed, source)
    traced = trace_op(lambda t: t.reshape(target), [x])
    check_op(lambda t: t.reshape(target), [x], exact=not traced.store.conflicts, seed=seed)


@FEW
@given(shapes(2, 4), st.data(), SEED)
def test_flatten_unflatten(shape, data, seed):
    rank = len(shape)
    start = data.draw(st.integers(0, rank - 1))
    end = data.draw(st.integers(start, rank - 1))
    (x,) = _tensors(seed, shape)
    _no_conflicts(check_op(lambda t: t.flatten(start, end), [x], exact=True, seed=seed))
    dim = data.draw(st.integers(-rank, rank - 1))
    size = shape[dim]
    first = data.draw(st.sampled_from([d for d in range(1, size + 1) if size % d == 0]))
    _no_conflicts(check_op(lambda t: t.unflatten(dim, (first, size // first)), [x], exact=True,
                           seed=seed))


@FEW
@given(shapes(1, 4), st.data(), SEED)
def test_permute_transpose(shape, data, seed):
    rank = len(shape)
    order = data.draw(st.permutations(range(rank)))
    order = [d - rank if data.draw(st.booleans()) else d for d in order]
    (x,) = _tensors(seed, shape)
    check_op(lambda t: t.permute(order), [x], exact=True, seed=seed)
    d0, d1 = data.draw(st.integers(-rank, rank - 1)), data.draw(st.integers(-rank, rank - 1))
    check_op(lambda t: t.transpose(d0, d1), [x], exact=True, seed=seed)
    if rank == 2:  # on 2-D tensors these are all transpose(0, 1)
        check_op(lambda t: t.t(), [x], exact=True, seed=seed)
        check_op(lambda t: t.T, [x], exact=True, seed=seed)
        check_op(lambda t: t.adjoint(), [x], exact=True, seed=seed)
    src, dst = data.draw(st.integers(-rank, rank - 1)), data.draw(st.integers(-rank, rank - 1))
    check_op(lambda t: t.movedim(src, dst), [x], exact=True, seed=seed)
    check_op(lambda t: t.swapaxes(d0, d1), [x], exact=True, seed=seed)


@FEW
@given(shapes(1, 3), st.data(), SEED)
def test_expand(shape, data, seed):
    shape = tuple(1 if data.draw(st.booleans()) else s for s in shape)
    lead = data.draw(st.lists(SIZE, max_size=2))
    target = [*lead, *(data.draw(SIZE) if s == 1 else s for s in shape)]
    spelled = [*lead, *(t if t != s or data.draw(st.booleans()) else -1
                        for s, t in zip(shape, target[len(lead):], strict=True))]
    (x,) = _tensors(seed, shape)
    check_op(lambda t: t.expand(spelled), [x], exact=True, seed=seed)


@FEW
@given(shapes(1, 3), st.data(), SEED)
def test_unsqueeze_squeeze(shape, data, seed):
    rank = len(shape)
    dim = data.draw(st.integers(-rank - 1, rank))
    (x,) = _tensors(seed, shape)
    check_op(lambda t: t.unsqueeze(dim), [x], exact=True, seed=seed)
    ones = [d for d, s in enumerate(shape) if s == 1]
    if ones:
        one = data.draw(st.sampled_from(ones))
        check_op(lambda t: t.squeeze(one), [x], exact=True, seed=seed)
        check_op(lambda t: t.squeeze(), [x], exact=True, seed=seed)


@SOME
@given(shapes(1, 3, st.integers(1, 6)), st.data(), SEED)
def test_slice(shape, data, seed):
    rank = len(shape)
    dim = data.draw(st.integers(0, rank - 1))
    size = shape[dim]
    start = data.draw(st.integers(-size - 1, size + 1))
    stop = data.draw(st.integers(-size - 1, size + 1) | st.none())
    step = data.draw(st.integers(1, 3))
    index = [slice(None)] * rank
    index[dim] = slice(start, stop, step)
    index = tuple(index)
    (x,) = _tensors(seed, shape)
    if x[index].numel() == 0:
        return
    kept = range(*slice(start, stop, step).indices(size))
    traced = trace_op(lambda t: t[index], [x])
    if step == 1:
        _no_conflicts(traced)

    def exact(k, d, c):
        # a strided slice keeps the rows of ``size // step`` and drops the phase: channels of
        # the other phases share the row coordinate (coarser, still sound)
        return d != dim or step == 1 or (not traced.store.conflicts and c in kept)

    check_op(lambda t: t[index], [x], exact=exact, seed=seed)


@FEW
@given(shapes(1, 3), st.data(), SEED)
def test_select_and_narrow(shape, data, seed):
    rank = len(shape)
    dim = data.draw(st.integers(-rank, rank - 1))
    size = shape[dim]
    index = data.draw(st.integers(-size, size - 1))
    (x,) = _tensors(seed, shape)
    norm_dim, norm_index = dim % rank, index % size
    # the selected dim is gone from the output: only the selected index is exactly predicted
    _no_conflicts(check_op(lambda t: t.select(dim, index), [x], seed=seed,
                           exact=lambda k, d, c: d != norm_dim or c == norm_index))
    start = data.draw(st.integers(0, size - 1))
    length = data.draw(st.integers(1, size - start))
    _no_conflicts(check_op(lambda t: t.narrow(dim, start, length), [x], exact=True, seed=seed))


@FEW
@given(shapes(1, 3), st.data(), SEED)
def test_cat(shape, data, seed):
    rank = len(shape)
    dim = data.draw(st.integers(-rank, rank - 1))
    count = data.draw(st.integers(2, 3))
    pieces = []
    for _ in range(count):
        piece = list(shape)
        piece[dim] = data.draw(SIZE)
        pieces.append(tuple(piece))
    args = _tensors(seed, *pieces)
    at = dim % rank
    starts = [sum(p[at] for p in pieces[:k]) for k in range(count + 1)]

    def region(k, d, c):
        # a one-channel piece has no atom (UNIT), so the output cannot say which piece a
        # position came from: exact then only within input k's own part
        if all(p[at] > 1 for p in pieces):
            return True
        index = [slice(None)] * rank
        index[at] = slice(starts[k], starts[k + 1])
        return tuple(index)

    _no_conflicts(check_op(lambda *ts: torch.cat(ts, dim), args, exact=region, seed=seed))


@FEW
@given(shapes(1, 3), st.data(), SEED)
def test_stack(shape, data, seed):
    rank = len(shape)
    dim = data.draw(st.integers(-rank - 1, rank))
    count = data.draw(st.integers(2, 3))
    args = _tensors(seed, *[shape] * count)
    at = dim % (rank + 1)

    def region(k, d, c):  # the stacked dim is fresh: exact within input k's own slice
        index = [slice(None)] * (rank + 1)
        index[at] = k
        return tuple(index)

    check_op(lambda *ts: torch.stack(ts, dim), args, exact=region, seed=seed)


@FEW
@given(shapes(1, 3, st.integers(1, 6)), st.data(), SEED)
def test_split_chunk(shape, data, seed):
    rank = len(shape)
    dim = data.draw(st.integers(-rank, rank - 1))
    size = shape[dim]
    (x,) = _tensors(seed, shape)
    step = data.draw(st.integers(1, size))
    _no_conflicts(check_op(lambda t: t.split(step, dim), [x], exact=True, seed=seed))
    sizes = []
    while sum(sizes) < size:
        sizes.append(data.draw(st.integers(1, size - sum(sizes))))
    _no_conflicts(check_op(lambda t: t.split(sizes, dim), [x], exact=True, seed=seed))
    chunks = data.draw(st.integers(1, size))
    _no_conflicts(check_op(lambda t: t.chunk(chunks, dim), [x], exact=True, seed=seed))
    _no_conflicts(check_op(lambda t: t.unbind(dim), [x], seed=seed,
                           exact=lambda k, d, c: d != dim % rank))


@FEW
@given(shapes(1, 3), st.data(), SEED)
def test_repeat(shape, data, seed):
    repeats = [data.draw(st.integers(1, 3)) for _ in range(len(shape) + data.draw(
        st.integers(0, 1)))]
    (x,) = _tensors(seed, shape)
    check_op(lambda t: t.repeat(repeats), [x], exact=True, seed=seed)


@FEW
@given(shapes(1, 3), st.data(), SEED)
def test_repeat_interleave(shape, data, seed):
    rank = len(shape)
    dim = data.draw(st.integers(-rank, rank - 1))
    times = data.draw(st.integers(1, 3))
    (x,) = _tensors(seed, shape)
    check_op(lambda t: t.repeat_interleave(times, dim), [x], exact=True, seed=seed)
    check_op(lambda t: t.repeat_interleave(times), [x], seed=seed)


# ---------------------------------------------------------------- compute


@st.composite
def broadcastable(draw, count: int):
    """``count`` shapes that broadcast together (some dims 1, some ranks shorter)."""
    full = draw(shapes(1, 4))
    out = []
    for _ in range(count):
        rank = draw(st.integers(0, len(full)))
        tail = full[len(full) - rank:]
        out.append(tuple(1 if draw(st.booleans()) and draw(st.booleans()) else s for s in tail))
    return out


@SOME
@given(broadcastable(2), SEED, st.sampled_from(["add", "mul", "sub", "maximum"]))
def test_pointwise_broadcasting(shapes_, seed, op):
    fn = {"add": torch.add, "mul": torch.mul, "sub": torch.sub, "maximum": torch.maximum}[op]
    args = _tensors(seed, *shapes_)
    # maximum only moves where one operand wins: soundness only
    _no_conflicts(check_op(fn, args, exact=op != "maximum", seed=seed))


@FEW
@given(broadcastable(3), SEED)
def test_where_broadcasting(shapes_, seed):
    cond, x, y = _tensors(seed, *shapes_)
    check_op(lambda m, a, b: torch.where(m, a, b), [cond > 0, x, y], seed=seed)


@FEW
@given(shapes(1, 3), SIZE, st.booleans(), SEED)
def test_linear(shape, out_features, bias, seed):
    in_features = shape[-1]
    args = _tensors(seed, shape, (out_features, in_features), (out_features,))
    if bias:
        _no_conflicts(check_op(F.linear, args, exact=True, seed=seed))
    else:
        _no_conflicts(check_op(F.linear, args[:2], exact=True, seed=seed))


@st.composite
def matmul_shapes(draw):
    n, k, m = draw(SIZE), draw(SIZE), draw(SIZE)
    batch = draw(shapes(0, 2))
    rank_a, rank_b = draw(st.integers(1, 4)), draw(st.integers(1, 4))

    def batch_of(rank):
        dims = batch[len(batch) - max(rank - 2, 0):] if rank > 2 else ()
        dims = tuple(1 if draw(st.booleans()) and draw(st.booleans()) else d for d in dims)
        return (1,) * max(rank - 2 - len(dims), 0) + dims

    a = (k,) if rank_a == 1 else (*batch_of(rank_a), n, k)
    b = (k,) if rank_b == 1 else (*batch_of(rank_b), k, m)
    return a, b


@SOME
@given(matmul_shapes(), SEED)
def test_matmul(shapes_, seed):
    args = _tensors(seed, *shapes_)
    _no_conflicts(check_op(torch.matmul, args, exact=True, seed=seed))


@FEW
@given(SIZE, SIZE, SIZE, SIZE, SEED)
def test_bmm(b, n, k, m, seed):
    args = _tensors(seed, (b, n, k), (b, k, m))
    _no_conflicts(check_op(torch.bmm, args, exact=True, seed=seed))


@FEW
@given(shapes(1, 4), st.data(), SEED)
def test_softmax_sound(shape, data, seed):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    (x,) = _tensors(seed, shape)
    check_op(lambda t: t.softmax(dim), [x], seed=seed)
    check_op(lambda t: t.log_softmax(dim), [x], seed=seed)


@FEW
@given(shapes(1, 4), st.data(), SEED)
def test_norms_sound(shape, data, seed):
    count = data.draw(st.integers(1, len(shape)))
    normalized = shape[len(shape) - count:]
    x, w, b = _tensors(seed, shape, normalized, normalized)
    check_op(lambda t, wt, bs: F.layer_norm(t, normalized, wt, bs), [x, w, b], seed=seed)
    check_op(lambda t: F.layer_norm(t, normalized), [x], seed=seed)
    check_op(lambda t, wt: F.rms_norm(t, normalized, wt, eps=1e-6), [x, w], seed=seed)


@FEW
@given(shapes(1, 4), st.data(), SEED)
def test_reductions(shape, data, seed):
    rank = len(shape)
    dims = data.draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
    dims = [d - rank if data.draw(st.booleans()) else d for d in dims]
    keep = data.draw(st.booleans())
    (x,) = _tensors(seed, shape)
    check_op(lambda t: t.sum(dims, keepdim=keep), [x], exact=True, seed=seed)
    check_op(lambda t: t.mean(dims, keepdim=keep), [x], exact=True, seed=seed)
    check_op(lambda t: t.sum(), [x], exact=True, seed=seed)
    check_op(lambda t: t.amax(dims, keepdim=keep), [x], seed=seed)


@FEW
@given(st.integers(2, 6), SIZE, shapes(1, 2), SEED)
def test_embedding(vocab, width, index_shape, seed):
    (weight,) = _tensors(seed, (vocab, width))
    ids = torch.randint(0, vocab, index_shape, generator=torch.Generator().manual_seed(seed))
    # rows are looked up by data: exactness only along the embedding width
    check_op(lambda w, i: F.embedding(i, w), [weight, ids], seed=seed,
             exact=lambda k, d, c: d == 1)


@FEW
@given(shapes(1, 3), st.data(), SEED)
def test_index_select(shape, data, seed):
    rank = len(shape)
    dim = data.draw(st.integers(-rank, rank - 1))
    count = data.draw(st.integers(1, 4))
    (x,) = _tensors(seed, shape)
    ids = torch.randint(0, shape[dim], (count,), generator=torch.Generator().manual_seed(seed))
    check_op(lambda t, i: t.index_select(dim, i), [x, ids], seed=seed,
             exact=lambda k, d, c: d != dim % rank)


@FEW
@given(shapes(1, 3), st.data(), SEED)
def test_gather(shape, data, seed):
    rank = len(shape)
    dim = data.draw(st.integers(-rank, rank - 1))
    index_shape = tuple(data.draw(st.integers(1, s)) if data.draw(st.booleans()) else s
                        for s in shape)
    index_shape = tuple(data.draw(SIZE) if d == dim % rank else s
                        for d, s in enumerate(index_shape))
    (x,) = _tensors(seed, shape)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape[dim], index_shape, generator=gen)
    check_op(lambda t, i: t.gather(dim, i), [x, ids], seed=seed)


@FEW
@given(SIZE, st.integers(1, 3), st.integers(1, 2), SIZE, SIZE, SIZE, SIZE, st.data(), SEED)
def test_scaled_dot_product_attention(batch, kv_heads, rep, q_len, kv_len, head_dim, v_dim,
                                      data, seed):
    gqa = rep > 1
    q_heads = kv_heads * rep
    q, k, v = _tensors(seed, (batch, q_heads, q_len, head_dim), (batch, kv_heads, kv_len, head_dim),
                       (batch, kv_heads, kv_len, v_dim))
    mode = data.draw(st.sampled_from(["plain", "causal", "mask"]))
    kwargs = {"enable_gqa": True} if gqa else {}
    if mode == "causal":
        kwargs["is_causal"] = True
    if mode == "mask":
        (mask,) = _tensors(seed + 1, (batch, 1, q_len, kv_len))
        check_op(lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, attn_mask=m, **kwargs),
                 [q, k, v, mask], seed=seed)
    else:
        check_op(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, **kwargs), [q, k, v],
                 seed=seed)


def _ids(high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(high))


# (name, fn, input shapes or tensors, exact): more rules, each run once on fixed shapes
_MORE = [
    ("einsum", lambda a, b: torch.einsum("bij,bjk->bik", a, b), [(2, 3, 4), (2, 4, 5)], True),
    ("einsum_t", lambda a, b: torch.einsum("ij,kj->ik", a, b), [(3, 4), (5, 4)], True),
    ("einsum_heads", lambda a, b: torch.einsum("bhqd,bhkd->bhqk", a, b),
     [(2, 1, 4, 5), (2, 3, 6, 5)], True),
    ("addmm", torch.addmm, [(5,), (3, 4), (4, 5)], True),
    ("addmm_col_bias", torch.addmm, [(3, 1), (3, 4), (4, 5)], True),
    ("baddbmm", torch.baddbmm, [(2, 3, 5), (2, 3, 4), (2, 4, 5)], True),
    ("glu", lambda x: F.glu(x, -1), [(3, 6)], False),
    ("diff", lambda x: torch.diff(x, dim=1), [(3, 6)], False),
    ("diff_prepend", lambda x, p: torch.diff(x, dim=1, prepend=p), [(3, 6), (3, 2)], False),
    ("tensor_split", lambda x: x.tensor_split(3, 1), [(3, 7)], True),
    ("tensor_split_at", lambda x: x.tensor_split([1, 4], 1), [(3, 7)], True),
    ("cumsum", lambda x: x.cumsum(1), [(3, 5)], False),
    ("topk", lambda x: x.topk(2, 1)[0], [(3, 5)], False),
    ("max_dim", lambda x: x.max(1)[0], [(3, 5)], False),
    ("max_all", lambda x: x.max(), [(3, 5)], False),
    ("sort", lambda x: x.sort(1)[0], [(3, 5)], False),
    ("var", lambda x: x.var(1), [(3, 5)], False),
    ("std_keepdim", lambda x: x.std(0, keepdim=True), [(3, 5)], False),
    ("vector_norm", lambda x: torch.linalg.vector_norm(x, dim=0), [(3, 5)], False),
    ("logsumexp", lambda x: x.logsumexp(1), [(3, 5)], False),
    ("prod", lambda x: x.prod(1), [(3, 5)], True),
    ("masked_fill", lambda x, m: x.masked_fill(m > 0, 0.0), [(3, 5), (5,)], False),
    ("masked_fill_", lambda x, m: x.clone().masked_fill_(m > 0, 1.0), [(3, 5), (3, 5)], False),
    ("clamp", lambda x: x.clamp(-0.5, 0.5), [(3, 5)], False),
    ("pow", lambda x, y: torch.pow(x.abs() + 1, y), [(3, 5), (3, 1)], True),
    ("lerp", torch.lerp, [(3, 5), (5,), (3, 1)], True),
    ("addcmul", torch.addcmul, [(3, 5), (5,), (3, 1)], True),
    ("silu", F.silu, [(3, 5)], True),
    ("gelu", F.gelu, [(3, 5)], True),
    ("add_", lambda x, y: x.clone().add_(y), [(3, 5), (5,)], True),
    ("mul_0d", torch.mul, [(3, 5), ()], True),
    ("index_add", lambda x, s, i: x.index_add(1, i, s), [(3, 5), (3, 2), _ids(5, 2)], False),
    ("index_copy", lambda x, s, i: x.index_copy(1, i, s), [(3, 5), (3, 2), torch.tensor([4, 1])],
     False),
    ("scatter_add", lambda x, s, i: x.scatter_add(1, i, s), [(3, 5), (3, 2), _ids(5, 3, 2)],
     False),
    ("scatter", lambda x, s, i: x.scatter(1, i, s), [(3, 5), (3, 2), _ids(5, 3, 2)], False),
    ("index_put", lambda x, v, i: x.index_put((i,), v), [(4, 5), (2, 5), torch.tensor([3, 1])],
     False),
    ("index_middle", lambda x, i: x[:, i], [(3, 5, 4), _ids(5, 2, 2)], lambda k, d, c: d != 1),
    ("index_split", lambda x, i, j: x[i, :, j], [(4, 3, 5), _ids(4, 2), _ids(5, 2)],
     lambda k, d, c: d == 1),
    ("index_pair", lambda x, i, j: x[:, i, j], [(4, 3, 5), _ids(3, 2), _ids(5, 2)],
     lambda k, d, c: d == 0),
    ("take_along_dim", lambda x, i: torch.take_along_dim(x, i, 1), [(3, 5), _ids(5, 3, 2)],
     False),
    ("tril", lambda x: x.tril(), [(4, 4)], False),
    ("dropout_eval", lambda x: F.dropout(x, 0.5, training=False), [(3, 4)], True),
    ("clone", lambda x: x.clone(), [(3, 4)], True),
    ("to", lambda x: x.to(torch.float32).double(), [(3, 4)], True),
    ("expand_as", lambda x, y: x.expand_as(y), [(3, 1), (2, 3, 4)], lambda k, d, c: k == 0),
    ("where_scalar", lambda m, x: torch.where(m > 0, x, 0.0), [(3, 1), (4,)], False),
    ("copy_", lambda x, y: x.clone().copy_(y), [(3, 4), (4,)], False),
    ("rotate_half", lambda x: x * 2.0 + torch.cat([-x[..., 2:], x[..., :2]], -1), [(3, 4)],
     False),
    ("rotate_every_two", lambda x: torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2),
     [(3, 4)], False),
    ("sdpa_3d", F.scaled_dot_product_attention, [(3, 4, 5), (3, 6, 5), (3, 6, 7)], False),
    ("sdpa_full_mask", lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
     [(2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7), (2, 3, 4, 6)], False),
    ("sdpa_bool_mask",
     lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m > -1),
     [(2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7), (4, 6)], False),
    ("argmax_one_hot", lambda x: F.one_hot(x.argmax(-1), 5).double(), [(3, 5)], False),
    ("topk_gather", lambda x, y: y.gather(1, x.topk(2, 1)[1]), [(3, 5), (3, 5)], False),
    ("arange_add", lambda x: x + torch.arange(5, dtype=torch.float64), [(3, 5)], True),
    ("zeros_like_add", lambda x: torch.zeros_like(x) + x, [(3, 5)], True),
    ("new_zeros_cat", lambda x: torch.cat([x, x.new_zeros(3, 2)], 1), [(3, 5)], True),
    ("squeeze_dims", lambda x: x.squeeze((0, 2)), [(1, 3, 1, 2)], True),
    ("view_as", lambda x, y: x.view_as(y), [(6, 2), (3, 4)], False),
    ("repeat_kv", lambda x: x[:, :, None].expand(2, 3, 2, 4, 5).reshape(2, 6, 4, 5),
     [(2, 3, 4, 5)], True),
    ("x_plus_xT", lambda x: x + x.t(), [(3, 3)], False),
    ("x_matmul_x", lambda x: x @ x, [(3, 3)], False),
    ("cat_self", lambda x: torch.cat([x, x], 0), [(2, 3)], False),
    ("heads_view_transpose", lambda x: x.view(2, 3, 2, 2).transpose(1, 2).reshape(2, 2, 6),
     [(2, 3, 4)], True),
    ("min_other", torch.min, [(3, 4), (4,)], False),
    ("max_other", torch.max, [(3, 1), (3, 4)], False),
    ("conv1d_depthwise", lambda x, w, b: F.conv1d(x, w, b, padding=2, groups=4),
     [(2, 4, 7), (4, 1, 3), (4,)], False),
    ("conv1d_dense", lambda x, w, b: F.conv1d(x, w, b), [(2, 4, 7), (6, 4, 3), (6,)], False),
    ("conv1d_groups", lambda x, w: F.conv1d(x, w, groups=2), [(2, 4, 7), (6, 2, 3)], False),
    ("pad_last", lambda x: F.pad(x, (1, 2)), [(3, 4)], True),
    ("pad_crop", lambda x: F.pad(x, (0, 0, 2, -1)), [(3, 4, 5)], False),
    ("broadcast_tensors", lambda x, y: torch.broadcast_tensors(x, y)[0] * 2 + torch.broadcast_tensors(
        x, y)[1], [(3, 1), (4,)], False),
    ("log_sigmoid", F.logsigmoid, [(3, 4)], True),
    ("unfold", lambda x: x.unfold(1, 3, 1).sum(-1), [(2, 6, 4)], False),
    ("flip", lambda x: x.flip(1) * 2, [(2, 6, 4)], False),
    ("flip_two", lambda x: x.flip([0, -1]), [(3, 2, 5)], False),
    ("complex_rotary", lambda x, a: torch.view_as_real(
        torch.view_as_complex(x.reshape(3, 4, 2)) * torch.polar(torch.ones_like(a), a)).flatten(-2),
     [(3, 8), (3, 4)], False),
]


@pytest.mark.parametrize("name, fn, shapes_, exact", _MORE, ids=[case[0] for case in _MORE])
def test_more_rules(name, fn, shapes_, exact):
    args = _tensors(len(name), *shapes_)
    check_op(fn, args, exact=exact, seed=len(name))


# ------------------------------------------------------------- unsupported


def _unregistered(op) -> bool:
    return lookup(op) is None and op._schema.name not in registered()


@pytest.mark.parametrize("fn, name", [
    (lambda t: torch.cummax(t, 0)[0], "aten::cummax"),
    (lambda t: torch.linalg.det(t), "aten::linalg_det"),
])
def test_op_without_rule_raises(fn, name):
    assert _unregistered(getattr(torch.ops.aten, name.split("::")[1]).default)
    (x,) = _tensors(0, (3, 3))
    with pytest.raises(UnsupportedOpError) as info:
        trace_op(fn, [x])
    message = str(info.value)
    for needle in (name, "node=", "module=", "source="):
        assert needle in message, message


class _Flipper(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.inner = _FlipBlock()

    def forward(self, input_ids):
        return self.inner(self.embed(input_ids))


class _FlipBlock(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, -1)


def test_build_graph_names_op_module_and_source():
    assert _unregistered(torch.ops.aten.roll.default)
    with pytest.raises(UnsupportedOpError) as info:
        build_graph(_Flipper())
    message = str(info.value)
    assert "aten::roll" in message and "node=" in message
    assert "module=inner" in message, message
    assert "source=" in message and "torch.roll" in message, message


def test_rules_used_here_are_registered():
    names = registered()
    for name in ("aten::view", "aten::permute", "aten::expand", "aten::slice", "aten::select",
                 "aten::cat", "aten::stack", "aten::split", "aten::chunk", "aten::repeat",
                 "aten::repeat_interleave", "aten::linear", "aten::matmul", "aten::bmm",
                 "aten::softmax", "aten::layer_norm", "aten::rms_norm", "aten::sum",
                 "aten::mean", "aten::embedding", "aten::index_select", "aten::gather",
                 "aten::scaled_dot_product_attention", "aten::where"):
        assert name in names, name
    assert lookup(torch.ops.aten.add.Tensor) is not None  # pointwise fallback
    assert lookup(torch.ops.aten.add_.Tensor) is not None  # in-place variant


def test_harness_wiring():
    """Fresh atoms in; ``add`` unifies its operands; one networkx node per dim."""
    x, y = _tensors(0, (2, 3), (2, 3))
    traced = trace_op(torch.add, [x, y])
    store = traced.store
    assert store.atoms(traced.inputs[0].dims[1]) == store.atoms(traced.inputs[1].dims[1])
    assert store.atoms(traced.outputs[0].dims[0]) == store.atoms(traced.inputs[0].dims[0])
    assert isinstance(traced.graph, nx.MultiDiGraph) and traced.graph.number_of_nodes() == 6
    assert any(kind == "same" for _, _, kind in traced.graph.edges(data="kind"))


def _wrong_transpose(node):
    """A broken rule: says transpose keeps the dims in place."""
    return Coupling(outputs=[dims_of(node.args[0])], edge_kind="permute")


def test_harness_catches_a_wrong_rule(monkeypatch):
    """The oracle has teeth: a rule that forgets to swap the dims is reported as unsound."""
    monkeypatch.setitem(registry._RULES, "aten::transpose", _wrong_transpose)
    (x,) = _tensors(0, (3, 3))
    with pytest.raises(AssertionError, match="UNSOUND"):
        check_op(lambda t: t.transpose(0, 1), [x])


def test_harness_catches_an_invented_coupling(monkeypatch):
    """... and a rule that couples what the op keeps apart is reported as inexact."""
    def over_coupled(node):
        coupling = Coupling(outputs=[dims_of(node.args[0])], edge_kind="permute")
        coupling.same.append((InputDim(node.args[0], 0), InputDim(node.args[0], 1)))
        return coupling

    monkeypatch.setitem(registry._RULES, "aten::clone", over_coupled)
    (x,) = _tensors(0, (3, 3))
    with pytest.raises(AssertionError, match="INEXACT"):
        check_op(lambda t: t.clone(), [x], exact=True)


# ----------------------------------------------------------- compositions


@st.composite
def reshape_then_cut(draw):
    source, target = draw(aligned_reshapes())
    rank = len(target)
    dim = draw(st.integers(0, rank - 1))
    size = target[dim]
    kind = draw(st.sampled_from(["slice", "select", "split", "narrow"]))
    start = draw(st.integers(0, size - 1))
    stop = draw(st.integers(start + 1, size))
    return source, target, dim, kind, start, stop


@SOME
@given(reshape_then_cut(), SEED)
def test_reshape_then_cut_is_sound(case, seed):
    """A cut of a reshaped dim (a product): aligned cuts refine, others pin; never unsound."""
    source, target, dim, kind, start, stop = case
    (x,) = _tensors(seed, source)
    index = [slice(None)] * len(target)
    index[dim] = slice(start, stop)
    cut = {
        "slice": lambda t: t.reshape(target)[tuple(index)],
        "select": lambda t: t.reshape(target).select(dim, start),
        "split": lambda t: t.reshape(target).split(stop - start, dim),
        "narrow": lambda t: t.reshape(target).narrow(dim, start, stop - start),
    }[kind]
    check_op(cut, [x], seed=seed)


def _chain_step(data, shape: tuple[int, ...]):
    """One random structural (or reducing) op on a tensor of ``shape``: (fn, new shape)."""
    rank = len(shape)
    kind = data.draw(st.sampled_from(["reshape", "permute", "slice", "select", "add", "cat",
                                      "expand", "repeat_interleave", "softmax", "sum",
                                      "chunk", "transpose"]))
    dim = data.draw(st.integers(0, rank - 1))
    size = shape[dim]
    if kind == "reshape":
        remaining, target = math.prod(shape), []
        while remaining > 1:
            target.append(data.draw(st.sampled_from(
                [d for d in range(2, remaining + 1) if remaining % d == 0])))
            remaining //= target[-1]
        target = tuple(target) or (1,)
        return (lambda t, o: t.reshape(target)), target
    if kind == "permute":
        order = data.draw(st.permutations(range(rank)))
        return (lambda t, o: t.permute(order)), tuple(shape[d] for d in order)
    if kind == "transpose" and rank >= 2:
        return (lambda t, o: t.transpose(0, -1)), (shape[-1], *shape[1:-1], shape[0])
    if kind == "slice" and size > 1:
        start = data.draw(st.integers(0, size - 1))
        stop = data.draw(st.integers(start + 1, size))
        index = tuple([slice(None)] * dim + [slice(start, stop)])
        return (lambda t, o: t[index]), shape[:dim] + (stop - start,) + shape[dim + 1:]
    if kind == "select" and rank > 1:
        at = data.draw(st.integers(0, size - 1))
        return (lambda t, o: t.select(dim, at)), shape[:dim] + shape[dim + 1:]
    if kind == "add":  # a second operand: the other input, viewed to this shape
        return (lambda t, o: t + o[:math.prod(shape)].reshape(shape)), shape
    if kind == "cat":
        return (lambda t, o: torch.cat([t, t], dim)), shape[:dim] + (2 * size,) + shape[dim + 1:]
    if kind == "expand":
        return (lambda t, o: t.unsqueeze(0).expand(2, *shape)), (2, *shape)
    if kind == "repeat_interleave":
        return (lambda t, o: t.repeat_interleave(2, dim)), shape[:dim] + (2 * size,) + shape[
            dim + 1:]
    if kind == "softmax":
        return (lambda t, o: t.softmax(dim)), shape
    if kind == "sum" and rank > 1:
        return (lambda t, o: t.sum(dim)), shape[:dim] + shape[dim + 1:]
    if kind == "chunk" and size % 2 == 0:
        return (lambda t, o: t.chunk(2, dim)[1]), shape[:dim] + (size // 2,) + shape[dim + 1:]
    return (lambda t, o: t), shape


@SOME
@given(shapes(1, 3, st.integers(1, 4)), st.data(), SEED)
def test_random_chains_are_sound(shape, data, seed):
    """Two to four ops in a row: the layouts the rules build together never miss a coupling."""
    steps, current = [], shape
    for _ in range(data.draw(st.integers(2, 4))):
        fn, current = _chain_step(data, current)
        if math.prod(current) > 256:
            break
        steps.append(fn)

    def chain(t, other):
        for fn in steps:
            t = fn(t, other)
        return t

    x, other = _tensors(seed, shape, (256,))
    check_op(chain, [x, other], seed=seed, perturb=[0])


# ---------------------------------------------------------------- bugs
# Regressions: library bugs the oracle found, now fixed; each constant records the file, the
# cause and the input that showed it.
_ADJOINT_BUG = ("depgraph/rules/views.py permute(): aten::adjoint falls into the transpose "
                "branch with no dim args and swaps dims 0 and 1; adjoint swaps the LAST two "
                "dims (rank >= 3 gets the wrong layout: silently wrong when sizes agree)")
_NUMPY_T_BUG = ("depgraph/rules/views.py permute(): aten::numpy_T (x.T) reverses all dims "
                "but the rule swaps dims 0 and 1 (wrong for rank >= 3)")
_MT_BUG = ("aten::mT (x.mT) has no rule (it is even listed in compute._SAME_DATA): "
           "UnsupportedOpError; it is transpose(-2, -1)")
_MOVEDIM_BUG = ("depgraph/rules/views.py permute(): aten::movedim.intlist (tuple source/"
                "destination) crashes with TypeError on normalize_dim(list)")


_GROUP_NORM_BUG = ("depgraph/rules/compute.py norm(): for aten::group_norm the reduced dims "
                   "are trailing=[1] only; group_norm normalises each group over channels AND "
                   "all spatial dims 2.., so those mix too but are neither tagged nor reduced")
_ONE_HOT_BUG = ("depgraph/propagate.py _apply (line ~176): a DimSpec that resolves to None "
                "(one_hot's ValueAxis of indices without a value axis, e.g. token ids) "
                "becomes store.new(1), a size-1 layout for a dim of num_classes channels; "
                "expected a fresh (pinned) layout of the dim's real size")
_STRIDED_PROD_BUG = ("depgraph/layout.py AxisStore._split_prod never returns for "
                     "Prod(2, 3) split at outer 3 (x.reshape(6)[::2]): see "
                     "test_layout.py::test_strided_slice_of_a_product_returns")


_ONE_CHANNEL_BUG = (
    "depgraph/rules/common.py broadcast_dims (used by the pointwise rule): an output dim of "
    "size 1 always gets Broadcast(1), a fresh atom, even when an operand holds that dim with "
    "a real one-channel atom (a one-channel segment of a Cat, which layout._split_cat keeps "
    "on purpose). For t = x[:, 1:] the layout of (2 * t) forgets t's channel, so "
    "cat([t, 2 * t], 1) is [a|fresh] instead of [a|a]: perturbing x[:, 1] changes output "
    "column 1, which the layouts say is independent. Low impact (size-1 atoms never form "
    "groups), but the rule misses a coupling")


def test_pointwise_keeps_a_one_channel_segment():
    (x,) = _tensors(0, (3, 2))
    check_op(lambda t: torch.cat([t[:, 1:], 2 * t[:, 1:]], 1), [x])


def test_group_norm_spatial_dims():
    x, w, b = _tensors(0, (2, 4, 3), (4,), (4,))
    check_op(lambda t, wt, bs: F.group_norm(t, 2, wt, bs), [x, w, b])


def test_group_norm_2d():
    x, w, b = _tensors(0, (3, 4), (4,), (4,))
    check_op(lambda t, wt, bs: F.group_norm(t, 2, wt, bs), [x, w, b])


def test_one_hot_of_plain_ids():
    ids = _ids(5, 2, 3)
    check_op(lambda i: F.one_hot(i, 5).double(), [ids])


def test_strided_slice_after_reshape():
    (x,) = _tensors(0, (2, 3))
    check_op(lambda t: t.reshape(6)[::2], [x], limit=1)


def test_strided_slice_after_aligned_reshape():
    """The same path where the step lands on a block boundary works: the rows survive."""
    (x,) = _tensors(0, (3, 4))
    traced = check_op(lambda t: t.reshape(12)[::4], [x], exact=lambda k, d, c: d == 0)
    store = traced.store
    assert store.atoms(traced.outputs[0].dims[0]) == store.atoms(traced.inputs[0].dims[0])
    assert not store.conflicts


def test_adjoint_rank3():
    (x,) = _tensors(0, (2, 2, 2))  # equal sizes: the wrong layout is not even caught by shape
    check_op(lambda t: t.adjoint(), [x], exact=True)


def test_adjoint_rank3_shape():
    (x,) = _tensors(0, (2, 3, 4))
    check_op(lambda t: t.adjoint(), [x], exact=True)


def test_numpy_T_rank3():
    (x,) = _tensors(0, (2, 2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_op(lambda t: t.T, [x], exact=True)


def test_mT():
    (x,) = _tensors(0, (2, 3, 4))
    check_op(lambda t: t.mT, [x], exact=True)


def test_movedim_lists():
    (x,) = _tensors(0, (2, 3, 4))
    check_op(lambda t: t.movedim((0, 1), (2, 0)), [x], exact=True)


class _Picker(nn.Module):
    """Channels used by constant position: ``w[2]``, ``v[-1]`` and an unbound ``s``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 5)
        self.w = nn.Parameter(torch.randn(6, 5))
        self.v = nn.Parameter(torch.randn(6, 5))
        self.s = nn.Parameter(torch.randn(3))

    def forward(self, input_ids):
        x = self.embed(input_ids)
        a, b, c = self.s.unbind(0)
        return (x @ self.w.t())[..., 2] * a + (x @ self.v.t())[..., -1] * b + c


def test_constant_positions_pin_the_channels_they_count_from():
    """Removing a channel before ``w[2]`` (or after ``v[-1]``) would move the position the
    code reads; an unbound dim names each channel (``a, b, c = s.unbind(0)``)."""
    graph = build_graph(_Picker())
    free = {(m.param, m.dim): g for g in graph.groups() for m in g.members}
    assert free[("w", 0)].slices([0])[0][2].tolist() == [3]  # only the channels after 2
    assert free[("v", 0)].slices([0])[0][2].tolist() == [0]  # only the channels before -1
    assert ("s", 0) not in free
    fixed = {(f["param"], f["dim"]): f["reasons"] for f in graph.fixed()}
    assert any("unbound" in reason for reason in fixed[("s", 0)])


class _ShortConv(nn.Module):
    """A causal depthwise convolution written with unfold (and flip, as inkling2 does)."""

    def __init__(self, flip: bool):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.taps = nn.Parameter(torch.randn(6, 4))
        self.out = nn.Linear(6, 11)
        self.flip = flip

    def forward(self, input_ids):
        x = F.pad(self.embed(input_ids), (0, 0, 3, 0))  # [B, T + 3, C]
        windows = x.unfold(1, 4, 1)  # [B, T, C, 4]
        if self.flip:
            windows = windows.flip(-1)
        return self.out((windows * self.taps).sum(-1))


@pytest.mark.parametrize("flip", [False, True])
def test_window_positions_are_never_a_group(flip):
    """The positions inside an unfolded window are as many as the code asks for: the taps
    of a convolution that meet them cannot lose one (once they formed a group whose pruned
    model differed from the zeroed one)."""
    graph = build_graph(_ShortConv(flip))
    for group in graph.groups():
        assert not any(m.param == "taps" and m.dim == 1 for m in group.members), group
    assert any(any(m.param == "taps" and m.dim == 0 for m in g.members) for g in graph.groups())
