"""Perplexity on WikiText-2 / PTB / any text, the way LLM-Pruner, GPTQ and Wanda measure it.

Protocol (LLM-Pruner ``LLMPruner/evaluator/ppl.py``): the whole evaluation text is
tokenized once, cut into non-overlapping windows of ``seq_len`` tokens (the remainder is
dropped), and every window is scored independently: the loss covers every position but the
first of each window. Perplexity is ``exp`` of the mean token NLL over all windows.

Every window starts the way the model expects a text to start. When the tokenizer's own
encoding puts BOS in front of a text (Llama, Gemma: :func:`pruning.text.bos_prefix`), each
window is BOS followed by ``seq_len - 1`` text tokens, all of which are scored (BOS is
context, never a scored token), as lm-evaluation-harness does; LLM-Pruner instead puts one
BOS at the very start of the text, so every window but the first begins mid-stream without
it (a Gemma-3 270M: 42 with BOS, 346 without, at windows of 128). Tokenizers that add no BOS
(GPT-2, SmolLM2) give exactly LLM-Pruner's windows. Either way ``windows × (seq_len - 1)``
tokens are scored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from depgraph.paths import data_dir
from pruning.text import bos_prefix, encode_text

from ._common import (
    check_finite_logits,
    check_positive_int,
    eval_mode,
    forward_logits,
    progress_bar,
    resolve_device,
)

__all__ = ["TEXT_DATASETS", "load_text", "perplexity", "text_windows", "token_windows",
           "tokenize_text", "window_bos"]

#: Dataset names understood by :func:`load_text` (aliases map onto the first two).
TEXT_DATASETS: tuple[str, ...] = ("wikitext2", "ptb")
_ALIASES = {"wikitext2": "wikitext2", "wikitext-2": "wikitext2", "wikitext": "wikitext2", "ptb": "ptb"}


def _read_text_file(path: Path) -> str:
    # "\r\n" -> "\n": the shared WikiText-2 copy came through a CRLF checkout, while the HF
    # rows (and so the string the papers score) contain no "\r" at all.
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {str(path)!r} is not UTF-8 text (byte {exc.start}: "
                         f"{exc.reason})") from None
    return text.replace("\r\n", "\n")


def _load_wikitext2(split: str) -> str:
    offline = data_dir() / "wikitext-2-raw" / f"{split}.txt"
    if offline.is_file():
        return _read_text_file(offline)
    rows = _hf_rows(("wikitext", "wikitext-2-raw-v1"), split, "text")
    return "\n\n".join(rows)


def _load_ptb(split: str) -> str:
    # Mikolov's ptb.<split>.txt has one sentence per line; HF ``ptb_text_only`` rows are those
    # lines stripped, so an offline copy of the file gives the same string.
    offline = data_dir() / "ptb" / f"ptb.{'valid' if split == 'validation' else split}.txt"
    if offline.is_file():
        rows = [line.strip() for line in _read_text_file(offline).split("\n")]
        rows = rows[:-1] if rows and not rows[-1] else rows
    else:
        rows = _hf_rows(("ptb_text_only", "penn_treebank"), split, "sentence")
    return "\n\n".join(rows)


def _hf_rows(args: tuple[str, str], split: str, field: str) -> list[str]:
    try:
        import datasets  # optional dependency, imported lazily
    except ImportError as exc:
        raise ValueError(
            f"{args[0]!r} split {split!r} is not in the offline data dir {str(data_dir())!r} and "
            "the `datasets` package is not installed; pass a text file path instead"
        ) from exc
    return list(datasets.load_dataset(*args, split=split)[field])


def load_text(name_or_path: str | os.PathLike[str], split: str | None = None) -> str:
    """Return the evaluation text of a named corpus or a text file.

    Parameters
    ----------
    name_or_path : str or path-like
        ``"wikitext2"`` (aliases ``"wikitext"``, ``"wikitext-2"``): WikiText-2 *raw*, rows
        joined with ``"\\n\\n"`` (the string LLM-Pruner, GPTQ and Wanda score). Read from
        ``<data_dir>/wikitext-2-raw/<split>.txt`` when present, otherwise from
        ``datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)``.
        Offline files are read as UTF-8 with ``"\\r\\n"`` turned into ``"\\n"`` (the shared
        copy has CRLF line ends; the HF rows, hence the papers' string, have none).
        ``"ptb"``: Penn Treebank, ``ptb_text_only`` sentences joined with ``"\\n\\n"`` as
        LLM-Pruner does (GPTQ/Wanda join the *test* split with ``" "`` instead). Read from
        ``<data_dir>/ptb/ptb.<split>.txt`` (Mikolov's files: ``ptb.valid.txt`` for
        ``"validation"``) when present, otherwise via ``datasets``.
        Anything else is read as a UTF-8 text file (same newline handling).
    split : str, optional
        Dataset split. Defaults to ``"test"`` for WikiText-2 and to ``"validation"`` for PTB:
        LLM-Pruner's ``get_ptb`` returns the validation split as its test set, and published
        LLM-Pruner PTB numbers are on it. Ignored for files.

    Returns
    -------
    str
        The text, exactly as it should be passed to :func:`perplexity`.

    Raises
    ------
    ValueError
        If the name is unknown and no such file exists, or the data is neither offline nor
        loadable with ``datasets``.
    """
    key = _ALIASES.get(str(name_or_path).lower()) if isinstance(name_or_path, str) else None
    if key == "wikitext2":
        return _load_wikitext2(split or "test")
    if key == "ptb":
        return _load_ptb(split or "validation")
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"unknown text {str(name_or_path)!r}: not one of {TEXT_DATASETS} nor an existing file"
        )
    return _read_text_file(path)


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """The token stream of ``text`` (its own tokens, no special tokens) as a 1-D LongTensor."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__!r}")
    return torch.as_tensor(encode_text(tokenizer, text), dtype=torch.long).reshape(-1)


