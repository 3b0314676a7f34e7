"""Where the offline data and models live, and how outputs are written without loss.

The project never copies ``../shared`` into the repository; it reads it from
``$DEPGRAPH_SHARED`` (default: the ``shared`` folder beside the repository checkout).
Online users never need it: every loader also accepts hub ids and dataset names.

Every writer of the project goes through :func:`atomic_folder` (a folder such as a pruned
model or a report) or :func:`atomic_files` (single files such as ``--json``): the work is
written under a hidden temporary name beside the output, ``.<name>.tmp-<pid>-<random>``, and
renamed into place only when it is complete. An existing output is swapped atomically
(``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere it is renamed aside to
``.<name>.old-<pid>-<random>`` first) and deleted only afterwards, so at every instant the
output's name holds either the old or the new complete folder. Temporary names left by a
process that no longer runs (killed with SIGKILL, a power cut) are removed by the next
writer of the same output; an ``.old`` folder whose output is missing is renamed back.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["shared_dir", "data_dir", "models_dir", "cache_dir", "atomic_folder", "atomic_files",
           "write_text_atomically", "remove_stale_temps", "swap_in_folder"]

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


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _temp_prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(out: str | os.PathLike[str]) -> list[Path]:
    """Remove what dead writers of ``out`` left beside it; returns the names handled.

    Only entries named ``.<out name>.tmp-<pid>-<random>`` or ``.<out name>.old-<pid>-<random>``
    whose process ``pid`` no longer runs on this machine are touched. An ``.old`` folder is
    the previous output moved aside by a swap that died half-way: when ``out`` is missing it
    is renamed back to ``out`` instead of being deleted.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    handled = []
    for entry in sorted(out.parent.iterdir()):
        match = _TEMP_NAME.match(entry.name)
        if not match or match["name"] != out.name or _alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not os.path.lexists(out):
            os.rename(entry, out)
        else:
            _remove(entry)
        handled.append(entry)
    return handled


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step; ``False`` where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
                 _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # e.g. a file system without it
        return False
    raise OSError(code, os.strerror(code), str(second))


def _move_aside(out: Path) -> Path:
    aside = out.parent / f"{_temp_prefix(out, 'old')}{secrets.token_hex(4)}"
    os.rename(out, aside)
    return aside


def _swap_in(new: Path, out: Path) -> None:
    """Put the complete folder ``new`` at ``out``; ``out``'s old content goes only after."""
    if not os.path.lexists(out):
        os.rename(new, out)
        return
    if _exchange(new, out):
        _remove(new)  # it holds the previous output now
        return
    aside = _move_aside(out)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(aside, out)
        raise
    _remove(aside)


def _check_folder_target(out: Path) -> None:
    if out.is_symlink():
        raise ValueError(f"output {str(out)!r} is a symbolic link; name the folder itself")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} is a file; expected a folder")


@contextmanager
def atomic_folder(out: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` when the block ends normally.

    An existing ``out`` folder is replaced only then, by an atomic swap (see the module
    docstring); on any error, ``KeyboardInterrupt`` included, the temporary folder is removed
    and ``out`` is left as it was, so nothing half-written is ever visible under its name.
    ``ValueError`` if ``out`` is a file or a symbolic link (which would be replaced, not the
    folder it points to). Leftovers of dead writers of ``out`` are removed first.
    """
    out = Path(out)
    _check_folder_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "tmp"), dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        _check_folder_target(out)
        _swap_in(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


def swap_in_folder(new: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Make the complete folder ``new`` become ``out`` (an existing ``out`` is swapped out
    atomically and removed only afterwards), for writers that keep their own resumable
    temporary folder instead of :func:`atomic_folder`'s."""
    out = Path(out)
    _check_folder_target(out)
    _swap_in(Path(new), out)


@contextmanager
def atomic_files(*paths: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """Temporary paths for files that become ``paths`` together when the block ends normally.

    Each temporary file lies in its own hidden folder beside its target (so a writer's own
    temporary files land there too); files the block did not write are skipped. On any error
    every temporary file is removed and no target changes. ``ValueError`` if a target is a
    folder.
    """
    targets = [Path(p) for p in paths]
    for target in targets:
        if target.is_dir():
            raise ValueError(f"output {str(target)!r} is a folder; expected a file path")
    folders: list[Path] = []
    try:
        for target in targets:
            remove_stale_temps(target)
            folders.append(Path(tempfile.mkdtemp(prefix=_temp_prefix(target, "tmp"),
                                                 dir=target.parent)))
        staged = [folder / target.name for folder, target in zip(folders, targets, strict=True)]
        yield staged
        for file, target in zip(staged, targets, strict=True):
            if file.exists():
                os.replace(file, target)
    finally:
        for folder in folders:
            _remove(folder)


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_files` (all of it or nothing)."""
    with atomic_files(path) as (staged,):
        staged.write_text(text, encoding="utf-8")
    return Path(path)
