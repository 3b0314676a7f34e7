"""Plain-text reports for the command line: what ``depgraph inspect`` and ``eval`` print.

Each report is built twice over the same numbers: once as a JSON-serialisable ``dict`` (what
``--json`` writes) and once as aligned text (what the terminal shows), so the two never drift.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from depgraph.graph import DependencyGraph
from evaluation.noise import difference_cell

__all__ = ["compared_metrics", "fixed_patterns", "format_eval", "format_inspect", "inspect_report", "name_pattern",
           "text_table"]

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")
#: Bookkeeping numbers of the evaluation results that a dense-vs-pruned ratio says nothing about.
_NOT_COMPARED = ("seq_len", "tokens", "windows", "text_tokens", "n", "acc_stderr",
                 "acc_norm_stderr")


def name_pattern(param: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.*.mlp.up_proj.weight``."""
    return _INDEX.sub("*", param)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned columns; ints get thousands separators and are right-aligned."""
    cells = [[f"{c:,}" if isinstance(c, int) and not isinstance(c, bool) else str(c) for c in row]
             for row in rows]
    numeric = [bool(rows) and all(isinstance(r[i], int) or r[i] == "" for r in rows)
               for i in range(len(header))]
    widths = [max(len(r[i]) for r in [list(header), *cells]) for i in range(len(header))]

    def line(items: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(items, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, cells)])


def fixed_patterns(graph: DependencyGraph) -> list[dict]:
    """``graph.fixed()`` folded over block indices: one entry per (pattern, dim, reasons)."""
    folded: dict[tuple, dict] = {}
    for item in graph.fixed():
        key = (name_pattern(item["param"]), item["dim"], tuple(item["reasons"]))
        entry = folded.setdefault(key, {"pattern": key[0], "dim": key[1], "sizes": [],
                                        "count": 0, "reasons": list(key[2])})
        entry["count"] += 1
        if item["size"] not in entry["sizes"]:
            entry["sizes"].append(item["size"])
    return list(folded.values())


def inspect_report(graph: DependencyGraph, source: str, total_params: int,
                   layer: int | None = None) -> dict:
    """Everything ``depgraph inspect`` prints, as a JSON-serialisable dict."""
    groups = graph.groups()
    coverage = graph.coverage()
    rows = []
    for row in graph.summary():
        members = [g for g in groups if g.layer == row["layer"] and g.kind == row["kind"]]
        rows.append({**row, "params_per_unit": sum(g.params_per_unit for g in members)})
    totals = {
        "groups": len(groups), "units": sum(g.num_units for g in groups),
        "param_tensors": len(coverage),
        "param_tensors_covered": sum(any(dims.values()) for dims in coverage.values()),
        "param_dims": sum(len(dims) for dims in coverage.values()),
        "param_dims_fixed": len(graph.fixed()), "parameters": total_params,
        "nodes": graph.nx.number_of_nodes(), "edges": graph.nx.number_of_edges(),
    }
    report = {"source": source, **graph.to_dict(), "summary": rows, "totals": totals,
              "fixed_patterns": fixed_patterns(graph)}
    if layer is not None:
        report["layer"] = layer
        report["layer_groups"] = [g.to_dict() for g in groups if g.layer == layer]
    return report


def format_inspect(report: Mapping[str, Any]) -> str:
    """The text of ``depgraph inspect`` from :func:`inspect_report`."""
    totals = report["totals"]
    out = [f"{report['model']} from {report['source']}: {totals['parameters']:,} parameters "
           f"in {totals['param_tensors']} tensors; channel graph {totals['nodes']:,} nodes, "
           f"{totals['edges']:,} edges", ""]
    rows = [["all" if r["layer"] is None else r["layer"], r["kind"], r["groups"], r["units"],
             r["params"], r["params_per_unit"]] for r in report["summary"]]
    rows.append(["total", "", totals["groups"], totals["units"], totals["param_tensors_covered"],
                 ""])
    out.append(text_table(["layer", "kind", "groups", "units", "param tensors", "params/unit"],
                          rows))
    out += ["", f"{totals['param_tensors_covered']} of {totals['param_tensors']} parameter tensors "
                f"can shrink; {totals['param_dims_fixed']} of {totals['param_dims']} parameter "
                f"dims are fixed:"]
    for item in report["fixed_patterns"]:
        sizes = "/".join(str(s) for s in item["sizes"])
        times = f" (x{item['count']})" if item["count"] > 1 else ""
        out.append(f"  {item['pattern']} dim {item['dim']} [{sizes}]{times}: "
                   + "; ".join(item["reasons"]))
    if not report["fixed_patterns"]:
        out.append("  (none)")
    if "layer_groups" in report:
        out += ["", f"groups of layer {report['layer']}:"]
        for group in report["layer_groups"]:
            zero = "zero-equivalent" if group["zero_equivalent"] else "not zero-equivalent"
            out.append(f"  {group['id']}  {group['kind']}, {group['num_units']:,} units, "
                       f"{group['params_per_unit']:,} params/unit, {zero}")
            for m in group["members"]:
                out.append(f"    {m['param']} dim {m['dim']} [{m['size']}] "
                           f"{m['channels_per_unit']}/unit  {m['layout']}")
    return "\n".join(out)


def _section(title: str, table: Mapping[str, Any], fmt: str = "{:.4g}") -> str:
    from evaluation import format_table

    return format_table(table, floatfmt=fmt, title=title)


def format_eval(results: Mapping[str, Any]) -> str:
    """The text of ``depgraph eval``: one table per section of ``results``.

    ``results`` holds ``perplexity`` ({source: numbers}), ``zeroshot`` ({task: numbers}),
    ``efficiency`` (flat numbers), ``agreement`` (flat numbers) and ``compare`` (the output of
    :func:`evaluation.compare`), each optional.
    """
    parts = []
    if results.get("perplexity"):
        parts.append(_section("perplexity", results["perplexity"]))
    if results.get("zeroshot"):
        parts.append(_section("zero-shot accuracy", results["zeroshot"]))
    if results.get("efficiency"):
        parts.append(_section("efficiency", results["efficiency"]))
    if results.get("compare"):
        parts.append(_section(f"{results['model']} vs dense {results['dense_model']}",
                              results["compare"]))
    if results.get("agreement"):
        parts.append(_section("next-token agreement with dense", results["agreement"]))
    return "\n\n".join(parts)


def compared_metrics(table: Mapping[str, Mapping[str, Any]]) -> dict:
    """Drop bookkeeping rows (token counts, window counts, ``n``, standard errors) from a
    compare table; accuracy rows gain ``noise``: "within noise" when the difference is within
    :data:`evaluation.noise.NOISE_SE` standard errors (see :mod:`evaluation.noise`)."""
    out = {}
    for key, row in table.items():
        if key.rsplit(".", 1)[-1] in _NOT_COMPARED:
            continue
        errors = table.get(f"{key}_stderr")
        out[key] = dict(row)
        if errors:
            within = "within noise" in difference_cell((row["dense"], errors["dense"]),
                                                       (row["pruned"], errors["pruned"]))
            out[key]["noise"] = "within noise" if within else "beyond noise"
    return out
