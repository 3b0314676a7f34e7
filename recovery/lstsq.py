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

from depgraph.errors import DepGraphError

__all__ = ["NormalEquations", "ReconstructionError", "solve"]


class ReconstructionError(DepGraphError, RuntimeError):
    """Reconstruction met non-finite numbers or a system it cannot solve (the command line
    reports it as one line, exit status 2: the models or the calibration data are at fault)."""


class NormalEquations:
    """Running ``XᵀX`` of one input and ``XᵀY`` of each of its targets (``bias``: ones column).

    Layers that read the same input (q, k and v; gate and up) share one ``XᵀX``: each is a
    target ``key``. Each batch's products are formed in the activations' precision and
    accumulated in float64.
    """

    def __init__(self, name: str, bias: bool):
        self.name, self.bias = name, bias
        self.xtx: torch.Tensor | None = None
        self.xty: dict[str, torch.Tensor] = {}
        self.yty: dict[str, float] = {}  # ||Y||², for reporting the relative error
        self.tokens = 0

    def _design(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1])
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        return x

    def _check(self, tensor: torch.Tensor, what: str) -> None:
        if not torch.isfinite(tensor).all():
            raise ReconstructionError(f"{self.name}: non-finite {what} in the calibration batch "
                                      "(NaN or Inf); cannot reconstruct")

    def add(self, x: torch.Tensor, targets: torch.Tensor | dict[str, torch.Tensor]) -> None:
        """Add a batch: ``x`` (..., in) inputs and, per key, ``y`` (..., out) targets."""
        targets = {"": targets} if isinstance(targets, torch.Tensor) else targets
        design = self._design(x)
        self._check(design, "activations")
        gram = (design.T @ design).double()
        self.xtx = gram if self.xtx is None else self.xtx + gram
        for key, y in targets.items():
            target = y.reshape(-1, y.shape[-1]).to(design.dtype)
            self._check(target, "targets")
            cross = (design.T @ target).double()
            self.xty[key] = cross if key not in self.xty else self.xty[key] + cross
            self.yty[key] = self.yty.get(key, 0.0) + float(target.double().square().sum())
        self.tokens += design.shape[0]


def solve(equations: NormalEquations, damping: float, prior: torch.Tensor | None = None,
          mode: str = "diag", key: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (out, in), bias (out,) or None)`` minimising
    ``||XW - Y||² + λ ||D^½ (W - W₀)||²``.

    ``mode="diag"``: ``D = diag(XᵀX)`` and ``λ = damping`` (each input channel is damped by its
    own energy: scale-free per channel, so a few channels with huge activations do not
    swamp the rest); ``mode="mean"``: ``D = I``, ``λ = damping · mean(diag(XᵀX))``.
    ``prior``: ``W₀`` as ``(out, in [+ 1 for the bias])``, the weights to stay near when the
    data says little (default zero, plain ridge regression).
    """
    if equations.xtx is None or key not in equations.xty:
        raise ReconstructionError(f"{equations.name}: no calibration tokens reached this layer")
    gram, rhs = equations.xtx.clone(), equations.xty[key].clone()
    diagonal = gram.diagonal().clone()
    if mode == "diag":
        penalty = damping * diagonal.clamp_min(diagonal.mean() * 1e-8 + 1e-30)
    elif mode == "mean":
        scale = float(diagonal.mean())
        penalty = torch.full_like(diagonal, damping * scale if scale > 0 else damping)
    else:
        raise ValueError(f"damping mode must be 'diag' or 'mean', got {mode!r}")
    gram.diagonal().add_(penalty)
    if prior is not None:
        rhs += penalty[:, None] * prior.T.to(rhs.dtype)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs, factor)
    else:
        values, vectors = torch.linalg.eigh(gram)
        keep = values > values.abs().max() * 1e-12
        inverse = (vectors[:, keep] / values[keep]) @ vectors[:, keep].T
        solution = inverse @ rhs
    if not torch.isfinite(solution).all():
        raise ReconstructionError(f"{equations.name}: the least-squares solution is not finite "
                                  f"(damping {damping}); try a larger damping")
    if equations.bias:
        return solution[:-1].T.contiguous(), solution[-1].contiguous()
    return solution.T.contiguous(), None
