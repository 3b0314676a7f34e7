"""Text in, token ids out: the one encoder every package uses, and the optional datasets.

:func:`encode_text` is how calibration windows, LoRA examples and zero-shot items are all
tokenized: the text's own tokens, no special tokens added (callers add BOS/EOS where a format
asks for them). :func:`bos_prefix` is the BOS every window cut from such a stream must start
with: models whose tokenizer puts BOS in front of every text (Llama, Gemma) were trained always
to see it (a Gemma-3 270M scores 42 on WikiText-2 at windows of 128 with it and 346 without),
so perplexity windows, calibration samples and training windows all begin with it, as
lm-evaluation-harness does. :func:`load_hf_dataset` loads a Hugging Face dataset, naming what
to install when ``datasets`` is missing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["bos_prefix", "encode_text", "load_hf_dataset"]

_PROBE = "The cat sat."  # any plain text: does the tokenizer's own encoding add BOS?


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (a tokenizer's ``encode`` or its call)."""
    if hasattr(tokenizer, "encode"):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` when the tokenizer's own encoding of a text starts with BOS (its
    default ``add_special_tokens=True``), else ``[]`` (GPT-2, SmolLM2: no BOS is added).

    Every window cut from a token stream starts with this prefix, so that a model sees each
    window the way it saw every text in training; the prefix is never a scored token.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or tokenizer is None:
        return []
    try:
        own = (tokenizer.encode(_PROBE) if hasattr(tokenizer, "encode")
               else tokenizer(_PROBE)["input_ids"])
    except TypeError:  # a bare callable without the default special tokens
        return []
    plain = encode_text(tokenizer, _PROBE)
    added = len(own) > len(plain) and int(own[0]) == int(bos) and plain[:1] != [int(bos)]
    return [int(bos)] if added else []


def load_hf_dataset(*args: Any, split: str) -> Any:
    """``datasets.load_dataset(*args, split=split)``; ValueError saying what to do without it."""
    try:
        import datasets  # optional dependency, imported only when a hub dataset is asked for
    except ImportError as exc:
        raise ValueError(f"loading {args[0]!r} needs the `datasets` package (pip install "
                         "datasets), or pass a text file or folder instead") from exc
    return datasets.load_dataset(*args, split=split)
