"""argparse ``type=`` converters shared by every ``depgraph`` subcommand.

Each turns bad text into ``argparse.ArgumentTypeError`` quoting the value, which the command
line prints as one line ``depgraph: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse

__all__ = ["positive_int", "nonnegative_int", "positive_float", "nonnegative_float", "ratio"]


def _number(kind, text: str, expected: str, accept) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value != value or not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, "a positive integer", lambda v: v >= 1)


def nonnegative_int(text: str) -> int:
    return _number(int, text, "a non-negative integer", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(float, text, "a positive number", lambda v: v > 0)


def nonnegative_float(text: str) -> float:
    return _number(float, text, "a non-negative number", lambda v: 0 <= v < float("inf"))


def ratio(text: str) -> float:
    """A fraction strictly between 0 and 1."""
    return _number(float, text, "a number in (0, 1)", lambda v: 0 < v < 1)
