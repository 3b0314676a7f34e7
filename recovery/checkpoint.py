"""Checkpoints of a training loop: everything needed to continue exactly where it stopped.

A checkpoint is one file, ``checkpoint.pt`` in its folder, replaced atomically
(:func:`depgraph.paths.atomic_files`), so a job killed while writing keeps the previous one.
It holds the trainable tensors, the optimizer and scheduler states, the step, the loop's own
state (best validation score and weights, evaluations without improvement, history), the
torch random state and the settings it was made with: :func:`load_checkpoint` refuses a
checkpoint made with other settings (which would continue a different job).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from depgraph.paths import atomic_files

__all__ = ["CHECKPOINT_FILE", "save_checkpoint", "load_checkpoint", "checkpoint_exists"]

CHECKPOINT_FILE = "checkpoint.pt"


def checkpoint_exists(folder: str | Path | None) -> bool:
    return folder is not None and (Path(folder) / CHECKPOINT_FILE).is_file()


def save_checkpoint(folder: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, dicts, numbers) as ``folder/checkpoint.pt``, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CHECKPOINT_FILE
    with atomic_files(target) as (staged,):
        torch.save({**state, "torch_rng": torch.get_rng_state()}, staged)
    return target


def load_checkpoint(folder: str | Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The state saved in ``folder``; ValueError when it was made with other ``settings``."""
    path = Path(folder) / CHECKPOINT_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {exc}") from None
    saved = state.get("settings", {})
    differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if differ:
        first = differ[0]
        raise ValueError(f"checkpoint {str(path)!r} was made with other settings ({first}: "
                         f"{saved.get(first)!r} there, {settings.get(first)!r} now); remove it "
                         "to start afresh")
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    return state
