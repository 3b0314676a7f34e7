"""How closely a pruned model follows its dense parent: next-token KL and top-1 agreement."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import (
    check_finite_logits,
    check_positive_int,
    eval_mode,
    forward_logits,
    progress_bar,
    resolve_device,
)

__all__ = ["next_token_agreement"]


def next_token_agreement(
    dense: nn.Module,
    pruned: nn.Module,
    windows: torch.Tensor | Sequence[Sequence[int]],
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> dict[str, float | int]:
    """Compare the next-token distributions of two models on the same token windows.

    At every position of every window, with ``p`` the dense and ``q`` the pruned model's
    softmax (computed in float32), this accumulates ``KL(p || q) = sum_v p_v (log p_v - log q_v)``
    and whether ``argmax p == argmax q``. Both models must share the tokenizer / vocabulary.

    Parameters
    ----------
    dense, pruned : nn.Module
        Reference and compared causal LMs (HF models or modules returning logits). They may
        live on different devices; ``device`` moves the inputs only.
    windows : Tensor or sequence of sequences of int
        ``[n_windows, seq_len]`` token ids (e.g. from
        :func:`evaluation.perplexity.token_windows`); a 1-D tensor is one window.
    batch_size : int, default 8
        Windows per forward pass.
    device : str or torch.device, optional
        Where the inputs go; defaults to each model's own device.
    progress : bool, optional
        Show a tqdm bar (default: only on a terminal).

    Returns
    -------
    dict
        ``kl`` (mean KL per position, nats), ``kl_max`` (largest per-position KL), ``top1``
        (fraction of positions whose argmax agrees) and ``tokens`` (positions compared).
    """
    check_positive_int("batch_size", batch_size)
    ids = torch.as_tensor(windows, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"windows must be a non-empty [n, seq_len] array, got shape {tuple(ids.shape)!r}")
    dev_p = resolve_device(dense, device)
    dev_q = resolve_device(pruned, device)
    kl_sum, kl_max, agree, count = 0.0, 0.0, 0, 0
    with eval_mode(dense, pruned):
        bar = progress_bar(total=ids.shape[0], desc="agreement", enabled=progress)
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size]
            where = f"windows {start}..{start + batch.shape[0] - 1}"
            dense_logits = forward_logits(dense, batch.to(dev_p))
            check_finite_logits(dense_logits, f"{where} (dense model)")
            pruned_logits = forward_logits(pruned, batch.to(dev_q))
            check_finite_logits(pruned_logits, f"{where} (compared model)")
            logp = torch.log_softmax(dense_logits.float(), dim=-1)
            logq = torch.log_softmax(pruned_logits.float(), dim=-1)
            logq = logq.to(logp.device)
            if logp.shape != logq.shape:
                raise ValueError(
                    f"models disagree on logits shape: {tuple(logp.shape)!r} vs {tuple(logq.shape)!r}"
                )
            kl = (logp.exp() * (logp - logq)).sum(dim=-1).clamp_min(0.0)
            kl_sum += float(kl.double().sum())
            kl_max = max(kl_max, float(kl.max()))
            agree += int((logp.argmax(dim=-1) == logq.argmax(dim=-1)).sum())
            count += kl.numel()
            bar.update(batch.shape[0])
        bar.close()
    return {"kl": kl_sum / count, "kl_max": kl_max, "top1": agree / count, "tokens": count}
