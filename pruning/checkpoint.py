"""A checkpoint opened lazily, and the model built around it without weights.

For pruning a model bigger than memory (:mod:`recovery.stream`):

* :class:`LazyCheckpoint` reads the tensors of a safetensors folder (one file or shards with
  ``model.safetensors.index.json``) by name, a few at a time: each read opens the file
  memory-mapped (safetensors' ``safe_open``) and closes it again; a tensor read keeps its
  pages mapped only while it lives, so what was read before never adds up in memory.
* :func:`skeleton_model` builds the causal LM of the folder's config with every parameter on
  the ``meta`` device (accelerate's ``init_empty_weights``) and real buffers (rotary tables
  are computed at construction), in the checkpoint's dtype; a folder pruned before has its
  recorded plans replayed on it, as :func:`pruning.load_pruned` does.
* :func:`materialized` puts real tensors into some of its parameters for the duration of a
  ``with`` block and returns them to ``meta`` afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .apply import RECORD_KEY, apply_plan
from .io import _model_class, _replay, _tie_as_saved

__all__ = ["LazyCheckpoint", "skeleton_model", "materialized", "parameter_aliases"]

INDEX = "model.safetensors.index.json"


class LazyCheckpoint:
    """The safetensors weights of a model folder, read by tensor name on demand."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{str(index)!r} has no weight_map; expected "
                                 "{'weight_map': {tensor name: shard file}}")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise ValueError(f"{str(self.folder)!r} holds no safetensors weights (expected "
                             "model.safetensors or shards with an index); streaming reads only "
                             "safetensors")
        self.files: dict[str, str] = {}
        self.meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise ValueError(f"{str(index)!r} names the missing shard {name!r}")
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    if weight_map is not None and weight_map.get(key) != name:
                        continue
                    view = handle.get_slice(key)
                    self.files[key] = name
                    self.meta[key] = (_DTYPES[view.get_dtype()], tuple(view.get_shape()))

    def keys(self) -> list[str]:
        return sorted(self.files)

    def dtype(self) -> torch.dtype:
        """The dtype most of the checkpoint's floating-point elements have."""
        sizes: dict[torch.dtype, int] = {}
        for dtype, shape in self.meta.values():
            if dtype.is_floating_point:
                sizes[dtype] = sizes.get(dtype, 0) + int(torch.Size(shape).numel())
        return max(sizes, key=sizes.get) if sizes else torch.float32

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors named ``keys``, read from the memory-mapped files."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for key in keys:
            if key not in self.files:
                raise KeyError(f"{str(self.folder)!r} holds no tensor {key!r}")
            by_file.setdefault(self.files[key], []).append(key)
        out = {}  # the files are unmapped when the last tensor read from them is freed
        for name, wanted in sorted(by_file.items()):
            with safe_open(str(self.folder / name), framework="pt") as handle:
                for key in wanted:
                    out[key] = handle.get_tensor(key)  # backed by the mapping until freed
        return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def skeleton_model(folder: str | Path, dtype: torch.dtype) -> nn.Module:
    """The folder's causal LM with parameters on ``meta`` and real buffers (see module doc)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    record = getattr(config, RECORD_KEY, None)
    replay = _replay(config, record)
    build_config, plans = replay if replay else (config, [])
    with init_empty_weights(include_buffers=False):
        model = _model_class(build_config)._from_config(build_config, dtype=dtype)
    _tie_as_saved(model)  # the empty-weights context re-creates parameters: tying is lost
    if plans:
        for plan in plans:
            apply_plan(model, plan)
        setattr(model.config, RECORD_KEY, record)
    return model.eval()


def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """``{parameter name: every name the same tensor has}`` (tied weights), for every name
    (``named_parameters(remove_duplicate=False)``); the first is the one
    ``named_parameters()`` uses."""
    by_id: dict[int, list[str]] = {}
    named = list(model.named_parameters(remove_duplicate=False))
    for name, param in named:
        by_id.setdefault(id(param), []).append(name)
    return {name: by_id[id(param)] for name, param in named}


@contextmanager
def materialized(model: nn.Module, names: Iterable[str], checkpoint: LazyCheckpoint,
                 device: str | torch.device = "cpu", writable: bool = False
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Parameters ``names`` of ``model`` hold the checkpoint's values inside the block.

    Each meta parameter is swapped for a real one (under every name a tied parameter has,
    read under whichever of them the checkpoint holds) and put back afterwards, so the real
    tensors are freed when the block ends. Yields ``{name: parameter}``. The values may
    share the read-only file mapping unless ``writable`` (then they are copies).
    """
    aliases = parameter_aliases(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    sources = {}
    for name in names:
        found = [alias for alias in aliases[name] if alias in checkpoint.files]
        if not found:
            raise ValueError(f"{str(checkpoint.folder)!r} lacks the weight {name!r} of the model")
        sources[name] = found[0]
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    values = {}
    try:
        loaded = checkpoint.read(sources.values())
        for name, key in sources.items():
            original = params[name]
            value = loaded.pop(key)
            if tuple(value.shape) != tuple(original.shape):
                raise ValueError(f"weight {key!r} of {str(checkpoint.folder)!r} has shape "
                                 f"{tuple(value.shape)}, the model expects {tuple(original.shape)}")
            moved = value.to(device=device, dtype=original.dtype)
            if writable and moved.data_ptr() == value.data_ptr():
                moved = moved.clone()
            real = nn.Parameter(moved, requires_grad=False)
            for alias in aliases[name]:
                owner, _, attr = alias.rpartition(".")
                module = model.get_submodule(owner) if owner else model
                if module._parameters.get(attr) is original:
                    swapped.append((module, attr, original))
                    module._parameters[attr] = real
            values[name] = real
        yield values
    finally:
        for module, attr, original in reversed(swapped):
            module._parameters[attr] = original
        values.clear()
