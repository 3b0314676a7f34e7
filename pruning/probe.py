"""Which groups a model's own code can follow: a probe on a meta copy, before any scoring.

The graph is read off one trace, with fixed sizes: it cannot see code that re-derives a width
from another one at run time (TrOCR's attention reshapes its output to the size of its
*input*, so no head can go while the hidden size stays). :func:`exclude_unprunable` applies,
to a weightless copy of the model, one small plan per *pattern* of groups (the same module in
every block, one kind): the fewest units each group allows, removed from every group of the
pattern at once. Patterns whose plan ``apply_plan`` refuses (no config and no attribute
setting expresses it) are excluded from the graph with that reason, so that no pruner is
offered a group that cannot be applied. Costs one ``apply_plan`` on meta tensors per pattern.

A plan must also survive a real forward and a reload. The probe's pruned copy runs as a user
runs it (the model's own cache, one decoded token) on meta tensors, which checks shapes: the
trace does not use the cache, and RWKV sizes its recurrent state from the config. It is held
to what the dense copy passes there (data-dependent code cannot run on meta at all). Some models replace modules while they
run (BigBird swaps its attention for one built from the config when the input is short; the
trace sees it), or hold modules of another class than their config builds (the same model,
after such a forward: a reload builds the other one). Attributes that a plan sets on such a
module would be lost, so a pattern whose probe changes them is excluded too.

A pruned model is the model its smaller config builds: a scale its constructor computes from
a size (Dory's gate scale, ``hidden_size ** 0.25``) follows the plan. Removing such units
then also rescales, so zeroing them is not the same: a pattern whose probe changes a float
attribute is marked not zero-equivalent (``group.zero_reason`` says which).
"""

from __future__ import annotations

import copy
import re
import weakref
from collections import defaultdict

import torch
from torch import nn

from depgraph import DependencyGraph, Group, PlanError
from depgraph.trace import meta_copy

from .apply import apply_plan, library_class
from .rollback import check_runs, steps_that_run

__all__ = ["exclude_unprunable", "fragile_modules", "probe_plan"]

_PROBED: weakref.WeakSet = weakref.WeakSet()  # graphs already probed: once is enough


def _pattern(group: Group) -> tuple[str, str]:
    return group.kind, re.sub(r"\.\d+(?=\.|$)", ".*", group.id)


def probe_plan(groups: list[Group]) -> dict[str, list[int]]:
    """The smallest removal each group allows (its last units), for every group given."""
    plan = {}
    for group in groups:
        step = next((n for n in range(1, group.num_units) if group.allows(group.num_units - n)), None)
        if step is not None:
            plan[group.id] = list(range(group.num_units - step, group.num_units))
    return plan


def exclude_unprunable(model: nn.Module, graph: DependencyGraph) -> dict[str, str]:
    """Probe every pattern of ``graph``'s groups on a meta copy of ``model`` (module doc);
    exclude the groups whose probe is refused and return ``{group id: reason}`` (of every
    exclusion so far: a graph is probed once)."""
    if graph in _PROBED:
        return graph.excluded()
    patterns: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in graph.groups():
        patterns[_pattern(group)].append(group)
    refused: dict[str, str] = {}
    fragile = fragile_modules(model, graph)
    steps = steps_that_run(meta_copy(model), meta=True)
    scales = _scales(model)
    for (kind, pattern), groups in patterns.items():
        plan = probe_plan(groups)
        if not plan:
            continue
        probe = meta_copy(model)
        before = {path: _settings(probe, path) for path in fragile}
        try:
            apply_plan(probe, plan, graph)
        except PlanError as error:
            reason = f"the model's code cannot follow removing {kind} units of {pattern} ({error})"
            refused.update({group.id: reason for group in groups})
            continue
        rescaled = [key for key, value in _scales(probe).items() if scales.get(key, value) != value]
        for group in groups if rescaled else ():  # zeroing them would not rescale anything
            group.zero_equivalent = False
            path, name = rescaled[0]
            group.zero_reason = (f"removing units changes {path}.{name}, a scale computed from "
                                 f"the config's sizes")
        try:  # shapes only, as a user runs it (RWKV sizes its recurrent state from the config)
            check_runs(probe, steps=steps, meta=True)
        except Exception as error:  # noqa: BLE001 - any failure of the run refuses the pattern
            message = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            reason = (f"the model's own forward fails after removing {kind} units of {pattern} "
                      f"({type(error).__name__}: {message})")
            refused.update({group.id: reason for group in groups})
            continue
        lost = next((path for path in fragile if _changed(before[path], _settings(probe, path))), None)
        if lost is not None:
            reason = (f"removing {kind} units of {pattern} sets attributes of {lost}, and "
                      f"{fragile[lost]}: they would be lost")
            refused.update({group.id: reason for group in groups})
    graph.exclude(refused)
    _PROBED.add(graph)
    return graph.excluded()


def fragile_modules(model: nn.Module, graph: DependencyGraph) -> dict[str, str]:
    """``{path: why}`` of the modules whose attributes a pruned model would not keep: those
    the forward replaces (seen by the trace) and those of another class than a model built
    from the config has there (what a reload builds)."""
    why = {path: "the forward replaces it with a new module built from the config"
           for path in graph.trace.replaced}
    built = _config_build(model)
    if built is not None:
        classes = {path: type(module) for path, module in built.named_modules()}
        for path, module in model.named_modules():
            if path in classes and classes[path] is not type(module):
                why.setdefault(path, f"it is a {type(module).__name__} where the config builds a "
                                     f"{classes[path].__name__} (a reload would not get it back)")
    return why


def _config_build(model: nn.Module) -> nn.Module | None:
    """The model its config builds, on ``meta`` (no weights); None where there is no config
    or the class will not build from it alone."""
    config = getattr(model, "config", None)
    if not hasattr(config, "to_dict"):
        return None
    try:
        with torch.device("meta"):
            return library_class(model)(copy.deepcopy(config))
    except Exception:  # noqa: BLE001 - not a config-built model: nothing to compare with
        return None


def _scales(model: nn.Module) -> dict[tuple[str, str], float]:
    """The float attributes of every module (scales a constructor computed from sizes, such
    as Dory's ``hidden_size ** 0.25``)."""
    return {(path, key): value for path, module in model.named_modules()
            for key, value in vars(module).items()
            if not key.startswith("_") and isinstance(value, float)}


def _settings(model: nn.Module, path: str) -> dict:
    """The plain attributes (numbers, strings, tuples) of the module at ``path``."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return {}
    return {key: value for key, value in vars(module).items()
            if not key.startswith("_") and isinstance(value, (bool, int, float, str, tuple, list))}


def _changed(before: dict, after: dict) -> bool:
    """Whether an attribute both hold has another value (attributes a forward added or
    dropped, as when it swaps the module, are not the plan's doing)."""
    return any(after[key] != value for key, value in before.items() if key in after)
