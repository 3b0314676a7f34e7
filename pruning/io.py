"""Saving and loading pruned models.

A pruned model saves as a normal Hugging Face folder: ``model.save_pretrained(out)`` works
because :func:`pruning.apply_plan` keeps ``model.config`` right. When every block was pruned
alike, plain ``AutoModelForCausalLM.from_pretrained(out)`` loads it. The config also carries
``depgraph`` (the original config and the plans applied), from which :func:`load_pruned`
rebuilds any pruned model, including ones whose blocks differ.
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
        if writer is not None:
            writer(tmp)
    return out


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

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a model folder (expected a config.json in it)")
    config = AutoConfig.from_pretrained(path)
    record = getattr(config, RECORD_KEY, None)
    dtype = dtype or torch.float32
    if not record or record.get("config_exact", True):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    original = type(config).from_dict(record["original_config"])
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


def _model_class(config) -> type:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]
