"""The exception hierarchy of depgraph.

``DepGraphError`` is the base: catch it to handle anything this package raises on purpose.
User mistakes (a bad plan, a bad argument) raise ``ValueError`` subclasses so that ordinary
``except ValueError`` code works; internal inconsistencies raise ``LayoutError``. Numbers that stop being finite (NaN or
infinite weights, losses, logits) raise ``NonFiniteError``, also a ``FloatingPointError``.
"""

from __future__ import annotations

__all__ = ["DepGraphError", "UnsupportedOpError", "RuleError", "LayoutError", "TraceError",
           "PlanError", "NonFiniteError"]


class DepGraphError(Exception):
    """Base class of every error raised on purpose by depgraph."""


class UnsupportedOpError(DepGraphError, NotImplementedError):
    """An aten op has no coupling rule; the message names the op, node, module and source."""


class RuleError(DepGraphError):
    """A coupling rule crashed on a node (a bug in depgraph, not in the model): the message
    names the rule's error, the node, the module and the source line."""


class LayoutError(DepGraphError):
    """Two channel layouts that must agree cannot be reconciled (an internal inconsistency)."""


class TraceError(DepGraphError):
    """``torch.export`` could not trace the model."""


class PlanError(DepGraphError, ValueError):
    """A pruning plan names an unknown group or unit, or would remove every unit of a group."""


class NonFiniteError(DepGraphError, FloatingPointError):
    """Weights, a loss or logits hold NaN or infinite values; the message says where."""
