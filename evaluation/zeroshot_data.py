"""Zero-shot multiple-choice task data: offline JSONL files, or HF ``datasets`` when online.

Every task becomes a list of :class:`MCItem` (one context and one continuation per choice).
Two JSONL record formats are read (those of ``<data_dir>/zeroshot/*.jsonl``, taken from
llm-foundry's local eval data):

* ``{"query": str, "choices": [str, ...], "gold": int}``: each choice is a continuation of
  the same query (boolq, piqa, hellaswag, arc_easy, arc_challenge, openbook_qa);
* ``{"context_options": [str, ...], "continuation": str, "gold": int}``: one shared
  continuation scored after each context (winogrande, "partial evaluation").

``prompt_style="harness"`` rewrites the queries of the tasks whose lm-evaluation-harness
template differs from llm-foundry's: arc_* and piqa become ``"Question: ...\\nAnswer:"`` and
boolq ``"<passage>\\nQuestion: <question>?\\nAnswer:"``, which are the harness prompts;
``prompt_style="raw"`` scores the queries as stored.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depgraph.paths import data_dir

__all__ = ["HF_SOURCES", "PROMPT_STYLES", "TASKS", "MCItem", "load_task", "parse_record"]

#: Tasks known by name (files ``<data_dir>/zeroshot/<name>.jsonl``).
TASKS: tuple[str, ...] = (
    "boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbook_qa",
)
PROMPT_STYLES: tuple[str, ...] = ("harness", "raw")


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: choice ``i`` scores ``continuations[i]`` after ``contexts[i]``."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int


def parse_record(record: Mapping[str, Any], where: str = "record") -> MCItem:
    """Turn one JSONL record (either format, see module docstring) into an :class:`MCItem`."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    gold = record.get("gold")
    if "query" in record and "choices" in record:
        choices = [str(c) for c in record["choices"]]
        contexts = [str(record["query"])] * len(choices)
    elif "context_options" in record and "continuation" in record:
        contexts = [str(c) for c in record["context_options"]]
        choices = [str(record["continuation"])] * len(contexts)
    else:
        raise ValueError(f"{where}: unknown zero-shot record keys {sorted(record)!r}")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"{where}: gold {gold!r} is not an index into {len(choices)} choices")
    return MCItem(tuple(contexts), tuple(choices), gold)


def _harness_query(task: str, query: str) -> str:
    if task in ("arc_easy", "arc_challenge", "piqa", "boolq"):
        query = query.rstrip()
        if task == "boolq" and query.startswith("Passage: "):
            query = query[len("Passage: "):]
        if not query.endswith("Answer:"):
            query += "\nAnswer:"
    return query


# ---- online fallback: HF datasets rows -> JSONL records (the harness's sources and splits) ----

def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _from_boolq(row: Mapping[str, Any]) -> dict[str, Any]:
    query = f"Passage: {row['passage']}\nQuestion: {row['question']}?"
    return {"query": query, "choices": ["no", "yes"], "gold": int(row["label"])}


def _from_piqa(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"query": f"Question: {row['goal']}\n", "choices": [row["sol1"], row["sol2"]],
            "gold": int(row["label"])}


