"""How sure a dense-vs-pruned difference is: standard errors of accuracies, spread of timings.

A report that says "0.453 → 0.473" from 60 items per task, or "×0.145" from timing rounds
that disagree by a factor of two, tells the reader more than the data do. These helpers
give each number its uncertainty and say when a difference is within it:

* accuracy: ``± se`` with ``se = sqrt(p (1 - p) / (n - 1))`` (lm-evaluation-harness's
  standard error, :func:`evaluation.zeroshot.accuracy_stderr`); two accuracies differ
  *within noise* when ``|a - b| <= NOISE_SE * sqrt(se_a² + se_b²)`` (about a 95% interval);
* timing: the spread of the rounds, ``(max - min) / median``
  (:func:`evaluation.efficiency.timing_spread`); above :data:`NOISY_SPREAD` for either model
  a speed ratio is replaced by a note that the machine was too noisy to give one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .zeroshot import accuracy_stderr

__all__ = ["NOISE_SE", "NOISY_SPREAD", "accuracy_cell", "difference_cell", "mean_accuracy",
           "speed_ratio_cell", "task_accuracy"]

#: Differences within this many standard errors of the difference are "within noise".
NOISE_SE = 2.0
#: Timing rounds whose spread exceeds this share of their median give no trustworthy ratio.
NOISY_SPREAD = 0.2


def _ok(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def task_accuracy(result: Mapping[str, Any], key: str = "acc") -> tuple[float | None, float | None]:
    """``(accuracy, standard error)`` of one task's result (the error derived from ``n``
    when the result predates ``acc_stderr``)."""
    acc = result.get(key)
    if not _ok(acc):
        return None, None
    stderr = result.get(f"{key}_stderr")
    if not _ok(stderr) and isinstance(result.get("n"), int):
        stderr = accuracy_stderr(acc, result["n"])
    return acc, stderr if _ok(stderr) else None


def mean_accuracy(zeroshot: Mapping[str, Mapping[str, Any]]) -> tuple[float | None, float | None]:
    """Mean accuracy over tasks and its standard error ``sqrt(Σ se²) / k`` (tasks independent)."""
    pairs = [task_accuracy(result) for result in zeroshot.values()]
    pairs = [(acc, se) for acc, se in pairs if acc is not None]
    if not pairs:
        return None, None
    mean = sum(acc for acc, _ in pairs) / len(pairs)
    if any(se is None for _, se in pairs):
        return mean, None
    return mean, math.sqrt(sum(se * se for _, se in pairs)) / len(pairs)


def accuracy_cell(acc: float | None, stderr: float | None) -> str:
    """``0.453 ± 0.065`` (``–`` when unknown)."""
    if acc is None:
        return "–"
    return f"{acc:.3f} ± {stderr:.3f}" if stderr is not None else f"{acc:.3f}"


def difference_cell(dense: tuple[float | None, float | None],
                    pruned: tuple[float | None, float | None]) -> str:
    """``+0.020 (within noise)`` or ``-0.150``; empty when a number is missing."""
    (a, se_a), (b, se_b) = dense, pruned
    if a is None or b is None:
        return ""
    text = f"{b - a:+.3f}"
    if se_a is not None and se_b is not None and \
            abs(b - a) <= NOISE_SE * math.sqrt(se_a ** 2 + se_b ** 2):
        text += " (within noise)"
    return text


def speed_ratio_cell(dense: Mapping[str, Any], pruned: Mapping[str, Any], key: str) -> str:
    """``×1.230`` for a speed entry of two efficiency dicts, unless their timing rounds
    disagree by more than :data:`NOISY_SPREAD`: then a note with the spreads instead."""
    a, b = dense.get(key), pruned.get(key)
    if not (_ok(a) and _ok(b) and a):
        return ""
    spreads = [(eff.get("timing_spread") or {}).get(key) for eff in (dense, pruned)]
    if any(_ok(s) and s > NOISY_SPREAD for s in spreads):
        shown = " / ".join(f"{s:.0%}" if _ok(s) else "?" for s in spreads)
        return f"no ratio: timing rounds spread {shown} (dense / pruned), too noisy"
    return f"×{b / a:.3f}"
