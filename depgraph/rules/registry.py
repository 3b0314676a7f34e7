"""The table of coupling rules, keyed by aten op name.

A rule is a plain function ``rule(node) -> Coupling`` registered for one or several op names
(``"aten::view"``); in-place variants (``aten::add_``) use the rule of their functional op.
Ops tagged ``torch.Tag.pointwise`` that have no rule of their own use the pointwise rule.
A missing rule is an error, never a guess.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

from ..dimmap import Coupling

__all__ = ["register", "lookup", "op_name", "Rule"]

Rule = Callable[[torch.fx.Node], Coupling]
_RULES: dict[str, Rule] = {}
_POINTWISE: list[Rule] = []


def register(*names: str) -> Callable[[Rule], Rule]:
    """Register a rule for aten ops given by schema name (``"aten::linear"``)."""

    def decorate(rule: Rule) -> Rule:
        for name in names:
            if name in _RULES:
                raise ValueError(f"a rule for {name!r} is already registered")
            _RULES[name] = rule
        return rule

    return decorate


def register_pointwise(rule: Rule) -> Rule:
    """Register the fallback rule for ops tagged ``torch.Tag.pointwise``."""
    _POINTWISE.append(rule)
    return rule


def op_name(target: object) -> str:
    """``"aten::view"`` for ``torch.ops.aten.view.default``; ``repr`` for anything else."""
    schema = getattr(target, "_schema", None)
    return schema.name if schema is not None else getattr(target, "__name__", repr(target))


def lookup(target: object) -> Rule | None:
    """The rule for an op, or ``None`` when there is none."""
    name = op_name(target)
    rule = _RULES.get(name) or (_RULES.get(name[:-1]) if name.endswith("_") else None)
    if rule is not None:
        return rule
    tags = getattr(target, "tags", ())
    if torch.Tag.pointwise in tags and _POINTWISE:
        return _POINTWISE[0]
    return None


def registered() -> list[str]:
    """Names of all ops with a rule of their own (for documentation and tests)."""
    return sorted(_RULES)
