"""The ``depgraph`` command line, run in-process on the offline stories260K model."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import types

import networkx as nx
import pytest

from depgraph.paths import data_dir, models_dir
from depgraph_cli.main import main

TINY = models_dir() / "stories260K"
pytestmark = pytest.mark.skipif(not TINY.is_dir(), reason="offline stories260K model missing")
needs_wiki = pytest.mark.skipif(not (data_dir() / "wikitext-2-raw" / "test.txt").is_file(),
                                reason="offline WikiText-2 missing")


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    """One ``inspect`` run writing every output file (capsys is function-scoped, so the
    output is captured by hand): exit status, stdout, stderr and the folder."""
    out = tmp_path_factory.mktemp("inspect")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(["inspect", str(TINY), "--layer", "1", "--json", str(out / "g.json"),
                       "--dot", str(out / "g.dot"), "--graphml", str(out / "g.graphml"),
                       "--html", str(out / "g.html")])
    return status, stdout.getvalue(), stderr.getvalue(), out


def test_inspect_prints_table_and_fixed_dims(inspected):
    status, text, err, _ = inspected
    assert status == 0, err
    for kind in ("hidden", "kv_group", "query_head", "mlp"):
        assert kind in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("layer"))
    assert header.split()[:4] == ["layer", "kind", "groups", "units"]
    total = next(line for line in lines if line.startswith("total"))
    # 16 groups: hidden + 5 x (kv_group, query_head, mlp); 4 KV groups of 2 query heads
    assert total.split()[1:3] == ["16", "954"]
    assert "model.embed_tokens.weight dim 0 [512]" in text  # the vocabulary dim is fixed
    assert "groups of layer 1:" in text and "model.layers.1.mlp.down_proj.weight dim 1" in text


def test_inspect_json_lists_groups(inspected):
    status, text, _, out = inspected
    data = json.loads((out / "g.json").read_text())
    kinds = {g["kind"] for g in data["groups"]}
    assert kinds == {"hidden", "kv_group", "query_head", "mlp"}
    assert len(data["groups"]) == data["totals"]["groups"] == 16
    assert {g["id"] for g in data["layer_groups"]} == {
        "model.layers.1.self_attn", "model.layers.1.self_attn.query_head", "model.layers.1.mlp"}
    assert sum(row["units"] for row in data["summary"]) == data["totals"]["units"]
    assert data["fixed_patterns"][0]["pattern"] == "model.embed_tokens.weight"
    assert f"{data['totals']['parameters']:,} parameters" in text


def test_inspect_writes_dot_graphml_html(inspected):
    _, text, _, out = inspected
    for name in ("g.dot", "g.graphml", "g.html"):
        assert (out / name).stat().st_size > 0
        assert str(out / name) in text
    graph = nx.read_graphml(out / "g.graphml")
    assert graph.number_of_nodes() > 100
    assert (out / "g.dot").read_text().startswith("digraph")
    assert not list(out.glob(".*"))  # no temporary files left behind


@needs_wiki
def test_eval_perplexity(tmp_path, capsys):
    status = main(["eval", str(TINY), "--ppl", "wikitext2", "--max-tokens", "2048",
                   "--json", str(tmp_path / "e.json")])
    out = capsys.readouterr().out
    assert status == 0
    row = next(line for line in out.splitlines() if line.startswith("wikitext2"))
    ppl = float(row.split()[1].replace(",", ""))
    data = json.loads((tmp_path / "e.json").read_text())
    result = data["perplexity"]["wikitext2"]
    assert math.isfinite(result["ppl"]) and 1 < result["ppl"] < 512  # better than uniform
    assert ppl == pytest.approx(result["ppl"], rel=1e-3)
    assert result["tokens"] == 16 * 127


@needs_wiki
def test_eval_compare_with_itself(capsys):
    status = main(["eval", str(TINY), "--ppl", "wikitext2", "--max-tokens", "256",
                   "--compare", str(TINY)])
    out = capsys.readouterr().out
    assert status == 0
    ratio = next(line for line in out.splitlines() if line.startswith("perplexity.wikitext2.ppl"))
    assert ratio.split()[3] == "1"  # the same model: ratio 1
    assert "top1" in out


@pytest.mark.parametrize("argv, message", [
    (["inspect", "/no/such/model/folder"], "/no/such/model/folder"),
    (["eval", str(TINY), "--zeroshot", "piqa", "--limit", "-1"], "--limit"),
    (["eval", str(TINY), "--zeroshot", "no_such_task"], "no_such_task"),
    (["eval", str(TINY), "--ppl", "no_such_corpus"], "no_such_corpus"),
    (["eval", str(TINY), "--max-tokens", "many"], "--max-tokens"),
    (["inspect", str(TINY), "--layer", "99"], "--layer 99"),
    (["inspect", str(TINY), "--json", "/no/such/dir/g.json"], "/no/such/dir"),
    (["prune", str(TINY), "--ratio", "0.2"], "--out"),
    (["recover", "somewhere", "--method", "lora", "--out", "x"], "'somewhere' is not a model folder"),
    (["recover", str(TINY), "--method", "magic", "--out", "x"], "magic"),
    (["prune", str(TINY), "--ratio", "0.2", "--stream", "--importance", "taylor", "--out", "x"],
     "needs the gradient of the loss"),
    (["prune", str(TINY), "--ratio", "0.2", "--stream", "--importance", "l2", "--kinds", "hidden",
      "--out", "x"], "spans every block"),
    (["prune", "owner/model", "--ratio", "0.2", "--stream", "--importance", "l2", "--out", "x"],
     "--stream reads a local model folder"),
    (["prune", str(TINY), "--ratio", "0.2", "--device", "nowhere", "--out", "x"], "--device 'nowhere'"),
    (["frobnicate"], "frobnicate"),
    ([], "COMMAND"),
])
def test_bad_input_is_one_line_and_status_2(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("depgraph: error: ") and message in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("inspect", "prune", "recover", "eval"):
        assert command in out


def test_eval_lm_eval_backend_without_the_package_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    assert main(["eval", str(TINY), "--zeroshot", "piqa", "--backend", "lm-eval"]) == 2
    assert "needs the lm-eval package" in capsys.readouterr().err


def test_eval_lm_eval_backend_hands_our_model_to_the_harness(capsys, monkeypatch, tmp_path):
    """With lm-eval installed, our model object and lm-eval's task names reach it."""
    calls = {}

    class FakeHFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["model"], calls["batch_size"] = pretrained, batch_size

    def simple_evaluate(model, tasks, limit):
        calls.update(tasks=tasks, limit=limit, wrapped=model)
        return {"results": {t: {"acc,none": 0.5, "acc_norm,none": 0.25} for t in tasks},
                "n-samples": {t: {"effective": limit} for t in tasks}}

    harness = types.ModuleType("lm_eval")
    harness.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = FakeHFLM
    monkeypatch.setitem(sys.modules, "lm_eval", harness)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    report = tmp_path / "eval.json"
    assert main(["eval", str(TINY), "--zeroshot", "piqa,openbook_qa", "--backend", "lm-eval",
                 "--limit", "7", "--json", str(report)]) == 0
    assert calls["tasks"] == ["piqa", "openbookqa"] and calls["limit"] == 7
    assert isinstance(calls["wrapped"], FakeHFLM) and hasattr(calls["model"], "config")
    zeroshot = json.loads(report.read_text())["zeroshot"]
    assert zeroshot["openbook_qa"] == {"acc": 0.5, "acc_norm": 0.25, "n": 7}


