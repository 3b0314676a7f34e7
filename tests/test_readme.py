"""The README's Python example runs as written (on a tiny random Llama in a temporary folder)."""

import json
import re
import shutil
from pathlib import Path

import pytest

from depgraph.paths import models_dir

README = Path(__file__).resolve().parent.parent / "README.md"
TINY = models_dir() / "stories260K"
pytestmark = pytest.mark.skipif(not TINY.is_dir(), reason="offline stories260K model missing")


def _python_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 2, "the README has two Python examples: usage and a pruning method"
    return blocks


def _python_block() -> str:
    return _python_blocks()[0]


def _tiny_llama(folder: Path) -> None:
    """Six blocks (the example edits blocks 3 and 5), four KV groups, 128 MLP channels."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(TINY))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / name, folder / name)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    code = _python_block()
    for needle in ('"path/to/model"', "max_steps=200", '"alpaca.json"'):
        assert needle in code, needle
    _tiny_llama(tmp_path / "model")
    records = [{"instruction": f"Count to {i}.", "input": "",
                "output": " ".join(str(k) for k in range(i + 1))} for i in range(24)]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    monkeypatch.chdir(tmp_path)
    code = code.replace('"path/to/model"', repr(str(tmp_path / "model")))
    code = code.replace("max_steps=200", "max_steps=2")  # the same call, shorter
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    kv = namespace["graph"].group("model.layers.3.self_attn")
    assert kv.kind == "kv_group" and kv.num_units == 4
    assert (tmp_path / "pruned" / "config.json").is_file()
    assert (tmp_path / "pruned2" / "config.json").is_file()
    assert namespace["lora"].stats["steps"] >= 1
    dense_params = sum(p.numel() for p in namespace["dense"].parameters())
    pruned_params = sum(p.numel() for p in namespace["merged"].parameters())
    assert pruned_params < 0.9 * dense_params


def test_readme_pruning_method_example_runs(tmp_path, monkeypatch):
    import torch

    code = _python_blocks()[1]
    assert '"path/to/model"' in code
    _tiny_llama(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace('"path/to/model"', repr(str(tmp_path / "model"))), str(README),
                 "exec"), namespace)  # noqa: S102 - our own README
    plan, model = namespace["plan"], namespace["model"]
    assert plan and namespace["total"] > sum(p.numel() for p in model.parameters())
    record = model.config.depgraph
    assert record["added"] and record["plans"] == [plan]
    assert all(name.endswith(".bias") for name in record["added"])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=namespace["tokens"][:1]).logits).all()
