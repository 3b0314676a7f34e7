"""Putting a model back exactly as it was when a plan is refused half-way.

:class:`ModelState` records, before ``apply_plan`` touches anything, what applying can
change: every parameter's tensor (its ``.data``, which slicing replaces) and which parameters
each module holds (compensation registers biases), every module's
plain attributes (sizes, ``config`` references), non-persistent buffers (recomputed from
sizes) and the config's fields. :meth:`ModelState.restore` puts all of it back.

:func:`check_runs` is the last step of applying a plan: a real forward pass of a few tokens,
so that no plan hands the user a model that fails its first forward (a kernel's alignment,
a size no attribute tracks). The user's hooks are set aside during it.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager

import torch
from torch import nn

from depgraph.trace import forward_kwargs

__all__ = ["ModelState", "check_runs", "steps_that_run"]

_PLAIN = (int, float, str, bool, tuple, list, type(None))
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
          "_forward_pre_hooks_with_kwargs")


class ModelState:
    """What ``apply_plan`` may change in ``model`` (see the module doc)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.tensors = {name: (p, p.data) for name, p in model.named_parameters()}
        self.slots = {module: dict(module._parameters) for module in model.modules()}
        self.attributes = {}
        self.buffers = {}
        for module in model.modules():
            self.attributes[module] = {k: v if k == "config" else copy.copy(v)  # the object
                                       for k, v in vars(module).items()  # shared, not a copy
                                       if not k.startswith("_") and (isinstance(v, _PLAIN) or k == "config")}
            for name in getattr(module, "_non_persistent_buffers_set", ()):
                buffer = module._buffers.get(name)
                if buffer is not None:
                    self.buffers[(module, name)] = buffer.clone()
        config = getattr(model, "config", None)
        self.config = copy.deepcopy(vars(config)) if config is not None else None

    def changed_attributes(self) -> dict[str, dict[str, object]]:
        """``{module path: {attribute: value}}`` of the plain attributes that differ now from
        when this state was taken (what the plan set: head counts, sizes)."""
        changed: dict[str, dict[str, object]] = {}
        for path, module in self.model.named_modules():
            before = self.attributes.get(module, {})
            for key, value in vars(module).items():
                if key.startswith("_") or key == "training" or not isinstance(value, _PLAIN):
                    continue
                if key not in before or before[key] != value:
                    changed.setdefault(path, {})[key] = copy.copy(value)
        return changed

    def changed_configs(self) -> dict[str, tuple[object, object]]:
        """``{module path: (config before, config now)}`` of the modules given a config
        object of their own since (modules that read their sizes from it at run time)."""
        changed = {}
        for path, module in self.model.named_modules():
            before = self.attributes.get(module, {}).get("config")
            now = vars(module).get("config")
            if before is not None and now is not None and now is not before:
                changed[path] = (before, now)
        return changed

    def restore(self) -> None:
        for module, slots in self.slots.items():  # parameters registered since (a bias)
            module._parameters.clear()
            module._parameters.update(slots)
        for param, data in self.tensors.values():
            param.data = data
            param.grad = None
        for module, attributes in self.attributes.items():
            for key in [k for k, v in vars(module).items() if not k.startswith("_")
                        and isinstance(v, _PLAIN) and k not in attributes]:
                delattr(module, key)
            for key, value in attributes.items():
                setattr(module, key, value)
        for (module, name), buffer in self.buffers.items():
            module._buffers[name] = buffer
        if self.config is not None:
            vars(self.model.config).clear()
            vars(self.model.config).update(self.config)


@contextmanager
def _hooks_set_aside(model: nn.Module):
    saved = {}
    for module in model.modules():
        for name in _HOOKS:
            hooks = getattr(module, name, None)
            if isinstance(hooks, dict) and hooks:
                saved[(module, name)] = dict(hooks)
                hooks.clear()
    try:
        yield
    finally:
        for (module, name), hooks in saved.items():
            getattr(module, name).update(hooks)


STEPS = ("forward", "finite", "decode")


def check_runs(model: nn.Module, tokens: int = 4, steps: tuple[str, ...] = STEPS,
               meta: bool = False) -> None:
    """A forward pass of ``tokens`` tokens as a user calls it (the model's own cache default),
    whose logits must be finite (``"finite"``), then (``"decode"``) one more token through
    the cache when there is one, as ``generate`` does; raises what the model raises. Models
    on the meta device (being built by ``load_pruned``) are skipped, unless ``meta``: then
    the run checks shapes only (values, and so ``"finite"``, are not known there)."""
    first = next(model.parameters(), None)
    if first is None or (first.is_meta and not meta) or "forward" not in steps:
        return
    if first.is_meta:
        steps = tuple(step for step in steps if step != "finite")
    input_ids = torch.zeros(1, tokens, dtype=torch.long, device=first.device)
    kwargs = forward_kwargs(model, input_ids)
    kwargs.pop("use_cache", None)
    training = model.training
    model.eval()
    try:
        with _hooks_set_aside(model), torch.no_grad():
            output = model(**kwargs)
            logits = getattr(output, "logits", None)
            if "finite" in steps and isinstance(logits, torch.Tensor) and \
                    not torch.isfinite(logits).all():
                raise FloatingPointError("non-finite logits (a router left with fewer experts "
                                         "than it picks per token does this)")
            name, cache = _cache_of(model, output)
            if "decode" in steps and cache is not None and "input_ids" in kwargs:
                model(input_ids=input_ids[:, :1], **{name: cache})
    finally:
        model.train(training)


def steps_that_run(model: nn.Module, meta: bool = False) -> tuple[str, ...]:
    """The steps of :func:`check_runs` that ``model`` passes as it is: a pruned model is held
    to what its dense self does (CPM-Ant's cache cannot decode one more token even dense)."""
    for count in range(len(STEPS), 0, -1):
        try:
            check_runs(model, steps=STEPS[:count], meta=meta)
            return STEPS[:count]
        except Exception:  # noqa: BLE001 - whatever the dense model cannot do is not asked
            continue
    return ()


def _cache_of(model: nn.Module, output) -> tuple[str, object]:
    """The cache an output carries and the forward argument that takes it back."""
    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    cache = getattr(output, "cache", None)
    return name, cache if cache is not None else getattr(output, "past_key_values", None)
