"""Progress bars (tqdm) for every step that may take more than a few seconds.

Bars show counts, rate and ETA on a terminal and stay quiet when stderr is not one (logs,
pipes, CI), so that output files and captured logs hold no bar debris.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar", "restart"]


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None,
                 desc: str | None = None, enabled: bool | None = None) -> tqdm:
    """A tqdm bar; shown by default only when stderr is a terminal."""
    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False)


def restart(bar: tqdm | None, total: int, desc: str | None = None) -> None:
    """Point a bar shared by several passes at the next one (``total`` steps, new label)."""
    if bar is None or not hasattr(bar, "reset"):
        return
    bar.reset(total=total)
    if desc:
        bar.set_description(desc, refresh=False)
