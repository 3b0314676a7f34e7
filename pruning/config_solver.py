"""Finding the config that describes a pruned model, without per-family code.

Every parameter size of a Hugging Face model is a product of config integers (q_proj rows =
heads × head_dim, c_attn columns = 3 × n_embd ...). We *probe* each integer key: build the
model on the meta device with that key changed and record, for every parameter dim, the
exponent with which its size follows the key (1 for ``heads`` in ``heads × head_dim``, -1 for
``n_head`` in GPT-2's derived ``head_dim``). To describe a pruned model we look for the
smallest set of keys whose new values reproduce every new size, then *verify* by building the
model from the candidate config and comparing every parameter shape exactly.

When no config reproduces the shapes (GPT-2 cannot express "10 heads of 64" when
``head_dim = n_embd / n_head``), :func:`solve_config` returns ``None`` and the caller keeps
the original config plus the pruning plan, from which :func:`pruning.load_pruned` rebuilds it.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ConfigProbe", "probe_config", "solve_config", "instantiate_meta", "model_shapes",
           "config_value", "config_changes", "with_changes"]

#: where apply_plan records its plans in a config
RECORD_KEY = "depgraph"
#: config fields that describe no size: never copied between configs nor compared
BOOKKEEPING = ("transformers_version", "architectures", RECORD_KEY)

_SKIP = ("vocab_size", "max_position_embeddings", "token_id", "pad_", "n_positions", "n_ctx",
         "max_window_layers", "sliding_window", "chunk_size", "pretraining_tp", "seq_length")


def instantiate_meta(config, model_class: type | None = None) -> nn.Module:
    """The causal LM of ``config`` built on the meta device (no memory, fast): an instance of
    ``model_class`` (the class of the model being pruned: some text configs map to no
    causal-LM class of their own), else of the class transformers maps ``config`` to."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        if model_class is not None and hasattr(model_class, "_from_config"):
            return model_class._from_config(config)
        return AutoModelForCausalLM.from_config(config)


