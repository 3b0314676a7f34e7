"""The arithmetic that recovery runs in: bfloat16 autocast where the hardware has it.

    >>> device = torch.device("cpu")
    >>> with compute_autocast(resolve_precision("auto", device), device):  # doctest: +SKIP
    ...     loss = loss_of(model(ids))

Training (LoRA, distillation): weights, gradients and the optimizer stay in float32; only the
forward (and so the backward) matrix products run in bfloat16, as ``torch.autocast`` does.
Least-squares reconstruction: the block runs that collect activations and the products
``XᵀX`` / ``XᵀY`` run in bfloat16 (accumulated in float64, solved in float32 on the
unit-diagonal scaling, :mod:`recovery.lstsq`): SmolLM2-135M at 20%,
49 s against 89 s on one core, WikiText-2 perplexity 124.58 against 124.11 in float32
(benchmarks/RESULTS.md). It pays where the device
multiplies bfloat16 natively: a CUDA GPU that supports it, or a CPU with AMX or AVX512-BF16
(measured on such a 2-core Xeon for SmolLM2-135M: a distillation step 2.1x faster; a
576 x 1536 product 6.5x). Elsewhere bfloat16 is emulated and slower, so ``"auto"`` keeps
float32 there. Evaluation (held-out scores, perplexity) is not changed by this.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "RESOLVED", "check_precision", "check_resolved", "native_bf16",
           "resolve_precision", "compute_autocast", "fused_adamw_ok"]

#: ``auto``: bfloat16 autocast where the device multiplies it natively, else float32.
PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        capabilities = torch.cpu.get_capabilities()
        return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))
    return False


def check_precision(precision: str) -> None:
    """A one-line ``ValueError`` naming ``precision`` unless it is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


#: What :func:`resolve_precision` returns: the arithmetic a pass actually runs in.
RESOLVED = ("fp32", "bf16")


def check_resolved(precision: str) -> None:
    """A one-line ``ValueError`` naming ``precision`` unless it is one of :data:`RESOLVED`."""
    if precision not in RESOLVED:
        raise ValueError(f"precision must be one of {RESOLVED}, got {precision!r}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"bf16"`` or ``"fp32"`` for ``precision`` (one of :data:`PRECISIONS`) on ``device``."""
    check_precision(precision)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def compute_autocast(precision: str, device: torch.device):
    """A context that runs forward passes in ``precision`` (``"bf16"`` or ``"fp32"``)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def fused_adamw_ok(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes ``params`` (float tensors on CPU or CUDA): one kernel
    instead of a loop over tensors (0.12 s against 0.31 s a step for 106M parameters on the
    2-core machine)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                for p in params)
