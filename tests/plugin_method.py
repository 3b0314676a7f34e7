"""A pruning method written as another author would write it: only names that README.md
documents in "Writing a pruning method" (``tests/test_extension_api.py`` checks the imports).

The method scores each channel a layer reads by its input energy times the energy of the
weight column that reads it, ``E[x_j²] · ||W[:, j]||²``, chooses a plan without applying it,
and applies it with bias compensation. The CLI uses it as
``depgraph prune MODEL --importance plugin_method:output_energy``.
"""

from __future__ import annotations

import numpy as np
import torch

from depgraph import Role, build_graph
from pruning import (
    ScoringContext,
    apply_plan,
    compensation_biases,
    input_statistics,
    register_importance,
    score_groups,
    select_plan,
)

NAME = "plugin_output_energy"
KINDS = ("mlp", "attention_head", "kv_group")


def _energy_along(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of w² over every axis but ``dim``: one number per position along ``dim``."""
    squares = weight.detach().double() ** 2
    return squares.sum(dim=[d for d in range(squares.dim()) if d != dim])


# replace=True: re-importing this module (a second test, the CLI) registers it again
@register_importance(NAME, needs_data=True, ranking="global_raw", replace=True,
                     summary="input energy x weight-column energy of every channel read")
def output_energy(ctx: ScoringContext) -> dict[str, np.ndarray]:
    """Per unit: Σ E[x_j²] · ||W[:, j]||² over its channels and over the layers that read
    the group; a group no plain layer reads (stacked experts) by its producers' energy."""
    params = dict(ctx.model.named_parameters())
    feeds = ctx.input_stats()
    scores = {}
    for group in ctx.groups:
        total = np.zeros(group.num_units)
        for feed in feeds[group.id]:
            columns = _energy_along(params[feed.member.param], feed.member.dim)
            total += group.unit_sums(feed.member, feed.stats.second_moment * columns)
        if not feeds[group.id]:
            for member in group.members_with(Role.PRODUCER):
                total += group.unit_sums(member, _energy_along(params[member.param], member.dim))
        scores[group.id] = total
    return scores


def consumers(graph, group_id: str) -> dict[str, int]:
    """``{module path: weight axis}`` of the layers that read the group's channels."""
    return {path: member.dim for member in graph.group(group_id).members_with(Role.CONSUMER)
            for path in member.modules(Role.CONSUMER)}


def choose(model: torch.nn.Module, tokens: torch.Tensor, ratio: float, graph=None
           ) -> dict[str, list[int]]:
    """The plan that removes ``ratio`` of the parameters by :func:`output_energy`; the model
    is not changed."""
    graph = graph or build_graph(model)
    groups = [group for group in graph.groups() if group.kind in KINDS]
    scores = score_groups(ScoringContext(model, graph, groups, tokens=tokens), output_energy)
    total = sum(p.numel() for p in model.parameters())
    return select_plan(groups, scores, ratio=ratio, total_params=total, kinds=KINDS,
                       ranking="global_raw")


def prune_compensated(model: torch.nn.Module, tokens: torch.Tensor, ratio: float
                      ) -> dict[str, list[int]]:
    """Choose a plan, then remove it with bias compensation measured on ``tokens``."""
    graph = build_graph(model)
    plan = choose(model, tokens, ratio, graph)
    stats = input_statistics(model, [graph.group(group_id) for group_id in plan], tokens)
    apply_plan(model, plan, graph, biases=compensation_biases(model, plan, stats, graph))
    return plan
