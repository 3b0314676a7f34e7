"""Plain-text tables of evaluation numbers, and dense-vs-pruned comparisons with ratios."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Number
from typing import Any

__all__ = ["compare", "flatten", "format_table"]


def flatten(results: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """Flatten nested mappings: ``{"piqa": {"acc": 0.6}}`` becomes ``{"piqa.acc": 0.6}``."""
    flat: dict[str, Any] = {}
    for key, value in results.items():
        if isinstance(value, Mapping):
            for sub, inner in flatten(value, sep).items():
                flat[f"{key}{sep}{sub}"] = inner
        else:
            flat[str(key)] = value
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, Number) and not isinstance(value, bool)


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not _is_number(value):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return floatfmt.format(value)


def format_table(
    data: Mapping[str, Any],
    columns: Sequence[str] | None = None,
    floatfmt: str = "{:.4g}",
    title: str | None = None,
    key_header: str = "",
) -> str:
    """Format numbers as an aligned text table.

    Parameters
    ----------
    data : mapping
        Either ``{row: value}`` (two columns: key and value; nested mappings are flattened
        with :func:`flatten`) or ``{row: {column: value}}`` when every value is a mapping of
        scalars (for instance the output of :func:`compare` or of ``evaluate_zeroshot``).
    columns : sequence of str, optional
        Column order for the row-mapping form; default: first-seen order over all rows.
    floatfmt : str, default "{:.4g}"
        Format of floats; ints get thousands separators, ``None`` shows as ``-``.
    title : str, optional
        A line printed above the table.
    key_header : str, default ""
        Header of the first (row key) column.

    Returns
    -------
    str
        The table, lines joined with ``"\\n"``; text left-aligned, numbers right-aligned.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"data must be a mapping, got {type(data).__name__!r}")
    nested = bool(data) and all(
        isinstance(v, Mapping) and not any(isinstance(x, Mapping) for x in v.values())
        for v in data.values()
    )
    if nested:
        if columns is None:
            columns = list(dict.fromkeys(c for row in data.values() for c in row))
        header = [key_header, *columns]
        rows = [[str(k), *(_cell(v.get(c), floatfmt) for c in columns)] for k, v in data.items()]
        numeric = [False] + [any(_is_number(v.get(c)) for v in data.values()) for c in columns]
    else:
        flat = flatten(data)
        header = [key_header, "value"]
        rows = [[k, _cell(v, floatfmt)] for k, v in flat.items()]
        numeric = [False, True]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out += [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def compare(
    dense_results: Mapping[str, Any], pruned_results: Mapping[str, Any]
) -> dict[str, dict[str, float | None]]:
    """Put dense and pruned numbers side by side with their ratio and difference.

    Parameters
    ----------
    dense_results, pruned_results : mapping
        Results of the same evaluations (nested mappings are flattened with :func:`flatten`).

    Returns
    -------
    dict
        ``{metric: {"dense", "pruned", "ratio", "delta"}}`` for every numeric metric present
        in both, in the dense order; ``ratio = pruned / dense`` (``None`` when dense is 0 or
        not finite) and ``delta = pruned - dense``. Format it with :func:`format_table`.
    """
    dense, pruned = flatten(dense_results), flatten(pruned_results)
    table: dict[str, dict[str, float | None]] = {}
    for key, a in dense.items():
        b = pruned.get(key)
        if not (_is_number(a) and _is_number(b)):
            continue
        ratio = b / a if a != 0 and math.isfinite(a) else None
        table[key] = {"dense": a, "pruned": b, "ratio": ratio, "delta": b - a}
    return table
