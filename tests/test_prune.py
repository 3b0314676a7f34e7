"""``prune`` and ``depgraph prune`` on the real stories260K model and tiny architectures."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from archs import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from depgraph import build_graph
from depgraph.paths import models_dir
from depgraph_cli.main import main
from pruning import load_pruned, prune, save_pruned

torch.set_num_threads(1)
STORIES = models_dir() / "stories260K"


def _stories():
    return (AutoModelForCausalLM.from_pretrained(STORIES).eval(),
            AutoTokenizer.from_pretrained(STORIES))


def _max_unit_cost(graph, kinds) -> int:
    return max(g.params_per_unit for g in graph.groups() if g.kind in kinds)


@pytest.mark.parametrize("importance", ["l2", "taylor", "taylor_second", "retraining_free",
                                        "flap", "wanda_sp"])
def test_prune_hits_the_ratio_within_one_unit(importance):
    model, tokenizer = _stories()
    graph = build_graph(model)
    total = sum(p.numel() for p in model.parameters())
    result = prune(model, ratio=0.2, importance=importance, tokenizer=tokenizer, n_samples=2,
                   seq_len=32, graph=graph)
    removed = total - sum(p.numel() for p in result.model.parameters())
    assert 0.2 * total <= removed < 0.2 * total + _max_unit_cost(graph, {"mlp", "kv_group"})
    assert result.stats["ratio_removed"] == pytest.approx(removed / total)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(result.model(ids).logits).all()


def test_prune_is_deterministic_for_a_seed():
    plans = []
    for _ in range(2):
        model, tokenizer = _stories()
        plans.append(prune(model, ratio=0.15, importance="taylor", tokenizer=tokenizer,
                           n_samples=2, seq_len=32, seed=7).plan)
    assert plans[0] == plans[1]


def test_layer_range_kinds_and_rounding_are_respected():
    model, tokenizer = _stories()
    result = prune(model, ratio=0.1, importance="l1", kinds="mlp", layers="1:-1", round_to=8)
    assert all(gid.startswith(("model.layers.1.", "model.layers.2.", "model.layers.3."))
               for gid in result.plan)
    assert all(gid.endswith(".mlp") for gid in result.plan)
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.out_features % 8 == 4 or layer.mlp.gate_proj.out_features % 8 == 0


def test_uniform_plan_loads_with_plain_from_pretrained(tmp_path):
    model, tokenizer = _stories()
    result = prune(model, importance="l2", ratio=None, kind_ratios={"mlp": 0.25, "kv_group": 0.5},
                   ranking="local")
    assert result.model.config.depgraph["config_exact"]
    result.model.save_pretrained(tmp_path / "uniform")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform").eval()
    ids = tokenizer("The cat sat", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, result.model(ids).logits, atol=1e-6)


def test_non_uniform_plan_loads_with_load_pruned(tmp_path):
    model, tokenizer = _stories()
    result = prune(model, ratio=0.2, importance="taylor", tokenizer=tokenizer, n_samples=2,
                   seq_len=32)
    widths = {layer.mlp.gate_proj.out_features for layer in result.model.model.layers}
    assert len(widths) > 1  # global ranking prunes blocks differently
    result.model.save_pretrained(tmp_path / "nonuniform")
    loaded = load_pruned(tmp_path / "nonuniform")
    ids = tokenizer("The cat sat", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, result.model(ids).logits, atol=1e-6)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "nonuniform")


def test_non_uniform_plan_loads_with_trust_remote_code(tmp_path):
    model, tokenizer = _stories()
    result = prune(model, ratio=0.2, importance="l2", ranking="global")
    assert not result.model.config.depgraph["config_exact"]
    save_pruned(result.model, tmp_path / "out", tokenizer=tokenizer)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_depgraph.")
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True,
                                                  dtype=torch.float64)
    assert next(remote.parameters()).dtype == torch.float64
    ids = tokenizer("The cat sat", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(remote(ids).logits.float(), result.model(ids).logits, atol=1e-5)
    # a uniform plan needs no remote code
    uniform = prune(_stories()[0], importance="l2", ratio=None, kind_ratios={"mlp": 0.25},
                    ranking="local")
    save_pruned(uniform.model, tmp_path / "uniform")
    assert "auto_map" not in json.loads((tmp_path / "uniform" / "config.json").read_text())
    assert not (tmp_path / "uniform" / "modeling_depgraph.py").exists()


def test_prune_on_another_architecture_with_self_generated_calibration():
    model = tiny_model("qwen3", dtype=torch.float32)
    result = prune(model, ratio=0.1, importance="second_moment", calib="self", n_samples=2,
                   seq_len=8)
    assert result.stats["ratio_removed"] >= 0.1


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_cli_prune_writes_a_loadable_folder_and_json(tmp_path, capsys):
    before = _digest(STORIES)
    out, report = tmp_path / "pruned", tmp_path / "prune.json"
    code = main(["prune", str(STORIES), "--ratio", "0.2", "--importance", "taylor", "--samples",
                 "2", "--seq-len", "32", "--ppl-tokens", "512", "--out", str(out), "--json",
                 str(report), "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "parameters" in printed and "wikitext2 ppl" in printed
    data = json.loads(report.read_text())
    assert data["ratio_removed"] >= 0.2 and data["ppl_after"] > 0 and data["plan"]
    assert json.loads((out / "pruning.json").read_text())["criterion"] == "taylor"
    assert load_pruned(out) is not None
    assert _digest(STORIES) == before  # the input folder is never modified
    assert main(["prune", str(STORIES), "--ratio", "0.2", "--importance", "l2", "--ppl-tokens",
                 "0", "--out", str(out)]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--ratio", "1.5"], "ratio"),
    (["--ratio", "0.2", "--importance", "bogus"], "taylor"),
    (["--ratio", "0.2", "--layers", "9:x"], "9:x"),
    (["--ratio", "0.95", "--importance", "l2", "--kinds", "mlp"], "cannot be reached"),
])
def test_cli_prune_bad_input_is_one_line_and_status_2(argv, message, tmp_path, capsys):
    code = main(["prune", str(STORIES), *argv, "--ppl-tokens", "0", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "o").exists()


def test_cli_prune_missing_model_is_status_2(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "nope"), "--ratio", "0.2", "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cli_prune_with_reconstruction_reports_it(tmp_path, capsys, precision):
    out, report = tmp_path / "recon", tmp_path / "recon.json"
    assert main(["prune", str(STORIES), "--ratio", "0.2", "--importance", "second_moment",
                 "--samples", "4", "--seq-len", "64", "--reconstruct", "--recon-samples", "8",
                 "--ppl-tokens", "0", "--out", str(out), "--json", str(report),
                 "--threads", "1", "--precision", precision]) == 0
    assert "reconstruction (pre+post)" in capsys.readouterr().out
    recon = json.loads(report.read_text())["reconstruction"]
    assert recon["pre"] and recon["post"] and recon["samples"] == 8
    assert recon["precision"] == precision
    assert recon["mean_error_after"] < recon["mean_error_before"]
    assert json.loads((out / "pruning.json").read_text())["reconstruction"]["method"] == "sequential"
    assert load_pruned(out) is not None
