"""Wall time and peak memory of benchmark steps, and running a step in a fresh interpreter.

Peak memory is the process's high-water RSS (``VmHWM``), reset through
``/proc/self/clear_refs`` before each step (Linux >= 4.0), so a step's peak includes what
was already resident (the model) plus what the step itself added.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

__all__ = ["rss_mb", "peak_mb", "reset_peak", "step", "run_worker", "markdown_table"]


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else float("nan")


def peak_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def step(record: dict, name: str):
    """Time a step and record its peak RSS into ``record[name]`` (seconds, peak_mb)."""
    exact = reset_peak()
    start = time.perf_counter()
    try:
        yield
    finally:
        record[name] = {"seconds": round(time.perf_counter() - start, 2),
                        "peak_mb": round(peak_mb(), 1) if exact else None}


def run_worker(script: str, spec: dict, timeout: float) -> dict:
    """Run ``script --worker JSON`` in a fresh interpreter; its last stdout line is JSON."""
    command = [sys.executable, script, "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {**spec, "error": f"exit {done.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    # a '|' inside a cell (an error message) would end the cell: escape it
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)