def window_bos(tokenizer: Any) -> int | None:
    """The BOS id every window starts with (``None``: windows are plain text)."""
    prefix = bos_prefix(tokenizer)
    return prefix[0] if prefix else None


def token_windows(
    ids: torch.Tensor | Sequence[int], seq_len: int, max_tokens: int | None = None,
    bos: int | None = None,
) -> torch.Tensor:
    """Cut a token sequence into non-overlapping ``[n_windows, seq_len]`` windows.

    Parameters
    ----------
    ids : Tensor or sequence of int
        The tokenized text (1-D), without BOS.
    seq_len : int
        Window length (>= 2, since the first position of a window is never scored).
    max_tokens : int, optional
        Keep only the first ``max_tokens`` tokens of ``ids`` before windowing.
    bos : int, optional
        Start every window with this token, followed by ``seq_len - 1`` tokens of ``ids``.

    Returns
    -------
    Tensor
        ``len(ids[:max_tokens]) // seq_len`` windows (``// (seq_len - 1)`` with ``bos``); the
        remainder is dropped.
    """
    check_positive_int("seq_len", seq_len, minimum=2)
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if max_tokens is not None:
        ids = ids[: check_positive_int("max_tokens", max_tokens)]
    step = seq_len - (bos is not None)
    n_windows = ids.numel() // step
    if n_windows == 0:
        raise ValueError(f"only {ids.numel()} tokens, fewer than the {step} a window of "
                         f"seq_len={seq_len!r} needs")
    windows = ids[: n_windows * step].view(n_windows, step)
    if bos is not None:
        windows = torch.cat([torch.full((n_windows, 1), int(bos), dtype=torch.long), windows], 1)
    return windows


