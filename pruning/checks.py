"""Checks of numeric settings, shared by every entry point: a bad value is a one-line
``ValueError`` that names the setting, the value and what was expected."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_int", "check_positive"]


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int``, unless it is not an integer >= ``minimum`` (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive(name: str, value: Any) -> float:
    """``value`` as a ``float``, unless it is not a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)
