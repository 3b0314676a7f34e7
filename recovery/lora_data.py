"""Training data for LoRA recovery: Alpaca-style instructions or plain text.

``load_examples(tokenizer, source, ...)`` returns ``(train, validation)`` lists of examples,
each ``{"input_ids": [...], "labels": [...]}`` (``-100`` marks tokens without loss).

Sources:

* an Alpaca JSON file (a list of records) or JSON-lines file, each record with
  ``instruction``, optional ``input`` and ``output``; formatted with the Alpaca prompt
  template (:data:`ALPACA_TEMPLATE`, the one LLM-Pruner's recovery uses), truncated to
  ``seq_len`` tokens, loss on the response only unless ``train_on_inputs``;
* ``hf:NAME[:CONFIG[:SPLIT]]`` with ``instruction``/``output`` columns (e.g.
  ``hf:yahma/alpaca-cleaned``, LLM-Pruner's data) is read the same way;
* anything :func:`pruning.calibration.calibration_tokens` reads as text (``bundled``,
  ``wikitext2``, a text file, a folder of ``.txt``, ``hf:`` datasets with a text column):
  windows of ``seq_len`` tokens (BOS first where the tokenizer adds one, as
  :func:`pruning.calibration.calibration_tokens` cuts them), loss on every token after the
  first. Training windows come from the first
  ``1 - val_fraction`` of every document and validation windows from the rest, so the two
  never share text.

Instruction records are shuffled with ``seed`` and the last ``val_fraction`` held out; records
whose prompt leaves no response token within ``seq_len`` are dropped.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from pruning.calibration import calibration_tokens
from pruning.text import bos_prefix, encode_text, load_hf_dataset

__all__ = ["ALPACA_TEMPLATE", "check_instruction_source", "load_examples", "format_alpaca",
           "is_instruction_source"]

#: The Stanford Alpaca prompt (also LLM-Pruner's ``templates/alpaca.json``).
ALPACA_TEMPLATE = {
    "prompt_input": ("Below is an instruction that describes a task, paired with an input that "
                     "provides further context. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
                     "\n\n### Response:\n"),
    "prompt_no_input": ("Below is an instruction that describes a task. Write a response that "
                        "appropriately completes the request.\n\n### Instruction:\n"
                        "{instruction}\n\n### Response:\n"),
}
IGNORE = -100


def format_alpaca(record: dict[str, Any]) -> tuple[str, str]:
    """``(prompt, response)`` of one Alpaca record; ``ValueError`` if fields are missing."""
    if not isinstance(record, dict) or "instruction" not in record or "output" not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"an Alpaca record needs 'instruction' and 'output' fields, got {keys}")
    context = str(record.get("input") or "").strip()
    key = "prompt_input" if context else "prompt_no_input"
    prompt = ALPACA_TEMPLATE[key].format(instruction=str(record["instruction"]), input=context)
    return prompt, str(record["output"])


def _instruction_example(tokenizer, record: dict, seq_len: int, train_on_inputs: bool) -> dict:
    prompt, response = format_alpaca(record)
    bos = bos_prefix(tokenizer)  # BOS where the tokenizer's own encoding adds one
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt_ids = bos + encode_text(tokenizer, prompt)
    ids = (prompt_ids + encode_text(tokenizer, response) + eos)[:seq_len]
    labels = list(ids) if train_on_inputs else (
        [IGNORE] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids):])
    return {"input_ids": ids, "labels": labels}


def _read_records(path: Path) -> list[dict]:
    """The records of a JSON list or JSON-lines file; errors name the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {exc.start})") from None
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{str(path)!r} line {lineno}: invalid JSON "
                                     f"({exc.msg}, column {exc.colno})") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} line {exc.lineno} column {exc.colno}: invalid JSON "
                         f"({exc.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{str(path)!r} must hold a JSON list of Alpaca records")
    return data


def check_instruction_source(source: str | os.PathLike[str]) -> None:
    """Read every record of an Alpaca JSON/JSONL file now; ``ValueError`` naming the file
    and the record (0-based, in file order) that is malformed."""
    if not str(source).startswith("hf:"):
        _check_records(_read_records(Path(source)), str(source))


def _check_records(records: list, label: str) -> None:
    for index, record in enumerate(records):
        try:
            format_alpaca(record)
        except ValueError as exc:
            raise ValueError(f"{label!r} record {index}: {exc}") from None


def _hf_rows(source: str) -> Any:

    name, _, rest = source[3:].partition(":")
    config, _, split = rest.partition(":")
    return load_hf_dataset(*([name, config] if config else [name]), split=split or "train")


def is_instruction_source(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names instruction records (JSON / JSONL / hf dataset with them)."""
    text = str(source)
    if Path(text).suffix in (".json", ".jsonl") and Path(text).is_file():
        return True
    if text.startswith("hf:"):
        columns = getattr(_hf_rows(text), "column_names", [])
        return "instruction" in columns and "output" in columns
    return False


def load_examples(tokenizer, source: str | os.PathLike[str], *, seq_len: int = 256,
                  max_examples: int = 1000, val_fraction: float = 0.1, seed: int = 0,
                  train_on_inputs: bool = False) -> tuple[list[dict], list[dict]]:
    """``(train, validation)`` examples from ``source`` (see the module docs)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if not isinstance(max_examples, int) or max_examples < 2:
        raise ValueError(f"max_examples must be an integer >= 2, got {max_examples!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    n_val = max(1, round(max_examples * val_fraction))
    if is_instruction_source(source):
        text = str(source)
        records = list(_hf_rows(text)) if text.startswith("hf:") else _read_records(Path(text))
        if len(records) < 2:
            raise ValueError(f"{text!r} holds {len(records)} records; need at least 2")
        _check_records(records, text)
        random.Random(seed).shuffle(records)
        records = records[:max_examples]
        examples = [_instruction_example(tokenizer, r, seq_len, train_on_inputs) for r in records]
        # a prompt longer than seq_len leaves nothing to learn from: drop such records
        examples = [e for e in examples if any(label != IGNORE for label in e["labels"])]
        if len(examples) < 2:
            raise ValueError(f"fewer than 2 records of {text!r} fit seq_len={seq_len} with a "
                             "response token left; raise seq_len")
        n_val = max(1, round(len(examples) * val_fraction))
        return examples[:-n_val], examples[-n_val:]

    split = 1 - val_fraction
    train = calibration_tokens(tokenizer, source, n_samples=max_examples - n_val,
                               seq_len=seq_len, seed=seed, region=(0.0, split))
    val = calibration_tokens(tokenizer, source, n_samples=n_val, seq_len=seq_len, seed=seed + 1,
                             region=(split, 1.0))
    return ([{"input_ids": row.tolist(), "labels": row.tolist()} for row in train],
            [{"input_ids": row.tolist(), "labels": row.tolist()} for row in val])
