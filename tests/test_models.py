"""Tests of depgraph_cli.models: spec resolution, loading, and the default-model conversion."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from depgraph.paths import models_dir
from depgraph_cli.models import DEFAULT_MODEL_NAME, load_model, load_tokenizer, resolve_model_path

torch.set_num_threads(2)

TINY = models_dir() / "stories260K"
needs_tiny = pytest.mark.skipif(not TINY.is_dir(), reason="offline stories260K model missing")


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    return {
        p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.iterdir())
    }


@needs_tiny
def test_load_tiny_model_by_folder() -> None:
    before = _snapshot(TINY)
    model = load_model(str(TINY))
    tokenizer = load_tokenizer(str(TINY))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 512)
    assert torch.isfinite(logits).all()
    assert _snapshot(TINY) == before


@needs_tiny
def test_dtype_by_name() -> None:
    model = load_model(TINY, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="nonsense"):
        load_model(TINY, dtype="nonsense")


def test_resolve_hub_id_is_passed_through() -> None:
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match="missing"):
        resolve_model_path(str(missing))
    with pytest.raises(ValueError, match="missing"):
        load_model(missing)


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="config.json") as info:
        resolve_model_path(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_garbage_spec() -> None:
    with pytest.raises(ValueError, match="no such thing!"):
        resolve_model_path("no such thing!")


@pytest.mark.slow
def test_default_model_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPGRAPH_CACHE", str(tmp_path))
    path = resolve_model_path("default")
    assert path == tmp_path / DEFAULT_MODEL_NAME
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".SmolLM2-135M.tmp")] == []
    config = json.loads((path / "config.json").read_text())
    assert config["hidden_size"] == 576
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert resolve_model_path("default") == path  # cached: no second conversion
    model = load_model("default")
    tokenizer = load_tokenizer("default")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == config["vocab_size"]
    assert torch.isfinite(logits).all()
