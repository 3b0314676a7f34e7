"""Text in, token ids out: the one encoder every package uses, and the optional datasets.

:func:`encode_text` is how calibration windows, LoRA examples and zero-shot items are all
tokenized: the text's own tokens, no special tokens added (callers add BOS/EOS where a format
asks for them). :func:`load_hf_dataset` loads a Hugging Face dataset, naming what to install
when ``datasets`` is missing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["encode_text", "load_hf_dataset"]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (a tokenizer's ``encode`` or its call)."""
    if hasattr(tokenizer, "encode"):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_hf_dataset(*args: Any, split: str) -> Any:
    """``datasets.load_dataset(*args, split=split)``; ValueError saying what to do without it."""
    try:
        import datasets  # optional dependency, imported only when a hub dataset is asked for
    except ImportError as exc:
        raise ValueError(f"loading {args[0]!r} needs the `datasets` package (pip install "
                         "datasets), or pass a text file or folder instead") from exc
    return datasets.load_dataset(*args, split=split)
