"""Where the offline data and models live.

The project never copies ``../shared`` into the repository; it reads it from
``$DEPGRAPH_SHARED`` (default: the ``shared`` folder beside the repository checkout).
Online users never need it: every loader also accepts hub ids and dataset names.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["shared_dir", "data_dir", "models_dir", "cache_dir", "atomic_folder"]

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


@contextmanager
def atomic_folder(out: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` when the block ends normally.

    An existing ``out`` is replaced only then; on any error the temporary folder is removed
    and ``out`` is left as it was, so nothing half-written is ever visible under its name.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
