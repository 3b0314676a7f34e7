"""Pruning: apply plans to models (and, with issue 3, choose them)."""

from .apply import apply_plan, plan_slices, zero_plan
from .io import load_pruned, save_pruned

__all__ = ["apply_plan", "plan_slices", "zero_plan", "load_pruned", "save_pruned"]
