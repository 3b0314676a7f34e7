"""One table of SmolLM2 quality: every criterion and ratio, pruned, reconstructed, LoRA.

    python benchmarks/summary.py [--results benchmarks/RESULTS.md] [--tokens 4096]

Gathers the quality cells of the other sections of RESULTS.md (tables printed by
``quality.py``) that were evaluated on the same text (the first ``--tokens`` WikiText-2
tokens, so every number in the table is comparable) with depgraph's default setting (all
blocks, heads and MLP channels, global ranking), and pivots them: a row per criterion, per
ratio a column per recovery. Where two sections measured the same cell, the later section
in RESULTS.md wins (and is named below the table). Nothing is run: the numbers are those
of the sections, with their commands.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from measure import markdown_table
from quality import ALL_CRITERIA, RECOVERY
from run_all import RESULTS, _split

_LABELS = {"none": "pruned", "reconstruct": "+ recon.", "lora": "+ LoRA",
           "reconstruct+lora": "+ both"}


def cells(text: str, tokens: int) -> tuple[dict, dict, dict[str, float]]:
    """``(criterion, ratio, recovery) -> ppl`` and ``-> section``; dense ppl per section."""
    found: dict[tuple[str, float, str], float] = {}
    source: dict[tuple[str, float, str], str] = {}
    dense: dict[str, float] = {}
    for name, body in _split(text).items():
        footer = re.search(r"first (\d+) tokens, windows of", body)
        if footer is None or int(footer.group(1)) != tokens:
            continue
        columns: list[str] = []
        for line in body.splitlines():
            parts = [p.strip() for p in line.strip().strip("|").split("|")]
            if parts[:2] == ["tool", "criterion"]:
                columns = parts
                continue
            if not columns or len(parts) != len(columns):  # not a row (or an error cell)
                continue
            row = dict(zip(columns, parts, strict=True))
            try:
                value = float(row["ppl"])
            except (KeyError, ValueError):
                continue
            if row["tool"] == "dense":
                dense[name] = value
            elif (row["tool"] == "depgraph" and row.get("blocks") == "all"  # older tables:
                  and row.get("kinds", "heads+mlp") == "heads+mlp"         # the defaults
                  and row.get("ranking", "default") == "default"):
                key = (row["criterion"], float(row["ratio"]), row["recovery"])
                found[key], source[key] = value, name
    return found, source, dense


def _number(value: float | None, best: bool) -> str:
    if value is None:
        return "-"
    text = f"{value:.1f}" if value < 1000 else f"{value:.3g}"
    return f"**{text}**" if best else text


def pivot(found: dict) -> str:
    ratios = sorted({r for _, r, _ in found})
    recoveries = [r for r in RECOVERY if any(k[2] == r for k in found)]
    criteria = [c for c in ALL_CRITERIA if any(k[0] == c for k in found)]
    columns = [(ratio, rec) for ratio in ratios for rec in recoveries
               if any(k[1] == ratio and k[2] == rec for k in found)]
    best = {col: min((v for (c, r, rec), v in found.items() if (r, rec) == col), default=None)
            for col in columns}
    header = ["criterion"] + [f"{ratio:.0%} {_LABELS.get(rec, '+ ' + rec)}" for ratio, rec in columns]
    rows = []
    for criterion in criteria:
        row = [criterion]
        for col in columns:
            value = found.get((criterion, *col))
            row.append(_number(value, value is not None and value == best[col]))
        rows.append(row)
    return markdown_table(header, rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--tokens", type=int, default=4096,
                        help="use the sections evaluated on this many WikiText-2 tokens")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"--results {str(args.results)!r}: no such file (run run_all.py first)")
    text = args.results.read_text()
    found, source, dense = cells(text, args.tokens)
    if not found:
        parser.error(f"no quality table evaluated on the first {args.tokens} tokens in "
                     f"{args.results}")
    print(pivot(found))
    used = sorted(set(source.values()), key=list(_split(text)).index)
    denses = sorted({f"{v:.2f}" for n, v in dense.items() if n in used})
    print(f"\nWikiText-2 perplexity, first {args.tokens} tokens, windows of 128 (dense "
          f"{', '.join(denses)}); best of each column in bold; '-' not measured. From the "
          f"sections {', '.join(used)} (a later one wins where two measured a cell).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
