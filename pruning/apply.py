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
4. adds the bias changes passed as ``biases`` (bias compensation,
   :mod:`pruning.compensation`), registering a bias where a layer had none;
5. records the plan (and any tensor it added) in ``model.config.depgraph`` so
   :func:`pruning.load_pruned` can rebuild any pruned model, including non-uniform ones.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from depgraph import DependencyGraph, build_graph
from depgraph.errors import PlanError

from .attributes import restore_attributes, sync_by_extent
from .compensation import output_dim, takes_bias
from .config_solver import config_changes, model_shapes, probe_config
from .plan_configs import (
    RECORD_KEY,
    configs_for,
    fix_standard_modules,
    scope_configs,
    sync_attributes,
    sync_scopes,
)
from .rollback import ModelState, check_runs, steps_that_run
from .saved_form import merged_on_save

__all__ = ["apply_plan", "zero_plan", "plan_slices", "plan_units", "check_biases", "add_biases",
           "cut", "RECORD_KEY", "REPLAYS_PLANS"]

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
        except (KeyError, TypeError):
            if isinstance(group_id, str) and group_id in graph.excluded():
                raise PlanError(f"group {group_id!r} in plan was excluded: "
                                f"{graph.excluded()[group_id]}") from None
            raise PlanError(f"unknown group {group_id!r} in plan (expected one of the "
                            f"{len(graph.groups())} ids of graph.groups())") from None
        unique = plan_units(group_id, units)
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


def _is_integer(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def plan_units(group_id: str, units: object) -> set[int]:
    """The plan's units of one group as ints; PlanError unless a collection of integers."""
    if isinstance(units, (str, bytes, Mapping)) or not isinstance(units, Iterable):
        raise PlanError(f"units of group {group_id!r} must be a list of integers, got "
                        f"{units!r}")
    values = list(units)
    bad = [u for u in values if not _is_integer(u)]
    if bad:
        raise PlanError(f"units of group {group_id!r} must be integers, got {bad[0]!r}")
    return {int(u) for u in values}


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
               graph: DependencyGraph | None = None, *,
               biases: Mapping[str, torch.Tensor] | None = None,
               attributes: Mapping[str, Mapping[str, object]] | None = None) -> nn.Module:
    """Remove the plan's units from ``model`` in place and return it (see module docs).

    Parameters
    ----------
    model : the model to prune.
    plan : ``{group_id: [units to remove]}`` (ids of ``graph.groups()``; units are integers).
    graph : ``build_graph(model)`` (built here when not given).
    biases : ``{module path: change of its bias}``, each over the module's outputs *before*
        the plan (:func:`pruning.compensation_biases`); the entries of outputs the plan
        removes are dropped, the rest added to the module's bias (created if it had none).
    attributes : ``{module path: {attribute: value}}`` to set where no config describes the
        pruned model, instead of searching for them: what an earlier application of the
        same plan recorded in ``model.config.depgraph["attributes"]`` (``load_pruned``
        replays plans so; the search verifies by running the model, which a model being
        built on the meta device cannot).

    Returns
    -------
    The same ``model``, pruned.

    Raises
    ------
    PlanError
        A bad plan (not a dict of group ids to integer units, unknown group, unit out of
        range, every unit of a group, a count that breaks a group's constraints), a bad
        ``biases`` entry (no such layer, a layer that does not add a bias, a wrong length,
        non-finite values), no attribute setting that fits, or a pruned model that fails a
        forward pass of a few tokens; the model is then left exactly as it was.
    """
    graph = graph or build_graph(model)
    drops = plan_slices(graph, plan)
    checked = check_biases(model, biases or {})
    if not drops:
        return _only_biases(model, checked) if checked else model
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
        settled = {}
        if configs is not None:
            sync_attributes(model, configs, library_class(model))
        elif attributes is not None:
            restore_attributes(model, attributes)
            fix_standard_modules(model)  # after: a record from before a layer owned its sizes
        else:
            settled = _sync_unsolved(model, graph, plan, scopes,
                                     lambda pruned: check_runs(pruned, steps=steps))
        added = add_biases(model, checked, drops)
        _check_runs(model, steps)
    except BaseException:  # refused after slicing: put everything back as it was
        state.restore()
        raise
    attributes = state.changed_attributes()
    for path, (before, now) in state.changed_configs().items():  # a module's own config
        if changes := config_changes(before, now):
            attributes.setdefault(path, {})["config"] = changes
    for (path, key), value in settled.items():  # what the search kept is a choice too
        attributes.setdefault(path, {})[key] = value
    _record(model, original, plan, configs, added, attributes)
    return model


