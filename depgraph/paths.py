"""Where the offline data and models live.

The project never copies ``../shared`` into the repository; it reads it from
``$DEPGRAPH_SHARED`` (default: the ``shared`` folder beside the repository checkout).
Online users never need it: every loader also accepts hub ids and dataset names.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["shared_dir", "data_dir", "models_dir", "cache_dir"]

_REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The shared folder: ``$DEPGRAPH_SHARED`` or ``<repo>/../shared``."""
    return Path(os.environ.get("DEPGRAPH_SHARED", _REPO_ROOT.parent / "shared"))


def data_dir() -> Path:
    """Offline data sets: ``$DEPGRAPH_DATA`` or ``<shared>/data``."""
    return Path(os.environ.get("DEPGRAPH_DATA", shared_dir() / "data"))


def models_dir() -> Path:
    """Offline models: ``<shared>/models``."""
    return shared_dir() / "models"


def cache_dir() -> Path:
    """Per-user cache for converted models: ``$DEPGRAPH_CACHE`` or ``~/.cache/depgraph``."""
    return Path(os.environ.get("DEPGRAPH_CACHE", Path.home() / ".cache" / "depgraph"))
