"""Run ``depgraph`` with one function paused, so that a test can kill or interrupt it there.

    python cli_pause.py MARKER before|after MODULE:ATTR[.ATTR] [--no-exchange] -- ARGS...

The first time ``MODULE.ATTR`` is called, ``MARKER`` is created just before (or after) the
call and the process waits there for the signal the test sends. ``--no-exchange`` makes
:func:`depgraph.paths._exchange` report that the system cannot swap atomically, so the
rename-aside path of the swap runs. Exits with ``depgraph_cli.main.main``'s status.
"""

from __future__ import annotations

import functools
import importlib
import signal
import sys
from pathlib import Path


def _pause(marker: Path) -> None:
    marker.touch()
    signal.pause()  # until the test's signal ends the process (SIGKILL) or raises (SIGINT)


def _wrap(function, marker: Path, when: str):
    done = []

    @functools.wraps(function)
    def paused(*args, **kwargs):
        first = not done
        done.append(True)
        if first and when == "before":
            _pause(marker)
        result = function(*args, **kwargs)
        if first and when == "after":
            _pause(marker)
        return result

    return paused


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    split = argv.index("--")
    marker, when, target, *flags = argv[:split]
    module_name, _, attribute = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, name, _wrap(getattr(owner, name), Path(marker), when))
    if "--no-exchange" in flags:
        import depgraph.paths

        depgraph.paths._exchange = lambda first, second: False
    from depgraph_cli.main import main as depgraph_main

    return depgraph_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
