"""Running a causal LM block by block, with the inputs each block really receives.

Reconstruction refits one block at a time, so it needs, for every calibration batch, the
hidden states entering a block and the other arguments the model passes it (rotary tables,
attention masks, cache positions ...). Nothing here knows an architecture:

* :func:`find_blocks` takes the ``nn.ModuleList`` of repeated blocks (the list whose
  children share one class and hold the most parameters: ``model.layers``, ``transformer.h``);
* :func:`capture_calls` runs the model once per batch with a pre-hook on every block that
  records the block's ``(args, kwargs)``; the hidden states are kept for block 0 only (the
  others are recomputed block by block), and the forward stops after the last block, so
  the head never runs. Per-block keyword arguments are kept by reference: blocks that
  share a tensor (the same rotary table) share its memory.
* :func:`run_block` calls a block on such a recorded call with other hidden states.

Memory: the hidden states of the calibration set for one block (dense and pruned), plus
whatever the block arguments hold; it does not grow with the number of blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .precision import compute_autocast

__all__ = ["BlockCall", "find_blocks", "capture_calls", "run_block", "batches", "stop_after",
           "StopForward", "truncated"]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (caught by whoever installed it)."""


@dataclass
class BlockCall:
    """One block invocation: positional args after the hidden states, and keyword args."""

    args: tuple
    kwargs: dict
    hidden_in_kwargs: bool = False


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, module_list)`` of the model's repeated blocks.

    Raises ``ValueError`` when the model has no ``ModuleList`` of same-class modules.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, path, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks (expected an "
                         "nn.ModuleList of decoder layers)")
    return best[1], best[2]


def batches(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``tokens`` (n, seq) cut into consecutive batches of at most ``batch_size`` rows."""
    return [tokens[i:i + batch_size] for i in range(0, tokens.shape[0], batch_size)]


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    if args:
        return args[0], BlockCall(tuple(args[1:]), dict(kwargs))
    rest = dict(kwargs)
    return rest.pop("hidden_states"), BlockCall((), rest, hidden_in_kwargs=True)


def capture_calls(model: nn.Module, blocks: nn.ModuleList, batch_tokens: list[torch.Tensor],
                  device: torch.device | str | None = None, precision: str = "fp32"
                  ) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """Block-0 hidden states per batch, and each block's call per batch (``[batch][block]``).

    The token ids go to ``device`` (default: the model's first parameter's). ``precision``
    (``"bf16"``: autocast) is the arithmetic of the blocks run to reach the next one's call;
    block 0's hidden states are taken before any block runs."""
    hidden: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = []
    last = len(blocks) - 1
    current: list[BlockCall] = []

    def hook(index: int):
        def record(_module, args, kwargs):
            state, call = _split_hidden(args, kwargs)
            if index == 0:
                hidden.append(state.detach())
            current.append(call)
            if index == last:
                raise StopForward
        return record

    handles = [block.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, block in enumerate(blocks)]
    device = torch.device(device if device is not None else next(model.parameters()).device)
    try:
        with torch.no_grad(), compute_autocast(precision, device):
            for ids in batch_tokens:
                current = []
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except StopForward:
                    pass
                if len(current) != len(blocks):
                    raise RuntimeError(f"the forward pass called {len(current)} of "
                                       f"{len(blocks)} blocks; cannot reconstruct block by block")
                calls.append(current)
    finally:
        for handle in handles:
            handle.remove()
    return hidden, calls


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """The block's output hidden states for ``hidden`` and a recorded call."""
    if call.hidden_in_kwargs:
        out = block(*call.args, hidden_states=hidden, **call.kwargs)
    else:
        out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def stop_after(module: nn.Module, calls: int) -> Iterator[None]:
    """Raise :class:`StopForward` once ``module`` has finished its ``calls``-th call."""
    seen = [0]

    def hook(_module, _args, _output):
        seen[0] += 1
        if seen[0] >= calls:
            raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def truncated(model: nn.Module, path: str, count: int) -> Iterator[None]:
    """The model with only its first ``count`` blocks (activations up to them are unchanged).

    The block list at ``path`` is swapped for a shorter one sharing the same modules, and put
    back afterwards; parameters are neither copied nor changed.
    """
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    full = getattr(parent, name)
    setattr(parent, name, nn.ModuleList(list(full)[:count]))
    try:
        yield
    finally:
        setattr(parent, name, full)
