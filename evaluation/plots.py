"""PNG plots of a pruning run, drawn with matplotlib's ``Agg`` backend (no display needed).

Every function takes plain data (lists and dicts, as stored in ``report.json``), writes one
PNG and returns its path, so a report can be re-plotted from its JSON alone:

* :func:`plot_kept_width`: the kept fraction of every block's groups, one bar per kind;
* :func:`plot_sweep`: perplexity and tokens/s against the fraction of parameters removed;
* :func:`plot_importance`: the distribution of normalised importance scores, kept vs
  removed units, overall and per block.

matplotlib is an optional dependency (``pip install depgraph[report]``); importing this
module without it raises ``ImportError`` with that hint.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    import matplotlib

    matplotlib.use("Agg")  # never open a window; also safe on headless machines
    import matplotlib.pyplot as plt
    import matplotlib.ticker
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("plots need matplotlib: pip install 'depgraph[report]'") from exc

__all__ = ["KIND_COLORS", "plot_importance", "plot_kept_width", "plot_sweep"]

#: One colour per group kind, shared by all plots.
KIND_COLORS = {"mlp": "#1f77b4", "attention_head": "#ff7f0e", "kv_group": "#ff7f0e",
               "query_head": "#d62728", "expert": "#2ca02c", "hidden": "#9467bd"}
_KIND_LABELS = {"mlp": "MLP inner channels", "attention_head": "attention heads",
                "kv_group": "attention KV groups (KV head + its query heads)",
                "query_head": "query heads (the same slot of every KV group)",
                "expert": "experts", "hidden": "hidden (residual) channels"}
_DPI = 110


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_kept_width(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str],
                    title: str = "") -> Path:
    """Grouped bars: per block, the kept fraction of each kind's units.

    ``rows``: ``{"layer": int, "kind": str, "units": int, "kept": int}`` per group (groups
    without a block are left out). The bar labels show the kept counts when few blocks.
    """
    rows = [r for r in rows if r.get("layer") is not None]
    kinds = sorted({r["kind"] for r in rows}, key=lambda k: list(KIND_COLORS).index(k)
                   if k in KIND_COLORS else 99)
    layers = sorted({int(r["layer"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(7.0, 0.32 * len(layers) * max(len(kinds), 1) + 2), 4.2))
    width = 0.8 / max(len(kinds), 1)
    for k, kind in enumerate(kinds):
        by_layer = {int(r["layer"]): r for r in rows if r["kind"] == kind}
        xs = [i + (k - (len(kinds) - 1) / 2) * width for i, layer in enumerate(layers)
              if layer in by_layer]
        fractions = [by_layer[layer]["kept"] / by_layer[layer]["units"] for layer in layers
                     if layer in by_layer]
        units = {by_layer[layer]["units"] for layer in by_layer}
        dense = f"{units.pop()} per block" if len(units) == 1 else "varies"
        ax.bar(xs, fractions, width=width * 0.95, color=KIND_COLORS.get(kind, "#7f7f7f"),
               label=f"{_KIND_LABELS.get(kind, kind)} (dense: {dense})")
    ax.axhline(1.0, color="#555555", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([str(layer) for layer in layers], fontsize=8 if len(layers) > 20 else 10)
    ax.set_xlabel("block (layer index)")
    ax.set_ylabel("kept fraction of units")
    ax.set_ylim(0, 1.12)
    ax.set_title(title or "Kept width per block and group kind")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=max(len(kinds), 1),
              frameon=False, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_sweep(points: Sequence[Mapping[str, Any]], path: str | os.PathLike[str],
               highlight: float | None = None, title: str = "") -> Path:
    """Two panels against the fraction of parameters removed: perplexity and tokens/s
    (relative to the dense point when there is one; the legend gives the dense figures).

    ``points``: ``{"ratio_removed": float, "ppl": float, "prefill_tok_s": float,
    "gen_tok_s": float | None}`` (the dense model is the point at 0). ``highlight``: the
    removed fraction of the main pruned model, circled in both panels.
    """
    points = sorted(points, key=lambda p: p["ratio_removed"])
    xs = np.array([100 * p["ratio_removed"] for p in points])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    ppl = np.array([p["ppl"] if _finite(p.get("ppl")) else np.nan for p in points])
    left.plot(xs, ppl, "o-", color="#d62728")
    for x, y in zip(xs, ppl, strict=True):
        if np.isfinite(y):
            left.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 7),
                          ha="center", fontsize=8)
    finite = ppl[np.isfinite(ppl)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
        left.set_yscale("log")
        left.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        left.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_ylabel("WikiText-2 perplexity (lower is better)")
    left.set_title("Quality")
    # relative to the dense point, so that prefill (hundreds of tokens/s) and generation
    # (tens) share one axis; the legend gives the dense figures, report.md every figure
    series = []
    for key, label, style in (("prefill_tok_s", "prefill, batch 1", "s-"),
                              ("gen_tok_s", "generation, batch 1", "^-")):
        ys = np.array([p.get(key) if _finite(p.get(key)) else np.nan for p in points])
        if np.isfinite(ys).any():
            series.append((label, style, ys))
    relative = bool(series) and xs[0] == 0 and all(np.isfinite(ys[0]) and ys[0] > 0
                                                   for _, _, ys in series)
    for label, style, ys in series:
        shown = ys / ys[0] if relative else ys
        right.plot(xs, shown, style, label=label + (f" (dense {ys[0]:.1f} tokens/s)"
                                                    if relative else ""))
    if relative:
        right.axhline(1.0, color="#999999", linewidth=0.8)
        right.set_ylabel("tokens / s relative to dense (higher is better)")
    else:
        right.set_ylabel("tokens / s (higher is better)")
        right.set_ylim(bottom=0)
    right.set_title("Speed (medians of alternating rounds)")
    right.legend(fontsize=8, loc="upper left")
    for ax in (left, right):
        ax.set_xlabel("parameters removed (%)")
        ax.grid(alpha=0.3)
        if highlight is not None:
            ax.axvline(100 * highlight, color="#555555", linestyle=":", linewidth=1,
                       label="main pruned model")
    if highlight is not None:
        left.legend(fontsize=9, loc="upper left")
    fig.suptitle(title or "Pruning ratio sweep (no reconstruction)")
    fig.tight_layout()
    return _save(fig, path)


def plot_importance(groups: Sequence[Mapping[str, Any]], path: str | os.PathLike[str],
                    title: str = "") -> Path:
    """Histogram of normalised scores (kept vs removed) and their spread per block.

    ``groups``: ``{"kind": str, "layer": int | None, "scores": [float], "removed": [int]}``
    with scores divided by the group's mean absolute score (how the global ranking compares
    groups). Positive scores are shown on a log axis; scores below ``1e-4`` (for example
    heads that ``retraining_free`` marks redundant) are drawn at ``1e-4``.
    """
    floor = 1e-4
    values = np.concatenate([np.asarray(g["scores"], dtype=float) for g in groups]) if groups \
        else np.zeros(0)
    log = values.size > 0 and bool((values > 0).all())
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4),
                                      gridspec_kw={"width_ratios": [1, 1.6]})
    kinds = sorted({g["kind"] for g in groups})
    bins = _bins(values, log, floor)
    for kind in kinds:
        members = [g for g in groups if g["kind"] == kind]
        kept, removed = _split(members, log, floor)
        color = KIND_COLORS.get(kind, "#7f7f7f")
        label = _KIND_LABELS.get(kind, kind).split(" (")[0]
        left.hist(kept, bins=bins, color=color, alpha=0.45, label=f"{label}: kept ({kept.size})")
        left.hist(removed, bins=bins, color=color, histtype="step", linewidth=1.8,
                  hatch="//", label=f"{label}: removed ({removed.size})")
    if log:
        left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("normalised importance (score / group geometric mean |score|)")
    left.set_ylabel("units")
    left.set_title("Distribution: kept (filled) and removed (hatched) units")
    left.title.set_fontsize(10)
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
                frameon=False)
    _per_layer(right, groups, log, floor)
    fig.suptitle(title or "Importance scores")
    fig.tight_layout()
    return _save(fig, path)


def _per_layer(ax: Any, groups: Sequence[Mapping[str, Any]], log: bool, floor: float) -> None:
    """Box plot of the MLP-like (many-unit) groups per block, single units as dots."""
    layered = [g for g in groups if g.get("layer") is not None]
    layers = sorted({int(g["layer"]) for g in layered})
    position = {layer: i for i, layer in enumerate(layers)}
    wide = [g for g in layered if len(g["scores"]) > 16]
    if wide:
        data = [_clip(np.asarray(g["scores"], float), log, floor) for g in wide]
        box = ax.boxplot(data, positions=[position[int(g["layer"])] for g in wide], widths=0.6,
                         showfliers=False, patch_artist=True,
                         medianprops={"color": "black"})
        for patch, g in zip(box["boxes"], wide, strict=True):
            patch.set_facecolor(KIND_COLORS.get(g["kind"], "#7f7f7f"))
            patch.set_alpha(0.45)
    labelled = set()
    for g in (g for g in layered if len(g["scores"]) <= 16):
        scores = _clip(np.asarray(g["scores"], float), log, floor)
        removed = set(int(u) for u in g["removed"])
        x = position[int(g["layer"])]
        for unit, score in enumerate(scores):
            gone = unit in removed
            label = "removed attention unit" if gone else "kept attention unit"
            ax.scatter(x + 0.25, score, marker="x" if gone else "o", s=18,
                       color="#d62728" if gone else KIND_COLORS.get(g["kind"], "#7f7f7f"),
                       label=None if label in labelled else label, zorder=3)
            labelled.add(label)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([str(layer) for layer in layers], fontsize=8 if len(layers) > 20 else 10)
    ax.set_xlabel("block (layer index)")
    ax.set_ylabel("normalised importance")
    ax.set_title("Per block: MLP channels (box: quartiles, whiskers: 1.5 IQR), "
                 "attention units (markers)" if wide else "Per block")
    ax.title.set_fontsize(10)
    if labelled:
        ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)


def _split(members: Sequence[Mapping[str, Any]], log: bool, floor: float
           ) -> tuple[np.ndarray, np.ndarray]:
    kept, removed = [], []
    for g in members:
        scores = _clip(np.asarray(g["scores"], float), log, floor)
        mask = np.zeros(scores.size, bool)
        mask[[int(u) for u in g["removed"]]] = True
        kept.append(scores[~mask])
        removed.append(scores[mask])
    return np.concatenate(kept) if kept else np.zeros(0), \
        np.concatenate(removed) if removed else np.zeros(0)


def _clip(values: np.ndarray, log: bool, floor: float) -> np.ndarray:
    return np.maximum(values, floor) if log else values


def _bins(values: np.ndarray, log: bool, floor: float) -> np.ndarray:
    if values.size == 0:
        return np.linspace(0, 1, 11)
    if log:
        low, high = max(values.min(), floor), max(values.max(), floor * 10)
        return np.logspace(math.log10(low), math.log10(high) + 1e-9, 50)
    low, high = float(values.min()), float(values.max())
    return np.linspace(low, high if high > low else low + 1, 50)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