#: elements of non-persistent buffers that the record keeps at most (per buffer)
SMALL_BUFFER = 4096


def _small_derived_buffers(model: nn.Module) -> dict[str, list]:
    """``{name: values}`` of the non-persistent floating-point buffers of ``model`` of at
    most :data:`SMALL_BUFFER` elements (scales and rotary frequencies, computed at build)."""
    found = {}
    for path, module in model.named_modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.is_floating_point() and not buffer.is_meta \
                    and buffer.numel() <= SMALL_BUFFER:
                found[f"{path}.{name}" if path else name] = buffer.detach().double().cpu().tolist()
    return found


def _is_json(value) -> bool:
    """Numbers, strings, booleans, None and (nested) lists, tuples or string-keyed dicts of
    them."""
    if isinstance(value, (tuple, list)):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def _only_biases(model: nn.Module, checked: dict) -> nn.Module:
    """Add bias changes without slicing anything (a plan that removes nothing)."""
    state = ModelState(model)
    try:
        added = add_biases(model, checked, {})
        _check_runs(model)
    except BaseException:
        state.restore()
        raise
    config = getattr(model, "config", None)
    if added and config is not None:
        record = copy.deepcopy(getattr(config, RECORD_KEY, None) or {})
        if "original_config" not in record:
            original = {k: v for k, v in config.to_dict().items() if k != RECORD_KEY}
            record = {"original_config": original, "plans": [], "replay": []}
        record["added"] = sorted({*record.get("added", ()), *added})
        record["config_exact"] = False
        setattr(config, RECORD_KEY, record)
    return model


def check_biases(model: nn.Module, biases: Mapping[str, torch.Tensor]
                 ) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """``{path: (module, 1-D float64 change)}`` for ``biases``; PlanError if one is bad."""
    if not isinstance(biases, Mapping):
        raise PlanError(f"biases must be a dict {{module path: tensor}}, got "
                        f"{type(biases).__name__}")
    checked = {}
    for path, delta in biases.items():
        try:
            module = model.get_submodule(path) if isinstance(path, str) else None
        except AttributeError:
            module = None
        if module is None or not takes_bias(module):
            raise PlanError(f"biases names {path!r}, which is not a layer of the model that "
                            f"adds a bias (expected the path of an nn.Linear or Conv1D)")
        tensor = torch.as_tensor(delta).detach().double().cpu().reshape(-1)
        size = module.weight.shape[output_dim(module)]
        if tensor.numel() != size or not torch.isfinite(tensor).all():
            raise PlanError(f"the bias change for {path!r} must be {size} finite numbers (one "
                            f"per output before pruning), got {tensor.numel()}")
        checked[path] = (module, tensor)
    return checked


