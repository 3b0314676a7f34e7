"""A fingerprint of a model folder's weight files, to tell later whether it is the same model.

``depgraph prune`` records the fingerprint of the dense model beside its resolved location
in ``pruning.json``; ``depgraph recover`` recomputes it before refitting against that model
and refuses a folder whose weights differ (another model that happens to have the same name).

What is hashed (:data:`FINGERPRINT_VERSION` 1): each weight file of the folder
(``*.safetensors``, else ``*.bin`` / ``*.pt`` / ``*.pth``), by name, with its size in bytes
and the sha256 of

* every byte, for files up to :data:`FULL_HASH_BYTES` (1 GiB: a 500M-parameter bf16 model
  hashes in about a second);
* otherwise the first :data:`HEAD_BYTES` (the safetensors header: every tensor's name, dtype,
  shape and offsets) and :data:`SAMPLES` evenly spaced chunks of :data:`SAMPLE_BYTES` (64 MiB
  read in all), so that a 15 GB checkpoint is fingerprinted in well under a second. Such a
  ``sampled`` fingerprint tells models apart; it may miss an edit of a few bytes.

>>> fingerprint = weights_fingerprint("path/to/model")           # doctest: +SKIP
>>> fingerprint_difference(fingerprint, weights_fingerprint("path/to/model"))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["FINGERPRINT_VERSION", "dense_record", "fingerprint_difference", "weight_files",
           "weights_fingerprint"]

FINGERPRINT_VERSION = 1
FULL_HASH_BYTES = 1 << 30
HEAD_BYTES = 1 << 20
SAMPLES = 1024
SAMPLE_BYTES = 1 << 16
_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth")


def weight_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The weight files of a model folder: its ``*.safetensors``, else its ``*.bin``/``*.pt``."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    return files or sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)


def _file_digest(path: Path, size: int) -> tuple[str, bool]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
            return digest.hexdigest(), False
        digest.update(handle.read(HEAD_BYTES))
        for index in range(SAMPLES):  # evenly spaced, the last one ending at the end
            handle.seek(index * (size - SAMPLE_BYTES) // (SAMPLES - 1))
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest(), True


def weights_fingerprint(folder: str | os.PathLike[str]) -> dict:
    """``{"version", "files": {name: {"bytes", "sha256", "sampled"}}}`` of ``folder``'s weights.

    ``ValueError`` if the folder has no weight file.
    """
    files = weight_files(folder)
    if not files:
        raise ValueError(f"model folder {str(folder)!r} has no weight file (*.safetensors or "
                         "*.bin)")
    entries = {}
    for path in files:
        size = path.stat().st_size
        sha, sampled = _file_digest(path, size)
        entries[path.name] = {"bytes": size, "sha256": sha, "sampled": sampled}
    return {"version": FINGERPRINT_VERSION, "files": entries}


def fingerprint_difference(recorded: dict, actual: dict) -> str | None:
    """What differs between two fingerprints, in words (``None`` when they match)."""
    if recorded.get("version") != actual.get("version"):
        return (f"fingerprint version {recorded.get('version')!r} cannot be compared with "
                f"{actual.get('version')!r}")
    old, new = recorded.get("files", {}), actual.get("files", {})
    for name in sorted(old):
        if name not in new:
            return f"weight file {name} is missing (recorded {old[name]['bytes']:,} bytes)"
        if old[name]["bytes"] != new[name]["bytes"]:
            return f"{name} has {new[name]['bytes']:,} bytes, recorded {old[name]['bytes']:,}"
        if old[name]["sha256"] != new[name]["sha256"]:
            return (f"{name} has other contents (sha256 {new[name]['sha256'][:12]}..., recorded "
                    f"{old[name]['sha256'][:12]}...)")
    extra = sorted(new.keys() - old.keys())
    return f"weight file {extra[0]} was not there when it was pruned" if extra else None


def dense_record(source: str | os.PathLike[str]) -> dict:
    """Where a model about to be pruned came from, for ``pruning.json``.

    ``model``: the resolved folder (symbolic links followed, absolute, so that ``depgraph
    recover`` finds it from any working folder), or the hub id unchanged; ``model_fingerprint``:
    :func:`weights_fingerprint` of that folder (``None`` for a hub id). A folder that was itself
    pruned by depgraph (its ``pruning.json`` names a model) passes its own dense model on, with
    ``pruned_from`` set to the folder, since the plans recorded in it compose from that model.
    """
    if not isinstance(source, Path):
        return {"model": str(source), "model_fingerprint": None}
    folder = source.resolve()
    record = _read_json(folder / "pruning.json")
    if record.get("model") and record.get("model_fingerprint"):
        return {"model": record["model"], "model_fingerprint": record["model_fingerprint"],
                "pruned_from": str(folder)}
    return {"model": str(folder), "model_fingerprint": weights_fingerprint(folder)}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}
