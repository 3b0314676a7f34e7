"""Evaluation of dense and pruned causal LMs.

* :mod:`evaluation.perplexity`: WikiText-2 / PTB / text-file perplexity (LLM-Pruner protocol).
* :mod:`evaluation.zeroshot`: zero-shot multiple-choice accuracy (lm-evaluation-harness scoring).
* :mod:`evaluation.agreement`: next-token KL and top-1 agreement between two models.
* :mod:`evaluation.efficiency`: parameters, weight bytes, MACs/token, peak memory, latency.
* :mod:`evaluation.report_table`: aligned text tables and dense-vs-pruned comparisons.

Offline data is read from :func:`depgraph.paths.data_dir`; Hugging Face ``datasets`` is used,
imported lazily, only when a file is missing there.
"""

from __future__ import annotations

from .agreement import next_token_agreement
from .efficiency import (
    count_parameters,
    efficiency_report,
    latency_medians,
    macs_per_token,
    measure_latency,
    measure_latency_rounds,
    measure_latency_side_by_side,
    peak_forward_memory,
    timing_spread,
    weight_memory_bytes,
)
from .perplexity import (
    TEXT_DATASETS,
    load_text,
    perplexity,
    text_windows,
    token_windows,
    tokenize_text,
    window_bos,
)
from .report_table import compare, flatten, format_table
from .zeroshot import (
    accuracy_stderr,
    encode_pair,
    evaluate_task,
    evaluate_zeroshot,
    loglikelihoods,
    score_items,
)
from .zeroshot_data import TASKS, MCItem, load_task

__all__ = [
    "TASKS",
    "TEXT_DATASETS",
    "MCItem",
    "accuracy_stderr",
    "compare",
    "count_parameters",
    "efficiency_report",
    "encode_pair",
    "evaluate_task",
    "evaluate_zeroshot",
    "flatten",
    "format_table",
    "latency_medians",
    "load_task",
    "load_text",
    "loglikelihoods",
    "macs_per_token",
    "measure_latency",
    "measure_latency_rounds",
    "measure_latency_side_by_side",
    "next_token_agreement",
    "peak_forward_memory",
    "perplexity",
    "timing_spread",
    "score_items",
    "text_windows",
    "token_windows",
    "tokenize_text",
    "window_bos",
    "weight_memory_bytes",
]
