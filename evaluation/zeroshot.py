"""Zero-shot multiple-choice accuracy (boolq, piqa, hellaswag, winogrande, arc, openbookqa).

Scoring follows lm-evaluation-harness (``HFLM.loglikelihood`` + ``multiple_choice``):

* the request for choice ``c`` is ``(context, " " + c)`` (``target_delimiter=" "``);
* trailing whitespace of the context moves to the front of the continuation; the
  continuation tokens are ``encode(context + continuation)[len(encode(context)):]``,
  encoded without special tokens; BOS is prepended to every context when the tokenizer's own
  encoding adds one (``add_bos=None``, :func:`pruning.text.bos_prefix`: Llama, Gemma, as the
  harness does for Gemma), or as ``add_bos`` says; an empty context becomes the BOS (else
  EOS) token;
* the model sees ``(context + continuation)[:-1]`` (left-truncated to ``max_length``) and the
  score is the sum of the log-probabilities of the continuation tokens;
* ``acc``: argmax of the sums; ``acc_norm``: argmax of the sums divided by the number of
  characters of the choice (without the delimiter). For winogrande the continuation is
  shared by both options, so ``acc_norm == acc`` (the harness reports only ``acc``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pruning.text import bos_prefix, encode_text

from ._common import (
    check_finite_logits,
    check_positive_int,
    eval_mode,
    forward_logits,
    progress_bar,
    resolve_device,
)
from .zeroshot_data import TASKS, MCItem, load_task

__all__ = ["TASKS", "accuracy_stderr", "encode_pair", "evaluate_task", "evaluate_zeroshot", "loglikelihoods",
           "score_items"]


def encode_pair(
    tokenizer: Any, context: str, continuation: str, add_bos: bool | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it, the harness way.

    Parameters
    ----------
    tokenizer : Any
        Object with ``encode(text, add_special_tokens=False)`` and optionally
        ``bos_token_id`` / ``eos_token_id``.
    context, continuation : str
        The conditioning text and the scored text (delimiter already included).
    add_bos : bool, optional
        Prepend the BOS token to the context; by default when the tokenizer's own encoding
        adds one.

    Returns
    -------
    (list of int, list of int)
        Context ids (never empty) and continuation ids.
    """
    if add_bos is None:
        add_bos = bool(bos_prefix(tokenizer))
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode_text(tokenizer, context + continuation)
    ctx = encode_text(tokenizer, context) if context else []
    cont = whole[len(ctx):]
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = bos if bos is not None else getattr(tokenizer, "eos_token_id", None)
    if (add_bos and bos is not None) or not ctx:
        if prefix is None:
            raise ValueError(f"context {context!r} is empty and the tokenizer has no BOS/EOS token")
        ctx = [prefix, *ctx]
    return ctx, cont


def loglikelihoods(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    device: str | torch.device | None = None,
    add_bos: bool | None = None,
    max_length: int | None = None,
    progress: bool | None = None,
) -> list[tuple[float, bool]]:
    """Log-likelihood of each ``(context, continuation)`` request, batched.

    Parameters
    ----------
    model : nn.Module
        Causal LM returning logits.
    tokenizer : Any
        See :func:`encode_pair`.
    requests : sequence of (str, str)
        ``(context, continuation)`` pairs; the continuation includes its delimiter.
    batch_size : int, default 16
        Sequences per forward pass (padded on the right, which a causal LM ignores).
    device : str or torch.device, optional
        Defaults to the model's device.
    add_bos : bool, optional
        See :func:`encode_pair`.
    max_length : int, optional
        Longest input fed to the model; defaults to ``config.max_position_embeddings`` or 2048.
    progress : bool, optional
        Show a tqdm bar (default: only on a terminal).

    Returns
    -------
    list of (float, bool)
        Sum log-probability of the continuation tokens, and whether each of them is the
        argmax (greedy) prediction; in the order of ``requests``.
    """
    check_positive_int("batch_size", batch_size)
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    check_positive_int("max_length", max_length, minimum=2)
    encoded = []
    add_bos = bool(bos_prefix(tokenizer)) if add_bos is None else add_bos
    for ctx, cont in requests:
        ctx_ids, cont_ids = encode_pair(tokenizer, ctx, cont, add_bos)
        full = (ctx_ids + cont_ids)[-(max_length + 1):]
        if len(cont_ids) > max_length:
            raise ValueError(f"continuation {cont!r} is longer than max_length={max_length!r}")
        encoded.append((full[:-1], cont_ids))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[tuple[float, bool]] = [(0.0, True)] * len(encoded)
    dev = resolve_device(model, device)
    with eval_mode(model):
        bar = progress_bar(total=len(order), desc="loglikelihood", enabled=progress)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(encoded[i][0]) for i in chunk)
            batch = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, i in enumerate(chunk):
                batch[row, : len(encoded[i][0])] = torch.tensor(encoded[i][0])
            logits = forward_logits(model, batch.to(dev))
            check_finite_logits(logits, f"zero-shot requests {start}..{start + len(chunk) - 1}")
            for row, i in enumerate(chunk):
                inp, cont = encoded[i]
                if not cont:
                    results[i] = (0.0, True)
                    continue
                lp = torch.log_softmax(logits[row, len(inp) - len(cont) : len(inp)].float(), dim=-1)
                target = torch.tensor(cont, device=lp.device)
                score = lp.gather(1, target[:, None]).sum()
                greedy = bool((lp.argmax(dim=-1) == target).all())
                results[i] = (float(score), greedy)
            bar.update(len(chunk))
        bar.close()
    return results


