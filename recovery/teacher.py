"""The dense teacher of distillation: run in the same process, or read back from a disk cache.

    >>> teacher = LiveTeacher(dense)                                       # doctest: +SKIP
    >>> teacher = write_teacher_cache(dense, tokens, "cache", top_k=64)    # doctest: +SKIP

Both answer :meth:`targets` for a batch of token windows (given by their row numbers in the
token tensor the student trains on):

* :class:`LiveTeacher` runs the dense model on the batch (full next-token logits); the
  student and the teacher are both in memory;
* :class:`CachedTeacher` reads the teacher's top-``k`` logits (float16 values, int32 token
  ids) that :func:`write_teacher_cache` wrote in one streamed pass over the tokens, so the
  dense model can be freed before the student is loaded, for models that do not fit twice.
  The cache holds the tokens it was written for; reading it for other tokens is an error.

:func:`distill_loss` is the forward KL of the student's next-token distribution to the
teacher's, at a temperature (Hinton et al.: multiplied by ``T²`` so gradients keep their
scale), over the full vocabulary or over the teacher's top-``k`` (renormalised), optionally
mixed with the language-model loss on the tokens themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from depgraph.paths import atomic_folder
from depgraph.progress import progress_bar
from pruning.checks import check_int

__all__ = ["Targets", "LiveTeacher", "CachedTeacher", "write_teacher_cache", "distill_loss",
           "CACHE_FORMAT"]

#: Written into a cache's ``cache.json``; a folder without it is not a teacher cache.
CACHE_FORMAT = "depgraph-teacher-topk-1"


@dataclass
class Targets:
    """The teacher's answer for a batch: full ``logits`` (batch, seq, vocab), or the top-k
    ``values`` and ``indices`` (batch, seq, k) of them."""

    logits: torch.Tensor | None = None
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out).float()


class LiveTeacher:
    """The dense model in this process, run without gradients on every batch."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        for param in model.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def targets(self, rows: torch.Tensor, ids: torch.Tensor) -> Targets:
        device = next(self.model.parameters()).device
        return Targets(logits=_logits(self.model, ids.to(device)))


class CachedTeacher:
    """Top-k teacher logits written by :func:`write_teacher_cache`, memory-mapped."""

    def __init__(self, folder: str | Path, tokens: torch.Tensor):
        folder = Path(folder)
        meta = read_cache_meta(folder)
        if meta is None:
            raise ValueError(f"{str(folder)!r} is not a teacher cache (no cache.json of format "
                             f"{CACHE_FORMAT!r})")
        cached = torch.from_numpy(np.load(folder / "tokens.npy"))
        if cached.shape != tokens.shape or not torch.equal(cached, tokens.cpu()):
            raise ValueError(f"teacher cache {str(folder)!r} was written for other tokens "
                             f"({tuple(cached.shape)}, asked for {tuple(tokens.shape)}); remove it "
                             "or use the same data, seed and token budget")
        self.values = np.load(folder / "values.npy", mmap_mode="r")
        self.indices = np.load(folder / "indices.npy", mmap_mode="r")
        self.top_k = int(meta["top_k"])

    def targets(self, rows: torch.Tensor, ids: torch.Tensor) -> Targets:
        order = rows.cpu().numpy()
        values = torch.from_numpy(np.ascontiguousarray(self.values[order])).float()
        indices = torch.from_numpy(np.ascontiguousarray(self.indices[order])).long()
        return Targets(values=values.to(ids.device), indices=indices.to(ids.device))


def read_cache_meta(folder: Path) -> dict | None:
    """A cache folder's ``cache.json``, or ``None`` when it is not a complete cache."""
    try:
        meta = json.loads((Path(folder) / "cache.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT else None


@torch.no_grad()
def write_teacher_cache(model: nn.Module, tokens: torch.Tensor, folder: str | Path,
                        top_k: int = 64, batch_size: int = 8, progress: bool | None = None
                        ) -> Path:
    """Run ``model`` once over ``tokens`` (windows × seq) and keep its top-``k`` logits per
    position in ``folder`` (written whole or not at all); returns the folder.

    Disk: ``windows × seq × k × 6`` bytes (float16 values, int32 ids): 64 MB per 160k tokens
    at ``k = 64``.
    """
    check_int("top_k", top_k)
    tokens = tokens.long().cpu()
    model.eval()
    device = next(model.parameters()).device
    with atomic_folder(folder) as work:
        shape = (*tokens.shape, top_k)
        values = np.lib.format.open_memmap(work / "values.npy", "w+", np.float16, shape)
        indices = np.lib.format.open_memmap(work / "indices.npy", "w+", np.int32, shape)
        bar = progress_bar(total=tokens.shape[0], desc="teacher top-k cache", enabled=progress)
        for start in range(0, tokens.shape[0], batch_size):
            logits = _logits(model, tokens[start:start + batch_size].to(device))
            top = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)
            values[start:start + len(logits)] = top.values.cpu().half().numpy()
            indices[start:start + len(logits)] = top.indices.cpu().int().numpy()
            bar.update(len(logits))
        bar.close()
        values.flush()
        indices.flush()
        del values, indices
        np.save(work / "tokens.npy", tokens.numpy())
        (work / "cache.json").write_text(json.dumps(
            {"format": CACHE_FORMAT, "top_k": top_k, "windows": int(tokens.shape[0]),
             "seq_len": int(tokens.shape[1])}))
    return Path(folder)


def _kl(student: torch.Tensor, targets: Targets, temperature: float) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) at ``temperature``, times ``T²``."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    if targets.logits is not None:
        log_p = F.log_softmax(targets.logits.float() / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    else:  # top-k: the teacher's mass renormalised over its k most likely tokens
        log_p = F.log_softmax(targets.values.float() / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q.gather(-1, targets.indices))).sum(-1)
    return kl.mean() * temperature ** 2


def distill_loss(student_logits: torch.Tensor, ids: torch.Tensor, targets: Targets,
                 temperature: float = 1.0, lm_weight: float = 0.0
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """``(1 - lm_weight) · T² · KL + lm_weight · LM loss`` and its parts (for the log).

    The KL covers every position (each predicts the next token, the last one included); the
    LM loss every position but the last (whose next token is not in the window).
    """
    kl = _kl(student_logits, targets, temperature)
    loss, parts = kl, {"kl": float(kl.detach())}
    if lm_weight > 0:
        vocab = student_logits.shape[-1]
        lm = F.cross_entropy(student_logits[:, :-1].reshape(-1, vocab).float(),
                             ids[:, 1:].reshape(-1))
        loss = (1 - lm_weight) * kl + lm_weight * lm
        parts["lm"] = float(lm.detach())
    return loss, parts
