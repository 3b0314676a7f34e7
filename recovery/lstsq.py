"""Damped least squares from streamed normal equations.

For inputs ``X`` (tokens × in) and targets ``Y`` (tokens × out) the refit of a linear layer is
``W = (XᵀX + λI)⁻¹ XᵀY`` (with a column of ones appended to ``X`` when the layer has a bias).
:class:`NormalEquations` accumulates ``XᵀX`` and ``XᵀY`` batch by batch in float64, so the
tokens never need to be held at once; :func:`fit` (and :func:`solve`, its weights alone) adds
the damping (per input channel by default, or ``λ = damping · mean(diag(XᵀX))``: relative, as
GPTQ's ``percdamp``, scale-free) and solves by Cholesky of the damped matrix scaled to a unit
diagonal, falling back to an eigen-decomposition pseudo-inverse if it is still not positive
definite; the solution's relative error comes from the same equations. The factorization is
made once per damping and shared by every target of one input (q, k and v; gate and up). It
runs in float64, or in float32 for equations whose products are bfloat16 (``precision="bf16"``:
their entries carry three significant digits, and the scaled, damped matrix is well
conditioned: float32's seven digits lose nothing, at half float64's time). Non-finite inputs or
results raise :class:`ReconstructionError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from depgraph.errors import DepGraphError

from .precision import check_resolved

__all__ = ["NormalEquations", "ReconstructionError", "Fit", "fit", "solve"]


class ReconstructionError(DepGraphError, RuntimeError):
    """Reconstruction met non-finite numbers or a system it cannot solve (the command line
    reports it as one line, exit status 2: the models or the calibration data are at fault)."""


class NormalEquations:
    """Running ``XᵀX`` of one input and ``XᵀY`` of each of its targets (``bias``: ones column).

    Layers that read the same input (q, k and v; gate and up) share one ``XᵀX``: each is a
    target ``key``. Each batch's products are formed in float32 (``precision="bf16"``: in
    bfloat16, 4.5x faster where the CPU multiplies it natively, each entry then good to
    about 3 significant digits, far inside the damping) and accumulated in float64.
    """

    def __init__(self, name: str, bias: bool, precision: str = "fp32"):
        check_resolved(precision)
        self.name, self.bias = name, bias
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        self.xtx: torch.Tensor | None = None
        self.xty: dict[str, torch.Tensor] = {}
        self.yty: dict[str, float] = {}  # ||Y||², for reporting the relative error
        self.tokens = 0
        # float32 solves only for products that were all bfloat16 (float64 data stays exact)
        self.solve_dtype = torch.float32 if precision == "bf16" else torch.float64
        self._damped: dict[tuple[float, str], _Damped] = {}  # by (damping, mode)

    def _design(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1])
        if self.dtype is not None and x.is_floating_point() and x.dtype != torch.float64:
            x = x.to(self.dtype)
        elif x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        return x

    def _check(self, tensor: torch.Tensor, what: str) -> None:
        if not torch.isfinite(tensor).all():
            raise ReconstructionError(f"{self.name}: non-finite {what} in the calibration batch "
                                      "(NaN or Inf); cannot reconstruct")

    def add(self, x: torch.Tensor, targets: torch.Tensor | dict[str, torch.Tensor]) -> None:
        """Add a batch: ``x`` (..., in) inputs and, per key, ``y`` (..., out) targets.

        Non-finite numbers are caught in the sums, not element by element: a NaN or Inf in
        ``x`` makes the diagonal of ``XᵀX`` non-finite, one in ``y`` makes ``||Y||²`` so."""
        targets = {"": targets} if isinstance(targets, torch.Tensor) else targets
        design = self._design(x)
        if design.dtype != torch.bfloat16:
            self.solve_dtype = torch.float64
        if self.xtx is None:
            self.xtx = design.new_zeros(design.shape[1], design.shape[1], dtype=torch.float64)
        _add_gram(self.xtx, design)
        self._check(self.xtx.diagonal(), "activations")
        self._damped.clear()
        for key, y in targets.items():
            target = y.reshape(-1, y.shape[-1]).to(design.dtype)
            energy = target.double().square().sum()
            self._check(energy, "targets")
            cross = (design.T @ target).double()
            self.xty[key] = cross if key not in self.xty else self.xty[key] + cross
            self.yty[key] = self.yty.get(key, 0.0) + float(energy)
        self.tokens += design.shape[0]


def _add_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """``total += xᵀx`` computing only the blocks on and above the diagonal (a column band
    against the columns from it on) and mirroring them: wide inputs (down_proj's) cost about
    two thirds of one product."""
    width = x.shape[1]
    parts = min(4, -(-width // 512))
    edges = [round(i * width / parts) for i in range(parts + 1)]
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        band = (x[:, start:stop].T @ x[:, start:]).double()
        total[start:stop, start:] += band
        if stop < width:
            total[stop:, start:stop] += band[:, stop - start:].T


@dataclass(frozen=True)
class Fit:
    """A solved layer: ``weight`` (out, in), ``bias`` (out,) or None, and ``error``, the
    relative output error ``||XW - Y||² / ||Y||²`` of the solution on the accumulated data."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    error: float


def solve(equations: NormalEquations, damping: float, prior: torch.Tensor | None = None,
          mode: str = "diag", key: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (out, in), bias (out,) or None)`` minimising
    ``||XW - Y||² + λ ||D^½ (W - W₀)||²`` (:func:`fit`, without the error)."""
    found = fit(equations, damping, prior, mode, key)
    return found.weight, found.bias


class _Damped:
    """``XᵀX + diag(penalty)`` factored once by Cholesky, in float64 as it is or, in float32,
    scaled to a unit diagonal (``S (XᵀX + P) S``, ``S = diag(..)^-½``: channels of very
    different energy then cost float32 nothing); an eigen-decomposition pseudo-inverse
    (float64) where it is not positive definite."""

    def __init__(self, gram: torch.Tensor, penalty: torch.Tensor, dtype: torch.dtype):
        damped = gram.clone()
        damped.diagonal().add_(penalty)
        self.penalty, self.dtype, self.scale = penalty, dtype, None
        if dtype != torch.float64:
            self.scale = damped.diagonal().clamp_min(1e-300).rsqrt()
            self.factor, info = torch.linalg.cholesky_ex(
                (damped * self.scale[:, None] * self.scale[None, :]).to(dtype))
        else:
            self.factor, info = torch.linalg.cholesky_ex(damped)
        self.inverse = None
        if int(info) != 0:
            values, vectors = torch.linalg.eigh(damped)
            keep = values > values.abs().max() * 1e-12
            self.inverse = (vectors[:, keep] / values[keep]) @ vectors[:, keep].T

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        if self.inverse is not None:
            return self.inverse @ rhs
        if self.scale is None:
            return torch.cholesky_solve(rhs, self.factor)
        scaled = (rhs * self.scale[:, None]).to(self.dtype)
        return torch.cholesky_solve(scaled, self.factor).double() * self.scale[:, None]


def _damped(equations: NormalEquations, damping: float, mode: str) -> _Damped:
    """The damped system of ``equations`` (made once per damping and mode, shared by keys)."""
    cached = equations._damped.get((damping, mode))
    if cached is not None:
        return cached
    diagonal = equations.xtx.diagonal()
    if mode == "diag":
        penalty = damping * diagonal.clamp_min(diagonal.mean() * 1e-8 + 1e-30)
    elif mode == "mean":
        scale = float(diagonal.mean())
        penalty = torch.full_like(diagonal, damping * scale if scale > 0 else damping)
    else:
        raise ValueError(f"damping mode must be 'diag' or 'mean', got {mode!r}")
    found = equations._damped[(damping, mode)] = _Damped(equations.xtx, penalty,
                                                         equations.solve_dtype)
    return found


def fit(equations: NormalEquations, damping: float, prior: torch.Tensor | None = None,
        mode: str = "diag", key: str = "") -> Fit:
    """The :class:`Fit` minimising ``||XW - Y||² + λ ||D^½ (W - W₀)||²``.

    ``mode="diag"``: ``D = diag(XᵀX)`` and ``λ = damping`` (each input channel is damped by its
    own energy: scale-free per channel, so a few channels with huge activations do not
    swamp the rest); ``mode="mean"``: ``D = I``, ``λ = damping · mean(diag(XᵀX))``.
    ``prior``: ``W₀`` as ``(out, in [+ 1 for the bias])``, the weights to stay near when the
    data says little (default zero, plain ridge regression). The error costs no product with
    ``XᵀX``: the damped equations give ``XᵀX W = XᵀY + λD (W₀ - W)``.
    """
    if equations.xtx is None or key not in equations.xty:
        raise ReconstructionError(f"{equations.name}: no calibration tokens reached this layer")
    cross = equations.xty[key]
    system = _damped(equations, damping, mode)
    penalty = system.penalty
    anchor = torch.zeros_like(cross) if prior is None else prior.T.to(cross.dtype)
    rhs = cross + penalty[:, None] * anchor
    solution = system.solve(rhs)
    if not torch.isfinite(solution).all():
        raise ReconstructionError(f"{equations.name}: the least-squares solution is not finite "
                                  f"(damping {damping}); try a larger damping")
    if system.inverse is None:
        fitted = cross + penalty[:, None] * (anchor - solution)  # XᵀX W, from the equations
    else:  # a pseudo-inverse does not satisfy the damped equations exactly
        fitted = equations.xtx @ solution
    yty = equations.yty[key]
    error = float((solution * fitted).sum() - 2 * (solution * cross).sum()) + yty
    error = max(error, 0.0) / max(yty, 1e-300)
    if equations.bias:
        return Fit(solution[:-1].T.contiguous(), solution[-1].contiguous(), error)
    return Fit(solution.T.contiguous(), None, error)
