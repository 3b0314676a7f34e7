"""Allocation: how many units each group loses, measured on the model's own outputs.

    >>> curves = sensitivity_curves(model, groups, scores, tokens)       # doctest: +SKIP
    >>> plan = allocate_plan(groups, scores, curves, ratio=0.2, total_params=n)  # doctest: +SKIP

A global ranking compares the criterion's scores across blocks and kinds after dividing each
group's scores by their typical size; a per-block ranking removes the same share everywhere.
Neither asks what removing units of a block *does*. Allocation does (as FLAP's adaptive
structure and OWL's layer-wise ratios do, here measured directly):

1. **measure**: for every group and a few candidate counts (``fractions`` of its units,
   rounded to counts the group allows), the group's lowest-scored units are zeroed, the
   model runs on a few calibration windows, and the KL divergence of its next-token
   distributions from the unpruned model's is recorded (the units are put back after);
   for a group whose zeroing equals its removal (``group.zero_equivalent``) the number is
   the damage that removal does, alone; for the others (a norm or a top-k over the group's
   channels, a router that would send tokens elsewhere) it is an
   estimate of it, and ``prune`` lists them in ``stats["allocation_estimated"]``. A group
   that spans blocks (the hidden stream, a KV group that later blocks share) is measured
   the same way. Cost: one forward pass per group and count, of the blocks from the
   group's first on: the blocks before it return what they gave in the
   unpruned pass (:mod:`pruning.prefix`; checked block by block on one window against a
   full pass, and a block where the two differ is measured with full passes).
2. **allocate**: each curve (KL against parameters removed) is made convex (its lower hull,
   linear in between, extended with its last slope), and the parameter budget is spent
   greedily on the chunks of units with the least KL per parameter
   (:func:`pruning.selection.greedy_counts`), assuming the damages of different groups add
   up. Within a group the criterion's scores still choose *which* units go.

``ranking="allocate"`` in :class:`pruning.PruneSettings` runs both steps inside
:func:`pruning.prune` (and :func:`recovery.prune_and_reconstruct`); ``options`` may set
``allocation_fractions`` and ``allocation_samples`` (calibration windows measured on).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from depgraph import Group
from depgraph.progress import progress_bar

from .prefix import PrefixReuse, block_list, first_block
from .selection import allowed_counts, greedy_counts

__all__ = ["FRACTIONS", "SAMPLES", "sensitivity_curves", "allocate_plan", "curve_keys"]

#: Candidate shares of a group's units whose removal is measured.
FRACTIONS: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
#: Calibration windows the damage is measured on (of the scoring windows, the first ones).
SAMPLES = 4


#: The damage recorded for a zeroing whose outputs are not finite (never chosen before others).
_BROKEN = 1e6


def _candidate_counts(group: Group, fractions: Sequence[float], round_to: int) -> np.ndarray:
    """Allowed removal counts nearest to each fraction (ascending, unique, no 0)."""
    steps = allowed_counts(group, round_to)
    if steps.size == 0:
        return steps
    picks = {int(steps[np.argmin(np.abs(steps - f * group.num_units))]) for f in fractions}
    return np.array(sorted(picks), dtype=np.int64)


def _logits(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's float32 next-token logits on ``tokens``, (windows × seq_len, vocab)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        result = model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
        logits = result.logits if hasattr(result, "logits") else result
        out.append(logits.float().flatten(0, -2))
    return torch.cat(out)


class _Reference:
    """The unpruned next-token distributions, ready for :meth:`kl`."""

    def __init__(self, logits: torch.Tensor):
        self.log_p = F.log_softmax(logits, dim=-1)
        self.p = self.log_p.exp()

    def kl(self, logits: torch.Tensor) -> float:
        """Mean per-token KL(unpruned || the model with ``logits``), summed term by term (a
        difference of cross-entropies would lose the small KL to float32 rounding)."""
        return float((self.p * (self.log_p - F.log_softmax(logits, dim=-1))).sum(-1).mean())


class _Zeroed:
    """Zero a group's slices for the duration of a ``with`` block, then put them back."""

    def __init__(self, params: dict[str, nn.Parameter], slices: list):
        self.params, self.slices, self.saved = params, slices, []

    def __enter__(self):
        for name, dim, indices in self.slices:
            param, index = self.params[name], indices.to(self.params[name].device)
            self.saved.append((param, dim, index, param.detach().index_select(dim, index)))
            param.data.index_fill_(dim, index, 0)
        return self

    def __exit__(self, *exc):
        for param, dim, index, values in reversed(self.saved):
            param.data.index_copy_(dim, index, values)
        return False


class _Reuse:
    """Passes that start at a group's first block, where one window shows that they may."""

    def __init__(self, model: nn.Module, groups: Sequence[Group], tokens: torch.Tensor,
                 batch_size: int, enabled: bool):
        self.model, self.batch_size, self.tokens = model, batch_size, tokens
        path = block_list(model, (m.param for g in groups for m in g.members)) if enabled else None
        self.starts = {g.id: first_block(model, path, {m.param for m in g.members}) if path
                       else 0 for g in groups}
        self.full = PrefixReuse(model, path) if path else None
        self.probe = PrefixReuse(model, path) if path else None
        self.trusted: dict[int, bool] = {}

    def dense(self) -> _Reference:
        """The unpruned distributions (recording every block's outputs for reuse)."""
        if self.full is None:
            return _Reference(_logits(self.model, self.tokens, self.batch_size))
        with self.probe.record():
            self.probe_dense = _logits(self.model, self.tokens[:1], 1)
        with self.full.record():
            return _Reference(_logits(self.model, self.tokens, self.batch_size))

    def from_group(self, group: Group) -> AbstractContextManager:
        """Where the passes measuring ``group`` start (call before changing any weight)."""
        start = self.starts[group.id]
        if self.full is None or start == 0:
            return nullcontext()
        if start not in self.trusted:
            try:
                with self.probe.starting_at(start):
                    again = _logits(self.model, self.tokens[:1], 1)
                self.trusted[start] = torch.allclose(again, self.probe_dense, rtol=1e-4, atol=1e-5)
            except Exception:  # noqa: BLE001 - a pass that cannot start there: run them all
                self.trusted[start] = False
        return self.full.starting_at(start) if self.trusted[start] else nullcontext()


