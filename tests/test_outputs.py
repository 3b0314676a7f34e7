"""Writing without loss (depgraph.paths), checking outputs against inputs (depgraph_cli.outputs)
and fingerprints of weight files (depgraph_cli.fingerprint), on small folders, in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import depgraph.paths as paths
import depgraph_cli.fingerprint as fingerprint
from depgraph.paths import atomic_files, atomic_folder, remove_stale_temps
from depgraph_cli.outputs import Output, check_outputs


def _folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


class Interrupt(BaseException):
    pass


def _raise_once(function):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        result = function(*args, **kwargs)
        if len(calls) == 1:
            raise Interrupt()
        return result

    return wrapper


# ------------------------------------------------------------------------------ atomic_folder
def test_atomic_folder_writes_then_swaps_an_existing_output(tmp_path):
    out = tmp_path / "o"
    with atomic_folder(out) as work:
        (work / "a").write_text("old")
        assert not out.exists() and work.name.startswith(f".o.tmp-{os.getpid()}-")
    with atomic_folder(out) as work:
        (work / "b").write_text("new")
        assert _contents(out) == {"a": "old"}  # untouched until the block ends
    assert _contents(out) == {"b": "new"} and _hidden(tmp_path) == []


def test_an_error_in_the_block_leaves_the_old_output(tmp_path):
    out = _folder(tmp_path / "o", a="old")
    with pytest.raises(KeyboardInterrupt), atomic_folder(out) as work:
        (work / "b").write_text("half")
        raise KeyboardInterrupt
    assert _contents(out) == {"a": "old"} and _hidden(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
def test_interrupted_after_the_swap_the_new_output_is_whole(tmp_path, monkeypatch, exchange):
    out = _folder(tmp_path / "o", a="old")
    if not exchange:
        monkeypatch.setattr(paths, "_exchange", lambda first, second: False)
    monkeypatch.setattr(paths, "_remove", _raise_once(paths._remove))  # while deleting the old
    with pytest.raises(Interrupt), atomic_folder(out) as work:
        (work / "b").write_text("new")
    assert _contents(out) == {"b": "new"}


def test_without_an_atomic_swap_a_failed_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    out = _folder(tmp_path / "o", a="old")
    monkeypatch.setattr(paths, "_exchange", lambda first, second: False)
    real_rename = os.rename

    def rename(source, target):
        if Path(source).name.startswith(".o.tmp-"):
            raise OSError("disk trouble")
        real_rename(source, target)

    monkeypatch.setattr(paths.os, "rename", rename)
    with pytest.raises(OSError, match="disk trouble"), atomic_folder(out) as work:
        (work / "b").write_text("new")
    assert _contents(out) == {"a": "old"} and _hidden(tmp_path) == []


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("x"), "is a file"),
    (lambda p: p.symlink_to(p.parent), "is a symbolic link"),
])
def test_atomic_folder_refuses_a_file_or_a_link(tmp_path, make, message):
    make(tmp_path / "o")
    with pytest.raises(ValueError, match=message), atomic_folder(tmp_path / "o"):
        pass
    assert _hidden(tmp_path) == []


def test_stale_temps_of_dead_writers_are_removed_or_restored(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    out = tmp_path / "o"
    _folder(tmp_path / f".o.tmp-{dead}-abc", x="half")
    _folder(tmp_path / f".o.old-{dead}-def", a="old")  # moved aside by a swap that died
    _folder(tmp_path / f".o.tmp-{alive}-ghi")  # a writer that still runs
    _folder(tmp_path / f".other.tmp-{dead}-jkl")  # another output's
    handled = remove_stale_temps(out)
    assert sorted(p.name for p in handled) == [f".o.old-{dead}-def", f".o.tmp-{dead}-abc"]
    assert _contents(out) == {"a": "old"}  # restored, since "o" was missing
    assert _hidden(tmp_path) == [f".o.tmp-{alive}-ghi", f".other.tmp-{dead}-jkl"]
    _folder(tmp_path / f".o.old-{dead}-mno", a="older")
    remove_stale_temps(out)  # "o" exists now: the older copy goes
    assert _contents(out) == {"a": "old"} and f".o.old-{dead}-mno" not in _hidden(tmp_path)


def test_atomic_files_write_all_or_nothing(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    with pytest.raises(RuntimeError), atomic_files(first, second) as (a, b):
        a.write_text("1")
        raise RuntimeError
    assert not first.exists() and _hidden(tmp_path) == []
    with atomic_files(first, second) as (a, b):
        a.write_text("1")
        b.write_text("2")
        assert not first.exists()
    assert first.read_text() == "1" and second.read_text() == "2" and _hidden(tmp_path) == []
    with pytest.raises(ValueError, match="is a folder"), atomic_files(tmp_path):
        pass


# ------------------------------------------------------------------------------ check_outputs
@pytest.fixture
def tree(tmp_path, monkeypatch):
    _folder(tmp_path / "m", **{"config.json": "{}"})
    _folder(tmp_path / "ours", **{"config.json": "{}"})
    _folder(tmp_path / "foreign", notes="mine")
    (tmp_path / "data.txt").write_text("text")
    (tmp_path / "link").symlink_to("m")
    work = _folder(tmp_path / "work")
    monkeypatch.chdir(work)
    return tmp_path


@pytest.mark.parametrize("outputs, overwrite, message", [
    ([Output("--out", "../m", True)], True, r"--out '../m' is the input MODEL"),
    ([Output("--out", "../link", True)], True, r"is the input MODEL"),
    ([Output("--out", "../m/x", True)], False, r"lies inside the input MODEL"),
    ([Output("--json", "../m/x.json")], False, r"lies inside the input MODEL"),
    ([Output("--out", "..", True)], True, r"contains the input MODEL"),
    ([Output("--out", "../data.txt", True)], True, r"is the input --calib"),
    ([Output("--out", ".", True)], True, r"is or contains the current folder"),
    ([Output("--out", "../o", True), Output("--json", "../o/p.json")], False,
     r"--json '../o/p.json' lies inside --out '../o'"),
    ([Output("--json", "nowhere/x.json")], False, r"folder 'nowhere' of --json"),
    ([Output("--json", "../foreign")], False, r"--json '../foreign' is a folder"),
    ([Output("--out", "../data2", True)], False, None),
    ([Output("--out", "../ours", True)], False, r"exists; pass --overwrite"),
    ([Output("--out", "../ours", True)], True, None),
    ([Output("--out", "../foreign", True)], True, r"holds files depgraph did not write"),
])
def test_check_outputs(tree, outputs, overwrite, message):
    inputs = [("MODEL", Path("../m")), ("--calib", "../data.txt"), ("--data", "bundled")]
    if message is None:
        check_outputs(outputs, inputs, overwrite=overwrite)
    else:
        with pytest.raises(ValueError, match=message):
            check_outputs(outputs, inputs, overwrite=overwrite)


def test_check_outputs_restores_a_half_swapped_output_first(tree):
    _folder(tree / f".o.old-{_dead_pid()}-abc", **{"config.json": "{}"})
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        check_outputs([Output("--out", tree / "o", True)], [])
    assert (tree / "o" / "config.json").is_file()


# ------------------------------------------------------------------------------ fingerprint
def test_fingerprint_tells_what_differs(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    recorded = fingerprint.weights_fingerprint(folder)
    assert fingerprint.fingerprint_difference(recorded, fingerprint.weights_fingerprint(folder)) \
        is None
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[1000] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert "model.safetensors has other contents" in fingerprint.fingerprint_difference(
        recorded, fingerprint.weights_fingerprint(folder))
    (folder / "model.safetensors").write_bytes(b"short")
    assert "has 5 bytes, recorded 16,384" in fingerprint.fingerprint_difference(
        recorded, fingerprint.weights_fingerprint(folder))
    (folder / "model.safetensors").rename(folder / "model-00001.safetensors")
    assert "model.safetensors is missing" in fingerprint.fingerprint_difference(
        recorded, fingerprint.weights_fingerprint(folder))


def test_large_files_are_fingerprinted_from_samples(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 1024)
    monkeypatch.setattr(fingerprint, "HEAD_BYTES", 256)
    monkeypatch.setattr(fingerprint, "SAMPLES", 4)
    monkeypatch.setattr(fingerprint, "SAMPLE_BYTES", 64)
    folder = _folder(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(bytes(4096))
    recorded = fingerprint.weights_fingerprint(folder)
    assert recorded["files"]["model.safetensors"]["sampled"] is True
    data = bytearray(4096)
    data[4090] = 1  # inside the last sample, which ends at the end of the file
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert fingerprint.fingerprint_difference(recorded, fingerprint.weights_fingerprint(folder))


def test_dense_record_of_a_pruned_folder_names_its_original(tmp_path):
    dense = _folder(tmp_path / "m")
    (dense / "model.safetensors").write_bytes(b"weights")
    record = fingerprint.dense_record(dense)
    assert record["model"] == str(dense.resolve()) and record["model_fingerprint"]
    pruned = _folder(tmp_path / "p")
    (pruned / "model.safetensors").write_bytes(b"fewer")
    (pruned / "pruning.json").write_text(json.dumps(record))
    again = fingerprint.dense_record(pruned)
    assert again == {**record, "pruned_from": str(pruned.resolve())}
    assert fingerprint.dense_record("owner/name") == {"model": "owner/name",
                                                      "model_fingerprint": None}
