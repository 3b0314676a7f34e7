"""Small helpers shared by the evaluation modules (not part of the public API)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from depgraph.errors import NonFiniteError
from depgraph.progress import progress_bar

__all__ = [
    "check_finite_logits",
    "check_positive_int",
    "eval_mode",
    "forward_logits",
    "model_device",
    "progress_bar",
    "resolve_device",
]


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` as an int, or raise ``ValueError`` quoting it.

    Parameters
    ----------
    name : str
        Argument name used in the error message.
    value : Any
        The value to check; ``bool`` is rejected even though it is an ``int``.
    minimum : int, default 1
        Smallest accepted value.

    Returns
    -------
    int
        ``value`` unchanged.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (or buffer) of ``model``; CPU when it has none."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``, defaulting to the model's own device."""
    return model_device(model) if device is None else torch.device(device)


def forward_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on ``input_ids`` (``[batch, seq]``) and return ``[batch, seq, vocab]`` logits.

    Hugging Face models (anything with a ``config``) are called with ``use_cache=False``;
    other modules are called with the ids alone and may return a tensor, a tuple whose
    first item is the logits, or an object with a ``logits`` attribute.
    """
    kwargs = {"use_cache": False} if getattr(model, "config", None) is not None else {}
    out = model(input_ids, **kwargs)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode under ``torch.no_grad()``; restore their mode afterwards."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def check_finite_logits(logits: torch.Tensor, what: str) -> None:
    """:class:`~depgraph.errors.NonFiniteError` when ``logits`` hold NaN or infinite values.

    A model whose weights are NaN would otherwise score a zero-shot task at chance level
    (every argmax picks the first choice) and raise no alarm.
    """
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteError(f"the model's logits are not finite (NaN or Inf) on {what}: its "
                             "weights are not finite or its dtype overflows")
