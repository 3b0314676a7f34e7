"""Saving and loading pruned models.

A pruned model saves as a normal Hugging Face folder: ``model.save_pretrained(out)`` works
because :func:`pruning.apply_plan` keeps ``model.config`` right. When every block was pruned
alike, plain ``AutoModelForCausalLM.from_pretrained(out)`` loads it. The config also carries
``depgraph`` (the original config and the plans applied), from which :func:`load_pruned`
rebuilds any pruned model, including ones whose blocks differ. For those, :func:`save_pruned`
also writes a small ``modeling_depgraph.py`` and an ``auto_map`` entry, so that
``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` loads it too (through
:func:`load_pruned`; depgraph must be installed where it is loaded).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from depgraph.paths import atomic_folder

from .apply import RECORD_KEY, apply_plan

__all__ = ["load_pruned", "save_pruned", "read_pruning_info"]


def save_pruned(model: nn.Module, out: str | Path, tokenizer=None, overwrite: bool = False,
                extra: dict | None = None, writer=None) -> Path:
    """``save_pretrained`` into a temporary folder, then rename it to ``out``.

    Also writes ``pruning.json`` (the plans and ``extra``: criterion, ratio, calibration ...).
    ``writer(folder)``, if given, adds more files to the temporary folder before the rename.
    Refuses to replace an existing ``out`` unless ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {str(out)!r} exists; pass overwrite=True to replace it")
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = getattr(getattr(model, "config", None), RECORD_KEY, None) or {}
        info = {"plans": record.get("plans", []), "config_exact": record.get("config_exact"),
                **(extra or {})}
        (tmp / "pruning.json").write_text(json.dumps(info, indent=1, default=str))
        if record and not record.get("config_exact", True):
            _write_remote_code(tmp, model)
        if writer is not None:
            writer(tmp)
    return out


REMOTE_MODULE = "modeling_depgraph"

_REMOTE_CODE = '''"""Loads this folder, pruned by depgraph with blocks of different widths.

``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` lands here; the
shapes of each block are rebuilt from the plans recorded in config.json by depgraph's
``pruning.load_pruned``, so depgraph must be installed.
"""

from transformers import {base} as _Base


class {name}(_Base):
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            from pruning.io import load_pruned
        except ImportError:
            raise ImportError("this model was pruned by depgraph with blocks of different "
                              "widths; install depgraph to load it") from None
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        device = kwargs.get("device_map")
        return load_pruned(pretrained_model_name_or_path,
                           dtype=None if dtype in (None, "auto") else dtype,
                           device=device if isinstance(device, str) and device != "auto" else "cpu")
'''


def _write_remote_code(folder: Path, model: nn.Module) -> None:
    """``modeling_depgraph.py`` and the ``auto_map`` that points at it (see the module doc)."""
    import transformers

    base = _model_class(model.config)  # the class depends only on the config's type
    if getattr(transformers, base.__name__, None) is not base:
        return  # not a class transformers exports by name: load_pruned still works
    name = f"Depgraph{base.__name__}"
    (folder / f"{REMOTE_MODULE}.py").write_text(_REMOTE_CODE.format(base=base.__name__, name=name))
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {**config.get("auto_map", {}),
                          "AutoModelForCausalLM": f"{REMOTE_MODULE}.{name}"}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_pruning_info(path: str | Path) -> dict:
    """The ``pruning.json`` a pruned folder carries (``{}`` when there is none)."""
    file = Path(path) / "pruning.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(file)!r} is not valid JSON: {exc}") from None


def load_pruned(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> nn.Module:
    """Load a folder written after :func:`pruning.apply_plan`, whatever the plan.

    When the config describes the model, this is plain ``from_pretrained``. Otherwise the
    model class is subclassed so that its constructor applies the recorded plans to the
    freshly built (meta) model; ``from_pretrained`` then loads the saved weights into those
    shapes with its usual checkpoint renaming and strict shape checks.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = _local_folder(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a model folder (expected a config.json in it)")
    config = AutoConfig.from_pretrained(path)
    record = getattr(config, RECORD_KEY, None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else (dtype or "auto")
    if not record or record.get("config_exact", True):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    original = type(config).from_dict(record["original_config"])
    original.dtype = config.dtype  # the dtype the folder was saved in ("auto" reads it)
    base = _model_class(original)
    plans = record["plans"]

    def __init__(self, cfg, *args, **kwargs):  # noqa: N807 - a constructor for the subclass
        base.__init__(self, cfg, *args, **kwargs)
        for plan in plans:
            apply_plan(self, plan)

    # same name and module as the library class, so checkpoint renamings still apply
    pruned_class = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__,
                                                 "__qualname__": base.__qualname__})
    model = pruned_class.from_pretrained(path, config=original, dtype=dtype)
    setattr(model.config, RECORD_KEY, record)
    return model.to(device).eval()


def _local_folder(path: str | Path) -> Path:
    """``path`` itself, or the local snapshot of a hub repository id (downloaded when online)."""
    if Path(path).exists() or not isinstance(path, str) or path.count("/") > 1:
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path))
    except Exception as exc:  # offline, unknown repo, ...: say what was asked for
        raise ValueError(f"{path!r} is neither a model folder nor a reachable Hugging Face "
                         f"repository ({type(exc).__name__})") from None


def _model_class(config) -> type:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]
