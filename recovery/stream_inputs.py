"""The calibration activations in front of the first block, with no block in memory.

:func:`capture_streamed` runs the model's own forward pass on each calibration row while the
model's parameters live on ``meta`` (:func:`pruning.checkpoint.skeleton_model`):

* the modules outside the block list load their own parameters from the checkpoint just for
  their call (the embeddings run; the final norm and the head are never called, so they are
  never read);
* every block is replaced by a pass-through that returns its input in the shape of a real
  block's output (learnt by running block 0 once on one row), so that one pass records the
  call — rotary tables, masks of its attention type, positions — each block receives, as
  :func:`recovery.blocks.capture_calls` does for a model in memory (where one row checks
  that the calls do not depend on the blocks' outputs).

Rows are captured in the batches the in-memory pass uses (one at a time for scoring, as
:meth:`pruning.importance.ScoringContext.run_forward` runs them; the reconstruction's batches
for it), so the activations block after block are bit-identical to the in-memory pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from pruning.checkpoint import LazyCheckpoint, materialized

from .blocks import BlockCall, batches, pass_through, record_calls

__all__ = ["capture_streamed", "block_parameter_names", "to_device"]


def block_parameter_names(model: nn.Module, path: str, index: int) -> list[str]:
    """Full names of the parameters of block ``index`` of the list at ``path``."""
    block = model.get_submodule(path)[index]
    return [f"{path}.{index}.{name}" for name, _ in block.named_parameters()]


@contextmanager
def _outside_loaded_on_call(model: nn.Module, path: str, checkpoint: LazyCheckpoint,
                            device) -> Iterator[None]:
    """Modules outside the blocks hold their parameters only while they run."""
    stack = ExitStack()
    handles, open_calls = [], {}

    def load(module, _args, names):
        if module not in open_calls:
            open_calls[module] = stack.enter_context(ExitStack())
            open_calls[module].enter_context(materialized(model, names, checkpoint, device))

    def free(module, _args, _output):
        if module in open_calls:
            open_calls.pop(module).close()

    for name, module in model.named_modules():
        if name == path or name.startswith(f"{path}."):
            continue
        names = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if names:
            handles.append(module.register_forward_pre_hook(
                lambda m, a, names=names: load(m, a, names)))
            handles.append(module.register_forward_hook(free))
    try:
        with stack:
            yield
    finally:
        for handle in handles:
            handle.remove()


def to_device(value, device):
    """``value`` with every tensor inside (tuples, lists, dicts, BlockCalls) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, BlockCall):
        return BlockCall(to_device(value.args, device), to_device(value.kwargs, device),
                         value.hidden_in_kwargs)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _call(block: nn.Module, hidden: torch.Tensor, call: BlockCall):
    if call.hidden_in_kwargs:
        return block(*call.args, hidden_states=hidden, **call.kwargs)
    return block(hidden, *call.args, **call.kwargs)


def capture_streamed(model: nn.Module, path: str, checkpoint: LazyCheckpoint,
                     tokens: torch.Tensor, device="cpu", batch_size: int = 1
                     ) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """Block-0 hidden states per batch of ``batch_size`` calibration rows, and each block's
    call per batch (``[batch][block]``), all on ``device`` (see the module doc)."""
    blocks = list(model.get_submodule(path))
    rows, cpu = batches(tokens, batch_size), torch.device("cpu")
    with torch.no_grad(), _outside_loaded_on_call(model, path, checkpoint, "cpu"):
        first_states, first_calls = record_calls(model, blocks[:1], rows[:1], cpu)
        with materialized(model, block_parameter_names(model, path, 0), checkpoint, "cpu"):
            template = _call(blocks[0], first_states[0], first_calls[0][0])
        with pass_through(blocks, template):
            states, calls = record_calls(model, blocks, rows, cpu)
    return to_device(states, device), to_device(calls, device)