def score_items(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[MCItem],
    target_delimiter: str = " ",
    **kwargs: Any,
) -> dict[str, float | int]:
    """Accuracy of ``model`` on multiple-choice ``items``.

    Parameters
    ----------
    model, tokenizer
        As for :func:`loglikelihoods`.
    items : sequence of MCItem
        Items from :func:`~evaluation.zeroshot_data.load_task` or hand-made.
    target_delimiter : str, default " "
        Put between context and continuation (the harness default).
    **kwargs
        ``batch_size``, ``device``, ``add_bos``, ``max_length``, ``progress`` for
        :func:`loglikelihoods`.

    Returns
    -------
    dict
        ``acc``, ``acc_norm`` (both in [0, 1]), their standard errors ``acc_stderr`` and
        ``acc_norm_stderr`` (:func:`accuracy_stderr`, as lm-evaluation-harness reports them)
        and ``n`` (number of items).
    """
    if not items:
        raise ValueError(f"no items to score, got {items!r}")
    requests = [(ctx, target_delimiter + cont) for it in items
                for ctx, cont in zip(it.contexts, it.continuations, strict=True)]
    scores = [s for s, _ in loglikelihoods(model, tokenizer, requests, **kwargs)]
    correct = correct_norm = 0
    pos = 0
    for it in items:
        lls = np.asarray(scores[pos : pos + len(it.continuations)])
        pos += len(it.continuations)
        lengths = np.asarray([max(len(c), 1) for c in it.continuations], dtype=float)
        correct += int(np.argmax(lls) == it.gold)
        correct_norm += int(np.argmax(lls / lengths) == it.gold)
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n,
            "acc_stderr": accuracy_stderr(correct / n, n),
            "acc_norm_stderr": accuracy_stderr(correct_norm / n, n), "n": n}


def accuracy_stderr(acc: float, n: int) -> float:
    """Standard error of an accuracy over ``n`` items: ``sqrt(acc (1 - acc) / (n - 1))``.

    lm-evaluation-harness's ``mean_stderr`` (sample standard deviation of the 0/1 scores over
    ``sqrt(n)``) is this number; with one item it is undefined (``nan``). Two accuracies
    whose difference is within about twice ``sqrt(se_a² + se_b²)`` are within noise.

    >>> round(accuracy_stderr(0.5, 60), 4)
    0.0651
    """
    if n < 2:
        return float("nan")
    return math.sqrt(acc * (1 - acc) / (n - 1))


def evaluate_task(
    model: nn.Module,
    tokenizer: Any,
    task: str | os.PathLike[str],
    limit: int | None = None,
    prompt_style: str = "harness",
    **kwargs: Any,
) -> dict[str, float | int]:
    """Load one task (name or JSONL path, see ``load_task``) and score it with :func:`score_items`."""
    _, items = load_task(task, limit=limit, prompt_style=prompt_style)
    return score_items(model, tokenizer, items, **kwargs)


def evaluate_zeroshot(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] = TASKS,
    limit: int | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    prompt_style: str = "harness",
    add_bos: bool | None = None,
    max_length: int | None = None,
    progress: bool | None = None,
) -> dict[str, dict[str, float | int]]:
    """Zero-shot accuracy on several tasks.

    Parameters
    ----------
    model : nn.Module
        Causal LM returning logits.
    tokenizer : Any
        HF tokenizer (or anything with ``encode(text, add_special_tokens=False)``).
    tasks : str, path or iterable of them, default all of :data:`TASKS`
        Task names and/or JSONL paths (a path's result key is its file stem).
    limit : int, optional
        First ``limit`` items of each task.
    batch_size, device, add_bos, max_length, progress
        See :func:`loglikelihoods`.
    prompt_style : {"harness", "raw"}, default "harness"
        See :mod:`evaluation.zeroshot_data`.

    Returns
    -------
    dict
        ``{task: {"acc", "acc_norm", "n"}}``.
    """
    if isinstance(tasks, (str, os.PathLike)):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"no tasks given, got {tasks!r}")
    loaded = [load_task(t, limit=limit, prompt_style=prompt_style) for t in tasks]
    return {
        name: score_items(model, tokenizer, items, batch_size=batch_size, device=device,
                          add_bos=add_bos, max_length=max_length, progress=progress)
        for name, items in loaded
    }
