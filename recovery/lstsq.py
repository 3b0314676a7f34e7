"""Damped least squares from streamed normal equations, in float64.

For inputs ``X`` (tokens × in) and targets ``Y`` (tokens × out) the refit of a linear layer is
``W = (XᵀX + λI)⁻¹ XᵀY`` (with a column of ones appended to ``X`` when the layer has a bias).
:class:`NormalEquations` accumulates ``XᵀX`` and ``XᵀY`` batch by batch in float64, so the
tokens never need to be held at once; :func:`solve` adds the damping
``λ = damping · mean(diag(XᵀX))`` (relative, as GPTQ's ``percdamp``: scale-free) and solves by
Cholesky, falling back to an eigen-decomposition pseudo-inverse if the damped matrix is still
not positive definite. Non-finite inputs or results raise :class:`ReconstructionError`.
"""

from __future__ import annotations

import torch

__all__ = ["NormalEquations", "ReconstructionError", "solve"]


class ReconstructionError(RuntimeError):
    """Reconstruction met non-finite numbers or a system it cannot solve."""


class NormalEquations:
    """Running ``XᵀX``, ``XᵀY`` and the token count for one layer (``bias``: ones column)."""

    def __init__(self, name: str, bias: bool):
        self.name, self.bias = name, bias
        self.xtx: torch.Tensor | None = None
        self.xty: torch.Tensor | None = None
        self.yty = 0.0  # ||Y||², for reporting the relative error
        self.tokens = 0

    def _design(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1]).double()
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        return x

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch: ``x`` (..., in) inputs, ``y`` (..., out) targets, same leading dims."""
        design = self._design(x)
        target = y.reshape(-1, y.shape[-1]).double()
        if not (torch.isfinite(design).all() and torch.isfinite(target).all()):
            raise ReconstructionError(f"{self.name}: non-finite activations in the calibration "
                                      "batch (NaN or Inf); cannot reconstruct")
        gram, cross = design.T @ design, design.T @ target
        self.xtx = gram if self.xtx is None else self.xtx + gram
        self.xty = cross if self.xty is None else self.xty + cross
        self.yty += float((target * target).sum())
        self.tokens += design.shape[0]


def solve(equations: NormalEquations, damping: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (out, in), bias (out,) or None)`` minimising ``||XW - Y||² + λ||W||²``."""
    if equations.xtx is None or equations.xty is None:
        raise ReconstructionError(f"{equations.name}: no calibration tokens reached this layer")
    gram = equations.xtx.clone()
    scale = float(gram.diagonal().mean())
    lam = damping * scale if scale > 0 else damping
    gram.diagonal().add_(lam)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        solution = torch.cholesky_solve(equations.xty, factor)
    else:
        values, vectors = torch.linalg.eigh(gram)
        keep = values > values.abs().max() * 1e-12
        inverse = (vectors[:, keep] / values[keep]) @ vectors[:, keep].T
        solution = inverse @ equations.xty
    if not torch.isfinite(solution).all():
        raise ReconstructionError(f"{equations.name}: the least-squares solution is not finite "
                                  f"(damping {damping}); try a larger damping")
    if equations.bias:
        return solution[:-1].T.contiguous(), solution[-1].contiguous()
    return solution.T.contiguous(), None
