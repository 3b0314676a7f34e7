"""Selection of units to remove: targets, constraints, rankings, layer specs (Hypothesis)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pruning.selection import (
    CHANNEL_KINDS,
    KINDS,
    LLM_PRUNER_LAYERS,
    parse_layers,
    removed_params,
    select_plan,
)

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class FakeGroup:
    """The attributes of :class:`depgraph.groups.Group` that selection reads."""

    id: str
    kind: str
    layer: int | None
    num_units: int
    params_per_unit: int


@st.composite
def problems(draw, kinds=KINDS):
    """Groups, one score array per group, and the model size."""
    count = draw(st.integers(1, 7))
    groups, scores = [], {}
    for index in range(count):
        kind = draw(st.sampled_from(kinds))
        layer = None if kind == "hidden" else draw(st.integers(0, 4))
        group = FakeGroup(f"g{index}", kind, layer, draw(st.integers(1, 40)),
                          draw(st.integers(1, 300)))
        ties = draw(st.booleans())  # few distinct values: many exact ties
        element = st.integers(0, 3).map(float) if ties else st.floats(0, 1e3)
        values = draw(st.lists(element, min_size=group.num_units, max_size=group.num_units))
        scale = draw(st.sampled_from([1e-3, 1.0, 1e4]))  # groups on different scales
        groups.append(group)
        scores[group.id] = np.array(values) * scale
    total = sum(g.num_units * g.params_per_unit for g in groups) + draw(st.integers(0, 5000))
    return groups, scores, total


def capacity(group, round_to: int = 1, min_keep: int = 1) -> int:
    """Most units a group may lose (reference implementation)."""
    floor = max(min_keep, 1)
    if group.kind in CHANNEL_KINDS:
        floor = math.ceil(floor / round_to) * round_to
    return max(group.num_units - floor, 0)


def check_constraints(groups, plan, round_to=1, min_keep=1, kinds=None, layers=None):
    by_id = {g.id: g for g in groups}
    for group_id, units in plan.items():
        group = by_id[group_id]
        assert units == sorted(set(units)) and units and 0 <= units[0] and units[-1] < group.num_units
        kept = group.num_units - len(units)
        assert kept >= max(min_keep, 1)
        if group.kind in CHANNEL_KINDS:
            assert kept % round_to == 0
        if kinds is not None:
            assert group.kind in kinds
        if layers is not None and group.layer is not None:
            assert group.layer in layers


def ranked_scores(groups, scores, normalise):
    out = {}
    for group in groups:
        values = scores[group.id]
        nonzero = np.abs(values)[np.abs(values) > 0]
        scale = np.exp(np.log(nonzero).mean()) if nonzero.size else 0.0  # geometric mean
        out[group.id] = values / scale if normalise and scale > 0 else values
    return out


# ------------------------------------------------------------------------------- global
@SETTINGS
@given(problem=problems(), ratio=st.floats(0.01, 0.95), ranking=st.sampled_from(["global", "global_raw"]))
def test_global_hits_target_within_one_unit(problem, ratio, ranking):
    groups, scores, total = problem
    kinds = set(KINDS)
    eligible = list(groups)
    removable = sum(capacity(g) * g.params_per_unit for g in eligible)
    if removable < ratio * total:
        with pytest.raises(ValueError, match=f"ratio {ratio} cannot be reached: at most"):
            select_plan(groups, scores, ratio=ratio, total_params=total, kinds=kinds, ranking=ranking)
        return
    plan = select_plan(groups, scores, ratio=ratio, total_params=total, kinds=kinds, ranking=ranking)
    check_constraints(groups, plan)
    removed = removed_params(groups, plan)
    assert ratio * total <= removed < ratio * total + max(g.params_per_unit for g in eligible)
    # lowest first: nothing kept (where more could go) ranks below anything removed
    ranked = ranked_scores(groups, scores, ranking == "global")
    gone = [ranked[g.id][u] for g in groups for u in plan.get(g.id, [])]
    kept = [ranked[g.id][u] for g in groups if len(plan.get(g.id, [])) < capacity(g)
            for u in sorted(set(range(g.num_units)) - set(plan.get(g.id, [])))]
    if gone and kept:
        assert max(gone) <= min(kept) * (1 + 1e-12)
    assert plan == select_plan(groups, scores, ratio=ratio, total_params=total, kinds=kinds,
                               ranking=ranking)


@SETTINGS
@given(problem=problems(kinds=("mlp", "hidden", "kv_group")), ratio=st.floats(0.01, 0.9),
       round_to=st.integers(1, 8), min_keep=st.integers(1, 5),
       ranking=st.sampled_from(["global", "global_raw", "local"]))
def test_round_to_and_min_keep(problem, ratio, round_to, min_keep, ranking):
    groups, scores, total = problem
    kinds = {"mlp", "hidden", "kv_group"}
    removable = sum(capacity(g, round_to, min_keep) * g.params_per_unit for g in groups)
    assume(removable >= ratio * total)
    plan = select_plan(groups, scores, ratio=ratio, total_params=total, kinds=kinds,
                       ranking=ranking, round_to=round_to, min_keep=min_keep)
    check_constraints(groups, plan, round_to, min_keep)
    removed = removed_params(groups, plan)
    assert removed >= ratio * total
    if ranking != "local":  # one chunk (at most round_to units) past the target
        assert removed < ratio * total + round_to * max(g.params_per_unit for g in groups)


@SETTINGS
@given(problem=problems(), ratio=st.floats(0.01, 0.5), start=st.integers(0, 3),
       kinds=st.sets(st.sampled_from(KINDS), min_size=1))
def test_layers_and_kinds_respected(problem, ratio, start, kinds):
    groups, scores, total = problem
    layers = range(start, start + 2)
    eligible = [g for g in groups if g.kind in kinds and (g.layer is None or g.layer in layers)]
    removable = sum(capacity(g) * g.params_per_unit for g in eligible)
    if removable < ratio * total:
        with pytest.raises(ValueError, match=r"removable with kinds .* and layers range\("):
            select_plan(groups, scores, ratio=ratio, total_params=total, layers=layers, kinds=kinds)
        return
    plan = select_plan(groups, scores, ratio=ratio, total_params=total, layers=layers, kinds=kinds)
    check_constraints(groups, plan, kinds=kinds, layers=layers)
    assert removed_params(groups, plan) >= ratio * total
    only_eligible = {g.id: scores[g.id] for g in eligible}  # other groups need no scores
    assert plan == select_plan(groups, only_eligible, ratio=ratio, total_params=total,
                               layers=layers, kinds=kinds)


# ------------------------------------------------------------------------------- local
@SETTINGS
@given(problem=problems(kinds=("mlp", "attention_head", "kv_group")), ratio=st.floats(0.01, 0.9))
def test_local_removes_equal_fractions(problem, ratio):
    groups, scores, total = problem
    assume(sum(capacity(g) * g.params_per_unit for g in groups) >= ratio * total)
    plan = select_plan(groups, scores, ratio=ratio, total_params=total, ranking="local")
    check_constraints(groups, plan)
    assert removed_params(groups, plan) >= ratio * total
    counts = {g.id: len(plan.get(g.id, [])) for g in groups}
    # one fraction f, every group removing ceil(f * n) units (or all it may): pairwise,
    # (c_a - 1) / n_a < f <= c_b / n_b for every uncapped group b
    below = max((counts[g.id] - 1) / g.num_units for g in groups)
    for group in groups:
        if counts[group.id] < capacity(group):
            assert below < counts[group.id] / group.num_units + 1e-12
    # a smaller common fraction would not have reached the target
    smaller = sum(min(math.ceil(below * g.num_units - 1e-9), capacity(g)) * g.params_per_unit
                  for g in groups)
    assert smaller < ratio * total
    for group in groups:  # each group drops its own lowest-scored units
        units = plan.get(group.id, [])
        rest = sorted(set(range(group.num_units)) - set(units))
        if units:
            assert max(scores[group.id][units]) <= min(scores[group.id][rest])


def test_kind_ratios_per_group():
    groups = [FakeGroup("a", "mlp", 0, 40, 3), FakeGroup("b", "mlp", 1, 10, 3),
              FakeGroup("k", "kv_group", 0, 4, 100), FakeGroup("h", "hidden", None, 16, 50)]
    scores = {g.id: np.arange(g.num_units, 0, -1, dtype=float) for g in groups}
    plan = select_plan(groups, scores, kind_ratios={"mlp": 0.3, "kv_group": 0.25},
                       total_params=10_000)
    assert {k: len(v) for k, v in plan.items()} == {"a": 12, "b": 3, "k": 1}
    assert plan["k"] == [3] and plan["b"] == [7, 8, 9]  # the lowest scores go
    rounded = select_plan(groups, scores, kind_ratios={"mlp": 0.3}, total_params=10_000,
                          round_to=8)
    assert {k: len(v) for k, v in rounded.items()} == {"a": 8, "b": 2}  # 12 is as near 8 as 16
    # kinds allowed but not named by kind_ratios keep all their units
    only_mlp = select_plan(groups, scores, kind_ratios={"mlp": 0.3}, total_params=10_000,
                           kinds={"mlp", "kv_group"})
    assert set(only_mlp) == {"a", "b"}
    with pytest.raises(ValueError, match=r"kind_ratios names kinds \['hidden'\] that are not in"):
        select_plan(groups, scores, kind_ratios={"hidden": 0.1}, total_params=10_000,
                    kinds={"mlp"})


# ------------------------------------------------------------------------------- ties, errors
def test_ties_broken_by_group_order_then_unit_index():
    groups = [FakeGroup("first", "mlp", 0, 6, 10), FakeGroup("second", "mlp", 1, 6, 10)]
    scores = {"first": np.ones(6), "second": np.ones(6)}
    plan = select_plan(groups, scores, ratio=0.35, total_params=120)
    assert plan == {"first": [0, 1, 2, 3, 4]}  # 42 needed: 5 units, never the last one
    plan = select_plan(groups, scores, ratio=0.5, total_params=120)
    assert plan == {"first": [0, 1, 2, 3, 4], "second": [0]}


def test_global_normalises_scales_and_global_raw_does_not():
    groups = [FakeGroup("small", "mlp", 0, 4, 1), FakeGroup("large", "mlp", 1, 4, 1)]
    scores = {"small": np.array([1.0, 2.0, 3.0, 4.0]) * 1e-3, "large": np.array([4.0, 1.0, 2.0, 3.0])}
    assert select_plan(groups, scores, ratio=0.25, total_params=8, ranking="global") == \
        {"small": [0], "large": [1]}
    assert select_plan(groups, scores, ratio=0.25, total_params=8, ranking="global_raw") == \
        {"small": [0, 1]}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ratio": 0.0}, r"ratio must be in \(0, 1\), got 0.0"),
    ({"ratio": 1.0}, r"ratio must be in \(0, 1\), got 1.0"),
    ({"ratio": -0.2}, r"ratio must be in \(0, 1\), got -0.2"),
    ({}, "pass exactly one of ratio"),
    ({"ratio": 0.1, "kind_ratios": {"mlp": 0.1}}, "pass exactly one of ratio"),
    ({"kind_ratios": {"mlp": 1.0}}, r"kind_ratios\['mlp'\] must be in \[0, 1\), got 1.0"),
    ({"ratio": 0.1, "kinds": {"mlp", "heads"}}, r"unknown group kinds \['heads'\]"),
    ({"ratio": 0.1, "kinds": "mlp"}, "kinds must be a set of kind names"),
    ({"ratio": 0.1, "round_to": 0}, "round_to must be an integer >= 1, got 0"),
    ({"ratio": 0.1, "min_keep": 0}, "min_keep must be an integer >= 1, got 0"),
    ({"ratio": 0.1, "ranking": "best"}, "ranking must be one of .*, got 'best'"),
    ({"ratio": 0.1, "total_params": 0}, "total_params must be an integer >= 1, got 0"),
    ({"ratio": 0.9, "kinds": {"mlp"}}, r"ratio 0.9 cannot be reached: at most 0.47 of the "
                                       r"parameters are removable with kinds \['mlp'\] and all layers"),
])
def test_bad_options(kwargs, match):
    groups = [FakeGroup("m", "mlp", 0, 16, 5), FakeGroup("k", "kv_group", 0, 2, 40)]
    scores = {"m": np.arange(16.0), "k": np.arange(2.0)}
    with pytest.raises(ValueError, match=match):
        select_plan(groups, scores, **{"total_params": 160, **kwargs})


def test_bad_scores():
    groups = [FakeGroup("m", "mlp", 0, 4, 5)]
    with pytest.raises(ValueError, match="no scores for eligible group 'm'"):
        select_plan(groups, {}, ratio=0.1, total_params=20)
    with pytest.raises(ValueError, match="have 3 entries, expected 4"):
        select_plan(groups, {"m": np.ones(3)}, ratio=0.1, total_params=20)
    with pytest.raises(ValueError, match="NaN"):
        select_plan(groups, {"m": np.array([1.0, np.nan, 1.0, 1.0])}, ratio=0.1, total_params=20)
    with pytest.raises(ValueError, match="plan names group 'x'"):
        removed_params(groups, {"x": [0]})


# ------------------------------------------------------------------------------- layers
@pytest.mark.parametrize(("spec", "num_layers", "expected"), [
    ("all", 5, range(5)), ("", 5, range(5)), (":", 5, range(5)), ("5", 8, range(5, 6)),
    ("-1", 8, range(7, 8)), ("3:-2", 10, range(3, 8)), ("4:", 6, range(4, 6)),
    (":2", 6, range(0, 2)), ("0:6:2", 6, range(0, 6, 2)), (LLM_PRUNER_LAYERS, 32, range(4, 30)),
])
def test_parse_layers(spec, num_layers, expected):
    assert parse_layers(spec, num_layers) == expected


@pytest.mark.parametrize(("spec", "match"), [
    ("x", "bad layer spec 'x': expected 'all'"), ("1:2:3:4", "bad layer spec '1:2:3:4'"),
    ("9", r"layer 9 in spec '9' is out of range \(expected -8 <= layer < 8\)"),
    ("5:5", "selects no block"), ("0:4:0", "the step must be >= 1"), ("a:3", "bad layer spec 'a:3'"),
])
def test_parse_layers_rejects(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_layers(spec, 8)


# ------------------------------------------------------------------------------- real graph
def test_real_llama_groups_prune_to_the_target():
    from archs import tiny_model

    from depgraph import build_graph
    from pruning import apply_plan

    torch.set_num_threads(1)
    model = tiny_model("llama")
    graph = build_graph(model)
    groups = graph.groups()
    rng = np.random.default_rng(0)
    scores = {g.id: rng.random(g.num_units) for g in groups}
    total = sum(p.numel() for p in model.parameters())
    plan = select_plan(groups, scores, ratio=0.2, total_params=total, round_to=4)
    check_constraints(groups, plan, round_to=4, kinds={"mlp", "kv_group", "attention_head"})
    assert {g.kind for g in groups if g.id in plan} <= {"mlp", "kv_group"}
    removed = removed_params(groups, plan)
    assert 0.2 * total <= removed
    apply_plan(model, plan, graph)
    assert sum(p.numel() for p in model.parameters()) == total - removed  # groups do not overlap
    model(torch.tensor([[1, 2, 3, 4]]))


def test_the_group_scale_is_robust_to_a_few_huge_scores():
    """A block's few massive-activation channels must not make its other units look tiny."""
    from pruning.selection import group_scale

    typical = np.full(99, 2.0)
    assert group_scale(np.concatenate([[1e9], typical])) < 2.5  # the mean would be ~1e7
    assert group_scale(np.array([0.0, 4.0, 1.0])) == pytest.approx(2.0)  # zeros ignored
    assert group_scale(np.zeros(3)) == 0.0
    assert group_scale(np.array([-3.0, 3.0])) == pytest.approx(3.0)
