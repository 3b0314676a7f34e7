"""A generic oracle for coupling rules: run the op, perturb one input channel, compare.

``trace_op(fn, args)`` exports a one-op module with ``torch.export.export(strict=False)``
and runs the :class:`~depgraph.propagate.Propagator` over it with a fresh atom for every
input dim (as ``depgraph.graph._placeholder_layouts`` does for model inputs).

``predicted(traced, k, d, c, o)``: which positions of output ``o`` the layouts say may change
when input ``k`` is perturbed at index ``c`` of dim ``d`` (the whole slice ``x.select(d, c)``).
Every position of a tensor gets, for each atom of its layouts, a coordinate
(``AxisStore.coords``; -1 where the atom is absent, e.g. the other part of a ``Cat``). An
output position may change iff some perturbed input position agrees with it on every atom
that both tensors hold. Atoms the two tensors do not share are unconstrained, and so are atoms
whose channels the rule declares mixed (tagged by a reduction: softmax, norms, contractions),
and atoms that sit in more than one dim of one tensor (ambiguous coordinates).

``actual(...)``: the output positions that really change (float64, exact comparison).

Soundness is ``actual ⊆ predicted`` (the rule never misses a coupling); exactness is
``predicted ⊆ actual`` (it never invents one), which holds only for structural ops.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
from torch import nn

from depgraph.layout import AxisStore
from depgraph.propagate import Propagator, Value

__all__ = ["Traced", "trace_op", "predicted", "actual", "check_op", "time_limit", "MIXING_TAGS"]

# tags a rule puts on dims whose channels it mixes (see Coupling.reduced)
MIXING_TAGS = frozenset({"normalizing", "sum", "activation_contraction", "attention_logits"})


class _Hung(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` re-wraps it."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str = "call") -> Iterator[None]:
    """Turn a hang (an endless loop in pure Python) into an ``AssertionError``."""

    def alarm(signum, frame):
        raise _Hung()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Hung:
        raise AssertionError(f"{what} did not return within {seconds} s (endless loop?)") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class OpModule(nn.Module):
    """``forward(*args) = fn(*args)``: every tensor argument becomes a placeholder."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


@dataclass
class Traced:
    fn: Callable
    args: list[torch.Tensor]
    program: torch.export.ExportedProgram
    store: AxisStore
    graph: nx.MultiDiGraph
    inputs: list[Value]
    outputs: list[Value]
    out_shapes: list[tuple[int, ...]]

    def ops(self) -> list[str]:
        return [str(n.target) for n in self.program.graph_module.graph.nodes
                if n.op == "call_function"]

    def describe(self) -> str:
        res = self.store.resolve
        ins = [[str(res(lay)) for lay in v.dims] for v in self.inputs]
        outs = [[str(res(lay)) for lay in v.dims] for v in self.outputs]
        return (f"ops={self.ops()} in_shapes={[tuple(a.shape) for a in self.args]} "
                f"inputs={ins} outputs={outs} conflicts={self.store.conflicts}")


def _flat(item) -> list:
    if isinstance(item, (list, tuple)):
        return [x for sub in item for x in _flat(sub)]
    return [item]


def trace_op(fn: Callable, args: Sequence[torch.Tensor], limit: float = 20) -> Traced:
    """Export ``fn`` applied to ``args`` and propagate layouts (a hang fails after ``limit`` s)."""
    args = list(args)
    program = torch.export.export(OpModule(fn), tuple(args), strict=False)
    module = program.graph_module
    store, graph = AxisStore(), nx.MultiDiGraph()
    holders = [n for n in module.graph.nodes if n.op == "placeholder"]
    assert len(holders) == len(args), [h.name for h in holders]
    inputs: dict[str, Value] = {}
    for holder, tensor in zip(holders, args, strict=True):
        assert tuple(holder.meta["val"].shape) == tuple(tensor.shape)
        inputs[holder.name] = Value([store.new(int(s)) for s in tensor.shape])
    with time_limit(limit, "Propagator.run"):
        env = Propagator(store, graph).run(module, inputs)
    output = next(n for n in module.graph.nodes if n.op == "output")
    outputs = _flat(env[output])
    with torch.no_grad():
        results = [t for t in _flat(fn(*args)) if isinstance(t, torch.Tensor)]
    assert len(outputs) == len(results), (outputs, [r.shape for r in results])
    for value, result in zip(outputs, results, strict=True):
        assert isinstance(value, Value), value
        sizes = [lay.size for lay in value.dims]
        assert sizes == list(result.shape), f"layout sizes {sizes} != output shape {result.shape}"
    return Traced(fn, args, program, store, graph, [inputs[h.name] for h in holders], outputs,
                  [tuple(r.shape) for r in results])


