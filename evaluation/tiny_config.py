"""Tiny random configs of any model type, by one generic shrinking function.

``tiny_config("llama")`` starts from the config class's defaults (``AutoConfig.for_model``)
and shrinks every integer by the role its name gives it, for every family alike (no
per-family table):

* blocks: the shortest run of blocks from the first that holds every distinct entry of the
  per-block lists (``layer_types``: sliding, full, linear attention ...), at least two and
  at most eight (else one block of each kind); per-block lists, dicts keyed by block index
  and counts of blocks (``num_kv_shared_layers``) follow; blocks counted as stacks of
  ``num_layers_per_stack`` keep one block per stack. ``blocks_per_kind=2`` keeps two of
  each kind, for models that share one block's weights with the next of its kind;
* head counts: divided by one factor so that the largest is 8 (16 where the smallest would
  drop to one), so grouped-query ratios survive;
* per-head sizes (``head_dim``, ``qk_rope_head_dim`` ...): divided by the power of two that
  brings the largest to 16 at most, so sums such as ``qk_head_dim`` stay sums;
* widths (hidden, MLP, ranks and every other size): divided by the product of those two
  factors, so that a hidden size that is not heads × head_dim (Gemma) stays so; a width
  that was a multiple of 8 stays one (grouped-GEMM kernels need 16-byte rows);
* experts to 4 (groups of experts to 2, one picked), experts per token to 2 (also where the
  default leaves it unset), an expert's width a multiple of 8, the vocabulary to 256 with
  every token id moved inside it;
* relations the default holds stay true: a width that was heads × a state-space head size
  (or the hidden size × ``expand``) stays that product, a width that was a multiple of the
  hidden size stays that multiple, a head size or key/value head count the default leaves
  unset gets transformers' convention (hidden / heads, as many as the heads), a
  ``default_language`` left unset the first of the ``languages`` listed;
* a config that says it is not a decoder (BERT-likes, Reformer) is made one: it is built
  as a causal LM.

Sub-configs (``text_config``, ``vision_config``) shrink the same way. The result is only a
config: :func:`build_tiny_model` tries to build it and says why not.
"""

from __future__ import annotations

import copy
import math
import re
from os.path import commonprefix

import torch
from torch import nn

__all__ = ["tiny_config", "build_tiny_model", "shrink", "TINY_VOCAB"]

TINY_VOCAB = 256
MAX_BLOCKS = 8
_LAYERS = re.compile(r"^(num_|n_)?(hidden_|decoder_|encoder_)?(n_)?layers?$")
_HIDDEN = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "hidden_dim", "model_dim")
_KEEP = ("position", "n_positions", "n_ctx", "seq_len", "seq_length", "window", "chunk",
         "token", "_id", "index", "vocab", "image", "patch", "bucket", "max_", "cache",
         "tokens_per", "state", "conv", "kernel", "num_labels", "pretraining_tp")


