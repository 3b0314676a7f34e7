"""Gradients of the language-model loss over calibration samples, one sample at a time.

Memory stays at the model, its activations for one sample, and one or two float32
accumulators for the parameters being scored (``grad_sum``; ``grad_sq`` for the diagonal
Fisher). Parameters no group slices get no gradient at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from depgraph.errors import NonFiniteError
from depgraph.progress import restart

__all__ = ["GradientStats", "accumulate_gradients"]


@dataclass
class GradientStats:
    grad_sum: dict[str, torch.Tensor]
    grad_sq: dict[str, torch.Tensor] | None
    samples: int
    seconds: float
    peak_rss_bytes: int


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def accumulate_gradients(model: nn.Module, params: dict[str, nn.Parameter], tokens: torch.Tensor,
                         fisher: bool, progress=None) -> GradientStats:
    """Sum of per-sample gradients of the mean next-token loss (and of their squares)."""
    start = time.perf_counter()
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()  # no dropout: the same function that is pruned
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    grad_sum = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    grad_sq = ({n: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                for n, p in params.items()} if fisher else None)
    device = next(iter(params.values())).device
    restart(progress, tokens.shape[0], "calibration gradients")
    try:
        for index in range(tokens.shape[0]):
            sample = tokens[index:index + 1].to(device)
            loss = model(input_ids=sample, labels=sample, use_cache=False).loss
            if not torch.isfinite(loss):
                raise NonFiniteError(f"calibration sample {index} gives a non-finite loss "
                                     f"{loss.item()}: the model's weights or activations are "
                                     "not finite")
            loss.backward()
            for name, p in params.items():
                grad = p.grad.float()
                grad_sum[name] += grad
                if grad_sq is not None:
                    grad_sq[name] += grad * grad
                p.grad = None
            if progress is not None:
                progress.update(1)
    finally:
        for p in model.parameters():
            p.requires_grad_(trainable[id(p)])
            p.grad = None
        model.train(was_training)
    return GradientStats(grad_sum, grad_sq, tokens.shape[0], time.perf_counter() - start, _peak_rss())
