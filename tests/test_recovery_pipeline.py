"""Recovery on the real stories260K model: sequential pruning, LoRA, ``depgraph recover``."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from depgraph.paths import data_dir, models_dir
from depgraph_cli.main import main
from pruning import load_pruned, prune
from recovery import (
    LoraDivergedError,
    LoraSettings,
    SequentialSettings,
    merge,
    prune_and_reconstruct,
    train_lora,
)
from recovery.lora import lora_targets
from recovery.precision import native_bf16

TINY = models_dir() / "stories260K"
pytestmark = pytest.mark.skipif(not TINY.is_dir(), reason="offline stories260K model missing")
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def held_out(tiny):
    from evaluation import load_text, tokenize_text

    ids = tokenize_text(tiny[1], load_text("wikitext2"))[:4096]
    return ids


def _ppl(model, ids) -> float:
    from evaluation import perplexity

    return perplexity(model, None, ids, seq_len=128, batch_size=8)["ppl"]


@pytest.fixture(scope="module")
def one_shot(tiny):
    model, tokenizer = tiny
    return prune(copy.deepcopy(model), 0.3, "second_moment", tokenizer=tokenizer, n_samples=8)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sequential_reconstruction_beats_one_shot(tiny, held_out, one_shot, precision):
    """In float32 and in bfloat16 arithmetic (block runs and XᵀX; the default on CPUs that
    multiply it natively), the same counts, a lower error and a clearly better model."""
    model, tokenizer = tiny
    result = prune_and_reconstruct(copy.deepcopy(model), 0.3, "second_moment",
                                   tokenizer=tokenizer, n_samples=8,
                                   reconstruct=SequentialSettings(precision=precision),
                                   recon_samples=32)
    counts = {g: len(u) for g, u in result.plan.items()}
    assert counts == {g: len(u) for g, u in one_shot.plan.items()}  # how many: the same
    assert result.stats["params_after"] == one_shot.stats["params_after"]
    recon = result.stats["reconstruction"]
    assert recon["pre"] and recon["post"] and recon["mean_error_after"] < recon["mean_error_before"]
    assert recon["precision"] == precision and recon["apply_seconds"] >= 0
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert _ppl(result.model, held_out) < 0.9 * _ppl(one_shot.model, held_out)


def test_reconstruct_mode_is_checked_before_any_work(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="reconstruct must be one of"):
        prune_and_reconstruct(copy.deepcopy(model), 0.2, "l2", tokenizer=tokenizer,
                              reconstruct="sometimes")


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The folder ``tempfile`` creates its temporary folders in, for this test alone."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_lora_lowers_validation_loss_and_merges_exactly(tiny, one_shot, private_tmp):
    _, tokenizer = tiny
    pruned = copy.deepcopy(one_shot.model)
    settings = LoraSettings(max_steps=24, eval_steps=8, seq_len=64, max_examples=120,
                            learning_rate=2e-3, batch_size=4)
    result = train_lora(pruned, tokenizer, "bundled", settings, progress=None)
    assert result.stats["val_loss_best"] < result.stats["val_loss_before"]
    assert [row["step"] for row in result.history] == [0, 8, 16, 24]
    assert result.stats["trainable_params"] > 0
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = result.model(ids).logits
        merged = merge(result.model)(ids).logits
    # trained in bf16 autocast where the CPU has it; the returned model computes in float32
    assert adapted.dtype == torch.float32 and result.stats["bf16"] == native_bf16(torch.device("cpu"))
    assert torch.allclose(adapted, merged, atol=1e-4, rtol=0)
    assert not list(private_tmp.iterdir())  # the Trainer's checkpoints are not left behind


def test_lora_targets_every_linear_layer_of_the_blocks(tiny):
    model, _ = tiny
    targets = lora_targets(model)
    assert len(targets) == 7 * model.config.num_hidden_layers
    assert not any("lm_head" in name or "embed" in name for name in targets)


def test_lora_stops_on_a_nan_loss(tiny, one_shot, private_tmp):
    _, tokenizer = tiny
    broken = copy.deepcopy(one_shot.model)
    with torch.no_grad():
        broken.model.norm.weight.fill_(float("nan"))
    settings = LoraSettings(max_steps=4, eval_steps=2, seq_len=32, max_examples=20)
    with pytest.raises(LoraDivergedError, match="loss became nan"):
        train_lora(broken, tokenizer, "bundled", settings, progress=None)
    assert not list(private_tmp.iterdir())


def test_alpaca_records_mask_the_prompt(tiny, tmp_path):
    from recovery.lora_data import load_examples

    _, tokenizer = tiny
    records = [{"instruction": f"Name a colour, please ({i}).", "input": "" if i % 2 else "sky",
                "output": "Blue is a colour."} for i in range(10)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    train, val = load_examples(tokenizer, path, seq_len=1024, val_fraction=0.2, seed=0)
    assert len(train) == 8 and len(val) == 2
    for example in train + val:
        labels = example["labels"]
        answer = [t for t in labels if t != -100]
        assert tokenizer.decode(answer).strip().startswith("Blue is a colour.")
        assert labels[0] == -100 and len(labels) == len(example["input_ids"])
    with pytest.raises(ValueError, match="fit seq_len=16"):
        load_examples(tokenizer, path, seq_len=16)


def test_plain_text_train_and_validation_do_not_overlap(tiny):
    from recovery.lora_data import load_examples

    _, tokenizer = tiny
    train, val = load_examples(tokenizer, data_dir() / "calib" / "gutenberg" / "pg11.txt",
                               seq_len=32, max_examples=60, val_fraction=0.25)
    grams = {tuple(e["input_ids"][i:i + 8]) for e in train for i in range(25)}
    assert not any(tuple(e["input_ids"][i:i + 8]) in grams for e in val for i in range(25))


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("recover") / "pruned"
    assert main(["prune", str(TINY), "--ratio", "0.3", "--importance", "l2", "--out", str(out),
                 "--ppl-tokens", "0"]) == 0
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cli_recover_reconstruct(pruned_dir, tmp_path, capsys, precision):
    out, report = tmp_path / "recon", tmp_path / "recon.json"
    before = sorted(p.name for p in pruned_dir.iterdir())
    assert main(["recover", str(pruned_dir), "--method", "reconstruct", "--out", str(out),
                 "--samples", "16", "--ppl-tokens", "2048", "--json", str(report),
                 "--precision", precision]) == 0
    stats = json.loads(report.read_text())
    assert stats["ppl_after"] < stats["ppl_before"] and stats["precision"] == precision
    assert sorted(p.name for p in pruned_dir.iterdir()) == before  # input untouched
    info = json.loads((out / "pruning.json").read_text())
    assert info["recovery"][-1]["method"] == "reconstruct" and info["plans"]
    model = load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) == info["params_after"]
    assert "layer output error" in capsys.readouterr().out


LORA_NO_MERGE = ("--method", "lora", "--max-steps", "4", "--eval-steps", "2", "--seq-len", "32",
                 "--max-examples", "24", "--ppl-tokens", "0", "--no-merge")


def test_cli_recover_lora_without_merging_keeps_the_adapter(pruned_dir, tmp_path, private_tmp):
    from peft import PeftModel

    out = tmp_path / "lora"
    assert main(["recover", str(pruned_dir), "--out", str(out), *LORA_NO_MERGE]) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not list(private_tmp.glob("depgraph-*"))  # the adapter was moved, not copied
    base = load_pruned(out)
    reference = load_pruned(pruned_dir)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the base is the pruned model itself; the adapter changes it
        assert torch.equal(base(ids).logits, reference(ids).logits)
        adapted = PeftModel.from_pretrained(base, out / "adapter")(ids).logits
    assert not torch.allclose(adapted, reference(ids).logits)


def test_cli_recover_lora_leaves_no_adapter_folder_when_saving_fails(pruned_dir, tmp_path,
                                                                      private_tmp, monkeypatch,
                                                                      capsys):
    import pruning.io

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pruning.io, "save_pruned", full_disk)
    out = tmp_path / "lora"
    assert main(["recover", str(pruned_dir), "--out", str(out), *LORA_NO_MERGE]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not out.exists() and not list(private_tmp.glob("depgraph-*"))


def test_cli_recover_refuses_its_own_input_and_missing_dense(pruned_dir, tmp_path, capsys):
    assert main(["recover", str(pruned_dir), "--method", "lora", "--out", str(pruned_dir),
                 "--overwrite"]) == 2
    assert "--out" in (err := capsys.readouterr().err) and "is the input DIR" in err


def test_lora_under_accelerate_launch_with_two_processes(pruned_dir, tmp_path):
    """Two CPU processes (gloo) train a few steps; only the main process writes the output."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "depgraph_cli.main", "recover", str(pruned_dir),
               "--method", "lora", "--out", str(out), "--max-steps", "4", "--eval-steps", "2",
               "--seq-len", "32", "--max-examples", "40", "--ppl-tokens", "0", "--threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((out / "pruning.json").read_text())["recovery"][-1]
    assert stats["world_size"] == 2 and stats["steps"] == 4
    assert math.isfinite(stats["val_loss_best"])
