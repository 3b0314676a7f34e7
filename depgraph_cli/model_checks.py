"""Checks of a model before any work: its files, config, tokenizer, weights and limits.

Each check raises ``ValueError`` (or :class:`depgraph.errors.NonFiniteError`) with one line
that names the folder, the file and what is wrong, so that the command line can report a
truncated ``model.safetensors``, a corrupt ``tokenizer.json`` or an impossible config value
as ``depgraph: error: ...`` instead of a library's traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depgraph.errors import NonFiniteError

from .fingerprint import weight_files

__all__ = ["TOKENIZER_FILES", "check_device", "check_finite", "check_json_files",
           "check_seq_len", "check_tokenizer_files", "check_weight_files", "config_error",
           "max_positions"]

#: Files from which a tokenizer can be built (one of them must be present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
_JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "model.safetensors.index.json")
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                  "n_ctx")


def check_json_files(folder: str | os.PathLike[str]) -> None:
    """Every JSON file a checkpoint folder may hold parses; else name the file and the spot."""
    for name in _JSON_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{str(path)!r} is not valid JSON ({exc})") from None


def check_weight_files(folder: str | os.PathLike[str]) -> None:
    """The folder has weight files and each safetensors file has a whole, readable header."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"{str(index)!r} names {len(missing)} missing shard(s), first "
                             f"{missing[0]!r}")
    files = weight_files(folder)
    if not files:
        raise ValueError(f"model folder {str(folder)!r} has no weight file (*.safetensors or "
                         "*.bin)")
    for path in files:
        if path.stat().st_size == 0:
            raise ValueError(f"weight file {str(path)!r} is empty")
        if path.suffix != ".safetensors":
            continue
        try:
            with safe_open(path, "pt"):
                pass
        except SafetensorError as exc:
            raise ValueError(f"weight file {str(path)!r} is truncated or not a safetensors "
                             f"file ({exc})") from None


def check_tokenizer_files(folder: str | os.PathLike[str]) -> None:
    """The folder holds a tokenizer: one of :data:`TOKENIZER_FILES`, each JSON file valid."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"model folder {str(folder)!r} has no tokenizer files (expected one "
                         f"of {', '.join(TOKENIZER_FILES)})")
    check_json_files(folder)


def config_error(exc: BaseException) -> str:
    """The reason in a config validation error, as one line (the library's last line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    return reason.removeprefix("ValueError: ")


def max_positions(config: Any) -> int | None:
    """How many positions the model's config allows (``max_position_embeddings`` or the
    like); ``None`` when it names no limit."""
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_seq_len(config: Any, value: int | None, option: str) -> None:
    """``ValueError`` when ``value`` tokens exceed the positions the model allows."""
    limit = max_positions(config)
    if value is not None and limit is not None and value > limit:
        raise ValueError(f"{option} {value} exceeds the model's {limit} positions "
                         f"(max_position_embeddings); use at most {limit}")


def check_device(text: str) -> torch.device:
    """``text`` as a ``torch.device`` this torch can use; ``ValueError`` naming why not."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a torch device such as 'cpu' or "
                         "'cuda:0'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "without a visible GPU"
            raise ValueError(f"--device {text!r}: this torch ({torch.__version__}, {build}) "
                             "has no CUDA; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text!r}: only {torch.cuda.device_count()} CUDA "
                             "device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text!r}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {text!r}: expected cpu, cuda[:N] or mps")
    return device


@torch.no_grad()
def check_finite(model: nn.Module, label: str) -> None:
    """``NonFiniteError`` naming the tensors of ``model`` that hold NaN or infinite values."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        total = sum(1 for t in model.state_dict().values() if t.is_floating_point())
        raise NonFiniteError(f"model {label!r} has NaN or infinite weights in {len(bad)} of "
                             f"{total} tensors (first: {bad[0]})")
