"""The command line under bad input and faults, as a new user meets them (issue 13).

One table, :data:`CASES`: each row builds its inputs in a fresh folder (``m``, a copy of
stories260K, and the variants its ``setup`` names), runs ``depgraph`` in-process with that
folder as the working directory, and checks

* the exit status, and for a failure exactly one stderr line ``depgraph: error: ...`` that
  matches the row's pattern, no traceback;
* for a failure, that nothing at all was written and no input changed: every file of the
  folder (hidden temporary ones included) has the same sha256 before and after;
* for a row marked ``early``, that it failed before any work (nothing on stdout);
* for a success, that every input is byte-identical and only the expected outputs appeared.

Kills and interrupts (``SIGKILL`` during a save, ``--overwrite`` killed half-way, Ctrl-C) run
``depgraph`` in a subprocess paused at an exact point by ``tests/cli_pause.py``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import depgraph.paths
import depgraph.progress
from depgraph.paths import models_dir
from depgraph_cli.main import main

TINY = models_dir() / "stories260K"
pytestmark = pytest.mark.skipif(not TINY.is_dir(), reason="offline stories260K model missing")
QUICK = ("--ppl-tokens", "0", "--threads", "1")
L2 = ("--ratio", "0.2", "--importance", "l2")
PAUSE = Path(__file__).with_name("cli_pause.py")


# ------------------------------------------------------------------------------ workspace
def _copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    for path in target.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    return target


def _edit_weights(folder: Path, edit: Callable[[dict], dict]) -> None:
    file = folder / "model.safetensors"
    save_file(edit(load_file(file)), file, metadata={"format": "pt"})


def _edit_json(file: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


@pytest.fixture(scope="module")
def pruned_template(tmp_path_factory) -> Path:
    """``p``: stories260K pruned by the command line (its pruning.json names its dense model)."""
    root = tmp_path_factory.mktemp("template")
    _copy_model(TINY, root / "m")
    assert main(["prune", str(root / "m"), *L2, "--out", str(root / "p"), *QUICK]) == 0
    return root / "p"


def _pruned(ws: Path, template: Path, name: str = "p") -> Path:
    """A copy of the pruned template whose pruning.json names ``ws/m`` (same weights)."""
    folder = _copy_model(template, ws / name)
    _edit_json(folder / "pruning.json", lambda d: d.update(model=str((ws / "m").resolve())))
    return folder


def _nan(ws: Path) -> None:
    _edit_weights(_copy_model(ws / "m", ws / "nan"),
                  lambda s: {k: torch.full_like(v, float("nan")) for k, v in s.items()})


def _huge_embedding(ws: Path) -> None:
    """Finite weights whose activations overflow (reconstruction meets non-finite numbers)."""
    def edit(state: dict) -> dict:
        embed = state["model.embed_tokens.weight"]
        state["model.embed_tokens.weight"] = embed * (1e38 / embed.abs().max())
        return state

    _edit_weights(_copy_model(ws / "m", ws / "huge"), edit)


def _truncate(folder: Path, size: int) -> None:
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:size])


def _legacy_record(ws: Path) -> None:
    """``p``'s pruning.json as older depgraph wrote it: no fingerprint of the dense model."""
    _edit_json(ws / "p" / "pruning.json", lambda d: d.pop("model_fingerprint"))


def _other_model(ws: Path, name: str = "m2") -> Path:
    folder = _copy_model(ws / "m", ws / name)
    _edit_weights(folder, lambda s: {k: v * 1.01 for k, v in s.items()})
    return folder


def _edit_config(ws: Path) -> None:
    _edit_json(_copy_model(ws / "m", ws / "badcfg") / "config.json",
               lambda c: c.update(hidden_size=65))


