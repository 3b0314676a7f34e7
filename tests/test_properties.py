"""Property tests of the whole engine: any architecture, any small config, any plan.

Oracle: for groups where zeroing equals removing, a physically pruned model must give the
same logits as the original with the same slices zeroed. Around it: parameter counts drop
by exactly what ``slices`` predicts, the pruned model's graph has the same groups with fewer
units, and save -> load round-trips the logits.
"""

from __future__ import annotations

import copy
import os
import random
import tempfile

import pytest
import torch
from archs import ARCHS, GQA_ARCHS, Dims, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depgraph import build_graph
from pruning import apply_plan, load_pruned, plan_slices, save_pruned, zero_plan

torch.set_num_threads(1)


def _tolerance(model) -> float:
    return 1e-9 if next(model.parameters()).dtype == torch.float64 else 2e-5


def _input_ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


def _random_plan(graph, rng: random.Random, zero_only: bool, with_hidden: bool,
                 align: int = 1) -> dict:
    """Random units of random groups; ``align``: kept channel widths stay multiples of it."""
    plan = {}
    for group in graph.groups():
        if zero_only and not group.zero_equivalent:
            continue
        if group.kind == "hidden" and not with_hidden:
            continue
        if rng.random() < 0.3:
            continue
        count = rng.randint(1, max(1, group.num_units - 1))
        if align > 1 and group.kind not in ("attention_head", "kv_group", "expert"):
            count += (group.num_units - count) % align
            if count <= 0 or count >= group.num_units:
                continue
        plan[group.id] = rng.sample(range(group.num_units), count)
    return plan


def _check_pruning(arch: str, dims: Dims, seed: int, tmp_path, with_hidden: bool = False) -> None:
    model = tiny_model(arch, dims, seed=seed)
    graph = build_graph(model)
    rng = random.Random(seed)
    # torch's grouped-mm MoE kernel needs 16-byte aligned expert widths
    plan = _random_plan(graph, rng, zero_only=True, with_hidden=with_hidden,
                        align=4 if arch == "mixtral" else 1)
    ids = _input_ids(dims.vocab, seed)
    expected_shapes = {name: list(p.shape) for name, p in model.named_parameters()}
    for (name, dim), indices in plan_slices(graph, plan).items():
        expected_shapes[name][dim] -= len(indices)

    zeroed = zero_plan(copy.deepcopy(model), plan, graph)
    pruned = apply_plan(copy.deepcopy(model), plan, graph)
    with torch.no_grad():
        reference, logits = zeroed(ids).logits, pruned(ids).logits
    assert logits.shape == reference.shape
    assert torch.allclose(logits, reference, atol=_tolerance(model), rtol=0), (
        f"{arch}: pruned != zeroed, max diff {(logits - reference).abs().max():.3g}")
    assert {n: list(p.shape) for n, p in pruned.named_parameters()} == expected_shapes
    assert sum(p.numel() for p in pruned.parameters()) == sum(
        torch.Size(s).numel() for s in expected_shapes.values())

    rebuilt = {g.id: g.num_units for g in build_graph(pruned).groups()}
    for group in graph.groups():  # a group left with one unit has nothing left to prune
        assert rebuilt.get(group.id, 1) == group.num_units - len(set(plan.get(group.id, ())))
    assert set(rebuilt) <= {g.id for g in graph.groups()}

    out = save_pruned(pruned, tempfile.mkdtemp(dir=tmp_path) + "/model")
    reloaded = load_pruned(out, dtype=next(model.parameters()).dtype)
    with torch.no_grad():  # identical up to float32 rounding inside norms that upcast (Gemma)
        assert torch.allclose(reloaded(ids).logits, logits, atol=1e-6, rtol=0)
    if getattr(pruned.config, "depgraph", {"config_exact": True})["config_exact"]:  # then no custom code is needed at all
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(out, dtype=next(model.parameters()).dtype)
        with torch.no_grad():
            assert torch.allclose(plain(ids).logits, logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_prunes_exactly(arch, tmp_path):
    _check_pruning(arch, Dims(), seed=1, tmp_path=tmp_path, with_hidden=True)


def _dims():
    return st.builds(
        lambda heads, kv_div, head_dim, inter, layers, tied, bias: Dims(
            hidden_heads=heads, kv_heads=max(1, heads // kv_div), head_dim=head_dim,
            intermediate=inter, layers=layers, tied=tied, bias=bias),
        heads=st.sampled_from([2, 4, 6]), kv_div=st.sampled_from([1, 2]),
        head_dim=st.sampled_from([4, 8]), inter=st.integers(3, 20),
        layers=st.integers(1, 2), tied=st.booleans(), bias=st.booleans())


# DEPGRAPH_PROPERTY_EXAMPLES=500 runs a longer search than CI's 20 examples
@settings(max_examples=int(os.environ.get("DEPGRAPH_PROPERTY_EXAMPLES", "20")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arch=st.sampled_from(ARCHS), dims=_dims(), seed=st.integers(0, 10_000),
       with_hidden=st.booleans())
def test_random_configs_and_plans(arch, dims, seed, with_hidden, tmp_path):
    if arch not in GQA_ARCHS:
        dims = Dims(**{**dims.__dict__, "kv_heads": dims.hidden_heads})
    if arch == "mixtral":  # grouped-mm kernels want 16-byte aligned expert widths
        dims = Dims(**{**dims.__dict__, "intermediate": 4 * ((dims.intermediate + 3) // 4)})
    _check_pruning(arch, dims, seed, tmp_path, with_hidden=with_hidden)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_model_is_not_modified_by_build_graph(arch):
    model = tiny_model(arch).train()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    dtype = next(model.parameters()).dtype
    build_graph(model)
    assert model.training
    assert next(model.parameters()).dtype == dtype
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_groups_are_deterministic():
    model = tiny_model("qwen3")
    first = [g.to_dict() for g in build_graph(model).groups()]
    second = [g.to_dict() for g in build_graph(model).groups()]
    assert first == second


def test_the_users_hooks_neither_run_on_the_trace_nor_go_away():
    model = tiny_model("llama")
    seen = []
    handle = model.model.layers[0].mlp.register_forward_hook(lambda m, a, o: seen.append(o.device))
    build_graph(model)
    assert seen == []  # the meta trace did not call it
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long))
    assert seen == [torch.device("cpu")]
    handle.remove()