def _grids(store: AxisStore, value: Value, shape: tuple[int, ...]) -> dict[int, np.ndarray]:
    """For each atom of ``value``: its coordinate at every position of the tensor."""
    where: dict[int, list[tuple[int, np.ndarray]]] = {}
    for d, layout in enumerate(value.dims):
        for root in store.atoms(layout):
            where.setdefault(root, []).append((d, store.coords(layout, root)))
    grids = {}
    for root, places in where.items():
        if len(places) > 1 or MIXING_TAGS & store.tags.get(root, set()):
            continue
        d, coords = places[0]
        view = [1] * len(shape)
        view[d] = len(coords)
        grids[root] = np.broadcast_to(coords.reshape(view), shape)
    return grids


def predicted(traced: Traced, k: int, d: int, c: int, o: int = 0) -> np.ndarray:
    store = traced.store
    in_shape, out_shape = tuple(traced.args[k].shape), traced.out_shapes[o]
    in_grids = _grids(store, traced.inputs[k], in_shape)
    out_grids = _grids(store, traced.outputs[o], out_shape)
    shared = [a for a in in_grids if a in out_grids]
    if not shared:
        return np.ones(out_shape, dtype=bool)
    code_in = np.zeros(in_shape, dtype=np.int64)
    code_out = np.zeros(out_shape, dtype=np.int64)
    for root in shared:  # mixed radix over (coordinate + 1)
        radix = store.sizes[root] + 1
        code_in = code_in * radix + in_grids[root] + 1
        code_out = code_out * radix + out_grids[root] + 1
    perturbed = np.take(code_in, c, axis=d)
    return np.isin(code_out, perturbed)


def actual(traced: Traced, k: int, d: int, c: int, o: int = 0, seed: int = 0) -> np.ndarray:
    args = [a.clone() for a in traced.args]
    gen = torch.Generator().manual_seed(seed)
    piece = args[k].select(d, c)
    delta = torch.rand(piece.shape, generator=gen, dtype=piece.dtype) + 0.5
    sign = torch.randint(0, 2, piece.shape, generator=gen).to(piece.dtype) * 2 - 1
    piece.add_(delta * sign)
    with torch.no_grad():
        before = _flat(traced.fn(*traced.args))[o]
        after = _flat(traced.fn(*args))[o]
    return (before != after).numpy()


Exact = bool | Callable[[int, int, int], object]


def check_op(fn: Callable, args: Sequence[torch.Tensor], exact: Exact = False, *,
             seed: int = 0, perturb: Sequence[int] | None = None, limit: float = 20) -> Traced:
    """Soundness for every (input, dim, index) of the float inputs; exactness where asked.

    ``exact(k, d, c)`` returns ``True`` (predicted == actual everywhere), ``False`` (only
    soundness), or an index into the output (predicted == actual inside that region).
    """
    traced = trace_op(fn, args, limit)
    ks = [k for k, a in enumerate(traced.args) if a.is_floating_point()] if perturb is None \
        else list(perturb)
    for o in range(len(traced.outputs)):
        for k in ks:
            for d in range(traced.args[k].dim()):
                for c in range(traced.args[k].shape[d]):
                    pred = predicted(traced, k, d, c, o)
                    act = actual(traced, k, d, c, o, seed=seed + 7919 * c + 31 * d + k)
                    where = f"output {o}, input {k}, dim {d}, index {c}; {traced.describe()}"
                    missed = np.argwhere(np.atleast_1d(act & ~pred))
                    assert missed.size == 0, (
                        f"UNSOUND: {len(missed)} changed positions not predicted, e.g. "
                        f"{missed[:4].tolist()}; {where}")
                    region = exact(k, d, c) if callable(exact) else exact
                    if region is False or region is None:
                        continue
                    if region is True:
                        region = ()
                    extra = np.argwhere(np.atleast_1d((pred & ~act)[region]))
                    assert extra.size == 0, (
                        f"INEXACT: {len(extra)} predicted positions did not change, e.g. "
                        f"{extra[:4].tolist()} (in region {region}); {where}")
    return traced
