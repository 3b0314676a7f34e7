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

__all__ = ["ConfigProbe", "probe_config", "solve_config", "instantiate_meta", "model_shapes"]

_SKIP = ("vocab_size", "max_position_embeddings", "token_id", "pad_", "n_positions", "n_ctx",
         "max_window_layers", "sliding_window", "chunk_size", "pretraining_tp", "seq_length")


def instantiate_meta(config) -> nn.Module:
    """The causal LM of ``config`` built on the meta device (no memory, fast)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _shapes(config) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter and buffer (buffers such as rotary frequencies pin sizes
    that pruning never changes, which tells ``heads`` apart from ``head_dim``)."""
    return model_shapes(instantiate_meta(config))


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    shapes.update({f"buffer:{name}": tuple(b.shape) for name, b in model.named_buffers()})
    return shapes


@dataclass
class ConfigProbe:
    """How parameter sizes follow config keys: ``exponents[key][(param, dim)]``."""

    base: dict[str, tuple[int, ...]]
    exponents: dict[str, dict[tuple[str, int], float]]


def probe_config(config) -> ConfigProbe:
    """Probe every integer config key (see the module docstring)."""
    base = _shapes(config)
    exponents: dict[str, dict[tuple[str, int], float]] = {}
    for key, value in sorted(config.to_dict().items()):
        if not _probeable(key, value):
            continue
        for trial in (value * 2, value // 2 if value % 2 == 0 else None, value + 1):
            if not trial or trial <= 0:
                continue
            shapes = _try_shapes(config, key, trial)
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
    return ConfigProbe(base, exponents)


def _probeable(key: str, value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value > 1
            and not any(skip in key for skip in _SKIP))


def _try_shapes(config, key: str, value: int):
    candidate = copy.deepcopy(config)
    try:
        setattr(candidate, key, value)
        return _shapes(candidate)
    except Exception:  # noqa: BLE001 - an invalid combination simply teaches nothing
        return None


def solve_config(config, probe: ConfigProbe, target: dict[str, tuple[int, ...]],
                 max_keys: int = 4):
    """A copy of ``config`` whose model has exactly the ``target`` shapes, or ``None``."""
    changed = {(name, dim): (old, target[name][dim]) for name, shape in probe.base.items()
               for dim, old in enumerate(shape) if target[name][dim] != old}
    if not changed:
        return copy.deepcopy(config)
    relevant = [k for k, eff in probe.exponents.items() if any(d in eff for d in changed)]
    for count in range(1, min(max_keys, len(relevant)) + 1):
        for keys in itertools.combinations(relevant, count):
            values = _fit(config, probe, keys, changed)
            if values is None:
                continue
            candidate = copy.deepcopy(config)
            for key, value in values.items():
                setattr(candidate, key, value)
            try:
                if _shapes(candidate) == {n: tuple(s) for n, s in target.items()}:
                    return candidate
            except Exception:  # noqa: BLE001
                continue
    return None


def _fit(config, probe: ConfigProbe, keys, changed) -> dict[str, int] | None:
    """Least-squares fit of log-ratios per key, rounded to integers; None if inconsistent."""
    rows, rhs = [], []
    for dim_key, (old, new) in changed.items():
        rows.append([probe.exponents[k].get(dim_key, 0.0) for k in keys])
        rhs.append(math.log(new / old))
    matrix, vector = torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64)
    solution = torch.linalg.lstsq(matrix, vector.unsqueeze(1)).solution.squeeze(1)
    if not torch.allclose(matrix @ solution, vector, atol=1e-6):
        return None
    values = {}
    for key, log_ratio in zip(keys, solution.tolist(), strict=True):
        value = getattr(config, key) * math.exp(log_ratio)
        if abs(value - round(value)) > 1e-6 or round(value) <= 0:
            return None
        values[key] = int(round(value))
    return values