def _without_tokenizer(ws: Path) -> None:
    folder = _copy_model(ws / "m", ws / "notok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


def _stale_temps(ws: Path) -> None:
    """What a writer of ``o`` killed with SIGKILL leaves: its hidden temporary folder."""
    stale = ws / f".o.tmp-{_dead_pid()}-abc123"
    stale.mkdir()
    (stale / "config.json").write_text("{}")


SETUPS: dict[str, Callable[[Path, Path], object]] = {
    "p": lambda ws, t: _pruned(ws, t),
    "nan": lambda ws, t: _nan(ws),
    "huge": lambda ws, t: _huge_embedding(ws),
    "legacy": lambda ws, t: _legacy_record(ws),
    "m2": lambda ws, t: _other_model(ws),
    "m-changed": lambda ws, t: _edit_weights(ws / "m", lambda s: {k: v * 1.01 for k, v in s.items()}),
    "trunc": lambda ws, t: _truncate(_copy_model(ws / "m", ws / "trunc"), 5000),
    "empty": lambda ws, t: _truncate(_copy_model(ws / "m", ws / "empty"), 0),
    "p-trunc": lambda ws, t: _truncate(_pruned(ws, t, "ptrunc"), 4000),
    "badcfg": lambda ws, t: _edit_config(ws),
    "notok": lambda ws, t: _without_tokenizer(ws),
    "badtok": lambda ws, t: (_copy_model(ws / "m", ws / "badtok") / "tokenizer.json")
    .write_text("{not json"),
    "junk": lambda ws, t: (ws / "junk.bin").write_bytes(
        bytes(torch.randint(0, 256, (100_000,), generator=torch.Generator().manual_seed(0))
              .to(torch.uint8).tolist())),
    "bad.json": lambda ws, t: (ws / "bad.json").write_text('[{"instruction": "a", "output": "b"}, {x}]'),
    "bad.jsonl": lambda ws, t: (ws / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{x\n'),
    "badrecord.json": lambda ws, t: (ws / "badrecord.json").write_text(
        json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}])),
    "task.jsonl": lambda ws, t: (ws / "task.jsonl").write_text(
        '{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": \n'),
    "rec.jsonl": lambda ws, t: (ws / "rec.jsonl").write_text(
        '{"query": "q", "choices": ["a", "b"], "gold": 0}\n["q", "a"]\n'),
    "afile": lambda ws, t: (ws / "afile").write_text("mine"),
    "adir": lambda ws, t: (ws / "adir").mkdir(),
    "foreign": lambda ws, t: [(ws / "foreign").mkdir(), (ws / "foreign" / "notes.txt").write_text("mine")],
    "link-to-m": lambda ws, t: (ws / "link").symlink_to("m"),
    "link-to-dir": lambda ws, t: [(ws / "elsewhere").mkdir(), (ws / "outlink").symlink_to("elsewhere")],
    "o": lambda ws, t: _pruned(ws, t, "o"),
    "stale": lambda ws, t: _stale_temps(ws),
}


@dataclass(frozen=True)
class Case:
    """One row: ``argv`` after ``setup``; the exit status, the stderr line's pattern."""

    id: str
    argv: tuple[str, ...]
    status: int = 2
    message: str = ""
    setup: tuple[str, ...] = ()
    early: bool = True  # a failure before any work: nothing on stdout
    writes: tuple[str, ...] = ()  # for a success: the outputs that must appear
    removes: str | None = None  # for a success: entries starting so must be gone (stale temps)
    marks: tuple = ()


def prune(*extra: str) -> tuple[str, ...]:
    return ("prune", "m", *L2, *extra, *QUICK)


def recover(folder: str, *extra: str) -> tuple[str, ...]:
    return ("recover", folder, *extra, *QUICK)