def test_prune_stream_matches_in_memory_and_reports_each_block(tmp_path, capsys):
    common = ["--ratio", "0.2", "--importance", "second_moment", "--samples", "4", "--seq-len",
              "32", "--ppl-tokens", "0", "--threads", "1"]
    assert main(["prune", str(TINY), *common, "--out", str(tmp_path / "mem"),
                 "--json", str(tmp_path / "mem.json")]) == 0
    assert main(["prune", str(TINY), *common, "--stream", "--out", str(tmp_path / "st"),
                 "--json", str(tmp_path / "st.json")]) == 0
    err = capsys.readouterr().err
    assert "score block 5/5" in err and "write block 5/5" in err and "ETA" in err
    memory = json.loads((tmp_path / "mem.json").read_text())
    streamed = json.loads((tmp_path / "st.json").read_text())
    assert streamed["plan"] == memory["plan"] and streamed["streamed"] is True
    assert streamed["params_after"] == memory["params_after"]
    from pruning import load_pruned

    model = load_pruned(tmp_path / "st")
    assert sum(p.numel() for p in model.parameters()) == memory["params_after"]
    assert (tmp_path / "st" / "tokenizer_config.json").is_file()


def test_prune_streams_by_itself_when_the_weights_would_not_fit(tmp_path, capsys, monkeypatch):
    from depgraph_cli import prune_command

    monkeypatch.setattr(prune_command, "_available_memory", lambda: 1000)
    assert main(["prune", str(TINY), "--ratio", "0.2", "--importance", "l2", "--ppl-tokens", "0",
                 "--out", str(tmp_path / "auto"), "--json", str(tmp_path / "auto.json")]) == 0
    assert "pruning block by block from disk" in capsys.readouterr().out
    assert json.loads((tmp_path / "auto.json").read_text())["streamed"] is True
    assert main(["prune", str(TINY), "--ratio", "0.2", "--importance", "taylor", "--ppl-tokens",
                 "0", "--samples", "2", "--out", str(tmp_path / "mem")]) == 0
    assert "--stream cannot take over: importance 'taylor'" in capsys.readouterr().out


