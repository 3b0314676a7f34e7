"""Tracing a model into an aten FX graph without touching its weights.

The model is copied with every parameter and buffer replaced by a ``meta`` tensor of the
same shape (``copy.deepcopy`` with a pre-filled memo, so no weight is ever copied), then
exported with ``torch.export.export(..., strict=False)``. The user's model is not modified:
not its device, dtype, values, nor train/eval mode.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .errors import TraceError

__all__ = ["Trace", "meta_copy", "trace_model", "trace_copy", "forward_kwargs"]


@dataclass
class Trace:
    """An exported program plus how its placeholders map to the model's tensors."""

    program: torch.export.ExportedProgram
    params: dict[str, str]  # placeholder name -> canonical parameter name
    buffers: dict[str, str]  # placeholder name -> buffer name
    inputs: list[str]  # placeholder names of user inputs
    param_shapes: dict[str, tuple[int, ...]]
    #: modules the forward itself replaced (BigBird swaps its attention for one built from the
    #: config when the input is short): what is set on the old ones is lost in a real forward
    replaced: tuple[str, ...] = ()


def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers live on ``meta``."""
    memo: dict[int, object] = {}
    for param in model.parameters(recurse=True):
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"),
                                       requires_grad=param.requires_grad)
    for buffer in model.buffers(recurse=True):
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    for module in model.modules():  # plain tensor attributes (e.g. cached rotary tables)
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and id(value) not in memo and not name.startswith("_"):
                memo[id(value)] = torch.empty_like(value, device="meta")
    clone = copy.deepcopy(model, memo)
    for module in clone.modules():  # the user's hooks would run on meta tensors: not ours
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                      "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            if isinstance(getattr(module, hooks, None), dict):
                getattr(module, hooks).clear()
    clone.eval()
    _trace_friendly_config(clone)
    return clone


def _trace_friendly_config(model: nn.Module) -> None:
    """Pick implementations that export can trace (only on the private copy)."""
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")]
    configs += [sub for c in configs for sub in _sub_configs(c)]
    for cfg in {id(c): c for c in configs}.values():
        if hasattr(cfg, "_experts_implementation") and cfg._experts_implementation != "batched_mm":
            _set(cfg, "_experts_implementation", "batched_mm")
        if getattr(cfg, "_attn_implementation", None) not in (None, "eager", "sdpa"):
            _set(cfg, "_attn_implementation", "sdpa")


def _set(config, key: str, value: str) -> None:
    """Set an implementation choice; configs whose setter trips over a sub-config kept as a
    plain dict (Moshi) are left as they are."""
    try:
        setattr(config, key, value)
    except (AttributeError, TypeError):
        pass


def _sub_configs(config) -> list:
    return [value for value in vars(config).values() if hasattr(value, "to_dict")
            and value.__class__.__name__.endswith("Config")]


def forward_kwargs(model: nn.Module, input_ids: torch.Tensor) -> dict:
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, object] = {"input_ids": input_ids}
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if "use_cache" in params or (accepts_any and hasattr(model, "config")):
        kwargs["use_cache"] = False
    if "input_ids" not in params and not accepts_any:
        first = next(iter(params))
        kwargs = {first: input_ids}
    return kwargs


def trace_model(model: nn.Module, batch: int = 2, seq_len: int = 7) -> Trace:
    """Export a meta copy of ``model`` called with ``input_ids`` of shape (batch, seq_len)."""
    return trace_copy(meta_copy(model), batch, seq_len, type(model).__name__)


def trace_copy(clone: nn.Module, batch: int = 2, seq_len: int = 7, name: str | None = None) -> Trace:
    """Export ``clone``, a :func:`meta_copy`; a ``TraceError`` keeps the export error as its
    cause, whose traceback runs through ``clone``'s own modules."""
    model_name = name or type(clone).__name__
    vocab = _vocab_size(clone)
    input_ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    if vocab is not None:
        input_ids = input_ids.clamp(max=vocab - 1)
    before = {path: id(module) for path, module in clone.named_modules()}
    # constants the forward creates without a device (Gemma-3n's Normal(0, 1)) are real
    # tensors in a normal build; inside from_pretrained's meta default device (load_pruned
    # replays plans there) they would be meta too, and checks on their values untraceable
    device = torch.device("cpu") if torch.get_default_device().type == "meta" else contextlib.nullcontext()
    try:
        with torch.no_grad(), device:
            program = torch.export.export(clone, (), forward_kwargs(clone, input_ids), strict=False)
    except Exception as error:  # noqa: BLE001 - re-raised with context
        raise TraceError(f"torch.export could not trace {model_name}: "
                         f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                         ) from error
    canonical = {id(p): name for name, p in clone.named_parameters()}
    params, buffers, inputs = {}, {}, []
    for spec in program.graph_signature.input_specs:
        kind = spec.kind.name
        if kind == "PARAMETER":
            params[spec.arg.name] = canonical[id(clone.get_parameter(spec.target))]
        elif kind == "BUFFER":
            buffers[spec.arg.name] = spec.target
        elif kind == "USER_INPUT":
            inputs.append(spec.arg.name)
    shapes = {name: tuple(p.shape) for name, p in clone.named_parameters()}
    after = {path: id(module) for path, module in clone.named_modules()}
    replaced = tuple(path for path, key in before.items() if after.get(path) != key)
    return Trace(program=program, params=params, buffers=buffers, inputs=inputs,
                 param_shapes=shapes, replaced=replaced)


def _vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None) if config is not None else None
    return int(size) if isinstance(size, int) else None
