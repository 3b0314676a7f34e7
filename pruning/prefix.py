"""Forward passes that reuse what a model's unchanged first blocks computed before.

    >>> reuse = PrefixReuse(model, "model.layers")            # doctest: +SKIP
    >>> with reuse.record():
    ...     dense = model(ids)                                 # every block's output kept
    >>> with reuse.starting_at(7):                             # blocks 0-6 do not run
    ...     changed = model(ids)                               # (only block 7 on changed)

A pass in which only the weights of block ``k`` and later differ from a pass already run
computes the same outputs in blocks ``0 .. k-1``. Inside :meth:`PrefixReuse.starting_at`,
those blocks do not run: each returns what block ``k-1`` returned in the recorded pass of the
same call (block ``k`` reads that; what the earlier ones return is never read), so the cost of
the pass is that of its last blocks. The forward calls must repeat the recorded ones, in order
(the same batches).

Nothing here knows an architecture. The blocks are the modules of the ``nn.ModuleList`` whose
index is the first number in the parameter names (``model.layers.3.mlp.up_proj.weight``:
``model.layers``), as :attr:`depgraph.Group.layer` counts them (:func:`block_list`). That a
block receives from the earlier ones nothing but its input is *not* assumed: a caller checks
a reused pass against a recorded one before it trusts it (as :mod:`pruning.allocation` does,
block by block, on one window).

Memory: every block's output for every recorded call, where the model put it (allocation's
4 windows of 128 tokens: 35 MB for SmolLM2-135M in float32, about 0.7 GB for a
Llama-3-70B-shaped model in bfloat16).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["PrefixReuse", "block_list", "first_block"]

_INDEX = re.compile(r"\.(\d+)(?=\.)")


def _split(name: str) -> tuple[str, int] | None:
    """``("model.layers", 3)`` for ``"model.layers.3.mlp.up_proj.weight"``; None without an index."""
    match = _INDEX.search(f".{name}")
    return (name[:max(match.start(1) - 2, 0)], int(match.group(1))) if match else None


def block_list(model: nn.Module, names: Iterable[str]) -> str | None:
    """The path of the ``nn.ModuleList`` most of ``names`` (parameter names) lie in, by the
    first number in each name; None when there is none."""
    counts: dict[str, int] = {}
    for name in names:
        split = _split(name)
        if split is not None:
            counts[split[0]] = counts.get(split[0], 0) + 1
    for path in sorted(counts, key=counts.__getitem__, reverse=True):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path
    return None


def first_block(model: nn.Module, path: str, params: Iterable[str]) -> int:
    """The first block of the list at ``path`` whose forward may read one of ``params``
    (parameter names; every name a shared tensor has counts). 0 when one lies outside the
    list: then no block can be skipped."""
    names = set(params)
    tensors = {id(p) for name, p in model.named_parameters() if name in names}
    first = None
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in tensors:
            continue
        split = _split(name)
        if split is None or split[0] != path:
            return 0
        first = split[1] if first is None else min(first, split[1])
    return first or 0


class PrefixReuse:
    """The outputs of the blocks of the list at ``path``, recorded in one pass and handed on
    in later ones (see the module docstring)."""

    def __init__(self, model: nn.Module, path: str):
        blocks = model.get_submodule(path)
        if not isinstance(blocks, nn.ModuleList):
            raise TypeError(f"{path!r} is a {type(blocks).__name__}, not an nn.ModuleList of blocks")
        self.blocks = list(blocks)
        self.outputs: list[list] = [[] for _ in self.blocks]

    @contextmanager
    def record(self) -> Iterator[None]:
        """Keep every block's output of every forward call made inside (earlier ones dropped)."""
        self.outputs = [[] for _ in self.blocks]

        def hook(index: int):
            def keep(_module, _args, output):
                self.outputs[index].append(output)
            return keep

        handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(self.blocks)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def starting_at(self, start: int) -> Iterator[None]:
        """Blocks before ``start`` return block ``start - 1``'s recorded output instead of
        running; the ``n``-th forward call inside reads the ``n``-th recorded one."""
        if start <= 0:
            yield
            return
        if start > len(self.blocks):
            raise ValueError(f"start {start} is past the last of {len(self.blocks)} blocks")
        calls = [0]
        recorded = self.outputs[start - 1]

        def first(*_args, **_kwargs):
            calls[0] += 1
            if calls[0] > len(recorded):
                raise RuntimeError(f"forward call {calls[0]} was not recorded "
                                   f"({len(recorded)} were)")
            return recorded[calls[0] - 1]

        def later(*_args, **_kwargs):
            return recorded[calls[0] - 1]

        saved = [vars(block).get("forward") for block in self.blocks[:start]]
        for index, block in enumerate(self.blocks[:start]):
            block.forward = first if index == 0 else later
        try:
            yield
        finally:
            for block, forward in zip(self.blocks[:start], saved, strict=True):
                if forward is None:
                    vars(block).pop("forward", None)
                else:
                    block.forward = forward
