"""Running a causal LM block by block, with the inputs each block really receives.

Reconstruction refits one block at a time, so it needs, for every calibration batch, the
hidden states entering a block and the other arguments the model passes it (rotary tables,
attention masks, cache positions ...). Nothing here knows an architecture:

* :func:`find_blocks` takes the ``nn.ModuleList`` of blocks (the list holding the most
  parameters: ``model.layers``, ``transformer.h``; its children may differ in class, as
  Jamba's attention and Mamba layers do);
* :func:`capture_calls` runs the model once per batch with a pre-hook on every block that
  records the block's ``(args, kwargs)``; the hidden states are kept for block 0 only (the
  others are recomputed block by block), the blocks themselves return their input instead
  of running (checked on one row against the real blocks), and the forward stops at the
  last block, so the head never runs. Per-block keyword arguments are kept by reference:
  blocks that share a tensor (the same rotary table) share its memory.
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

from .lstsq import ReconstructionError
from .precision import compute_autocast

__all__ = ["BlockCall", "find_blocks", "capture_calls", "run_block", "batches", "stop_after",
           "StopForward", "truncated", "pass_through", "record_calls", "same_value"]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (caught by whoever installed it)."""


@dataclass
class BlockCall:
    """One block invocation: positional args after the hidden states, and keyword args."""

    args: tuple
    kwargs: dict
    hidden_in_kwargs: bool = False


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, module_list)`` of the model's blocks: the ``nn.ModuleList`` with the most
    parameters (its children may be of several classes).

    Raises ``ValueError`` when the model has no non-empty ``ModuleList``.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
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


def record_calls(model: nn.Module, blocks: nn.ModuleList, batch_tokens: list[torch.Tensor],
                 device: torch.device, outputs: list | None = None
                 ) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """One forward per batch, stopped at the last block, recording block 0's hidden states and
    every block's call as the blocks are (real or :func:`pass_through`), and block 0's
    output into ``outputs`` when given. Runs under the caller's grad and autocast modes."""
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
    if outputs is not None:
        handles.append(blocks[0].register_forward_hook(lambda _m, _a, out: outputs.append(out)))
    try:
        for ids in batch_tokens:
            current = []
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except StopForward:
                pass
            if len(current) != len(blocks):
                raise ReconstructionError(
                    f"the forward pass called {len(current)} of the {len(blocks)} blocks of "
                    "its largest layer list (blocks skipped, looped or not the text model's); "
                    "cannot reconstruct block by block")
            calls.append(current)
    finally:
        for handle in handles:
            handle.remove()
    return hidden, calls


def capture_calls(model: nn.Module, blocks: nn.ModuleList, batch_tokens: list[torch.Tensor],
                  device: torch.device | str | None = None, precision: str = "fp32"
                  ) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """Block-0 hidden states per batch, and each block's call per batch (``[batch][block]``).

    The token ids go to ``device`` (default: the model's first parameter's). ``precision``
    (``"bf16"``: autocast) is the arithmetic of the blocks run to reach the next one's call;
    block 0's hidden states are taken before any block runs.

    The calls come from passes whose blocks return their input (:func:`pass_through`): what
    the model hands a block (rotary tables, masks, positions) does not depend on the hidden
    states' values, so the blocks need not run. That is checked, not assumed: one row runs
    through the real blocks and again through the pass-throughs, and unless both give
    identical calls every batch runs the real blocks (a model that feeds a block something
    computed from an earlier block's output).
    """
    device = torch.device(device if device is not None else next(model.parameters()).device)
    with torch.no_grad(), compute_autocast(precision, device):
        if len(blocks) < 2 or not batch_tokens:
            return record_calls(model, blocks, batch_tokens, device)
        probe = batch_tokens[0][:1]
        template: list = []
        _, real = record_calls(model, blocks, [probe], device, outputs=template)
        try:
            with pass_through(list(blocks), template[0]):
                hidden, calls = record_calls(model, blocks, [probe, *batch_tokens], device)
        except Exception:  # noqa: BLE001 - any failure means: run the real blocks
            calls = None
        if calls is not None and same_value(real[0], calls[0]):
            return hidden[1:], calls[1:]
        return record_calls(model, blocks, batch_tokens, device)


@contextmanager
def pass_through(blocks: list[nn.Module], template) -> Iterator[None]:
    """Blocks that return their input hidden states, shaped like ``template`` (an output)."""
    if not isinstance(template, (torch.Tensor, tuple, list)):
        raise TypeError(f"a block returns {type(template).__name__}; expected a tensor or a "
                        "tuple starting with the hidden states")

    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if isinstance(template, torch.Tensor):
            return hidden
        return type(template)((hidden, *template[1:]))

    for block in blocks:
        block.forward = forward
    try:
        yield
    finally:
        for block in blocks:
            vars(block).pop("forward", None)


def same_value(a, b) -> bool:
    """Whether two recorded values (tensors, containers, BlockCalls, plain objects) are equal:
    tensors of the same shape, dtype and elements."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, BlockCall) and isinstance(b, BlockCall):
        return (a.hidden_in_kwargs == b.hidden_in_kwargs and same_value(a.args, b.args)
                and same_value(a.kwargs, b.kwargs))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(same_value(x, y) for x, y in zip(a, b, strict=True)))
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not known equal
        return False


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
