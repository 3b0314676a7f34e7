"""The configs that describe a pruned model, and the module attributes they imply.

After slicing, modules still hold their old sizes as attributes (``num_heads``,
``head_dim``, a fused projection's ``split_size`` ...). The surest source of the right values
is a model built from a config that has the new sizes (:mod:`pruning.config_solver`), in
decreasing order of reach:

1. **one config** for the whole model (every block pruned alike): it replaces
   ``model.config``, so the folder is a plain Hugging Face one;
2. **one config per block**: each block's modules take their attributes (and their
   ``config``, for modules that read it at run time) from a model built from it;
3. **one config per module of a block** (``model.layers.3.self_attn``, ``...mlp``): where no
   config fits a whole block (DeepSeek's routed and shared experts both follow
   ``moe_intermediate_size`` but lose different widths), each module that some config fits
   takes its attributes from it. What no config fits is left to the attribute search of
   :mod:`pruning.attributes`.

Each candidate config is verified on a one-block meta model: its parameters must be laid out
as the plan expects (:func:`pruning.extents.expected_signatures`), which tells "2 heads of 4"
from "4 heads of 2" where shapes alone cannot.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from depgraph import DependencyGraph, build_graph
from depgraph.errors import DepGraphError
from depgraph.groups import block_index

from .config_solver import (
    BOOKKEEPING,
    RECORD_KEY,
    ConfigProbe,
    config_value,
    instantiate_meta,
    solve_config,
)
from .extents import expected_signatures, plan_extents

__all__ = ["configs_for", "scope_configs", "sync_attributes", "sync_scopes",
           "fix_standard_modules", "convolution_owns_its_sizes", "RECORD_KEY"]


def configs_for(model: nn.Module, target: dict[str, tuple[int, ...]], graph: DependencyGraph,
                plan: dict, probe: ConfigProbe) -> dict | None:
    """``{None: config}`` when one config fits, ``{block: config}`` when one per block fits,
    ``{}`` for models without a config, ``None`` when no config describes the model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    signatures = expected_signatures(graph, plan)
    cls = probe.model_class
    if _uniform(graph, plan):  # saved as config.json, so it must pass the class's validation
        whole = solve_config(config, probe, target, plan_extents(graph, plan),
                             accept=lambda c: _validates(c) and _layouts_match(c, signatures, None,
                                                                               model_class=cls))
        if whole is not None:
            return {None: whole}
    configs: dict = {}
    for block in sorted({b for n in target if (b := block_index(n)) is not None}):
        names = {n for n in target if block_index(n) in (block, None)}
        solved = solve_config(config, probe, target, plan_extents(graph, _local(graph, plan, block)),
                              only=names, accept=lambda c, b=block: _layouts_match(
                                  c, signatures, b, model_class=cls))
        if solved is None:
            return None
        configs[block] = solved
    return configs