def tiny_config(model_type: str, blocks_per_kind: int = 1, **overrides):
    """The default config of ``model_type`` shrunk (see the module doc), keeping the first
    ``blocks_per_kind`` blocks of each kind."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    shrink(config, blocks_per_kind)
    for sub in [config, *_sub_configs(config)]:  # built as a causal LM: a decoder
        if getattr(sub, "is_decoder", True) is False and not getattr(sub, "is_encoder_decoder", False):
            sub.is_decoder = True
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def shrink(config, blocks_per_kind: int = 1) -> None:
    """Shrink ``config`` and its sub-configs in place."""
    for sub in _sub_configs(config):
        shrink(sub, blocks_per_kind)
    values = {k: _read(config, k, v) for k, v in config.to_dict().items()
              if not hasattr(_attribute(config, k), "to_dict")}
    changes = _Shrinker(values, blocks_per_kind).changes()
    for key, value in changes.items():
        if isinstance(_attribute(config, key), tuple) and isinstance(value, list):
            value = tuple(value)  # to_dict() gave a tuple field as a list
        try:
            setattr(config, key, value)
        except Exception:  # noqa: BLE001 - a read-only or validated field keeps its value
            continue


def _read(config, key: str, saved):
    """The value the model reads (the attribute) where it is a number or a list, otherwise
    the saved value: Dory saves twice its blocks (attention and MLP sub-blocks in one
    ``layer_types`` list, every count doubled) and reads them back halved."""
    value = _attribute(config, key)
    if _is_int(value) or isinstance(value, list | tuple) and isinstance(saved, list):
        return list(value) if isinstance(value, tuple) else value
    return saved


def _attribute(config, key: str):
    """``config.key``, or None where reading it raises (a per-layer attribute read globally)."""
    try:
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001 - transformers raises its own error types here
        return None


def _sub_configs(config) -> list:
    return [value for key, value in vars(config).items()
            if hasattr(value, "to_dict") and type(value).__name__.endswith("Config")
            and not key.startswith("_")]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _power_of_two_at_least(value: float) -> int:
    return 1 if value <= 1 else 2 ** math.ceil(math.log2(value))


class _Shrinker:
    """The changes for one config's own fields (see the module doc)."""

    def __init__(self, values: dict, blocks_per_kind: int = 1):
        self.values = values
        self.blocks_per_kind = blocks_per_kind
        self.ints = {k: v for k, v in values.items() if _is_int(v)}
        self.out: dict[str, object] = {}

    def changes(self) -> dict[str, object]:
        self._blocks()
        head_scale = self._heads()
        dim_scale = self._head_dims()
        width_scale = self._widths(head_scale, dim_scale)
        self._products()
        self._unset()
        self._experts()
        self._vocab()
        self._nested(dim_scale, width_scale)
        return self.out

    # ----------------------------------------------------------------- blocks
    def _blocks(self) -> None:
        for key, count in self.ints.items():
            if not _LAYERS.match(key) or count <= 2:
                continue
            per_block = [k for k, v in self.values.items() if isinstance(v, list) and len(v) == count]
            kinds = self._block_kinds(per_block, count)
            stacks = {k: v for k, v in self.ints.items() if "layers_per" in k and 1 < v < count
                      and count % v == 0 and count // v <= MAX_BLOCKS}
            if stacks and not kinds:  # blocks = stacks x blocks per stack (HRM): one per stack
                self.out.update({k: 1 for k in stacks})
                keep = list(range(count // next(iter(stacks.values()))))
            else:
                keep = _kept_blocks(kinds, count, self.blocks_per_kind)
            self.out[key] = len(keep)
            for list_key in per_block:
                entries = self.values[list_key]
                self.out[list_key] = (_remap(entries, keep) if _is_index_list(entries, count)
                                      else [entries[i] for i in keep])
            for other, entries in self.values.items():
                if other in per_block or "layer" not in other:
                    continue
                if isinstance(entries, list) and entries and _is_index_list(entries, count):
                    self.out[other] = _remap(entries, keep)
                elif isinstance(entries, dict) and entries and all(_block_key(k) is not None for k in entries):
                    self.out[other] = {_same_form(k, keep.index(_block_key(k))): v
                                       for k, v in entries.items() if _block_key(k) in keep}
            for other, value in self.ints.items():
                if other == key or other in stacks and not kinds or \
                        not any(word in other for word in ("layer", "first_k", "blocks")):
                    continue
                if "period" in other and value > 2:
                    self.out[other] = 2
                elif ("offset" in other or "first_k" in other) and value > 1:
                    self.out[other] = 1
                elif 0 < value <= count and "layers" in other or value == count and "blocks" in other:
                    self.out[other] = max(1, round(value * len(keep) / count))

    def _block_kinds(self, per_block: list[str], count: int) -> list[list]:
        """The kind of every block by each list that gives one: per-block lists, membership
        in a list of block indices (``attn_layer_indices``), and a shorter list of kinds that
        repeats (``block_types``: two recurrent blocks, then one attention block)."""
        kinds = []
        for key, entries in self.values.items():
            if not isinstance(entries, list) or not entries:
                continue
            if key in per_block and not _is_index_list(entries, count):
                kinds.append(entries)
            elif "layer" in key and _is_index_list(entries, count):
                kinds.append([i in entries for i in range(count)])
            elif len(entries) < count and all(isinstance(e, str) for e in entries) and len(set(entries)) > 1:
                kinds.append([entries[i % len(entries)] for i in range(count)])
        return kinds

    # ------------------------------------------------------------------ heads
    def _heads(self) -> int:
        """Head counts divided by one factor (0 when the config has none)."""
        heads = {k: v for k, v in self.ints.items() if _is_heads_key(k) and v > 0 and k not in self.out}
        if not heads:
            return 0
        largest, smallest = max(heads.values()), min(heads.values())
        target = 8 if largest <= 8 or largest // 8 < smallest or smallest == 1 else 16
        scale = max(1, largest // target)
        main = _main_heads_key(heads)
        for key, value in heads.items():
            self.out[key] = max(1, value // scale)
        for key in heads:  # every other head count divides the main one
            if key != main and self.out[main] % self.out[key]:
                self.out[key] = math.gcd(self.out[main], self.out[key])
        return scale

    def _head_dims(self) -> int:
        dims = {k: v for k, v in self.ints.items() if "head_dim" in k and v > 0}
        if not dims:
            return 8
        scale = _power_of_two_at_least(max(dims.values()) / 16)
        for key, value in dims.items():
            self.out[key] = max(2, value // scale)
        return scale

    # ----------------------------------------------------------------- widths
    def _widths(self, head_scale: int, dim_scale: int) -> float:
        hidden_key = next((k for k in _HIDDEN if self.ints.get(k, 0) >= 16), None)
        if hidden_key is None:
            scale = 16.0
        elif head_scale:
            scale = float(head_scale * dim_scale)
        else:
            scale = float(_power_of_two_at_least(self.ints[hidden_key] / 64))
        for key, value in self.ints.items():
            if key in self.out or not _is_width(key, value):
                continue
            self.out[key] = _width(value, scale, aligned="moe" in key or "expert" in key)
        for key, value in self.values.items():  # per-block widths (Gemma-3n's MLP sizes)
            if key not in self.out and isinstance(value, list) and value and \
                    all(_is_int(v) for v in value) and _is_width(key, min(value)):
                self.out[key] = [_width(v, scale) for v in value]
        main = _main_heads_key({k: v for k, v in self.ints.items() if _is_heads_key(k)})
        if hidden_key and head_scale and main and "head_dim" not in self.ints:
            # a derived head_dim (hidden / heads) stays a whole, even number
            per_head = max(8, self.ints[hidden_key] // self.ints[main] // dim_scale)
            self.out[hidden_key] = self.out[main] * (per_head + per_head % 2)
            # a width that was a multiple of the hidden size stays that multiple
            hidden = self.ints[hidden_key]
            for key, value in self.ints.items():
                if key != hidden_key and key in self.out and _is_width(key, value) and \
                        value % hidden == 0 and value // hidden <= 8:
                    self.out[key] = value // hidden * self.out[hidden_key]
        if hidden_key:  # widths that split the hidden size (``axial_pos_embds_dim``) still do
            hidden, now = self.ints[hidden_key], self.out.get(hidden_key, self.ints[hidden_key])
            for key, value in self.values.items():
                if isinstance(value, list | tuple) and len(value) > 1 and all(_is_int(v) for v in value) \
                        and sum(value) == hidden and key != hidden_key and key not in self.out:
                    # (a list of block indices the block step rewrote can sum to it too)
                    parts = [max(1, v * now // hidden) for v in value[:-1]]
                    self.out[key] = type(value)([*parts, now - sum(parts)])
        return scale

    def _products(self) -> None:
        """A width that was heads × per-head size (``mamba_d_ssm`` = ``mamba_n_heads`` ×
        ``mamba_d_head``, or the hidden size times an ``expand`` factor) stays that product:
        the per-head size (of a state-space head; attention's ``head_dim`` follows its own
        scale) becomes the shrunk width over the shrunk head count where that is even, else
        the width becomes the shrunk head count times the head size."""
        now = {k: self.out.get(k, v) for k, v in self.ints.items()}
        hidden = next((k for k in _HIDDEN if self.ints.get(k, 0) >= 16), None)
        targets = [(k, v, now[k]) for k, v in self.ints.items() if k in self.out and _is_width(k, v)]
        if hidden:  # named by the factor: the name closest to the per-head size's wins
            targets += [(m, self.ints[hidden] * v, now[hidden] * v)
                        for m, v in self.ints.items() if "expand" in m and 1 < v <= 8]
        heads = [k for k, v in self.ints.items() if _is_heads_key(k) and v > 0]
        for dim, size in self.ints.items():
            if size <= 0 or not any(word in dim for word in ("headdim", "d_head")):  # not head_dim
                continue
            found = [(name, shrunk, [h for h in heads if self.ints[h] * size == was])
                     for name, was, shrunk in targets]
            found = [item for item in found if item[2]]
            if not found:
                continue
            name, shrunk, partners = max(found, key=lambda item: len(commonprefix([item[0], dim])))
            head = max(partners, key=lambda h: len(commonprefix([h, dim])))
            if now[head] * now[dim] == shrunk:
                continue
            if shrunk % (2 * now[head]) == 0:
                self.out[dim] = now[dim] = shrunk // now[head]
            elif name in self.out:  # too narrow for an even head size: the width follows instead
                self.out[name] = now[name] = now[head] * now[dim]

    def _unset(self) -> None:
        """Sizes a default config leaves unset where transformers' convention derives them
        (a head size of hidden / heads, as many key/value heads as heads, two experts per
        token where experts are routed)."""
        now = {k: self.out.get(k, v) for k, v in self.ints.items()}
        hidden = next((k for k in _HIDDEN if now.get(k, 0) >= 16), None)
        main = _main_heads_key({k: v for k, v in now.items() if _is_heads_key(k)})
        unset = [k for k, v in self.values.items() if v is None]
        if main and "num_key_value_heads" in unset:
            self.out["num_key_value_heads"] = now[main]
        if main and hidden and "head_dim" in unset:
            self.out["head_dim"] = now[hidden] // now[main]
        if any("expert" in k and v > 1 for k, v in now.items()):
            for key in unset:
                if "per_tok" in key:
                    self.out[key] = 2
        for key in unset:  # a default choice left unset among the choices listed (languages)
            choices = self.values.get(key.removeprefix("default_") + "s")
            if key.startswith("default_") and isinstance(choices, list) and choices:
                self.out[key] = choices[0]

    # ----------------------------------------------------- experts, vocabulary
    def _experts(self) -> None:
        for key, value in self.ints.items():
            if value <= 0:
                continue
            if "group" in key and "head" not in key:  # groups of experts: two, one picked
                self.out[key] = 1 if "topk" in key or "top_k" in key else min(value, 2)
            elif "per_tok" in key or key in ("top_k", "moe_topk", "moe_k") or key.endswith("top_k"):
                self.out[key] = min(value, 2)
            elif "expert" in key and not any(w in key for w in ("size", "dim", "shared", "period",
                                                                 "offset", "layer", "top")):
                self.out[key] = min(value, 4)

    def _vocab(self) -> None:
        if not any("vocab_size" in k and v > TINY_VOCAB for k, v in self.ints.items()):
            return
        for key, value in self.ints.items():
            if "vocab_size" in key and value > TINY_VOCAB:
                self.out[key] = TINY_VOCAB
        next_id = iter(range(TINY_VOCAB - 1, 0, -1))
        for key, value in self.values.items():
            if not key.endswith(("token_id", "token_ids", "token_index", "_token")):
                continue
            if _is_int(value) and value >= TINY_VOCAB:
                self.out[key] = next(next_id)
            elif isinstance(value, list) and any(_is_int(v) and v >= TINY_VOCAB for v in value):
                self.out[key] = [v if v < TINY_VOCAB else next(next_id) for v in value]

    def _nested(self, dim_scale: int, width_scale: float) -> None:
        """Dicts of settings (``per_layer_config``, ``ffn_config``): their head sizes and
        widths shrink like the config's own."""
        for key, value in list(self.out.items()) + [(k, v) for k, v in self.values.items()
                                                    if k not in self.out]:
            if not isinstance(value, dict) or key in ("id2label", "label2id"):
                continue
            self.out[key] = {k: _shrink_settings(v, dim_scale, width_scale) for k, v in value.items()}


def _shrink_settings(value, dim_scale: int, width_scale: float):
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        if _is_int(item) and "head_dim" in key:
            out[key] = max(2, item // dim_scale)
        elif _is_int(item) and _is_width(key, item):
            out[key] = _width(item, width_scale)
        else:
            out[key] = item
    return out


def _is_width(key: str, value: int) -> bool:
    return (value >= 16 and not any(word in key for word in _KEEP) and not _LAYERS.match(key)
            and not _is_heads_key(key) and not ("expert" in key and "size" not in key
                                               and "dim" not in key) and "group" not in key)


def _width(value: int, scale: float, aligned: bool = False) -> int:
    """``value / scale``; a multiple of 8 where ``value`` was one or ``aligned`` (an expert's
    width: the grouped-GEMM kernel that runs every expert at once needs 16-byte rows)."""
    shrunk = max(4, int(round(value / scale)))
    return max(8, 8 * round(shrunk / 8)) if value % 8 == 0 or aligned else shrunk


def _kept_blocks(kinds: list[list], count: int, per_kind: int = 1) -> list[int]:
    """The first blocks up to ``per_kind`` of every kind (2..MAX_BLOCKS), else those blocks."""
    first: dict = {}
    for entries in kinds:
        for i, entry in enumerate(entries):
            seen = first.setdefault((id(entries), repr(entry)), [])
            if len(seen) < per_kind:
                seen.append(i)
    found = sorted({i for seen in first.values() for i in seen})
    last = max(found, default=0)
    if last < MAX_BLOCKS:
        return list(range(max(2, last + 1)))
    return found if len(found) >= 2 else [0, 1]


def _block_key(key) -> int | None:
    if _is_int(key):
        return key
    return int(key) if isinstance(key, str) and key.isdigit() else None


def _same_form(original, index: int):
    if isinstance(original, str):
        return str(index).zfill(len(original))
    return index


def _remap(entries: list[int], keep: list[int]) -> list[int]:
    return [keep.index(i) for i in entries if i in keep]


def _is_index_list(entries: list, count: int) -> bool:
    return (all(_is_int(e) for e in entries) and entries == sorted(set(entries))
            and all(0 <= e < count for e in entries) and not all(e in (0, 1) for e in entries))


def _is_heads_key(key: str) -> bool:
    return ("head" in key and not any(w in key for w in ("dim", "size", "rank", "layer", "scale",
                                                         "d_head"))
            and ("num" in key or key.startswith("n_") or key.endswith("heads")))


def _main_heads_key(heads: dict) -> str | None:
    for key in ("num_attention_heads", "n_head", "num_heads", "n_heads"):
        if key in heads:
            return key
    return max(heads, key=lambda k: heads[k]) if heads else None


def build_tiny_model(config, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The causal LM of ``config`` with random weights, every norm and bias perturbed so that
    each coupling shows in the outputs; ``ValueError`` saying why when it cannot be built."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = copy.deepcopy(config)
    try:
        # built in its dtype as from_pretrained builds it, so that buffers computed at
        # construction (an embedding scale) round the same way in the model and its reload
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as error:  # noqa: BLE001 - reported as "not constructible"
        raise ValueError(f"{type(error).__name__}: {_first_line(error)}") from error
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1 and param.is_floating_point():
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""
