"""The resumable folder a streamed run builds its output in (:mod:`recovery.stream`).

``.<out name>.partial`` beside ``out`` holds the shards written so far and, under
``_stream/``, what resuming needs: ``state.json`` (the run's key, the number of blocks scored,
the shards written), each scored block's scores and the calibration activations after the
last scored block. Every file is written under a temporary name and renamed, and the state
is updated only after the file it counts, so a run killed at any instant resumes from the
last block it finished. The key (:func:`run_key`) covers the input weights (names, sizes and
modification times of the files), the settings, the compute dtype and the calibration tokens: a run with other
inputs clears the folder and starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from depgraph.paths import swap_in_folder

__all__ = ["PartialFolder", "run_key"]

WORK = "_stream"
VERSION = 1


def run_key(source: Path, checkpoint, settings, tokens: torch.Tensor | None, dtype) -> str:
    """A digest of everything that decides a streamed run's result (see the module doc)."""
    digest = hashlib.sha256()
    files = sorted(set(checkpoint.files.values()))
    stamp = [(name, (source / name).stat().st_size, (source / name).stat().st_mtime_ns)
             for name in files]
    config = (source / "config.json").read_bytes()
    digest.update(json.dumps([VERSION, str(source.resolve()), stamp, repr(settings),
                              str(dtype)]).encode())
    digest.update(config)
    if tokens is not None:
        digest.update(tokens.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


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

    def save_block_scores(self, index: int, scores: dict, states: list | None) -> None:
        """Scores of block ``index`` and the activations after it; then count it scored."""
        if scores:
            tmp = self.work / f".scores-{index}.tmp.npz"
            np.savez(tmp, **{key: np.asarray(value) for key, value in scores.items()})
            os.replace(tmp, self.work / f"scores-{index}.npz")
        if states is not None:
            tmp = self.work / ".states.tmp"
            torch.save([s.cpu() for s in states], tmp)
            os.replace(tmp, self.work / "states.pt")
        self.state["scored"] = index + 1
        self._save_state()

    def load_scores(self) -> dict[str, np.ndarray]:
        scores = {}
        for index in range(self.state["scored"]):
            file = self.work / f"scores-{index}.npz"
            if file.is_file():
                with np.load(file) as data:
                    scores.update({key: data[key] for key in data.files})
        return scores

    def load_states(self, device) -> list[torch.Tensor]:
        return [s.to(device) for s in torch.load(self.work / "states.pt", weights_only=True)]

    def mark_written(self, shard: int) -> None:
        self.state["written"] = sorted({*self.state["written"], shard})
        self._save_state()

    def complete(self, out: Path) -> None:
        """Drop the resume files and put the finished folder at ``out``."""
        shutil.rmtree(self.work)
        swap_in_folder(self.folder, out)
