"""Calibration corpora: documents that :mod:`pruning.calibration` cuts windows from.

:class:`FileCorpus` reads text files (a chunk at a random byte offset, never a whole file);
:class:`RowCorpus` reads the rows of a dataset. A file whose bytes are mostly not UTF-8 (more
than :data:`MAX_UNDECODABLE` of its first 64 KiB, or of any chunk read) is refused with the
file named, instead of being decoded into junk that the model would be calibrated on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MAX_UNDECODABLE", "FileCorpus", "RowCorpus", "text_column"]

#: Largest share of a file's bytes that may fail to decode as UTF-8 (checked on its first
#: 64 KiB and on every chunk read); binary files are refused instead of silently decoded.
MAX_UNDECODABLE = 0.05
_HEAD_BYTES = 1 << 16


def _undecodable(raw: bytes) -> tuple[str, float]:
    """The text in ``raw`` and the share of its bytes that are not UTF-8 (or are NUL)."""
    text = raw.decode("utf-8", errors="ignore")
    dropped = len(raw) - len(text.encode("utf-8")) + text.count("\0")
    return text, dropped / max(len(raw), 1)


def _check_text(path: Path, raw: bytes, where: str) -> str:
    text, share = _undecodable(raw)
    if share > MAX_UNDECODABLE:
        raise ValueError(f"calibration file {str(path)!r} is not UTF-8 text: {share:.0%} of "
                         f"{where} do not decode")
    return text


class FileCorpus:
    """Documents = files; a chunk is read at a byte offset, without loading whole files."""

    def __init__(self, paths: list[Path], label: str, region: tuple[float, float] = (0.0, 1.0)):
        self.paths = [p for p in paths if p.stat().st_size > 0]
        if not self.paths:
            raise ValueError(f"calibration source {label!r} holds no text")
        for path in self.paths:
            with open(path, "rb") as handle:
                head = handle.read(_HEAD_BYTES)
            _check_text(path, head, f"its first {len(head):,} bytes")
        sizes = np.array([p.stat().st_size for p in self.paths], dtype=np.int64)
        # only bytes [start, start + size) of each file are read (see ``region``)
        self.starts = (sizes * region[0]).astype(np.int64)
        self.sizes = (sizes * region[1]).astype(np.int64) - self.starts
        self.label = label

    def draw(self, rng: np.random.Generator, chars: int) -> tuple[str, bool, bool]:
        """A chunk of ``chars`` bytes at a random place; whether it starts / ends mid-text."""
        long_enough = self.sizes >= chars
        if long_enough.any():
            weights = np.where(long_enough, self.sizes, 0)
            index = int(rng.choice(len(self.paths), p=weights / weights.sum()))
        else:  # no document is that long: read the longest one whole
            index = int(np.argmax(self.sizes))
        size, start = int(self.sizes[index]), int(self.starts[index])
        offset = int(rng.integers(0, max(size - chars, 0) + 1))
        with open(self.paths[index], "rb") as handle:
            handle.seek(start + offset)
            raw = handle.read(min(chars, size - offset))
        # decoding drops the halves of multi-byte characters cut at either end
        text = _check_text(self.paths[index], raw, f"{len(raw):,} bytes at offset "
                           f"{start + offset:,}").replace("\r\n", "\n")
        return text, start + offset > 0, offset + chars < size

    def exhausted(self, chars: int) -> bool:
        """Whether a chunk of ``chars`` already covers the longest document."""
        return chars >= int(self.sizes.max())


class RowCorpus:
    """Documents = rows of a dataset; a chunk starts in a random row and runs on into the next."""

    def __init__(self, rows: Any, column: str, label: str, region: tuple[float, float] = (0.0, 1.0)):
        first, last = int(len(rows) * region[0]), int(len(rows) * region[1])
        if last <= first:
            raise ValueError(f"calibration source {label!r} has no rows")
        self.rows = rows.select(range(first, last)) if hasattr(rows, "select") else rows[first:last]
        self.column, self.label = column, label

    def draw(self, rng: np.random.Generator, chars: int) -> tuple[str, bool, bool]:
        row = int(rng.integers(0, len(self.rows)))
        first = self.rows[row][self.column] or ""
        offset = int(rng.integers(0, max(len(first) - chars, 0) + 1))
        parts, total = [first[offset:]], len(first) - offset
        while total < chars and row + 1 < len(self.rows):
            row += 1
            parts.append(self.rows[row][self.column] or "")
            total += len(parts[-1]) + 1
        return "\n".join(parts)[:chars], offset > 0, total > chars or row + 1 < len(self.rows)

    def exhausted(self, chars: int) -> bool:
        return False  # unknown without reading everything; the try limit ends the search


def text_column(dataset: Any, label: str) -> str:
    features = getattr(dataset, "features", {}) or {}
    if "text" in features:
        return "text"
    for name, feature in features.items():
        if getattr(feature, "dtype", None) in ("string", "large_string"):
            return name
    raise ValueError(f"dataset {label!r} has no text column (columns: {list(features)})")
