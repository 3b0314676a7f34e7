"""Groups whose removal the model's own code cannot follow are not offered to any pruner."""

from __future__ import annotations

import copy

import pytest
import torch
from archs import tiny_model

from depgraph import Kind, PlanError, build_graph
from evaluation.cycle import build_tiny_model, cycle_row, tiny_dense_model
from evaluation.tiny_config import tiny_config
from pruning import apply_plan, prune
from pruning.probe import exclude_unprunable, fragile_modules, probe_plan
from pruning.prune import PruneSettings, eligible_groups

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trocr():
    """TrOCR's attention reshapes its output to the size of its *input*: no head can go
    while the hidden size stays, whatever the attributes say."""
    model = tiny_dense_model("trocr")
    graph = build_graph(model)
    heads = [g.id for g in graph.groups() if g.kind == Kind.ATTENTION_HEAD]
    return model, graph, heads, exclude_unprunable(model, graph)


def test_heads_that_the_code_cannot_follow_are_excluded_with_a_reason(trocr):
    trocr, graph, heads, excluded = trocr
    assert heads
    assert set(heads) <= set(excluded)
    assert all("cannot follow" in excluded[h] for h in heads)
    assert not any(g.kind == Kind.ATTENTION_HEAD for g in graph.groups())
    assert graph.excluded() == excluded
    assert any(g.kind == Kind.MLP for g in graph.groups())  # the MLPs still prune
    with pytest.raises(PlanError, match="excluded"):
        apply_plan(trocr, {heads[0]: [0]}, graph)


def test_prune_uses_only_what_the_probe_kept(trocr):
    model, graph, _, _ = trocr
    result = prune(copy.deepcopy(model), ratio=0.1, importance="l2", kinds=("mlp", "attention"),
                   graph=graph)
    assert result.plan and all("self_attn" not in gid for gid in result.plan)
    with torch.no_grad():
        assert torch.isfinite(result.model(torch.zeros(1, 5, dtype=torch.long)).logits).all()


def test_a_family_the_code_follows_loses_nothing():
    model = tiny_model("qwen3")
    graph = build_graph(model)
    before = [g.id for g in graph.groups()]
    assert exclude_unprunable(model, graph) == {}
    assert [g.id for g in graph.groups()] == before
    settings = PruneSettings(kinds=("mlp",))
    assert [g.id for g in eligible_groups(graph, settings, model)] == \
        [g.id for g in graph.groups() if g.kind == Kind.MLP]


def test_the_probe_removes_what_each_group_allows():
    graph = build_graph(tiny_model("mixtral"))
    plan = probe_plan(graph.groups())
    for group in graph.groups():
        kept = group.num_units - len(plan[group.id])
        assert group.allows(kept) and kept < group.num_units


def test_attributes_a_forward_or_a_reload_would_lose_are_not_offered():
    """BigBird swaps its attention for one built from the config when the input is short. A
    model fresh from its config: the trace sees the swap. The same model after a forward: it
    holds another attention class than its config builds, which is what a reload gets. Either
    way the head count set on that module would be lost, so heads are not offered (with the
    reason); the MLPs still are, and the whole cycle (save, reload, run) passes."""
    fresh = build_tiny_model(tiny_config("big_bird"), dtype=torch.float64, seed=0)
    graph = build_graph(fresh)
    assert graph.trace.replaced and all(p.endswith("attention.self") for p in graph.trace.replaced)
    warm = tiny_dense_model("big_bird")  # has run a forward: the swap happened
    warm_graph = build_graph(warm)
    assert not warm_graph.trace.replaced
    fragile = fragile_modules(warm, warm_graph)
    assert set(fragile) == set(graph.trace.replaced), fragile
    excluded = exclude_unprunable(warm, warm_graph)
    heads = [g for g in excluded if "attention" in g]
    assert heads and all("would be lost" in excluded[g] for g in heads), excluded
    assert any(g.kind == Kind.MLP for g in warm_graph.groups())
    assert cycle_row("big_bird").status == "pass"


def test_a_forward_that_sizes_its_state_from_the_config_is_probed():
    """RWKV builds its recurrent state from ``config.hidden_size`` when it runs with its
    cache (as users run it; the trace does not). The probe runs each pruned copy so, on meta
    tensors: hidden and attention widths are excluded with the run's error, the
    feed-forward channels still prune and the pruned model runs."""
    model = tiny_dense_model("rwkv")
    graph = build_graph(model)
    excluded = exclude_unprunable(model, graph)
    assert "hidden" in excluded and "own forward fails" in excluded["hidden"], excluded
    assert all(g.kind == Kind.MLP and "feed_forward" in g.id for g in graph.groups())
    group = graph.groups()[0]
    apply_plan(model, {group.id: list(range(group.num_units // 2))}, graph)
    model(torch.zeros(1, 5, dtype=torch.long))
