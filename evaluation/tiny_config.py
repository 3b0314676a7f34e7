"""Tiny random configs of any model type, by one generic shrinking function.

``tiny_config("llama")`` starts from the config class's defaults (``AutoConfig.for_model``)
and shrinks every integer by the role its name gives it, for every family alike (no
per-family table): layer counts to two blocks (keeping one block of each distinct
``layer_types`` entry first), head counts so that the largest is 8 or 16 while grouped-query
ratios survive, per-head sizes so that the largest is 16, widths (hidden, MLP, ranks) by the
factor that the hidden size shrank, experts to 4 with 2 per token, the vocabulary to 256
(token ids moved inside it). Sub-configs (``text_config``, ``vision_config``) shrink the same
way. Ratios survive on purpose: a family whose hidden size is not heads × head_dim (Gemma)
keeps that property, so the tiny model shows the same hard cases as the real one.

The result is a config; whether its model can be built is for the caller to try
(:func:`build_tiny_model` does, and says why not).
"""

from __future__ import annotations

import copy
import math
import re

import torch
from torch import nn

__all__ = ["tiny_config", "build_tiny_model", "TINY_VOCAB"]

TINY_VOCAB = 256
_LAYERS = re.compile(r"^(num_)?(hidden_|decoder_)?(n_)?layers?$|^n_layer$|^num_hidden_layers$")
_HIDDEN = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "hidden_dim", "model_dim")
_KEEP = ("position", "n_positions", "n_ctx", "seq_len", "seq_length", "window", "chunk",
         "token", "_id", "index", "vocab", "image", "patch", "bucket", "max_", "cache",
         "tokens_per", "state", "conv", "kernel", "num_labels", "pretraining_tp")