def scope_configs(model: nn.Module, target: dict[str, tuple[int, ...]], graph: DependencyGraph,
                  plan: dict, probe: ConfigProbe) -> dict[str, object]:
    """``{module path: config}`` for the modules of each block that some config fits."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    signatures = expected_signatures(graph, plan)
    modules = dict(model.named_modules())
    found: dict[str, object] = {}
    for scope in _scopes(target):
        if not _has_custom_module(modules, scope):
            continue  # standard layers follow their own weights
        block = block_index(scope + ".")
        names = {n for n in target if _within(n.removeprefix("buffer:"), scope)}
        solved = solve_config(config, probe, target, plan_extents(graph, _local(graph, plan, block)),
                              only=names, accept=lambda c, b=block, keep=names: _layouts_match(
                                  c, signatures, b, keep, probe.model_class))
        if solved is not None:
            found[scope] = solved
    return found


def _scopes(target: dict) -> list[str]:
    """Paths of the direct children of every block that hold parameters or buffers."""
    scopes = set()
    for name in target:
        parts = name.removeprefix("buffer:").split(".")
        digit = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if digit is not None and digit + 2 < len(parts):
            scopes.add(".".join(parts[:digit + 2]))
    return sorted(scopes)


def _has_custom_module(modules: dict[str, nn.Module], scope: str) -> bool:
    return any(_within(path, scope) and not _standard(module) for path, module in modules.items())


def _standard(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm, nn.Dropout)) or \
        type(module).__name__ == "Conv1D"


def _within(name: str, scope: str) -> bool:
    return name == scope or name.startswith(scope + ".")


def _local(graph: DependencyGraph, plan: dict, block: int | None) -> dict:
    return {gid: units for gid, units in plan.items() if graph.group(gid).layer in (block, None)}


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


def _layouts_match(candidate, signatures: dict, block: int | None,
                   names: set[str] | None = None, model_class: type | None = None) -> bool:
    """A meta model of ``candidate`` has the expected layouts (sizes and structure).

    Checked on a one-block model (cheap for any depth): its block 0 stands for ``block``
    (for every block when ``block`` is None); model-wide parameters are compared as they are.
    With ``names``, only those parameters are compared.
    """
    found = _one_block_signatures(candidate, model_class)
    if found is None:
        return False
    for (param, dim), signature in signatures.items():
        own = block_index(param)
        if own is not None and block is not None and own != block:
            continue
        if names is not None and param not in names:
            continue
        name = param if own is None else param.replace(f".{own}.", ".0.", 1)
        if found.get((name, dim)) != signature:
            return False
    return True


# a candidate config's layouts, by (class, config as JSON): one apply_plan tries the same
# candidates for many blocks and scopes, and load_pruned replays the very same ones
_SIGNATURES: dict[tuple, dict | None] = {}
_SIGNATURES_KEPT = 512


def _one_block_signatures(candidate, model_class: type | None) -> dict | None:
    """The layouts of a one-block meta model of ``candidate``; ``None`` if it cannot be built."""
    reduced = copy.deepcopy(candidate)
    try:
        reduced.num_hidden_layers = 1
        key = (model_class, type(reduced), reduced.to_json_string(use_diff=False))
    except Exception:  # noqa: BLE001 - a config that will not serialize is simply not cached
        key = None
    if key is not None and key in _SIGNATURES:
        return _SIGNATURES[key]
    try:
        found = expected_signatures(build_graph(instantiate_meta(reduced, model_class)), {})
    except (DepGraphError, ValueError, AttributeError, TypeError, RuntimeError, KeyError, IndexError):
        found = None
    if key is not None:
        if len(_SIGNATURES) >= _SIGNATURES_KEPT:
            _SIGNATURES.pop(next(iter(_SIGNATURES)))
        _SIGNATURES[key] = found
    return found


# ------------------------------------------------------------------ attributes
def sync_attributes(model: nn.Module, configs: dict, model_class: type | None = None) -> None:
    """Copy scalar module attributes from meta models built from the new configs."""
    if not configs:
        fix_standard_modules(model)
        return
    first = min(configs, key=lambda b: -1 if b is None else b)
    for block, config in configs.items():
        # model-wide modules (embeddings, the final norm) follow the first config: every
        # per-block config agrees on the model-wide sizes
        _copy_attributes(model, config, lambda path, own, b=block: b is None or own == b or (
            own is None and b == first), per_block=block is not None, model_class=model_class)
    if None in configs:
        _replace_config(model, configs[None])
    fix_standard_modules(model)


def sync_scopes(model: nn.Module, scopes: dict[str, object], model_class: type | None = None) -> None:
    """Copy the attributes of each module subtree from a meta model of its own config."""
    for scope, config in scopes.items():
        _copy_attributes(model, config, lambda path, own, s=scope: _within(path, s), per_block=True,
                         model_class=model_class)


def _copy_attributes(model: nn.Module, config, include: Callable[[str, int | None], bool],
                     per_block: bool, model_class: type | None) -> None:
    fresh = dict(instantiate_meta(config, model_class).named_modules())
    for path, module in model.named_modules():
        own = block_index(path + ".")
        twin = fresh.get(path)
        if twin is None or not include(path, own):
            continue
        if per_block and own is not None and hasattr(twin, "config") and hasattr(module, "config"):
            module.config = twin.config  # modules that read their (sub-)config at run time
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
    """Update the model's config object in place (modules hold references to it and to its
    sub-configs, such as a multimodal model's ``text_config``, which are updated likewise)."""
    _update_config(model.config, config)


def _update_config(target, source) -> None:
    """Set ``source``'s values on ``target``: as the attributes the model reads, not the
    saved form (Dory saves twice its blocks and reads them back halved)."""
    for key, value in source.to_dict().items():
        if key in BOOKKEEPING:
            continue
        current, new = config_value(target, key), config_value(source, key)
        try:
            if hasattr(current, "to_dict") and hasattr(new, "to_dict"):
                _update_config(current, new)
            else:
                setattr(target, key, copy.deepcopy(new) if new is not None else value)
        except (AttributeError, TypeError):
            continue


def fix_standard_modules(model: nn.Module) -> None:
    """Sizes of standard layers from their own weights."""
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
        elif convolution_owns_its_sizes(module):
            _fix_convolution(module)


def convolution_owns_its_sizes(module: nn.Module) -> bool:
    """A (non-transposed) convolution whose sizes follow its weight ``(C_out, C_in / groups,
    *kernel)``: one group, or depthwise (``groups == C_in == C_out``), whose channels stay
    depthwise when pruned. Its kernel taps are never pruned (they are pinned). A convolution
    of other groups cannot tell from its weight how many groups it keeps (the search does)."""
    weight = getattr(module, "weight", None)
    if not isinstance(module, nn.modules.conv._ConvNd) or module.transposed or weight is None:
        return False
    return module.groups == 1 or module.groups == module.in_channels == module.out_channels


def _fix_convolution(module: nn.Module) -> None:
    weight = module.weight
    if module.groups == 1:
        module.out_channels, module.in_channels = weight.shape[:2]
    else:  # depthwise: a channel is its own group
        module.out_channels = module.in_channels = module.groups = weight.shape[0]
    module.kernel_size = tuple(weight.shape[2:])