CASES = [
    # --- data loss and silent wrong results
    Case("prune-out-is-input", prune("--out", "m", "--overwrite"), message=r"--out 'm' is the input MODEL"),
    Case("prune-out-inside-input", prune("--out", "m/sub"), message=r"lies inside the input MODEL"),
    Case("prune-out-contains-input", prune("--out", ".", "--overwrite"),
         message=r"--out '\.' contains the input MODEL"),
    Case("prune-out-links-to-input", prune("--out", "link", "--overwrite"), setup=("link-to-m",),
         message=r"--out 'link' is the input MODEL"),
    Case("prune-input-through-link", ("prune", "link", *L2, "--out", "m", "--overwrite", *QUICK),
         setup=("link-to-m",), message=r"--out 'm' is the input MODEL"),
    Case("prune-json-inside-input", prune("--out", "o", "--json", "m/p.json"),
         message=r"--json 'm/p\.json' lies inside the input MODEL"),
    Case("prune-json-inside-out", prune("--out", "o", "--json", "o/p.json"),
         message=r"--json 'o/p\.json' lies inside --out 'o'"),
    Case("prune-calib-inside-out", prune("--out", "o", "--calib", "o/config.json", "--overwrite"),
         setup=("p", "o"), message=r"--out 'o' contains the input --calib"),
    Case("prune-json-folder-missing", prune("--out", "o", "--json", "missing/p.json"),
         message=r"folder 'missing' of --json 'missing/p\.json' does not exist"),
    Case("prune-out-folder-missing", prune("--out", "missing/o"),
         message=r"folder 'missing' of --out 'missing/o' does not exist"),
    Case("recover-out-is-input", recover("p", "--method", "reconstruct", "--out", "p", "--overwrite"),
         setup=("p",), message=r"--out 'p' is the input DIR"),
    Case("recover-out-is-dense", recover("p", "--method", "reconstruct", "--dense", "m", "--out", "m",
                                         "--overwrite"), setup=("p",), message=r"--out 'm' is the input --dense"),
    Case("recover-out-is-recorded-dense", recover("p", "--method", "reconstruct", "--out", "m",
                                                  "--overwrite"),
         setup=("p",), message=r"--out 'm' is the input dense model \(recorded in pruning\.json\)"),
    Case("recover-lora-out-is-dense", recover("p", "--method", "lora", "--dense", "m", "--out", "m",
                                              "--overwrite"), setup=("p",), message=r"is the input --dense"),
    Case("recover-recorded-dense-changed", recover("p", "--method", "reconstruct", "--out", "r"),
         setup=("p", "m-changed"),
         message=r"dense model '/.*/m' is not the model 'p' was pruned from: model\.safetensors "
                 r"has other contents"),
    Case("recover-other-dense", recover("p", "--method", "reconstruct", "--dense", "m2", "--out", "r"),
         setup=("p", "m2"), message=r"dense model 'm2' is not the model 'p' was pruned from"),
    Case("eval-json-inside-input", ("eval", "m", "--json", "m/e.json", "--max-tokens", "256"),
         message=r"--json 'm/e\.json' lies inside the input MODEL"),
    Case("inspect-html-inside-input", ("inspect", "m", "--html", "m/g.html"),
         message=r"--html 'm/g\.html' lies inside the input MODEL"),
    Case("demo-out-is-input", ("demo", "m", "--out", "m", "--overwrite", "--fast", "--threads", "1"),
         message=r"--out 'm' is the input MODEL"),
    Case("zeroshot-nan-weights", ("eval", "nan", "--zeroshot", "piqa", "--limit", "4"),
         setup=("nan",), message=r"model '.*nan' has NaN or infinite weights in 48 of 48 tensors"),
    Case("ppl-nan-weights", ("eval", "nan", "--max-tokens", "256"), setup=("nan",),
         message=r"NaN or infinite weights"),
    Case("calib-binary-junk", prune("--calib", "junk.bin", "--out", "o"), setup=("junk",),
         message=r"calibration file 'junk\.bin' is not UTF-8 text: \d+% of its first"),
    Case("ppl-binary-junk", ("eval", "m", "--ppl", "junk.bin"), setup=("junk",),
         message=r"text file 'junk\.bin' is not UTF-8 text"),
    # --- tracebacks that are now one line
    Case("prune-truncated-weights", ("prune", "trunc", *L2, "--out", "o", *QUICK), setup=("trunc",),
         message=r"weight file '.*trunc/model\.safetensors' is truncated or not a safetensors file"),
    Case("prune-empty-weights", ("prune", "empty", *L2, "--out", "o", *QUICK), setup=("empty",),
         message=r"weight file '.*empty/model\.safetensors' is empty"),
    Case("inspect-weights-truncated", ("inspect", "trunc", "--weights"), setup=("trunc",),
         message=r"is truncated or not a safetensors file"),
    Case("eval-truncated-weights", ("eval", "trunc", "--max-tokens", "256"), setup=("trunc",),
         message=r"is truncated or not a safetensors file"),
    Case("eval-empty-weights", ("eval", "empty", "--max-tokens", "256"), setup=("empty",),
         message=r"weight file '.*empty/model\.safetensors' is empty"),
    Case("recover-truncated-weights", recover("ptrunc", "--method", "lora", "--out", "r"),
         setup=("p-trunc",), message=r"'.*ptrunc/model\.safetensors' is truncated"),
    Case("recover-dense-truncated", recover("p", "--method", "reconstruct", "--dense", "trunc", "--out", "r"),
         setup=("p", "trunc"), message=r"dense model 'trunc' is not the model 'p' was pruned from: "
                                       r"model\.safetensors has 5,000 bytes"),
    Case("taylor-nan-weights", ("prune", "nan", "--ratio", "0.2", "--importance", "taylor", "--out", "o",
                                *QUICK), setup=("nan",), message=r"NaN or infinite weights"),
    Case("reconstruct-nan-dense", recover("p", "--method", "reconstruct", "--dense", "nan", "--out", "r"),
         setup=("p", "legacy", "nan"), message=r"model '.*nan' has NaN or infinite weights"),
    Case("reconstruct-overflows", recover("p", "--method", "reconstruct", "--dense", "huge", "--out", "r",
                                          "--samples", "2"),
         setup=("p", "legacy", "huge"), early=False,
         message=r"least-squares solution is not finite|non-finite"),
    Case("config-value-invalid", ("prune", "badcfg", *L2, "--out", "o", *QUICK), setup=("badcfg",),
         message=r"config\.json of '.*badcfg' is invalid: The hidden size \(65\) is not a multiple"),
    Case("inspect-config-invalid", ("inspect", "badcfg"), setup=("badcfg",),
         message=r"hidden size \(65\)"),
    Case("eval-cuda-without-cuda", ("eval", "m", "--device", "cuda"), message=r"--device 'cuda'.* has no CUDA",
         marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA"),)),
    Case("eval-device-nonsense", ("eval", "m", "--device", "toaster"), message=r"--device 'toaster'"),
    # --- messages that help
    Case("lora-data-bad-json", recover("m", "--method", "lora", "--data", "bad.json", "--out", "r"),
         setup=("bad.json",), message=r"'bad\.json' line 1 column \d+: invalid JSON"),
    Case("lora-data-bad-jsonl", recover("m", "--method", "lora", "--data", "bad.jsonl", "--out", "r"),
         setup=("bad.jsonl",), message=r"'bad\.jsonl' line 2: invalid JSON"),
    Case("lora-data-bad-record", recover("m", "--method", "lora", "--data", "badrecord.json", "--out", "r"),
         setup=("badrecord.json",), message=r"'badrecord\.json' record 1: an Alpaca record needs"),
    Case("zeroshot-file-bad-json", ("eval", "m", "--zeroshot", "task.jsonl"), setup=("task.jsonl",),
         message=r"'task\.jsonl' line 2: invalid JSON"),
    Case("zeroshot-file-bad-record", ("eval", "m", "--zeroshot", "rec.jsonl"), setup=("rec.jsonl",),
         message=r"'rec\.jsonl' item 1: expected a JSON object, got list"),
    Case("lora-data-missing", recover("m", "--method", "lora", "--data", "missing.json", "--out", "r"),
         message=r"--data 'missing\.json' does not exist"),
    Case("calib-missing", prune("--calib", "nope.txt", "--out", "o"),
         message=r"calibration text 'nope\.txt' does not exist"),
    Case("inspect-html-is-folder", ("inspect", "m", "--html", "adir"), setup=("adir",),
         message=r"--html 'adir' is a folder; expected a file path"),
    Case("no-tokenizer-files", ("prune", "notok", *L2, "--out", "o", *QUICK), setup=("notok",),
         message=r"model folder '.*notok' has no tokenizer files \(expected one of tokenizer\.json"),
    Case("corrupt-tokenizer-json", ("eval", "badtok", "--max-tokens", "256"), setup=("badtok",),
         message=r"'.*badtok/tokenizer\.json' is not valid JSON \(Expecting property name"),
    Case("out-is-a-file", prune("--out", "afile", "--overwrite"), setup=("afile",),
         message=r"--out 'afile' is a file; expected a folder"),
    Case("out-is-a-symlink", prune("--out", "outlink", "--overwrite"), setup=("link-to-dir",),
         message=r"--out 'outlink' is a symbolic link"),
    Case("overwrite-foreign-folder", prune("--out", "foreign", "--overwrite"), setup=("foreign",),
         message=r"--out 'foreign' holds files depgraph did not write"),
    Case("tau-ignored", prune("--tau", "0.3", "--out", "o"),
         message=r"--tau is read only by --importance retraining_free; 'l2' would ignore it"),
    Case("compare-missing-before-work", ("eval", "m", "--max-tokens", "256", "--compare", "nope"),
         message=r"model spec 'nope' is not an existing folder"),
    # --- long work stays bounded
    Case("prune-seq-len-beyond-positions", prune("--seq-len", "100000", "--out", "o"),
         message=r"--seq-len 100000 exceeds the model's 512 positions"),
    Case("eval-seq-len-beyond-positions", ("eval", "m", "--seq-len", "1000"),
         message=r"--seq-len 1000 exceeds the model's 512 positions"),
    Case("recover-calib-len-beyond-positions", recover("p", "--method", "reconstruct", "--calib-len",
                                                       "513", "--out", "r"),
         setup=("p",), message=r"--calib-len 513 exceeds the model's 512 positions"),
    Case("lora-seq-len-beyond-positions", recover("p", "--method", "lora", "--seq-len", "4096",
                                                  "--out", "r"),
         setup=("p",), message=r"--seq-len 4096 exceeds"),
    Case("demo-seq-len-beyond-positions", ("demo", "m", "--out", "d", "--fast", "--seq-len", "600",
                                                "--sweep-tokens", "1200", "--ppl-tokens", "1200"),
         message=r"--seq-len 600 exceeds"),
    # --- already one line before issue 13: they stay so
    Case("missing-model", ("inspect", "/no/such/model/folder"), message=r"'/no/such/model/folder'"),
    Case("bad-limit", ("eval", "m", "--zeroshot", "piqa", "--limit", "-1"), message=r"--limit"),
    Case("unknown-task", ("eval", "m", "--zeroshot", "no_such_task"), message=r"no_such_task"),
    Case("unknown-corpus", ("eval", "m", "--ppl", "no_such_corpus"), message=r"no_such_corpus"),
    Case("bad-ratio", ("prune", "m", "--ratio", "1.5", "--out", "o"), message=r"--ratio"),
    Case("unknown-criterion", prune("--importance", "nope", "--out", "o"),
         message=r"unknown importance criterion 'nope'"),
    Case("unknown-kind", prune("--kinds", "bogus", "--out", "o"), early=False,
         message=r"unknown group kind 'bogus'"),
    Case("out-exists", prune("--out", "o"), setup=("p", "o"), message=r"--out 'o' exists; pass --overwrite"),
    Case("missing-out", ("prune", "m", "--ratio", "0.2"), message=r"--out"),
    Case("not-a-model-folder", recover("somewhere", "--method", "lora", "--out", "r"),
         message=r"'somewhere' is not a model folder"),
    Case("unknown-command", ("frobnicate",), message=r"frobnicate"),
    Case("json-folder-missing", ("inspect", "m", "--json", "/no/such/dir/g.json"), message=r"/no/such/dir"),
    Case("demo-out-not-empty", ("demo", "m", "--out", "foreign", "--fast"), setup=("foreign",),
         message=r"--out 'foreign' exists; pass --overwrite"),
    # --- what must work
    Case("inspect-negative-layer", ("inspect", "m", "--layer", "-1"), status=0),
    Case("prune-writes-out-and-json", prune("--out", "o", "--json", "o.json"), status=0,
         writes=("o", "o.json")),
    Case("prune-overwrites-its-own-output", prune("--out", "o", "--overwrite"), status=0,
         setup=("p", "o"), writes=("o",)),
    Case("prune-removes-a-dead-writers-temp", prune("--out", "o"), status=0, setup=("stale",),
         writes=("o",), removes=".o.tmp-"),
    Case("prune-pruned-folder", ("prune", "p", *L2, "--out", "pp", *QUICK), status=0, setup=("p",),
         writes=("pp",)),
]


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every file (and the target of every link) under ``root``, hidden ones too."""
    tree = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            tree[key] = "link:" + os.readlink(path)
        elif path.is_file():
            tree[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            tree[key] = "dir"
    return tree


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    ws = tmp_path / "ws"
    _copy_model(TINY, ws / "m")
    monkeypatch.chdir(ws)
    return ws


def _run(argv, capsys) -> tuple[int, str, list[str]]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, [line for line in captured.err.splitlines() if line.strip()]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_command_line_case(case: Case, workspace, pruned_template, capsys):
    for name in case.setup:
        SETUPS[name](workspace, pruned_template)
    before = _tree(workspace)
    status, out, err = _run(case.argv, capsys)
    assert status == case.status, "\n".join(err)
    assert not any("Traceback" in line for line in err)
    after = _tree(workspace)
    if case.status != 0:
        assert len(err) == 1, err
        assert err[0].startswith("depgraph: error: "), err
        assert re.search(case.message, err[0]), err[0]
        assert after == before  # inputs byte-identical, nothing written, no temporary left
        if case.early:
            assert out == ""
        return
    changed = {k for k in before if after.get(k) != before[k]}
    removed = {k for k in changed if case.removes and k.startswith(case.removes)}
    assert removed == {k for k in before if case.removes and k.startswith(case.removes)}
    assert all(k.split("/")[0] in case.writes for k in changed - removed), changed  # inputs same
    new = {k.split("/")[0] for k in after.keys() - before.keys()}
    assert new <= set(case.writes), new
    for name in case.writes:
        assert (workspace / name).exists(), name
    assert not [k for k in after if k.startswith(".")], "a temporary was left behind"


def test_inspect_negative_layer_is_the_last_block(workspace, capsys):
    assert main(["inspect", "m", "--layer", "-1"]) == 0
    assert "groups of layer 4:" in capsys.readouterr().out


def test_recover_finds_the_recorded_dense_model_from_another_folder(workspace, pruned_template,
                                                                    monkeypatch, capsys):
    """The recorded location is absolute: run from a folder that holds another ``m``, recover
    refits against the model the folder was pruned from (exit 0), and says so."""
    _pruned(workspace, pruned_template)
    elsewhere = workspace / "elsewhere"
    elsewhere.mkdir()
    _other_model(workspace, "elsewhere/m")
    monkeypatch.chdir(elsewhere)
    assert main(["recover", "../p", "--method", "reconstruct", "--out", "r", "--samples", "2",
                 *QUICK]) == 0
    assert f"reconstructing against {(workspace / 'm').resolve()}" in capsys.readouterr().out
    info = json.loads((elsewhere / "r" / "pruning.json").read_text())
    assert info["model"] == str((workspace / "m").resolve()) and info["model_fingerprint"]


def test_pruning_json_records_resolved_dense_and_fingerprint(workspace, capsys):
    from depgraph_cli.fingerprint import weights_fingerprint

    (workspace / "link").symlink_to("m")
    assert main(["prune", "link", *L2, "--out", "o", *QUICK]) == 0
    info = json.loads((workspace / "o" / "pruning.json").read_text())
    assert info["model"] == str((workspace / "m").resolve()) and info["model_spec"] == "link"
    assert info["model_fingerprint"] == weights_fingerprint(workspace / "m")
    sha = hashlib.sha256((workspace / "m" / "model.safetensors").read_bytes()).hexdigest()
    assert info["model_fingerprint"]["files"]["model.safetensors"]["sha256"] == sha


# ------------------------------------------------------------------------------ kills
def _paused(ws: Path, when: str, target: str, argv: list[str], *flags: str) -> subprocess.Popen:
    """Start ``depgraph argv`` in ``ws`` and return once it waits at ``target``."""
    marker = ws.parent / "paused"
    process = subprocess.Popen(
        [sys.executable, str(PAUSE), str(marker), when, target, *flags, "--", *argv],
        cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.monotonic() + 180
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"exited {process.returncode} before pausing: {process.stderr.read()}")
        assert time.monotonic() < deadline, "never reached the pause point"
        time.sleep(0.05)
    return process


def _finish(process: subprocess.Popen, sig: int) -> tuple[int, list[str]]:
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    return process.returncode, [line for line in err.splitlines() if line.strip()]


SAVE = "transformers.modeling_utils:PreTrainedModel.save_pretrained"
PRUNE_O = ["prune", "m", *L2, "--out", "o", *QUICK]


def test_ctrl_c_prints_one_line_exits_130_and_writes_nothing(workspace):
    before = _tree(workspace)
    process = _paused(workspace, "after", SAVE, PRUNE_O)  # half-way through the save
    assert [p.name for p in workspace.iterdir() if p.name.startswith(".o.tmp-")]
    status, err = _finish(process, signal.SIGINT)
    assert status == 130 and err == ["depgraph: interrupted"], err
    assert _tree(workspace) == before


def test_sigkill_during_save_leaves_no_output_and_the_next_run_cleans_up(workspace, capsys):
    before = _tree(workspace)
    process = _paused(workspace, "after", SAVE, PRUNE_O)
    status, _ = _finish(process, signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert not (workspace / "o").exists()
    left = {k for k in _tree(workspace).keys() - before.keys() if "/" not in k}
    assert len(left) == 1 and left.pop().startswith(".o.tmp-")  # the dead writer's temp folder
    assert main(PRUNE_O) == 0
    assert {k.split("/")[0] for k in _tree(workspace).keys() - before.keys()} == {"o"}


@pytest.mark.parametrize("when, target, flags, holds", [  # tests/test_outputs.py: in-process
    pytest.param("before", "depgraph.paths:_swap_in", (), "old", id="before-swap",
                 marks=pytest.mark.slow),  # the new folder is complete, not in yet
    pytest.param("after", "depgraph.paths:_exchange", (), "new", id="after-swap",
                 marks=pytest.mark.slow),  # swapped, the old one not yet deleted
    pytest.param("after", "depgraph.paths:_move_aside", ("--no-exchange",), "aside",
                 id="moved-aside"),  # without an atomic swap, between the two renames
])
def test_overwrite_killed_at_each_step_loses_nothing(workspace, pruned_template, capsys,
                                                     when, target, flags, holds):
    """``--overwrite`` killed at any point: ``o`` holds the old or the new complete output, or
    (without an atomic swap, between two renames) the old one comes back on the next run."""
    old = _pruned(workspace, pruned_template, "o")
    old_tree = _tree(old)
    process = _paused(workspace, when, target, [*PRUNE_O, "--overwrite", "--seed", "1"], *flags)
    _finish(process, signal.SIGKILL)
    if holds == "old":
        assert _tree(old) == old_tree
    elif holds == "new":
        assert _tree(old) != old_tree and (old / "model.safetensors").is_file()
        assert json.loads((old / "pruning.json").read_text())["seed"] == 1
    else:
        assert not old.exists()
    assert main([*PRUNE_O]) == 2  # the next run of the same output restores and cleans up...
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert old.is_dir() and (holds == "new" or _tree(old) == old_tree)
    assert not [p for p in workspace.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------ progress
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_long_steps_show_progress_bars_on_a_terminal_only(workspace, monkeypatch, capsys):
    argv = ["prune", "m", "--ratio", "0.2", "--importance", "taylor", "--samples", "3", *QUICK]
    terminal = _Terminal()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", terminal)
        patch.setattr(depgraph.progress, "tqdm",  # draw every step, however fast
                      functools.partial(depgraph.progress.tqdm, mininterval=0))
        assert main([*argv, "--out", "o"]) == 0
    shown = terminal.getvalue()
    for label in ("calibration windows", "calibration gradients"):
        assert re.search(rf"{label}.*3/3 \[", shown), label  # counts, then elapsed<ETA
    capsys.readouterr()
    assert main([*argv, "--out", "o2"]) == 0
    assert capsys.readouterr().err == ""  # stderr is no terminal here: no bar debris


def test_lora_bars_follow_the_terminal_too(monkeypatch):
    from recovery.lora import _quiet

    assert _quiet(print) and _quiet(None)  # pytest's stderr is no terminal
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert not _quiet(print) and _quiet(None)


def test_pruning_a_pruned_folder_composes_its_plan_record(workspace, pruned_template):
    from pruning import load_pruned

    _pruned(workspace, pruned_template)
    assert main(["prune", "p", *L2, "--out", "pp", *QUICK]) == 0
    first = json.loads((workspace / "p" / "pruning.json").read_text())
    info = json.loads((workspace / "pp" / "pruning.json").read_text())
    assert info["plans"][0] == first["plans"][0] and len(info["plans"]) == 2
    assert info["model"] == first["model"]  # the dense model the plans compose from
    assert info["model_fingerprint"] == first["model_fingerprint"]
    model = load_pruned(workspace / "pp")
    assert sum(p.numel() for p in model.parameters()) == info["params_after"]


def test_sigterm_unwinds_like_ctrl_c_and_exits_143(workspace, monkeypatch, capsys):
    import depgraph.paths
    import depgraph_cli.main

    def handler(args):
        with depgraph.paths.atomic_folder(workspace / "o") as work:
            (work / "half").write_text("written")
            os.kill(os.getpid(), signal.SIGTERM)  # our handler raises inside the block
        return 0

    monkeypatch.setattr(depgraph_cli.main, "_run_inspect", handler)
    before = _tree(workspace)
    assert main(["inspect", "m"]) == 143
    assert capsys.readouterr().err.split() == ["depgraph:", "terminated"]
    assert _tree(workspace) == before
    assert signal.getsignal(signal.SIGTERM) is not depgraph_cli.main._terminate  # put back


def test_eval_compare_marks_accuracy_differences_within_noise(workspace, capsys):
    assert main(["eval", "m", "--zeroshot", "piqa", "--limit", "8", "--compare", "m",
                 "--threads", "1"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("zeroshot.piqa.acc "))
    assert row.split()[-2:] == ["within", "noise"]


def test_a_killed_stream_resumes_in_a_new_process(workspace, capsys):
    """SIGKILL after the first shard: the next process (another hash seed) resumes the same
    run from its .partial folder: no block scored again, and the folder of a fresh run."""
    argv = ["prune", "m", *L2, "--stream", "--out", "o", *QUICK]
    process = _paused(workspace, "after", "recovery.stream:write_shard", argv)
    status, _ = _finish(process, signal.SIGKILL)
    assert status == -signal.SIGKILL and not (workspace / "o").exists()
    assert (workspace / ".o.partial" / "model-00001-of-00006.safetensors").is_file()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "score block" not in err and "write block 1/5" in err
    assert not (workspace / ".o.partial").exists()
    assert main(["prune", "m", *L2, "--stream", "--out", "fresh", *QUICK]) == 0
    for name in ("model-00001-of-00006.safetensors", "model-00006-of-00006.safetensors",
                 "model.safetensors.index.json", "config.json"):
        assert (workspace / "o" / name).read_bytes() == (workspace / "fresh" / name).read_bytes()
