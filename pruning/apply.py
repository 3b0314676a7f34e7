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
from depgraph.errors import DepGraphError, PlanError
from depgraph.groups import block_index

from .attributes import sync_by_extent
from .config_solver import instantiate_meta, model_shapes, probe_config, solve_config
from .extents import expected_signatures, plan_extents
from .rollback import ModelState, check_runs

__all__ = ["apply_plan", "zero_plan", "plan_slices", "RECORD_KEY"]

RECORD_KEY = "depgraph"


def plan_slices(graph: DependencyGraph, plan: dict[str, list[int]]) -> dict[tuple[str, int], torch.Tensor]:
    """Validate ``plan`` and merge its slices: ``(param, dim) -> sorted indices to drop``."""
    if not isinstance(plan, dict):
        raise PlanError(f"plan must be a dict {{group_id: [units]}}, got {type(plan).__name__}")
    drops: dict[tuple[str, int], set[int]] = defaultdict(set)
    for group_id, units in plan.items():
        try:
            group = graph.group(group_id)
        except KeyError:
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
    configs = _configs_for(model, {n: tuple(s) for n, s in target.items()}, graph, plan)
    exact = configs is not None
    original = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else {}
    state = ModelState(model)
    try:
        with torch.no_grad():
            for name, param in params.items():
                dims = {dim: idx for (n, dim), idx in drops.items() if n == name}
                if dims:
                    param.data = _keep(param.data, dims)
                    param.grad = None
        if exact:
            _sync_attributes(model, configs)
        else:
            _fix_standard_modules(model)
            sync_by_extent(model, graph, plan)
        _check_runs(model)
    except BaseException:  # refused after slicing: put everything back as it was
        state.restore()
        raise
    _record(model, original, plan, configs)
    return model


def _check_runs(model: nn.Module) -> None:
    try:
        check_runs(model)
    except Exception as error:  # noqa: BLE001 - any failure of the forward refuses the plan
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise PlanError(f"the pruned model fails a forward pass ({type(error).__name__}: "
                        f"{message}); the plan was not applied") from error


def _keep(tensor: torch.Tensor, dims: dict[int, torch.Tensor]) -> torch.Tensor:
    for dim, drop in dims.items():
        # explicit CPU: this also runs inside from_pretrained's meta-device context
        mask = torch.ones(tensor.shape[dim], dtype=torch.bool, device="cpu")
        mask[drop.cpu()] = False
        keep = torch.arange(tensor.shape[dim], device="cpu")[mask]
        tensor = tensor.index_select(dim, keep.to(tensor.device))
    return tensor.contiguous()


