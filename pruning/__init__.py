"""Pruning: calibration data, importance criteria, selection, applying plans, save/load."""

from .apply import apply_plan, plan_slices, zero_plan
from .importance import available_importance, register_importance
from .io import load_pruned, save_pruned
from .prune import PruneResult, PruneSettings, eligible_groups, prune, score, select

__all__ = ["apply_plan", "plan_slices", "zero_plan", "load_pruned", "save_pruned", "prune",
           "PruneResult", "PruneSettings", "eligible_groups", "score", "select",
           "available_importance", "register_importance"]