def _from_hellaswag(row: Mapping[str, Any]) -> dict[str, Any]:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"query": _hellaswag_clean(row["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in row["endings"]], "gold": int(row["label"])}


def _from_winogrande(row: Mapping[str, Any]) -> dict[str, Any]:
    sentence = row["sentence"]
    idx = sentence.index("_")
    return {"context_options": [sentence[:idx] + row["option1"], sentence[:idx] + row["option2"]],
            "continuation": sentence[idx + 1:].strip(), "gold": int(row["answer"]) - 1}


def _from_arc(row: Mapping[str, Any]) -> dict[str, Any]:
    labels = list(row["choices"]["label"])
    return {"query": f"Question: {row['question']}", "choices": list(row["choices"]["text"]),
            "gold": labels.index(row["answerKey"])}


def _from_openbookqa(row: Mapping[str, Any]) -> dict[str, Any]:
    labels = list(row["choices"]["label"])
    return {"query": row["question_stem"], "choices": list(row["choices"]["text"]),
            "gold": labels.index(row["answerKey"].strip())}


#: ``task -> ((load_dataset args), split, row converter)``, as lm-evaluation-harness loads them.
HF_SOURCES: dict[str, tuple[tuple[str, ...], str, Callable[[Mapping[str, Any]], dict[str, Any]]]] = {
    "boolq": (("aps/super_glue", "boolq"), "validation", _from_boolq),
    "piqa": (("baber/piqa",), "validation", _from_piqa),
    "hellaswag": (("Rowan/hellaswag",), "validation", _from_hellaswag),
    "winogrande": (("allenai/winogrande", "winogrande_xl"), "validation", _from_winogrande),
    "arc_easy": (("allenai/ai2_arc", "ARC-Easy"), "test", _from_arc),
    "arc_challenge": (("allenai/ai2_arc", "ARC-Challenge"), "test", _from_arc),
    "openbook_qa": (("allenai/openbookqa", "main"), "test", _from_openbookqa),
}


def _hf_load(args: tuple[str, ...], split: str) -> Any:
    import datasets  # optional dependency, imported lazily

    return datasets.load_dataset(*args, split=split)


def _records_from_hf(task: str, offline: Path, limit: int | None) -> list[dict[str, Any]]:
    args, split, convert = HF_SOURCES[task]
    hint = f"zero-shot task {task!r}: offline file {str(offline)!r} is missing; pass a JSONL path"
    try:
        import datasets  # noqa: F401  (only to tell a missing package from a failed download)
    except ImportError as exc:
        raise ValueError(f"{hint} (or install `datasets` to load {args[0]!r})") from exc
    try:
        rows = _hf_load(args, split)
    except Exception as exc:  # hub unreachable, dataset renamed, ...
        raise ValueError(f"{hint} (loading {args[0]!r} with datasets failed: {exc})") from exc
    n = len(rows) if limit is None else min(limit, len(rows))
    return [convert(rows[i]) for i in range(n)]


def _read_jsonl(path: Path, limit: int | None) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if limit is not None and len(records) >= limit:
                break
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{str(path)!r} line {lineno}: invalid JSON ({exc})") from exc
    return records


def load_task(
    task: str | os.PathLike[str], limit: int | None = None, prompt_style: str = "harness"
) -> tuple[str, list[MCItem]]:
    """Load a zero-shot task by name or from a JSONL file.

    Parameters
    ----------
    task : str or path-like
        One of :data:`TASKS` (read from ``<data_dir>/zeroshot/<task>.jsonl``, or through HF
        ``datasets`` from :data:`HF_SOURCES` when that file is absent), or a path to a JSONL
        file in one of the two formats; the task name is then the file stem.
    limit : int, optional
        Keep only the first ``limit`` items.
    prompt_style : {"harness", "raw"}, default "harness"
        See the module docstring.

    Returns
    -------
    (str, list of MCItem)
        The task name and its items.

    Raises
    ------
    ValueError
        Unknown task name, missing file, malformed record, bad ``limit`` or ``prompt_style``.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt_style {prompt_style!r}; expected one of {PROMPT_STYLES}")
    text = os.fspath(task)
    if text in TASKS:
        name, path = text, data_dir() / "zeroshot" / f"{text}.jsonl"
        records = _read_jsonl(path, limit) if path.is_file() else _records_from_hf(name, path, limit)
    elif text.endswith(".jsonl") or os.sep in text or Path(text).suffix:
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"zero-shot task file {text!r} does not exist")
        name, records = path.stem, _read_jsonl(path, limit)
    else:
        raise ValueError(f"unknown zero-shot task {text!r}; expected one of {TASKS} or a JSONL path")
    source = repr(str(path)) if path.is_file() else name
    items = [parse_record(r, f"{source} item {i}") for i, r in enumerate(records)]
    if prompt_style == "harness":
        items = [
            MCItem(tuple(_harness_query(name, c) for c in it.contexts), it.continuations, it.gold)
            for it in items
        ]
    return name, items
