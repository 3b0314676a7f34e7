"""Physically removing units: slice parameters, fix module attributes and the config.

``apply_plan(model, {group_id: [unit, ...]})`` validates the whole plan first (unknown group,
unit out of range, every unit of a group) and changes nothing if it is refused. Then it:

1. slices every member parameter in place (``param.data`` is replaced, so tied weights stay
   tied and the ``Parameter`` objects the user holds stay valid);
2. finds the config that describes the new shapes (:mod:`pruning.config_solver`): one config
   when all blocks agree, else one per block;
3. copies the scalar attributes (``num_heads``, ``head_dim``, ``in_features`` ...) of every
   module from a meta-device model built from that config, so the eager code, ``generate()``
   and ``save_pretrained`` see consistent sizes;
4. records the plan in ``model.config.depgraph`` so :func:`pruning.load_pruned` can rebuild
   any pruned model, including non-uniform ones.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn

from depgraph import DependencyGraph, build_graph
from depgraph.errors import PlanError

from .attributes import sync_by_extent
from .config_solver import model_shapes, probe_config
from .plan_configs import (
    RECORD_KEY,
    configs_for,
    fix_standard_modules,
    scope_configs,
    sync_attributes,
    sync_scopes,
)
from .rollback import ModelState, check_runs, steps_that_run

__all__ = ["apply_plan", "zero_plan", "plan_slices", "cut", "RECORD_KEY", "REPLAYS_PLANS"]

#: Marks the class ``load_pruned`` derives to replay plans while it is built: models of the
#: new sizes are built from the library class above it, never from it.
REPLAYS_PLANS = "_depgraph_replays_plans"


def plan_slices(graph: DependencyGraph, plan: dict[str, list[int]]) -> dict[tuple[str, int], torch.Tensor]:
    """Validate ``plan`` and merge its slices: ``(param, dim) -> sorted indices to drop``."""
    if not isinstance(plan, dict):
        raise PlanError(f"plan must be a dict {{group_id: [units]}}, got {type(plan).__name__}")
    drops: dict[tuple[str, int], set[int]] = defaultdict(set)
    for group_id, units in plan.items():
        try:
            group = graph.group(group_id)
        except KeyError:
            if group_id in graph.excluded():
                raise PlanError(f"group {group_id!r} in plan was excluded: "
                                f"{graph.excluded()[group_id]}") from None
            raise PlanError(f"unknown group {group_id!r} in plan (expected one of the "
                            f"{len(graph.groups())} ids of graph.groups())") from None
        unique = {int(u) for u in units}
        if len(unique) >= group.num_units:
            raise PlanError(f"plan removes all {group.num_units} units of group {group_id!r}; "
                            f"at least one must stay")
        if unique and not group.allows(group.num_units - len(unique)):
            raise PlanError(f"plan keeps {group.num_units - len(unique)} of the "
                            f"{group.num_units} units of group {group_id!r}, but "
                            f"{'; '.join(group.constraints)}")
        for param, dim, indices in group.slices(sorted(unique)):
            drops[(param, dim)].update(indices.tolist())
    return {key: torch.tensor(sorted(v), dtype=torch.long, device="cpu") for key, v in drops.items() if v}


def zero_plan(model: nn.Module, plan: dict[str, list[int]], graph: DependencyGraph | None = None
              ) -> nn.Module:
    """Zero (instead of remove) everything the plan would remove; returns the model."""
    graph = graph or build_graph(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for (name, dim), indices in plan_slices(graph, plan).items():
            params[name].index_fill_(dim, indices.to(params[name].device), 0)
    return model


def apply_plan(model: nn.Module, plan: dict[str, list[int]],
               graph: DependencyGraph | None = None) -> nn.Module:
    """Remove the plan's units from ``model`` in place and return it (see module docs).

    Raises
    ------
    PlanError
        A bad plan (unknown group, unit out of range, every unit of a group, a count that
        breaks a group's constraints), no attribute setting that fits, or a pruned model
        that fails a forward pass of a few tokens; the model is then left exactly as it was.
    """
    graph = graph or build_graph(model)
    drops = plan_slices(graph, plan)
    if not drops:
        return model
    params = dict(model.named_parameters())
    target = {name: list(shape) for name, shape in model_shapes(model).items()}
    for (name, dim), indices in drops.items():
        target[name][dim] -= len(indices)
    target = {n: tuple(s) for n, s in target.items()}
    config = getattr(model, "config", None)
    probe = probe_config(config, library_class(model)) if hasattr(config, "to_dict") else None
    configs = configs_for(model, target, graph, plan, probe)
    scopes = scope_configs(model, target, graph, plan, probe) if configs is None else {}
    original = config.to_dict() if hasattr(config, "to_dict") else {}
    steps = steps_that_run(model)
    state = ModelState(model)
    try:
        with torch.no_grad():
            for name, param in params.items():
                dims = {dim: idx for (n, dim), idx in drops.items() if n == name}
                if dims:
                    param.data = _keep(param.data, dims)
                    param.grad = None
        if configs is not None:
            sync_attributes(model, configs, library_class(model))
        else:
            _sync_unsolved(model, graph, plan, scopes)
        _check_runs(model, steps)
    except BaseException:  # refused after slicing: put everything back as it was
        state.restore()
        raise
    _record(model, original, plan, configs)
    return model


def library_class(model: nn.Module) -> type:
    """The class of ``model`` that transformers defines (not ``load_pruned``'s subclass)."""
    cls = type(model)
    while vars(cls).get(REPLAYS_PLANS):
        cls = cls.__mro__[1]
    return cls


def _sync_unsolved(model: nn.Module, graph: DependencyGraph, plan: dict, scopes: dict) -> None:
    """Attributes where no config describes a whole block: the modules that a config fits
    take them from it, the attribute search settles the rest (all of it, if that fails)."""
    fix_standard_modules(model)
    if not scopes:
        sync_by_extent(model, graph, plan)
        return
    before = ModelState(model)
    try:
        sync_scopes(model, scopes, library_class(model))
        sync_by_extent(model, graph, plan, solved=set(scopes))
    except PlanError:
        before.restore()
        sync_by_extent(model, graph, plan)


def _check_runs(model: nn.Module, steps: tuple[str, ...]) -> None:
    try:
        check_runs(model, steps=steps)
    except Exception as error:  # noqa: BLE001 - any failure of the forward refuses the plan
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise PlanError(f"the pruned model fails a forward pass ({type(error).__name__}: "
                        f"{message}); the plan was not applied") from error


def cut(tensor: torch.Tensor, dims: dict[int, torch.Tensor]) -> torch.Tensor:
    """``tensor`` without the indices ``dims[d]`` along each dim ``d`` (what
    :func:`apply_plan` does to a parameter; ``dims`` from :func:`plan_slices`)."""
    return _keep(tensor, dims)


def _keep(tensor: torch.Tensor, dims: dict[int, torch.Tensor]) -> torch.Tensor:
    for dim, drop in dims.items():
        # explicit CPU: this also runs inside from_pretrained's meta-device context
        mask = torch.ones(tensor.shape[dim], dtype=torch.bool, device="cpu")
        mask[drop.cpu()] = False
        keep = torch.arange(tensor.shape[dim], device="cpu")[mask]
        tensor = tensor.index_select(dim, keep.to(tensor.device))
    return tensor.contiguous()


def _record(model: nn.Module, original: dict, plan: dict, configs: dict) -> None:
    """Record the plan in ``model.config.depgraph``: ``plans`` (every plan applied, for the
    history), ``replay`` (the plans applied since the config last described the model: what
    ``load_pruned`` applies to the folder's own config) and ``config_exact``."""
    config = getattr(model, "config", None)
    if config is None:
        return
    record = copy.deepcopy(getattr(config, RECORD_KEY, None) or {})
    if "original_config" not in record:
        base = {k: v for k, v in original.items() if k != RECORD_KEY}
        record = {"original_config": base, "plans": [], "replay": [], "config_exact": True}
    if "replay" not in record:  # written before replay was recorded: load_pruned built
        # such a model from the original config, so every plan replays on it
        record["replay"] = [] if record.get("config_exact", True) else list(record["plans"])
    applied = {gid: sorted(int(u) for u in units) for gid, units in plan.items() if len(units)}
    record["plans"].append(applied)
    # config_exact: model.config alone describes the model (plain from_pretrained loads it)
    record["config_exact"] = configs is not None and None in configs
    record["replay"] = [] if record["config_exact"] else [*record["replay"], applied]
    setattr(config, RECORD_KEY, record)