def weight_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """``{id(weight): [(path, layer), ...]}``: the layers holding each weight parameter (more
    than one where a block is tied into several places)."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(getattr(module, "weight", None), nn.Parameter):
            holders.setdefault(id(module.weight), []).append((path, module))
    return holders


def add_biases(model: nn.Module, checked: dict, drops: dict) -> list[str]:
    """Add each checked change to its module's bias (sliced like the module's outputs);
    returns the names of the bias parameters this created.

    Layers that share one weight (tied blocks, called at several places) share one bias:
    their changes are averaged, the bias is created once and set on every layer that holds
    that weight, and a bias they already share changes once. A layer whose tensors
    ``save_pretrained`` stores merged with other layers' (:mod:`pruning.saved_form`) gives
    those layers a zero bias too, so that the merge on disk splits back."""
    names = {id(p): n for n, p in model.named_parameters()}
    sharing = weight_holders(model)
    by_weight: dict[int, list] = {}
    for path, (module, delta) in checked.items():
        by_weight.setdefault(id(module.weight), []).append((path, module, delta))
    added = []
    for entries in by_weight.values():
        path, module, _ = entries[0]
        delta = torch.stack([d for _, _, d in entries]).mean(0)
        weight = module.weight
        drop = drops.get((names.get(id(weight), f"{path}.weight"), output_dim(module)))
        if drop is not None and drop.numel():
            keep = torch.ones(delta.numel(), dtype=torch.bool)
            keep[drop] = False
            delta = delta[keep]
        change = delta.to(dtype=weight.dtype, device=weight.device)
        if module.bias is None:
            added.append(_new_bias(sharing.get(id(weight)) or [(path, module)], change))
        else:
            with torch.no_grad():
                module.bias.add_(change)
    return added + _complete_merges(model, added, sharing)


def _new_bias(holders: list[tuple[str, nn.Module]], value: torch.Tensor) -> str:
    """Set one new bias ``value`` on every layer in ``holders`` (layers sharing a weight)
    that adds one; its name (``named_parameters()`` lists a shared tensor once, first)."""
    bias = nn.Parameter(value.clone(), requires_grad=holders[0][1].weight.requires_grad)
    named = []
    for holder_path, holder in holders:  # an Embedding tied to lm_head takes none
        if takes_bias(holder) and holder.bias is None:
            holder.bias = bias
            named.append(f"{holder_path}.bias")
    return named[0]


def _complete_merges(model: nn.Module, added: list[str], sharing: dict) -> list[str]:
    """Zero biases for the layers stored merged with a layer in ``added`` that have none."""
    if not added:
        return []
    layers = {f"{path}.bias": module for path, module in model.named_modules() if takes_bias(module)}
    merged = merged_on_save(model, layers)
    more = []
    for key in added:
        for partner in merged.get(key, ()):
            layer = layers[partner]
            if layer.bias is None:
                weight = layer.weight
                zero = weight.new_zeros(weight.shape[output_dim(layer)])
                holders = sharing.get(id(weight)) or [(partner.removesuffix(".bias"), layer)]
                more.append(_new_bias(holders, zero))
    return more


def library_class(model: nn.Module) -> type:
    """The class of ``model`` that transformers defines (not ``load_pruned``'s subclass)."""
    cls = type(model)
    while vars(cls).get(REPLAYS_PLANS):
        cls = cls.__mro__[1]
    return cls


def _sync_unsolved(model: nn.Module, graph: DependencyGraph, plan: dict, scopes: dict,
                   verify) -> dict:
    """Attributes where no config describes a whole block: the modules that a config fits
    take them from it, the attribute search settles the rest (all of it, if that fails).
    ``verify`` runs the pruned model for real (the search's trace does not decode)."""
    fix_standard_modules(model)
    if not scopes:
        return sync_by_extent(model, graph, plan, verify=verify)
    before = ModelState(model)
    try:
        sync_scopes(model, scopes, library_class(model))
        return sync_by_extent(model, graph, plan, solved=set(scopes), verify=verify)
    except PlanError:
        before.restore()
        return sync_by_extent(model, graph, plan, verify=verify)


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


def _record(model: nn.Module, original: dict, plan: dict, configs: dict,
            added: list[str] = (), attributes: dict | None = None) -> None:
    """Record the plan in ``model.config.depgraph``: ``plans`` (every plan applied, for the
    history), ``replay`` (the plans applied since the config last described the model's
    shapes: what ``load_pruned`` applies to the folder's own config), ``attributes`` (for
    each of those plans, the module attributes it set, verified by a real run: the replay
    sets them as they were, where a meta-device model could not tell coinciding sizes apart,
    and need not search again),
    ``added`` (tensors the model class does not create, e.g. compensation biases) and
    ``config_exact``."""
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
    solved = configs is not None and None in configs  # the config describes the shapes
    earlier = record.get("attributes")
    if not isinstance(earlier, list) or len(earlier) != len(record["replay"]):
        earlier = [{} for _ in record["replay"]]  # a record written before they were kept
    record["replay"] = [] if solved else [*record["replay"], applied]
    settings = {path: {k: v for k, v in values.items() if _is_json(v)}
                for path, values in (attributes or {}).items()}
    record["attributes"] = [] if solved else [*earlier, settings]
    # values that a reload recomputes from sizes (Gemma-3n's hidden_size ** -0.5) and the
    # pruned model kept from before: load_pruned puts them back (small ones; others are masks)
    record["buffers"] = {} if solved else _small_derived_buffers(model)
    record["added"] = sorted({*record.get("added", ()), *added})
    # config_exact: model.config alone describes the model (plain from_pretrained loads it
    # exactly); an added tensor, which the model class would not create, rules that out
    record["config_exact"] = solved and not record["added"]
    setattr(config, RECORD_KEY, record)
