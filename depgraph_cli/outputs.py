"""Checks that every output of a command can be written, before the command does any work.

A command lists its outputs (:class:`Output`: the option that names it, the path, whether it
is a folder) and its local inputs (model folders, data files), then calls
:func:`check_outputs`. It raises ``ValueError`` naming the option and the path when

* an output is, contains, or lies inside an input, or another output (compared after
  resolving symbolic links, so a link to the input counts as the input);
* a folder output would replace the current folder or one above it;
* the folder an output goes into does not exist or is not writable;
* a file output is an existing folder, or a folder output an existing file or symbolic link;
* a folder output exists, is not empty, and ``overwrite`` is off; or ``overwrite`` is on but
  the folder holds neither ``config.json`` nor ``report.json`` (it was not written by
  depgraph, and ``--overwrite`` only ever replaces depgraph's own outputs).

Before judging an output, what dead writers of it left is cleaned up
(:func:`depgraph.paths.remove_stale_temps`), so that an output moved aside by a swap that
was killed half-way is back under its name, and counts as existing.

The writing itself goes through :func:`depgraph.paths.atomic_folder` and
:func:`depgraph.paths.atomic_files`, so a run that fails later still leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from depgraph.paths import remove_stale_temps

__all__ = ["Output", "check_outputs", "local_path"]

#: Files that mark a folder as one depgraph wrote (a model folder, a demo report).
OUR_MARKERS = ("config.json", "report.json")


@dataclass(frozen=True)
class Output:
    """One output of a command: ``option`` (e.g. ``"--out"``) names it in messages."""

    option: str
    path: Path | None
    folder: bool = False


def local_path(source: object) -> Path | None:
    """``source`` as a path when it names something on disk (a hub id or dataset name: None)."""
    if isinstance(source, Path):
        return source
    if isinstance(source, str) and source and os.path.lexists(source):
        return Path(source)
    return None


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _relation(output: Path, other: Path) -> str | None:
    if output == other:
        return "is"
    if output.is_relative_to(other):
        return "lies inside"
    if other.is_relative_to(output):
        return "contains"
    return None


def _check_location(out: Output, overwrite: bool) -> None:
    path, name = out.path, f"{out.option} {str(out.path)!r}"
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"folder {str(parent)!r} of {name} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"folder {str(parent)!r} of {name} is not writable")
    if not out.folder:
        if path.is_dir():
            raise ValueError(f"{name} is a folder; expected a file path (a new file inside "
                             "it, say)")
        return
    if path.is_symlink():
        raise ValueError(f"{name} is a symbolic link; name the folder itself "
                         f"({os.path.realpath(path)!r})")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} is a file; expected a folder (remove the file or pick "
                         "another name)")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ValueError(f"{name} exists; pass --overwrite to replace it")
        if not any((path / marker).is_file() for marker in OUR_MARKERS):
            raise ValueError(f"{name} holds files depgraph did not write (no "
                             f"{' or '.join(OUR_MARKERS)}); --overwrite replaces only "
                             "depgraph's own outputs: remove it yourself or pick another folder")


def check_outputs(outputs: Sequence[Output], inputs: Iterable[tuple[str, object]],
                  overwrite: bool = False) -> None:
    """Raise ``ValueError`` for the first output that cannot be written safely (see above).

    ``inputs`` are ``(label, source)`` pairs such as ``("MODEL", "m")``; sources that are not
    on disk (hub ids, ``"bundled"``) are skipped. Outputs whose path is ``None`` are skipped.
    """
    local = [(label, _real(path)) for label, source in inputs
             if (path := local_path(source)) is not None]
    cwd = _real(Path.cwd())
    seen: list[tuple[Output, Path]] = []
    for out in outputs:
        if out.path is None:
            continue
        out = Output(out.option, Path(out.path).expanduser(), out.folder)
        remove_stale_temps(out.path)  # a dead writer's half-swapped output comes back first
        real = _real(out.path)
        name = f"{out.option} {str(out.path)!r}"
        for label, path in local:
            relation = _relation(real, path)
            if relation:
                raise ValueError(f"{name} {relation} the input {label} ({str(path)!r}); an "
                                 "output may not be, contain or lie inside an input")
        if out.folder and cwd.is_relative_to(real):
            raise ValueError(f"{name} is or contains the current folder; pick a new folder")
        for other, other_real in seen:
            relation = _relation(real, other_real)
            if relation:
                raise ValueError(f"{name} {relation} {other.option} {str(other.path)!r}; "
                                 "outputs must not overlap")
        _check_location(out, overwrite)
        seen.append((out, real))