def text_windows(tokenizer: Any, text: str, seq_len: int, max_tokens: int | None = None
                 ) -> torch.Tensor:
    """``text`` as evaluation windows: tokenized once, cut, BOS first where the model expects it."""
    return token_windows(tokenize_text(tokenizer, text), seq_len, max_tokens,
                         bos=window_bos(tokenizer))


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str | torch.Tensor | Sequence[int],
    seq_len: int = 128,
    batch_size: int = 4,
    max_tokens: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    bos: int | bool | None = None,
) -> dict[str, float | int]:
    """Perplexity of ``model`` on ``text`` over non-overlapping windows (LLM-Pruner style).

    Parameters
    ----------
    model : nn.Module
        A causal LM returning logits (HF model or any module, see ``forward_logits``).
    tokenizer : Any
        HF tokenizer (``encode``), which also says whether windows start with BOS; may be
        ``None`` when ``text`` is token ids (then windows start with ``bos`` only).
    text : str, Tensor or sequence of int
        The evaluation text (e.g. from :func:`load_text`), its token ids (1-D, without BOS;
        cut like the text), or ready windows (a 2-D tensor, e.g. from :func:`text_windows`,
        scored as they are: ``seq_len`` and ``max_tokens`` do not apply).
    seq_len : int, default 128
        Window length; LLM-Pruner reports 128 (and 2048 for some tables).
    batch_size : int, default 4
        Windows per forward pass.
    max_tokens : int, optional
        Evaluate only the first ``max_tokens`` tokens of the text (fast mode).
    device : str or torch.device, optional
        Where to run; defaults to the model's device.
    progress : bool, optional
        Show a tqdm bar; by default only when stderr is a terminal.
    bos : int or False, optional
        The token every window starts with; by default the tokenizer's (:func:`window_bos`;
        none without a tokenizer), ``False`` for none.

    Returns
    -------
    dict
        ``ppl`` (exp of mean NLL), ``nll`` (mean NLL per predicted token, nats), ``tokens``
        (predicted tokens, ``windows * (seq_len - 1)``), ``windows``, ``seq_len``,
        ``text_tokens`` (tokens of the whole text before windowing) and ``bos`` (the token
        each window starts with, or ``None``).

    Raises
    ------
    depgraph.errors.NonFiniteError
        When the model's logits are NaN or infinite (a number computed from them would be
        meaningless).
    """
    check_positive_int("seq_len", seq_len, minimum=2)
    check_positive_int("batch_size", batch_size)
    if isinstance(text, str) and tokenizer is None:
        raise ValueError("tokenizer=None needs token ids, got a str text")
    if bos is None:
        bos = window_bos(tokenizer) if tokenizer is not None else None
    bos = None if bos is False else bos
    if isinstance(text, torch.Tensor) and text.dim() == 2:  # ready windows, scored as they are
        windows = text.long()
        ids, seq_len = windows.reshape(-1), check_positive_int("seq_len", windows.shape[1], 2)
        bos = bos if bos is not None and bool((windows[:, 0] == bos).all()) else None
    else:
        ids = (tokenize_text(tokenizer, text) if isinstance(text, str)
               else torch.as_tensor(text, dtype=torch.long).reshape(-1))
        windows = token_windows(ids, seq_len, max_tokens, bos=bos)
    dev = resolve_device(model, device)
    total_nll, total_tokens = 0.0, 0
    with eval_mode(model):
        bar = progress_bar(total=windows.shape[0], desc=f"ppl@{seq_len}", enabled=progress)
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(dev)
            logits = forward_logits(model, batch)[:, :-1, :].float()
            check_finite_logits(logits, f"perplexity windows {start}..{start + len(batch) - 1}")
            targets = batch[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                  reduction="sum")
            total_nll += float(nll)
            total_tokens += targets.numel()
            bar.update(batch.shape[0])
        bar.close()
    mean_nll = total_nll / total_tokens
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": total_tokens,
        "windows": int(windows.shape[0]),
        "seq_len": seq_len,
        "text_tokens": int(ids.numel()),
        "bos": bos,
    }
