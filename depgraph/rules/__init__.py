"""Coupling rules, one small function per aten op family, in a table keyed by op name.

Each module registers its rules on import; this package imports every rule module
explicitly, so importing :mod:`depgraph.rules` makes the whole table available.
"""

from . import compute, conv, indexing, misc, views  # noqa: F401  (registration on import)
from .registry import lookup, op_name, register, register_pointwise, registered

__all__ = ["lookup", "op_name", "register", "register_pointwise", "registered"]
