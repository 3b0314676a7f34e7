"""How transformers stores a model's tensors on disk, read from its own conversion mapping.

``save_pretrained`` reverts the weight conversions that ``from_pretrained`` applies: some
names change (GPT-NeoX's ``lm_head`` is ``embed_out`` on disk) and some tensors are stored
merged with others (Lara's ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b`` and ``in_proj_a``
are one ``in_proj`` on disk). ``from_pretrained`` splits a merged tensor by the sizes of the
model's own parameters, so a tensor added after pruning (a compensation bias) must exist on
every part of a merge or on none, and must exist in the model being loaded before the split.
Models transformers has no conversions for store every tensor under its own name.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

from torch import nn

__all__ = ["load_names", "merged_on_save"]


def _conversions(model: nn.Module) -> list:
    """The model's weight transforms as ``from_pretrained`` applies them (``[]`` when
    transformers has none for it, or this transformers has no conversion mapping)."""
    found = getattr(model, "_weight_conversions", None)
    if found is not None:
        return list(found)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange

        # as save_pretrained does for a model not loaded with from_pretrained
        return [t for t in get_model_conversion_mapping(model, add_legacy=False)
                if not isinstance(t, PrefixChange)]
    except (ImportError, AttributeError, TypeError):
        return []


def load_names(model: nn.Module) -> Callable[[str], str]:
    """The name ``from_pretrained`` gives a key of the saved file (the key itself where
    transformers renames nothing); it reports unexpected keys by that name."""
    try:
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:
        return lambda key: key
    renamings = [t for t in _conversions(model) if isinstance(t, WeightRenaming)]
    return lambda key: apply_renamings(key, renamings)


def merged_on_save(model: nn.Module, keys: Iterable[str]) -> dict[str, list[str]]:
    """``{key: the keys stored with it in one tensor}`` for those of ``keys`` (parameter
    names, existing or not yet) that ``save_pretrained`` merges with another of ``keys``."""
    try:
        from transformers.core_model_loading import WeightConverter, apply_converters
    except ImportError:
        return {}
    converters = []
    for transform in reversed(_conversions(model)):  # save applies them in reverse order
        if isinstance(transform, WeightConverter):
            try:
                converters.append(transform.reverse_transform())
            except ValueError:  # quantized: not reversible, and not saved by us either
                continue
    if not converters:
        return {}
    by_target: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        target, pattern = apply_converters(key, converters)
        if pattern is not None:
            by_target[target].append(key)
    return {key: group for group in by_target.values() if len(group) > 1 for key in group}