def _shapes(config, model_class: type | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter and buffer (buffers such as rotary frequencies pin sizes
    that pruning never changes, which tells ``heads`` apart from ``head_dim``)."""
    return model_shapes(instantiate_meta(config, model_class))


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    shapes.update({f"buffer:{name}": tuple(b.shape) for name, b in model.named_buffers()})
    return shapes


@dataclass
class ConfigProbe:
    """How parameter sizes follow config keys: ``exponents[key][(param, dim)]``."""

    base: dict[str, tuple[int, ...]]
    exponents: dict[str, dict[tuple[str, int], float]]
    model_class: type | None = None


def probe_config(config, model_class: type | None = None) -> ConfigProbe:
    """Probe every integer config key (see the module docstring); models are built as
    ``model_class`` (see :func:`instantiate_meta`)."""
    base = _shapes(config, model_class)
    exponents: dict[str, dict[tuple[str, int], float]] = {}
    for key, value in sorted(_integer_keys(config).items()):
        if not _probeable(key, value):
            continue
        for trial in (value * 2, value // 2 if value % 2 == 0 else None, value + 1):
            if not trial or trial <= 0:
                continue
            shapes = _try_shapes(config, key, trial, model_class)
            if shapes is None or set(shapes) != set(base):
                continue
            effect = {}
            for name, shape in shapes.items():
                for dim, (old, new) in enumerate(zip(base[name], shape, strict=True)):
                    if old != new:
                        effect[(name, dim)] = math.log(new / old) / math.log(trial / value)
            if effect:
                exponents[key] = effect
            break
    return ConfigProbe(base, exponents, model_class)


def _integer_keys(config) -> dict[str, object]:
    """Integer config keys, plus ``head_dim`` where the config derives it.

    Many modeling files read ``getattr(config, "head_dim", hidden // heads)``: adding the key
    lets a config say "fewer heads of the same size". (Transformers' attribute maps make
    ``hidden_size`` and ``num_attention_heads`` available on every config.)
    """
    keys = {key: value if not _is_count(config_value(config, key)) else config_value(config, key)
            for key, value in config.to_dict().items()}  # what the model reads (Dory halves)
    hidden, heads = config_value(config, "hidden_size"), config_value(config, "num_attention_heads")
    if "head_dim" not in keys and isinstance(hidden, int) and isinstance(heads, int) and heads:
        keys["head_dim"] = hidden // heads
    return keys


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _probeable(key: str, value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value > 1
            and not any(skip in key for skip in _SKIP))


def _try_shapes(config, key: str, value: int, model_class: type | None = None):
    candidate = copy.deepcopy(config)
    try:
        setattr(candidate, key, value)
        return _shapes(candidate, model_class)
    except Exception:  # noqa: BLE001 - an invalid combination simply teaches nothing
        return None


def solve_config(config, probe: ConfigProbe, target: dict[str, tuple[int, ...]],
                 extents: dict[int, set[int]], max_trials: int = 512,
                 only: set[str] | None = None, accept=None):
    """A copy of ``config`` whose model has exactly the ``target`` shapes, or ``None``.

    ``extents`` maps each old size that a pruned group spans (``heads``, ``heads × head_dim``,
    ``hidden`` ...) to its possible new values. Each config key that the probe found to
    change a pruned dim may take one of those values (or keep its own); combinations are
    tried with the fewest changed keys first and verified by building the model on meta.
    With ``only``, just those parameters (and buffers) must match (one block's config).
    ``accept(candidate)`` is a final check (apply_plan compares re-traced layouts, which
    tells "2 heads of 4" from "4 heads of 2" where shapes alone cannot).
    """
    if only is not None:
        target = {n: s for n, s in target.items() if n in only}
    changed = {(name, dim) for name, shape in probe.base.items() if name in target
               for dim, old in enumerate(shape) if target[name][dim] != old}
    if not changed:
        return copy.deepcopy(config)
    target = {n: tuple(s) for n, s in target.items()}
    options: list[tuple[str, list]] = []
    for key, effect in sorted(probe.exponents.items()):
        current = _current(config, key)
        derived = key == "head_dim" and config_value(config, "head_dim") is None
        if not derived and not any(d in effect for d in changed):
            continue
        values = sorted(extents.get(current, set()) - {current})
        if derived:
            values = [current, *values]  # state the derived head_dim explicitly
        if values:
            options.append((key, values))
    trials = 0
    for count in range(1, len(options) + 1):
        for chosen in itertools.combinations(options, count):
            for values in itertools.product(*[vals for _, vals in chosen]):
                trials += 1
                if trials > max_trials:
                    return None
                candidate = copy.deepcopy(config)
                for (key, _), value in zip(chosen, values, strict=True):
                    setattr(candidate, key, value)
                try:
                    shapes = _shapes(candidate, probe.model_class)
                    if {n: shapes.get(n) for n in target} == target and (
                            accept is None or accept(candidate)):
                        return candidate
                except Exception:  # noqa: BLE001 - an invalid combination is just not it
                    continue
    return None


def _current(config, key: str) -> int:
    value = config_value(config, key)
    if value is None and key == "head_dim":
        return config_value(config, "hidden_size") // config_value(config, "num_attention_heads")
    return int(value)


def config_value(config, key: str, default=None):
    """``config.key`` (``default`` where absent); for a field a heterogeneous config keeps per
    block (``per_layer_config``), whose global read transformers refuses, its global value."""
    try:
        return getattr(config, key, default)
    except Exception:  # noqa: BLE001 - transformers' AmbiguousGlobalPerLayerAttributeError
        return config.to_dict().get(key, default)


def config_changes(old, new) -> dict:
    """``{field: value}`` where config ``new`` differs from ``old``, as the values the model
    reads (a sub-config's changes nested as a dict): what :func:`with_changes` puts back."""
    changes = {}
    for key in new.to_dict():
        if key in BOOKKEEPING:
            continue
        before, after = config_value(old, key), config_value(new, key)
        if hasattr(after, "to_dict") and hasattr(before, "to_dict"):
            if nested := config_changes(before, after):
                changes[key] = nested
        elif before != after:
            changes[key] = copy.deepcopy(after)
    return changes


def with_changes(config, changes: dict):
    """A copy of ``config`` with ``changes`` (from :func:`config_changes`; JSON may have made
    tuples lists) set on it."""
    config = copy.deepcopy(config)
    for key, value in changes.items():
        current = config_value(config, key)
        if hasattr(current, "to_dict") and isinstance(value, dict):
            value = with_changes(current, value)
        elif isinstance(value, list) and isinstance(current, tuple):
            value = tuple(value)
        setattr(config, key, value)
    return config
