"""The resumable folder a streamed run builds its output in (:mod:`recovery.stream`).

``.<out name>.partial`` beside ``out`` holds the shards written so far and, under
``_stream/``, what resuming needs: ``state.json`` (the run's key, the number of blocks scored,
the shards written), each scored block's scores and the calibration activations after the
last scored block (with reconstruction: the plan, scores and activations after the last
block written). Every file is written under a temporary name and renamed, files are named by
the block they follow, and the state is updated only after the file it counts (the previous
one is deleted only then), so a run killed at any instant resumes from the last block it
finished. The key (:func:`run_key`) covers the input weights (names, sizes and
modification times of the files), the settings, the compute dtype and the calibration tokens: a run with other
inputs clears the folder and starts afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from depgraph.paths import swap_in_folder

__all__ = ["PartialFolder", "run_key", "settings_text"]

WORK = "_stream"
VERSION = 1


def run_key(source: Path, checkpoint, settings, tokens: torch.Tensor | None, dtype,
            extra: tuple = ()) -> str:
    """A digest of everything that decides a streamed run's result (see the module doc)."""
    digest = hashlib.sha256()
    files = sorted(set(checkpoint.files.values()))
    stamp = [(name, (source / name).stat().st_size, (source / name).stat().st_mtime_ns)
             for name in files]
    config = (source / "config.json").read_bytes()
    digest.update(json.dumps([VERSION, str(source.resolve()), stamp, settings_text(settings),
                              str(dtype)]).encode())
    digest.update(config)
    for value in (tokens, *extra):
        if isinstance(value, torch.Tensor):
            digest.update(value.to(torch.int64).contiguous().numpy().tobytes())
        elif dataclasses.is_dataclass(value):
            digest.update(settings_text(value).encode())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def settings_text(settings) -> str:
    """A dataclass's fields as canonical JSON: the same text in every process (sets sorted;
    ``repr`` of a frozenset follows the per-process string hash seed)."""
    def plain(value):
        if isinstance(value, (set, frozenset)):
            return sorted(str(v) for v in value)
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)

    fields = {f.name: plain(getattr(settings, f.name)) for f in dataclasses.fields(settings)}
    return json.dumps(fields, sort_keys=True)


def _replace_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class PartialFolder:
    """The output under construction; ``state`` says how far a previous run of it got."""

    def __init__(self, out: Path, key: str):
        self.folder = out.parent / f".{out.name}.partial"
        self.work = self.folder / WORK
        self.state = {"key": key, "scored": 0, "written": []}
        state_file = self.work / "state.json"
        if state_file.is_file():
            try:
                previous = json.loads(state_file.read_text())
            except json.JSONDecodeError:
                previous = {}
            if previous.get("key") == key:
                self.state = previous
        if self.state["scored"] == 0 and not self.state["written"] and self.folder.exists():
            shutil.rmtree(self.folder)  # another run's leftovers, or nothing worth keeping
        self.work.mkdir(parents=True, exist_ok=True)
        self._save_state()

    def _save_state(self) -> None:
        _replace_json(self.work / "state.json", self.state)

    def save_scored(self, index: int, scores: dict, states: list | None) -> None:
        """Scores of block ``index`` and the activations after it; then count it scored."""
        if scores:
            tmp = self.work / f".scores-{index}.tmp.npz"
            np.savez(tmp, **{key: np.asarray(value) for key, value in scores.items()})
            os.replace(tmp, self.work / f"scores-{index}.npz")
        if states is not None:
            self._save_tensors(f"states-{index}.pt", [s.cpu() for s in states])
        self.state["scored"] = index + 1
        self._save_state()
        (self.work / f"states-{index - 1}.pt").unlink(missing_ok=True)

    def load_scores(self) -> dict[str, np.ndarray]:
        scores = {}
        for index in range(self.state["scored"]):
            file = self.work / f"scores-{index}.npz"
            if file.is_file():
                with np.load(file) as data:
                    scores.update({key: data[key] for key in data.files})
        return scores

    def load_states(self, device) -> list[torch.Tensor]:
        """The activations after the last scored block."""
        states = torch.load(self.work / f"states-{self.state['scored'] - 1}.pt", weights_only=True)
        return [s.to(device) for s in states]

    def save_sequential(self, index: int, payload: dict) -> None:
        """What the sequential pass has after block ``index`` (its shard written): then count
        the block's shard written."""
        self._save_tensors(f"sequential-{index}.pt", payload)
        self.mark_written(index + 1)
        (self.work / f"sequential-{index - 1}.pt").unlink(missing_ok=True)

    def load_sequential(self, index: int) -> dict:
        return torch.load(self.work / f"sequential-{index}.pt", weights_only=False)

    def _save_tensors(self, name: str, value) -> None:
        tmp = self.work / f".{name}.tmp"
        torch.save(value, tmp)
        os.replace(tmp, self.work / name)

    def mark_written(self, shard: int) -> None:
        self.state["written"] = sorted({*self.state["written"], shard})
        self._save_state()

    def complete(self, out: Path) -> None:
        """Drop the resume files and put the finished folder at ``out``."""
        shutil.rmtree(self.work)
        swap_in_folder(self.folder, out)
