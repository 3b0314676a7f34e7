"""``depgraph demo``: the whole job, run in-process on stories260K with ``--fast`` settings."""

import json
import math
import struct

import pytest

from depgraph.paths import models_dir
from depgraph_cli.main import main

TINY = models_dir() / "stories260K"
pytestmark = pytest.mark.skipif(not TINY.is_dir(), reason="offline stories260K model missing")
pytest.importorskip("matplotlib")

PNGS = ("kept_width.png", "sweep.png", "importance.png")
FILES = ("report.md", "report.json", *PNGS, "graph.html", "model/config.json")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    assert main(["demo", str(TINY), "--out", str(out), "--fast", "--threads", "2"]) == 0
    return out


def test_writes_every_file(report_dir):
    for name in FILES:
        assert (report_dir / name).is_file(), name
    assert not [p for p in report_dir.parent.iterdir() if p.name.startswith(".report.tmp")]


def test_report_json_numbers(report_dir):
    data = json.loads((report_dir / "report.json").read_text())
    for side in ("dense", "pruned"):
        ppl = data[side]["perplexity"]["ppl"]
        assert math.isfinite(ppl) and ppl > 1
        assert set(data[side]["zeroshot"]) == {"piqa", "winogrande"}
        assert data[side]["efficiency"]["params"] > 0
    assert data["pruned"]["efficiency"]["params"] < data["dense"]["efficiency"]["params"]
    assert 0.15 < data["pruning"]["ratio_removed"] < 0.3
    assert [p["ratio"] for p in data["sweep"]] == [0.0, 0.2, 0.4]
    assert all(math.isfinite(p["ppl"]) for p in data["sweep"])
    recon = data["reconstruction"]
    assert recon["status"] == "applied" and recon["samples"] == 4
    assert recon["mean_error_after"] < recon["mean_error_before"]
    distilled = data["distillation"]  # --fast: 128 tokens, 2 x 32 per step
    assert distilled["status"] == "applied" and distilled["steps"] == 2
    assert distilled["train_tokens"] == 128
    assert math.isfinite(distilled["val_kl_before"]) and math.isfinite(distilled["val_kl_best"])
    assert [s["name"] for s in data["steps"]][0] == "load model and tokenizer"
    assert "distil from the dense model" in [s["name"] for s in data["steps"]]
    assert len(data["steps"]) == 11
    for side in ("dense", "pruned"):  # timed side by side, after the sweep
        efficiency = data[side]["efficiency"]
        assert efficiency["timing_rounds"] == 1
        for key in ("prefill_b1_tok_s", "prefill_b4_tok_s", "gen_b1_tok_s", "gen_b4_tok_s"):
            assert efficiency[key] > 0, (side, key)
    assert data["sweep"][0]["gen_tok_s"] == data["dense"]["efficiency"]["gen_b1_tok_s"]
    assert all(p["prefill_tok_s"] > 0 and p["gen_tok_s"] > 0 for p in data["sweep"])


def test_pngs_are_valid(report_dir):
    for name in PNGS:
        head = (report_dir / name).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n", name
        width, height = struct.unpack(">II", head[16:24])
        assert width > 300 and height > 200, (name, width, height)


def test_report_md_links_graph_and_plots(report_dir):
    text = (report_dir / "report.md").read_text()
    assert "(graph.html)" in text
    for name in PNGS:
        assert f"]({name})" in text
    assert "## Dense vs pruned" in text and "## Ratio sweep" in text
    assert "piqa acc / acc_norm (4 items) | 0." in text and " ± " in text  # standard errors
    assert "within noise" in text  # 4 items per task: no difference is beyond noise
    assert "**Distillation:** applied: 128 tokens" in text


def test_pruned_model_loads(report_dir):
    from pruning import load_pruned

    model = load_pruned(report_dir / "model")
    data = json.loads((report_dir / "report.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == data["pruned"]["efficiency"]["params"]


def test_refuses_non_empty_out(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["demo", str(TINY), "--out", str(out), "--fast"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_ratio_is_a_usage_error(tmp_path, capsys):
    assert main(["demo", str(TINY), "--out", str(tmp_path / "x"), "--ratio", "1.5"]) == 2
    assert "ratio" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--distill-tokens", "--distill-seconds"])
def test_negative_distill_budget_is_a_usage_error(tmp_path, capsys, option):
    assert main(["demo", str(TINY), "--out", str(tmp_path / "x"), option, "-1"]) == 2
    err = capsys.readouterr().err
    assert option in err and "non-negative" in err and "'-1'" in err
