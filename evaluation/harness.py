"""Zero-shot tasks through lm-evaluation-harness, when the ``lm-eval`` package is installed.

``depgraph eval --backend lm-eval`` hands our (pruned) model object to lm-eval's ``HFLM``
wrapper and runs its own task definitions (its prompts, its datasets from the hub), so the
numbers are lm-eval's. Without the package the native evaluator (:mod:`evaluation.zeroshot`)
scores the same tasks the same way from the offline JSONL files.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["HARNESS_TASKS", "evaluate_with_lm_eval"]

#: Our task names -> lm-eval's.
HARNESS_TASKS = {"boolq": "boolq", "piqa": "piqa", "hellaswag": "hellaswag",
                 "winogrande": "winogrande", "arc_easy": "arc_easy",
                 "arc_challenge": "arc_challenge", "openbook_qa": "openbookqa"}


def _lm_eval():
    try:
        return (importlib.import_module("lm_eval"),
                importlib.import_module("lm_eval.models.huggingface"))
    except ImportError:
        raise ValueError("--backend lm-eval needs the lm-eval package (pip install lm-eval); "
                         "the native backend scores the same tasks offline") from None


def evaluate_with_lm_eval(model: nn.Module, tokenizer: Any, tasks: Iterable[str],
                          limit: int | None = None, batch_size: int = 8
                          ) -> dict[str, dict[str, float | int]]:
    """``{task: {"acc", "acc_norm", "n"}}`` as lm-eval reports them (our task names)."""
    names = list(tasks)
    unknown = [t for t in names if t not in HARNESS_TASKS]
    if unknown:
        raise ValueError(f"task {unknown[0]!r} has no lm-eval counterpart; expected some of "
                         f"{', '.join(HARNESS_TASKS)}")
    lm_eval, huggingface = _lm_eval()
    wrapped = huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(model=wrapped, tasks=[HARNESS_TASKS[t] for t in names],
                                     limit=limit)
    results = {}
    for task in names:
        row = output["results"][HARNESS_TASKS[task]]
        acc = row.get("acc,none", row.get("acc"))
        results[task] = {"acc": float(acc), "acc_norm": float(row.get("acc_norm,none", acc)),
                         "n": int(output.get("n-samples", {}).get(HARNESS_TASKS[task], {})
                                  .get("effective", limit or 0))}
    return results
