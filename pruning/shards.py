"""Writing safetensors shards one tensor at a time, and the index that names them.

``safetensors.torch.save_file`` serialises a whole shard in memory before writing it, which
doubles the memory a big shard takes (the embedding matrix of a 128k vocabulary is 1 GiB in
bf16). :func:`write_shard` writes the same format — an 8-byte little-endian header length, a
JSON header padded with spaces to 8 bytes, then each tensor's bytes in header order — asking
``produce(name)`` for one tensor at a time, so a shard never needs more memory than its
largest tensor. The file appears under its name only when complete (written beside it under a
hidden name, then renamed). Files are read back with safetensors itself.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["write_shard", "write_index", "shard_name", "SAFETENSORS_DTYPES"]

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                      torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
                      torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def shard_name(index: int, count: int) -> str:
    """Hugging Face's shard file name, 1-based: ``model-00001-of-00009.safetensors``."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_shard(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                produce: Callable[[str], torch.Tensor]) -> int:
    """Write the tensors ``entries`` (name, dtype, shape) to ``path``; returns data bytes.

    ``produce(name)`` must return a tensor of exactly that dtype and shape (``ValueError``
    otherwise, and nothing is left at ``path``).
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.parent / f".{path.name}.partial"
    try:
        with open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(text)))
            handle.write(text)
            for name, dtype, shape in entries:
                tensor = produce(name)
                if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                                     f"expected {dtype} {tuple(shape)}")
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                handle.write(memoryview(data.numpy()))
                del tensor, data
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return offset


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json`` as ``save_pretrained`` writes it."""
    index = {"metadata": {"total_size": total_size},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
