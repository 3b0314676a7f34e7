"""``report.md`` and ``report.json`` of a dense-vs-pruned run (see :mod:`depgraph_cli.demo`).

:func:`markdown_report` turns the run's JSON-ready dict into a Markdown page: a summary, the
dense-vs-pruned table, per-kind kept widths, the ratio sweep, the plots and the time of each
step. :func:`write_report` writes both files. The dict's keys are documented in
:mod:`depgraph_cli.demo` (``report.json`` is that dict, unchanged).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .noise import (
    NOISE_SE,
    NOISY_SPREAD,
    accuracy_cell,
    difference_cell,
    mean_accuracy,
    speed_ratio_cell,
    task_accuracy,
)

__all__ = ["markdown_report", "markdown_table", "write_report"]

_MB = 1e6  # as benchmarks/speed.py prints them


def write_report(folder: str | os.PathLike[str], data: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``folder``; returns their paths."""
    folder = Path(folder)
    json_path, md_path = folder / "report.json", folder / "report.md"
    json_path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    md_path.write_text(markdown_report(data))
    return md_path, json_path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one letter per column (``l`` or ``r``)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_text(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(data: Mapping[str, Any]) -> str:
    """The Markdown page for one run (see the module docstring)."""
    parts = [_header(data), _comparison(data), _kinds(data), _sweep(data), _plots(data),
             _graph(data), _steps(data), _settings(data)]
    return "\n\n".join(p for p in parts if p) + "\n"


# ------------------------------------------------------------------------------ sections
def _header(data: Mapping[str, Any]) -> str:
    prune, dense, pruned = data["pruning"], data["dense"], data["pruned"]
    recon = data.get("reconstruction", {})
    lines = [f"# Pruning report: {data['model']}", ""]
    lines.append(f"Removed **{prune['ratio_removed']:.1%}** of the parameters "
                 f"({prune['params_before']:,} → {prune['params_after']:,}) with the "
                 f"`{prune['criterion']}` importance criterion "
                 f"({prune.get('ranking', 'global')} ranking, kinds `{prune.get('kinds')}`), "
                 f"calibrated on {_calib(prune)}.")
    ppl_d, ppl_p = _ppl(dense), _ppl(pruned)
    if ppl_d is not None and ppl_p is not None:
        acc_d, acc_p = _mean_acc(dense), _mean_acc(pruned)
        noise = " (within noise)" if "within noise" in difference_cell(acc_d, acc_p) else ""
        lines.append(f"WikiText-2 perplexity {ppl_d:.2f} → **{ppl_p:.2f}**; "
                     f"mean zero-shot accuracy {accuracy_cell(*acc_d)} → "
                     f"**{accuracy_cell(*acc_p)}**{noise}; prefill speed at batch 1 "
                     f"{_speedup(dense, pruned, 'prefill_b1_tok_s')}.")
    for title, step in (("Reconstruction", recon), ("Distillation", data.get("distillation", {}))):
        lines += ["", f"**{title}:** {step.get('status', 'not run')}"
                  + (f": {step['detail']}" if step.get("detail") else "")]
    lines += ["", f"The pruned model is saved in [`model/`](model/) (load it with "
                  "`pruning.load_pruned`, or `depgraph eval "
                  f"{Path(data.get('out', '.')) / 'model'}`)."
              f" Total time {data.get('total_seconds', 0):.0f} s on {data.get('threads', '?')} "
              f"CPU thread(s); created {data.get('created', '')}."]
    return "\n".join(lines)


def _comparison(data: Mapping[str, Any]) -> str:
    dense, pruned = data["dense"], data["pruned"]
    d_eff, p_eff = dense.get("efficiency", {}), pruned.get("efficiency", {})
    rows: list[list[Any]] = [
        ["parameters", _int(d_eff.get("params")), _int(p_eff.get("params")),
         _ratio(d_eff.get("params"), p_eff.get("params"))],
        ["weights (MB)", _mb(d_eff.get("weight_bytes")), _mb(p_eff.get("weight_bytes")),
         _ratio(d_eff.get("weight_bytes"), p_eff.get("weight_bytes"))],
        ["MACs / token (M)", _millions(d_eff.get("macs_per_token")),
         _millions(p_eff.get("macs_per_token")),
         _ratio(d_eff.get("macs_per_token"), p_eff.get("macs_per_token"))],
    ]
    ppl = dense.get("perplexity", {})
    if ppl:
        rows.append([f"WikiText-2 perplexity ({ppl.get('tokens', 0):,} tokens, "
                     f"seq {ppl.get('seq_len')})", _fmt(ppl.get("ppl"), ".2f"),
                     _fmt(_ppl(pruned), ".2f"), _ratio(ppl.get("ppl"), _ppl(pruned))])
    for task, res in dense.get("zeroshot", {}).items():
        other = pruned.get("zeroshot", {}).get(task, {})
        rows.append([f"{task} acc / acc_norm ({res.get('n')} items)",
                     f"{accuracy_cell(*task_accuracy(res))} / "
                     f"{accuracy_cell(*task_accuracy(res, 'acc_norm'))}",
                     f"{accuracy_cell(*task_accuracy(other))} / "
                     f"{accuracy_cell(*task_accuracy(other, 'acc_norm'))}",
                     difference_cell(task_accuracy(res), task_accuracy(other))])
    if dense.get("zeroshot"):
        rows.append(["mean zero-shot acc", accuracy_cell(*_mean_acc(dense)),
                     accuracy_cell(*_mean_acc(pruned)),
                     difference_cell(_mean_acc(dense), _mean_acc(pruned))])
    for key, label in (("prefill_b1_tok_s", "prefill tokens/s, batch 1"),
                       ("prefill_b4_tok_s", "prefill tokens/s, batch 4"),
                       ("gen_b1_tok_s", "generation tokens/s, batch 1"),
                       ("gen_b4_tok_s", "generation tokens/s, batch 4")):
        if key in d_eff or key in p_eff:
            rows.append([label, _fmt(d_eff.get(key), ".1f"), _fmt(p_eff.get(key), ".1f"),
                         speed_ratio_cell(d_eff, p_eff, key)])
    if "peak_forward_bytes" in d_eff:
        rows.append([f"peak forward memory (MB, batch 1 × {d_eff.get('seq_len')} tokens)",
                     _mb(d_eff.get("peak_forward_bytes")), _mb(p_eff.get("peak_forward_bytes")),
                     _ratio(d_eff.get("peak_forward_bytes"), p_eff.get("peak_forward_bytes"))])
    agreement = data.get("agreement")
    if agreement:
        rows.append([f"next-token top-1 agreement with dense ({agreement['tokens']:,} positions)",
                     "1", _fmt(agreement.get("top1"), ".3f"), ""])
        rows.append(["next-token KL(dense ‖ pruned), nats", "0", _fmt(agreement.get("kl"), ".3f"),
                     ""])
    table = markdown_table(["metric", "dense", "pruned", "pruned vs dense"], rows)
    rounds = d_eff.get("timing_rounds")
    timed = (f"medians of {rounds} round{'s' * (rounds != 1)} in which the dense, the pruned "
             "and the sweep models were timed in turn" if rounds else "medians of a few runs")
    note = (f"Speeds are {timed}, on random-token prompts of {d_eff.get('seq_len', '?')} "
            f"tokens (generation: {data['settings'].get('new_tokens')} new tokens, greedy, KV "
            "cache on); where the rounds of a model spread by more than "
            f"{NOISY_SPREAD:.0%} of their median, no ratio is given (the machine was too busy "
            "to compare). Accuracies are ± one standard error, sqrt(p(1-p)/(n-1)) as "
            "lm-evaluation-harness reports it; a difference within "
            f"{NOISE_SE:g} standard errors of the difference is marked within noise.")
    return "## Dense vs pruned\n\n" + table + "\n\n" + note


def _kinds(data: Mapping[str, Any]) -> str:
    kinds = data.get("kinds_summary") or {}
    if not kinds:
        return ""
    rows = [[kind, s["groups"], _fmt(s["units_mean"], ".1f"), _fmt(s["kept_mean"], ".1f"),
             f"{s['kept_min']}–{s['kept_max']}", f"{s['kept_fraction']:.1%}",
             _int(s["params_removed"])] for kind, s in kinds.items()]
    table = markdown_table(["group kind", "groups", "dense units / group", "kept (mean)",
                            "kept (min–max)", "kept", "parameters removed"], rows)
    return ("## Kept widths per group kind\n\nA unit is one MLP inner channel, one attention "
            "head, or one KV group (a KV head with the query heads that share it); groups that "
            "may not shrink (`kinds` setting) keep every unit.\n\n" + table)


def _sweep(data: Mapping[str, Any]) -> str:
    points = data.get("sweep") or []
    if not points:
        return ""
    rows = [["dense" if p["ratio"] == 0 else f"{p['ratio']:.2f}", f"{p['ratio_removed']:.1%}",
             _int(p.get("params")), _fmt(p.get("ppl"), ".2f"), _fmt(p.get("prefill_tok_s"), ".1f"),
             _fmt(p.get("gen_tok_s"), ".1f")] for p in points]
    table = markdown_table(["target ratio", "removed", "parameters", "perplexity",
                            "prefill tok/s (b1)", "generation tok/s (b1)"], rows)
    tokens = points[0].get("ppl_tokens")
    return ("## Ratio sweep\n\nThe same importance scores (computed once on the dense model), "
            "different ratios, no reconstruction or distillation; perplexity on the first "
            f"{_int(tokens)} scored WikiText-2 tokens.\n\n" + table)


def _plots(data: Mapping[str, Any]) -> str:
    files = data.get("files", {})
    captions = (("kept_width", "Kept fraction of each block's units, per group kind"),
                ("sweep", "Perplexity and tokens/s against the fraction of parameters removed"),
                ("importance", "Normalised importance scores of kept and removed units"))
    lines = ["## Plots"]
    for key, caption in captions:
        if key in files:
            lines += ["", f"**{caption}**", "", f"![{caption}]({files[key]})"]
    return "\n".join(lines)


def _graph(data: Mapping[str, Any]) -> str:
    graph = data.get("graph") or {}
    if not graph:
        return ""
    rows = [[kind, s["groups"], _int(s["units"])] for kind, s in graph.get("by_kind", {}).items()]
    page = graph.get("html", "graph.html")
    return (f"## Dependency graph\n\nOpen **[{page}]({page})** in a browser to see the coupled "
            f"groups of one block at a time (it opens on block {graph.get('layer')}): pick a "
            "group to see which rows and columns of which weights go together. The same page "
            f"comes from `depgraph inspect {data['model']} --html FILE`. The graph has "
            f"{graph.get('groups', 0)} coupled groups:\n\n"
            + markdown_table(["kind", "groups", "units"], rows))


def _steps(data: Mapping[str, Any]) -> str:
    steps = data.get("steps") or []
    rows = [[s["name"], f"{s['seconds']:.1f}"] for s in steps]
    rows.append(["**total**", f"**{data.get('total_seconds', 0):.1f}**"])
    return "## Time per step\n\n" + markdown_table(["step", "seconds"], rows)


def _settings(data: Mapping[str, Any]) -> str:
    rows = [[f"`{k}`", f"`{v}`"] for k, v in data.get("settings", {}).items()]
    extra = data.get("pruning", {})
    for key in ("redundant_heads", "tau", "calibration", "score_seconds", "total_seconds"):
        if key in extra:
            rows.append([f"pruning `{key}`", f"`{extra[key]}`"])
    return "## Settings\n\n" + markdown_table(["setting", "value"], rows, "ll") + \
        f"\n\nCommand: `{data.get('command', '')}`"


# ------------------------------------------------------------------------------ helpers
def _ppl(results: Mapping[str, Any]) -> float | None:
    return (results.get("perplexity") or {}).get("ppl")


def _mean_acc(results: Mapping[str, Any]) -> tuple[float | None, float | None]:
    return mean_accuracy(results.get("zeroshot") or {})


def _calib(prune: Mapping[str, Any]) -> str:
    shape = prune.get("calibration")
    source = prune.get("calib", "?")
    return f"{shape[0]} × {shape[1]} tokens of `{source}`" if shape else "no data"


def _speedup(dense: Mapping[str, Any], pruned: Mapping[str, Any], key: str) -> str:
    d_eff, p_eff = dense.get("efficiency", {}), pruned.get("efficiency", {})
    a, b = d_eff.get(key), p_eff.get(key)
    if not (_ok(a) and _ok(b) and a):
        return "n/a"
    return f"{a:.0f} → {b:.0f} tokens/s ({speed_ratio_cell(d_eff, p_eff, key)})"


def _ok(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if _ok(value) else "–"


def _int(value: Any) -> str:
    return f"{int(value):,}" if _ok(value) else "–"


def _mb(value: Any) -> str:
    return f"{value / _MB:.1f}" if _ok(value) else "–"


def _millions(value: Any) -> str:
    return f"{value / 1e6:.1f}" if _ok(value) else "–"


def _ratio(dense: Any, pruned: Any) -> str:
    return f"×{pruned / dense:.3f}" if _ok(dense) and _ok(pruned) and dense else ""


def _text(cell: Any) -> str:
    return str(cell).replace("|", "\\|").replace("\n", " ")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