def tiny_config(model_type: str, **overrides):
    """The default config of ``model_type`` shrunk to a few thousand parameters a block."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    shrink(config)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def shrink(config) -> None:
    """Shrink ``config`` and its sub-configs in place (see the module doc)."""
    for sub in _sub_configs(config):
        shrink(sub)
    values = {k: v for k, v in config.to_dict().items() if not isinstance(v, dict)}
    ints = {k: v for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool)}
    changes: dict[str, object] = {}
    changes.update(_layers(ints, values))
    heads, head_scale = _heads(ints)
    changes.update(heads)
    dims, dim_scale = _head_dims(ints)
    changes.update(dims)
    hidden_key = next((k for k in _HIDDEN if k in ints and ints[k] >= 16), None)
    width_scale = _width_scale(ints, hidden_key, head_scale, dim_scale)
    for key, value in ints.items():
        if key in changes or value < 16 or any(word in key for word in _KEEP):
            continue
        if "expert" in key or "group" in key:
            continue
        changes[key] = max(4, int(round(value / width_scale)))
    if hidden_key is not None and head_scale and "head_dim" not in ints:
        # derived head_dim (hidden / heads): keep it exact
        heads_key = _main_heads_key(ints)
        if heads_key:
            per_head = max(8, ints[hidden_key] // ints[heads_key] // dim_scale)
            changes[hidden_key] = changes[heads_key] * _even(per_head)
    changes.update(_experts(ints))
    changes.update(_vocab(values))
    for key, value in changes.items():
        try:
            setattr(config, key, value)
        except (AttributeError, TypeError, ValueError):
            continue


def _sub_configs(config) -> list:
    return [value for key, value in vars(config).items()
            if hasattr(value, "to_dict") and type(value).__name__.endswith("Config")
            and not key.startswith("_")]


def _even(value: float) -> int:
    return max(2, 2 * int(round(value / 2)))


def _layers(ints: dict, values: dict) -> dict:
    """Two blocks; lists with one entry per block keep one block of each kind first."""
    changes: dict[str, object] = {}
    counts = {k: v for k, v in ints.items() if _LAYERS.match(k) and v > 2}
    for key, count in counts.items():
        changes[key] = 2
        per_layer = [k for k, v in values.items() if isinstance(v, list) and len(v) == count]
        keep = _representative_layers(values, per_layer, count)
        changes[key] = len(keep)
        for list_key in per_layer:
            entries = values[list_key]
            if _is_index_list(entries, count):
                changes[list_key] = [keep.index(i) for i in entries if i in keep]
            else:
                changes[list_key] = [entries[i] for i in keep]
        for list_key, entries in values.items():  # other lists of block indices
            if list_key not in per_layer and isinstance(entries, list) and entries and \
                    _is_index_list(entries, count) and "layer" in list_key:
                changes[list_key] = [keep.index(i) for i in entries if i in keep]
    for key, value in ints.items():
        if key in changes or "layer" not in key and "first_k" not in key:
            continue
        if "period" in key and value > 2:
            changes[key] = 2
        elif ("offset" in key or "first_k" in key) and value > 1:
            changes[key] = 1
    return changes


def _representative_layers(values: dict, per_layer: list[str], count: int) -> list[int]:
    """Block indices to keep: the first block of each distinct kind, then block 1."""
    keep: list[int] = []
    for list_key in per_layer:
        entries = values[list_key]
        if _is_index_list(entries, count):
            continue
        seen = []
        for i, entry in enumerate(entries):
            if entry not in seen:
                seen.append(entry)
                keep.append(i)
    keep = sorted(set(keep))[:4]
    for i in range(count):
        if len(keep) >= 2:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def _is_index_list(entries: list, count: int) -> bool:
    return (all(isinstance(e, int) and not isinstance(e, bool) for e in entries)
            and entries == sorted(set(entries)) and all(0 <= e < count for e in entries)
            and len(entries) < count + 1 and not all(e in (0, 1) for e in entries))


def _is_heads_key(key: str) -> bool:
    return ("head" in key and not any(w in key for w in ("dim", "size", "rank", "layer", "scale"))
            and ("num" in key or key.startswith("n_") or key.endswith("heads")))


def _main_heads_key(ints: dict) -> str | None:
    for key in ("num_attention_heads", "n_head", "num_heads", "n_heads"):
        if key in ints:
            return key
    heads = [k for k in ints if _is_heads_key(k)]
    return max(heads, key=lambda k: ints[k]) if heads else None


def _heads(ints: dict) -> tuple[dict, int]:
    """Head counts divided by one factor: the largest becomes 8 (16 where the smallest would
    otherwise drop to one), so grouped-query ratios stay as they were."""
    heads = {k: v for k, v in ints.items() if _is_heads_key(k) and v > 0}
    if not heads:
        return {}, 0
    largest, smallest = max(heads.values()), min(heads.values())
    target = 8 if largest <= 8 or largest // 8 < smallest or smallest == 1 else 16
    scale = max(1, largest // target)
    changes = {k: max(1, v // scale) for k, v in heads.items()}
    main = _main_heads_key(ints)
    for key, value in changes.items():  # every other head count divides the main one
        if main and key != main and changes[main] % value:
            changes[key] = math.gcd(changes[main], value)
    return changes, scale


def _head_dims(ints: dict) -> tuple[dict, int]:
    dims = {k: v for k, v in ints.items() if "head_dim" in k and v > 0}
    if not dims:
        return {}, 8
    scale = max(1, max(dims.values()) // 16)
    return {k: _even(v / scale) for k, v in dims.items()}, scale


def _width_scale(ints: dict, hidden_key: str | None, head_scale: int, dim_scale: int) -> float:
    if hidden_key is None:
        return 16.0
    hidden = ints[hidden_key]
    if head_scale:
        return max(1.0, float(head_scale * dim_scale))
    return max(1.0, hidden / 64)


def _experts(ints: dict) -> dict:
    changes = {}
    for key, value in ints.items():
        if "expert" not in key or value <= 0:
            continue
        if any(w in key for w in ("per_tok", "top", "shared", "period", "offset", "layer",
                                  "size", "dim")):
            continue
        changes[key] = min(value, 4)
    for key, value in ints.items():
        if ("per_tok" in key or key in ("top_k", "moe_topk", "num_selected_experts")) and value > 2:
            changes[key] = 2
        elif "group" in key and "expert" not in key and "head" not in key and value > 2:
            changes[key] = 2 if "topk" not in key else 1
    return changes


def _vocab(values: dict) -> dict:
    """A small vocabulary, with every token id inside it."""
    changes: dict[str, object] = {}
    for key, value in values.items():
        if "vocab_size" in key and isinstance(value, int) and value > TINY_VOCAB:
            changes[key] = TINY_VOCAB
    if not changes:
        return changes
    next_id = iter(range(TINY_VOCAB - 1, 0, -1))
    for key, value in values.items():
        if not (key.endswith("token_id") or key.endswith("token_ids") or key.endswith("token_index")
                or key.endswith("_token")):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value >= TINY_VOCAB:
            changes[key] = next(next_id)
        elif isinstance(value, list) and any(isinstance(v, int) and v >= TINY_VOCAB for v in value):
            changes[key] = [v if v < TINY_VOCAB else next(next_id) for v in value]
    return changes


def build_tiny_model(config, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The causal LM of ``config`` with random weights, every norm and bias perturbed so that
    each coupling shows in the outputs; ``ValueError`` saying why when it cannot be built."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = copy.deepcopy(config)
    try:
        model = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # noqa: BLE001 - reported as "not constructible"
        raise ValueError(f"{type(error).__name__}: {_first_line(error)}") from error
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1 and param.is_floating_point():
                param.add_(torch.randn_like(param) * 0.1)
    return model.to(dtype).eval()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""