# ------------------------------------------------------------------ configs
def _configs_for(model: nn.Module, target: dict[str, tuple[int, ...]], graph: DependencyGraph,
                 plan: dict) -> dict | None:
    """``{None: config}`` when one config fits, ``{block: config}`` when one per block fits,
    ``{}`` for models without a config, ``None`` when no config describes the model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    probe = probe_config(config)
    signatures = expected_signatures(graph, plan)
    uniform = _uniform(graph, plan)
    if uniform:  # saved as config.json, so it must also pass the config class's validation
        whole = solve_config(config, probe, target, plan_extents(graph, plan),
                             accept=lambda c: _validates(c) and _layouts_match(c, signatures, None))
        if whole is not None:
            return {None: whole}
    configs: dict = {}
    blocks = sorted({b for n in target if (b := block_index(n)) is not None})
    for block in blocks:
        names = {n for n in target if block_index(n) in (block, None)}
        local = {gid: units for gid, units in plan.items()
                 if graph.group(gid).layer in (block, None)}
        solved = solve_config(config, probe, target, plan_extents(graph, local), only=names,
                              accept=lambda c, b=block: _layouts_match(c, signatures, b))
        if solved is None:
            return None
        configs[block] = solved
    return configs


def _validates(config) -> bool:
    """Whether ``config`` passes its class's checks (``save_pretrained`` and loading run them:
    Llama refuses ``hidden_size % num_attention_heads != 0`` even with an explicit head_dim)."""
    check = getattr(config, "validate", None)
    if check is None:
        return True
    try:
        check()
        return True
    except Exception:  # noqa: BLE001 - any refusal means: not a config to save
        return False


def _uniform(graph: DependencyGraph, plan: dict) -> bool:
    """Whether every block loses the same number of units of each group kind."""
    counts: dict[str, set[tuple]] = {}
    per_block: dict[tuple, int] = {}
    for group in graph.groups():
        if group.layer is not None:
            per_block[(group.layer, group.kind, group.num_units)] = len(set(plan.get(group.id, ())))
    for (_layer, kind, units), removed in per_block.items():
        counts.setdefault(kind, set()).add((units, removed))
    return all(len(values) == 1 for values in counts.values())


def _layouts_match(candidate, signatures: dict, block: int | None) -> bool:
    """A meta model of ``candidate`` has the expected layouts (sizes and structure).

    Checked on a one-block model (cheap for any depth): its block 0 stands for ``block``
    (for every block when ``block`` is None); model-wide parameters are compared as they are.
    """
    reduced = copy.deepcopy(candidate)
    try:
        reduced.num_hidden_layers = 1
        found = expected_signatures(build_graph(instantiate_meta(reduced)), {})
    except (DepGraphError, ValueError, AttributeError, TypeError, RuntimeError):
        return False
    for (param, dim), signature in signatures.items():
        own = block_index(param)
        if own is not None and block is not None and own != block:
            continue
        name = param if own is None else param.replace(f".{own}.", ".0.", 1)
        if found.get((name, dim)) != signature:
            return False
    return True


def _sync_attributes(model: nn.Module, configs: dict) -> None:
    """Copy scalar module attributes from meta models built from the new configs."""
    if not configs:
        _fix_standard_modules(model)
        return
    first = min(configs, key=lambda b: -1 if b is None else b)
    for block, config in configs.items():
        fresh = dict(instantiate_meta(config).named_modules())
        for path, module in model.named_modules():
            own = block_index(path + ".")
            # model-wide modules (embeddings, the final norm) follow the first config: every
            # per-block config agrees on the model-wide sizes
            if block is not None and own != block and not (own is None and block == first):
                continue
            twin = fresh.get(path)
            if twin is None:
                continue
            if block is not None and own is not None and hasattr(twin, "config") and hasattr(module, "config"):
                module.config = config  # modules that read their config at run time
            changed = False
            for key, value in vars(twin).items():
                if key.startswith("_") or not isinstance(value, (int, float, tuple, list, str)):
                    continue
                if isinstance(value, bool) or getattr(module, key, object()) == value:
                    continue
                setattr(module, key, copy.deepcopy(value))
                changed = True
            if changed:
                _refresh_buffers(model, module)
    if None in configs:
        _replace_config(model, configs[None])
    _fix_standard_modules(model)


def _refresh_buffers(model: nn.Module, module: nn.Module) -> None:
    """Recompute a module's non-persistent buffers (e.g. an embedding scale of sqrt(hidden))
    from its updated attributes, with the model's own ``_init_weights``; parameters are
    restored afterwards, so only the buffers change."""
    init = getattr(model, "_init_weights", None)
    own = getattr(module, "_non_persistent_buffers_set", set())
    if init is None or not own or any(module._buffers.get(n) is None or
                                      module._buffers[n].is_meta for n in own):
        return
    saved = {name: p.detach().clone() for name, p in module.named_parameters(recurse=False)}
    with torch.no_grad():
        init(module)
        for name, p in module.named_parameters(recurse=False):
            p.copy_(saved[name])


def _replace_config(model: nn.Module, config) -> None:
    """Update the model's config object in place (modules hold references to it)."""
    for key, value in config.to_dict().items():
        if key in ("transformers_version", "architectures", RECORD_KEY):
            continue
        try:
            setattr(model.config, key, value)
        except (AttributeError, TypeError):
            continue


def _fix_standard_modules(model: nn.Module) -> None:
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.num_embeddings, module.embedding_dim = module.weight.shape
        elif isinstance(module, nn.LayerNorm) and weight is not None:
            module.normalized_shape = tuple(weight.shape)
        elif type(module).__name__ == "Conv1D" and weight is not None:
            module.nf = weight.shape[1]


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