@torch.no_grad()
def sensitivity_curves(model: nn.Module, groups: Sequence[Group],
                       scores: Mapping[str, np.ndarray], tokens: torch.Tensor, *,
                       fractions: Sequence[float] = FRACTIONS, round_to: int = 1,
                       batch_size: int = 4, progress: bool | None = None,
                       reuse_prefix: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{group_id: (removed counts, KL)}``: the damage of removing each group's
    lowest-scored units alone, measured on ``tokens`` (windows × seq_len). The model is
    left exactly as it was. ``reuse_prefix``: passes skip the blocks before the group's
    (the same numbers, in less time; False runs every block every time)."""
    if not fractions or not all(0 < f < 1 for f in fractions):
        raise ValueError(f"allocation fractions must lie in (0, 1), got {tuple(fractions)!r}")
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    reuse = _Reuse(model, groups, tokens, batch_size, reuse_prefix)
    dense = reuse.dense()
    plans = {g.id: _candidate_counts(g, fractions, round_to) for g in groups}
    bar = progress_bar(total=sum(c.size for c in plans.values()), desc="allocation (groups x "
                       "widths)", enabled=progress)
    curves = {}
    try:
        for group in groups:
            order = np.argsort(np.asarray(scores[group.id]), kind="stable")
            losses = []
            for count in plans[group.id]:
                start = reuse.from_group(group)
                with _Zeroed(params, group.slices(order[:count].tolist())), start:
                    kl = dense.kl(_logits(model, tokens, batch_size))
                # a zeroing that breaks the model (an estimate's norm of nothing) costs most
                losses.append(kl if np.isfinite(kl) else _BROKEN)
                bar.update(1)
            curves[group.id] = (plans[group.id], np.array(losses, dtype=np.float64))
    finally:
        bar.close()
        model.train(was_training)
    return curves


def _lower_hull(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lower convex hull of points sorted by ``x`` (from ``(0, 0)``)."""
    points: list[tuple[float, float]] = []
    for px, py in zip(np.concatenate([[0.0], x]), np.concatenate([[0.0], np.maximum(y, 0)]),
                      strict=True):
        while len(points) >= 2:
            (ax, ay), (bx, by) = points[-2], points[-1]
            if (by - ay) * (px - ax) >= (py - ay) * (bx - ax):  # b lies on or above a->p
                points.pop()
            else:
                break
        points.append((float(px), float(py)))
    hull = np.array(points)
    return hull[:, 0], hull[:, 1]


def curve_keys(group: Group, steps: np.ndarray, curve: tuple[np.ndarray, np.ndarray]
               ) -> np.ndarray:
    """KL per parameter of each chunk between allowed counts ``steps``, from a measured
    curve made convex (linear in between, its last slope beyond the last measurement)."""
    hx, hy = _lower_hull(np.asarray(curve[0], dtype=np.float64), curve[1])
    slope = (hy[-1] - hy[-2]) / (hx[-1] - hx[-2]) if hx.size >= 2 else 0.0
    at = np.interp(steps, hx, hy) + np.maximum(steps - hx[-1], 0) * slope
    before = np.concatenate([[0.0], at[:-1]])
    sizes = np.diff(np.concatenate([[0], steps]))
    return (at - before) / (sizes * max(int(group.params_per_unit), 1))


def allocate_plan(groups: Sequence[Group], scores: Mapping[str, np.ndarray],
                  curves: Mapping[str, tuple[np.ndarray, np.ndarray]], *, ratio: float,
                  total_params: int, round_to: int = 1, min_keep: int = 1
                  ) -> dict[str, list[int]]:
    """The plan that removes ``ratio × total_params`` parameters where the measured
    ``curves`` say it hurts least; each group's lowest-scored units go."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio!r}")
    missing = [g.id for g in groups if g.id not in curves or g.id not in scores]
    if missing:
        raise ValueError(f"no measured curve or scores for group {missing[0]!r}")
    allowed = [allowed_counts(g, round_to, min_keep) for g in groups]
    target = ratio * total_params
    removable = sum(int(s[-1]) * int(g.params_per_unit)
                    for g, s in zip(groups, allowed, strict=True) if s.size)
    if removable < target:
        raise ValueError(f"ratio {ratio} cannot be reached: at most "
                         f"{removable / total_params:.4f} of the parameters are removable")
    keys = [curve_keys(g, steps, curves[g.id]) if steps.size and curves[g.id][0].size
            else np.full(steps.size, np.inf) for g, steps in zip(groups, allowed, strict=True)]
    counts = greedy_counts(groups, keys, allowed, target)
    plan = {}
    for group, count in zip(groups, counts, strict=True):
        if count:
            order = np.argsort(np.asarray(scores[group.id], dtype=np.float64), kind="stable")
            plan[group.id] = sorted(int(u) for u in order[:count])
    return plan