@pytest.mark.parametrize(("top_k", "precision"), [("0", "fp32"), ("16", "bf16")])
def test_recover_distill_end_to_end(tmp_path, capsys, top_k, precision):
    """Prune stories260K, distil the dense model back into it (live or through the top-k
    cache, each precision): the held-out KL goes down, the work folders are gone, the output
    loads."""
    pruned, out = tmp_path / "p", tmp_path / "d"
    assert main(["prune", str(TINY), "--ratio", "0.3", "--importance", "l2", "--ppl-tokens", "0",
                 "--out", str(pruned), "--threads", "1"]) == 0
    argv = ["recover", str(pruned), "--method", "distill", "--tokens", str(32 * 4 * 6),
            "--seq-len", "32", "--eval-steps", "3", "--lr", "1e-3", "--top-k", top_k,
            "--precision", precision,
            "--ppl-tokens", "0", "--out", str(out), "--json", str(tmp_path / "d.json"),
            "--threads", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    stats = json.loads((tmp_path / "d.json").read_text())
    assert stats["method"] == "distill" and stats["steps"] == 6
    assert stats["precision"] == precision and stats["precision_used"] == precision
    assert stats["teacher"] == ("CachedTeacher" if top_k != "0" else "LiveTeacher")
    assert stats["val_kl_best"] < stats["val_kl_before"]
    assert (out / "config.json").is_file()
    assert not (tmp_path / "d.checkpoint").exists() and not (tmp_path / "d.teacher-cache").exists()
    assert "held-out KL" in capsys.readouterr().out
    assert main([*argv[:-6], "--resume", "--out", str(tmp_path / "e")]) == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err


def test_prune_and_demo_default_to_the_same_measured_pipeline():
    """``depgraph prune`` without options runs what the demo runs: the best pipeline measured
    in benchmarks/RESULTS.md (depgraph_cli.defaults), not the weaker Taylor criterion."""
    from depgraph_cli import defaults
    from depgraph_cli.demo import FULL
    from depgraph_cli.main import build_parser
    from depgraph_cli.prune_command import _check_options

    args = build_parser().parse_args(["prune", "m", "--ratio", "0.2", "--out", "o"])
    _check_options(args)  # the defaults are filled in with the other option checks
    chosen = (args.importance, args.kinds)
    assert chosen == (defaults.IMPORTANCE, defaults.KINDS) == (FULL.importance, FULL.kinds)
    assert (args.round_to, FULL.round_to) == (defaults.ROUND_TO, defaults.DEMO_ROUND_TO) == (1, 64)
    assert args.importance == "second_moment" and args.ranking is None  # the criterion's own
    recon = build_parser().parse_args(["prune", "m", "--ratio", "0.2", "--out", "o",
                                       "--reconstruct"])
    _check_options(recon)
    assert recon.ranking == defaults.RANKING == "allocate"
    # the demo reconstructs, so it allocates; a one-shot prune ranks globally (RESULTS.md)
    assert FULL.reconstruct and FULL.ranking == defaults.ranking(reconstruct=True) == "allocate"
    assert defaults.ranking(reconstruct=False) == "global"
