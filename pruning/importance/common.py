"""Per-unit reductions over a group's member slices, shared by the criteria."""

from __future__ import annotations

import numpy as np
import torch

from depgraph import Group

__all__ = ["unit_index", "per_unit", "member_params"]


def unit_index(group: Group) -> list[tuple[str, int, torch.Tensor]]:
    """For each member: (param, dim, unit id of every position along dim; -1 = none)."""
    return [(m.param, m.dim, torch.from_numpy(coords)) for m, coords in
            zip(group.members, group._coords, strict=True)]


def per_unit(values: torch.Tensor, dim: int, units: torch.Tensor, num_units: int) -> np.ndarray:
    """Sum of ``values`` over everything that unit ``u`` covers along ``dim``, for each u."""
    moved = values.movedim(dim, 0).reshape(values.shape[dim], -1).sum(1).double()
    keep = units >= 0
    out = torch.zeros(num_units, dtype=torch.float64)
    out.index_add_(0, units[keep].to(moved.device).cpu(), moved[keep.to(moved.device)].cpu())
    return out.numpy()


def member_params(model, groups: list[Group]) -> dict[str, torch.nn.Parameter]:
    """The parameters that some member of these groups slices."""
    params = dict(model.named_parameters())
    return {m.param: params[m.param] for g in groups for m in g.members}

