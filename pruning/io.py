"""Saving and loading pruned models.

A pruned model saves as a normal Hugging Face folder: ``model.save_pretrained(out)`` works
because :func:`pruning.apply_plan` keeps ``model.config`` right. When every block was pruned
alike, plain ``AutoModelForCausalLM.from_pretrained(out)`` loads it. The config also carries
``depgraph`` (the original config and the plans applied), from which :func:`load_pruned`
rebuilds any pruned model, including ones whose blocks differ.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .apply import RECORD_KEY, apply_plan

__all__ = ["load_pruned", "save_pruned"]


def save_pruned(model: nn.Module, out: str | Path, tokenizer=None, overwrite: bool = False,
                extra: dict | None = None) -> Path:
    """``save_pretrained`` into a temporary folder, then rename it to ``out``.

    Also writes ``pruning.json`` (the plans and ``extra``: criterion, ratio, calibration ...).
    Refuses to replace an existing ``out`` unless ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {str(out)!r} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = getattr(getattr(model, "config", None), RECORD_KEY, None) or {}
        info = {"plans": record.get("plans", []), "config_exact": record.get("config_exact"),
                **(extra or {})}
        (tmp / "pruning.json").write_text(json.dumps(info, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_pruned(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> nn.Module:
    """Load a folder written after :func:`pruning.apply_plan`, uniform or not.

    Uniform models load with ``from_pretrained``. Otherwise the original architecture is
    built (without initialising weights), the recorded plans are applied to it, and the saved
    weights are loaded with a strict key and shape check.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a model folder (expected a config.json in it)")
    config = AutoConfig.from_pretrained(path)
    record = getattr(config, RECORD_KEY, None)
    if not record or record.get("config_exact", True):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device)
    original = type(config).from_dict(record["original_config"])
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(original)
    for plan in record["plans"]:
        apply_plan(model, plan)
    state = _read_state(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name in missing if _is_tied(model, name)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{str(path)!r} does not match its pruning record: missing "
                         f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.config = config
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {str(path)!r}")
    for file in files:
        state.update(load_file(file))
    return state


def _is_tied(model: nn.Module, name: str) -> bool:
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    unique = {n for n, _ in model.named_parameters()}
    return name in names and name not in unique
