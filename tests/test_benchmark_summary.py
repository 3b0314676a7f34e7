"""benchmarks/summary.py: the pivot of quality cells gathered from RESULTS.md sections."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402
import summary  # noqa: E402

HEADER = ("| tool | criterion | ratio | blocks | kinds | recovery | removed | ppl | prune s |\n"
          "|---|---|---|---|---|---|---|---|---|\n")


def _section(name: str, rows: list[str], tokens: int) -> str:
    return (f"## {name} title\n\n<!-- section: {name} -->\n\nCommand: `x`\n\n" + HEADER
            + "\n".join(rows) + f"\n\n3 cells in 9 s; WikiText-2 raw test, first {tokens} "
            "tokens, windows of 128; calibration bundled.\n")


TEXT = "# Benchmark results\n\n" + "\n".join([
    _section("one", ["| dense | - | 0.0 | - | - | - | 0.0% | 55.00 |  |",
                     "| depgraph | taylor | 0.1 | all | heads+mlp | none | 10.0% | 90.00 | 5 |",
                     "| depgraph | taylor | 0.1 | all | heads+mlp | reconstruct | 10.0% | 80.00 | 5 |",
                     "| depgraph | taylor | 0.1 | 3:-2 | heads+mlp | none | 10.0% | 70.00 | 5 |",
                     "| depgraph | taylor | 0.1 | all | mlp | none | 10.0% | 60.00 | 5 |"], 4096),
    _section("two", ["| depgraph | taylor | 0.1 | all | heads+mlp | reconstruct | 10.0% | 75.00 | 5 |",
                     "| depgraph | l1 | 0.1 | all | heads+mlp | none | 10.0% | 12345.00 | 5 |",
                     "| depgraph | l1 | 0.1 | all | heads+mlp | lora |  | error: boom |  |"], 4096),
    _section("other", ["| depgraph | taylor | 0.1 | all | heads+mlp | none | 10.0% | 1.00 | 5 |"],
             16384),
])


def test_cells_keep_the_default_setting_on_one_evaluation_and_the_later_section_wins():
    found, source, dense = summary.cells(TEXT, 4096)
    assert found == {("taylor", 0.1, "none"): 90.0, ("taylor", 0.1, "reconstruct"): 75.0,
                     ("l1", 0.1, "none"): 12345.0}
    assert source[("taylor", 0.1, "reconstruct")] == "two"
    assert dense == {"one": 55.0}


def test_pivot_has_a_column_per_ratio_and_recovery_and_bolds_the_best():
    found, _, _ = summary.cells(TEXT, 4096)
    table = summary.pivot(found).splitlines()
    assert table[0] == "| criterion | 10% pruned | 10% + recon. |"
    assert table[2] == "| l1 | 1.23e+04 | - |"  # criteria in the benchmark's order
    assert table[3] == "| taylor | **90.0** | **75.0** |"


def test_no_cells_on_that_evaluation_is_an_error(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    results.write_text(TEXT)
    with pytest.raises(SystemExit):
        summary.main(["--results", str(results), "--tokens", "7"])
    assert "no quality table evaluated on the first 7 tokens" in capsys.readouterr().err
    assert summary.main(["--results", str(results), "--tokens", "16384"]) == 0
    assert "| taylor | **1.0** |" in capsys.readouterr().out


def test_rows_of_another_ranking_are_not_the_default_setting():
    header = ("| tool | criterion | ratio | blocks | kinds | ranking | recovery | removed | ppl |\n"
              "|---|---|---|---|---|---|---|---|---|\n")
    body = header + "\n".join([
        "| depgraph | l2 | 0.2 | all | heads+mlp | default | none | 20.0% | 150.00 |",
        "| depgraph | l2 | 0.2 | all | heads+mlp | allocate | none | 20.0% | 140.00 |",
        "| depgraph | l2 | 0.2 | all | heads+mlp | local | none | 20.0% | 160.00 |"])
    text = (f"# Benchmark results\n\n## r title\n\n<!-- section: r -->\n\n{body}\n\n"
            "3 cells in 9 s; WikiText-2 raw test, first 4096 tokens, windows of 128.\n")
    found, _, _ = summary.cells(text, 4096)
    assert found == {("l2", 0.2, "none"): 150.0}


def test_quality_makes_a_cell_per_ranking_and_names_it_in_the_table():
    cells = quality._cells(argparse.Namespace(
        model="default", calib="bundled", calib_samples=10, recon_samples=32,
        recon_damping=None, lora_steps=60, ppl_tokens=4096, threads=1, seed=0,
        distill_tokens=1, distill_lr=None, temperature=1.0, lm_weight=0.0, ppl_seq_lens=[128],
        kinds="default", round_to=1, pruned_cache=None, ratios=[0.2], layers=["all"],
        criteria=["l2"], ranking=["global", "allocate"], recovery=["none", "reconstruct"],
        tp=False, tp_mlp=False))
    pruned = [(c["ranking"], c["recovery"]) for c in cells if c["tool"] == "depgraph"]
    assert pruned == [("global", "none"), ("global", "reconstruct"),
                      ("allocate", "none"), ("allocate", "reconstruct")]
    assert len({quality._cache_key(c) for c in cells[1:]}) == 4
    done = [{**c, "ratio_removed": 0.2, "ppl": 1.0} for c in cells]
    lines = quality.table(done).splitlines()
    assert lines[0].split("|")[6].strip() == "ranking"
    assert [line.split("|")[6].strip() for line in lines[2:]] == [
        "-", "global", "global", "allocate", "allocate"]


def test_quality_table_names_each_perplexity_column_over_its_numbers():
    cells = [{"tool": "depgraph", "criterion": "l2", "ratio": 0.2, "layers": "all",
              "ranking": "allocate", "recovery": "none", "ratio_removed": 0.2, "ppl": 11.0,
              "ppl@2048": 22.0}]
    header, _, row = quality.table(cells).splitlines()
    named = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")],
                     strict=True))
    assert (named["ppl"], named["ppl@2048"], named["ranking"]) == ("11.00", "22.00", "allocate")


def test_quality_refuses_an_unknown_ranking(capsys):
    with pytest.raises(SystemExit):
        quality.main(["--ranking", "global,best"])
    assert "--ranking 'best': expected some of global" in capsys.readouterr().err


def test_a_recovery_without_a_short_label_is_named_as_it_is():
    table = summary.pivot({("l2", 0.2, "reconstruct+distill"): 90.0, ("l2", 0.2, "none"): 99.0})
    assert table.splitlines()[0] == "| criterion | 20% pruned | 20% + reconstruct+distill |"
