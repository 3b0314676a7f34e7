"""``apply_plan``'s refusals leave the model as it was; regressions of plans that failed."""

from __future__ import annotations

import copy

import pytest
import torch
from archs import Dims, tiny_model

from depgraph import PlanError, build_graph
from pruning import apply_plan, zero_plan

torch.set_num_threads(1)


def _snapshot(model):
    return ({n: p.detach().clone() for n, p in model.state_dict().items()},
            model.config.to_dict(),
            {path: dict(vars(m)) for path, m in model.named_modules()})


def _assert_unchanged(model, snapshot):
    state, config, attributes = snapshot
    after = model.state_dict()
    assert set(after) == set(state)
    assert all(after[n].shape == state[n].shape and torch.equal(after[n], state[n]) for n in state)
    assert model.config.to_dict() == config
    for path, module in model.named_modules():
        plain = {k: v for k, v in attributes[path].items() if isinstance(v, (int, float, str, tuple))}
        assert {k: getattr(module, k) for k in plain} == plain, path


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    return model, build_graph(model)


@pytest.mark.parametrize("plan, message", [
    ({"model.layers.9.mlp": [0]}, "unknown group 'model.layers.9.mlp'"),
    ({"model.layers.0.mlp": [24]}, "unit 24 is out of range"),
    ({"model.layers.0.mlp": [-1]}, "unit -1 is out of range"),
    ({"model.layers.0.mlp": list(range(24))}, "removes all 24 units"),
    ({"model.layers.0.mlp": [0], "model.layers.0.self_attn": [0, 1]}, "removes all 2 units"),
])
def test_bad_plans_are_refused_before_anything_changes(llama, plan, message):
    model, graph = llama
    model = copy.deepcopy(model)
    snapshot = _snapshot(model)
    with pytest.raises(PlanError, match=message):
        apply_plan(model, plan, graph)
    _assert_unchanged(model, snapshot)


def test_plan_that_is_not_a_dict_is_refused(llama):
    model, graph = llama
    with pytest.raises(PlanError, match="plan must be a dict"):
        apply_plan(copy.deepcopy(model), [("model.layers.0.mlp", [0])], graph)


def test_a_refusal_after_slicing_restores_every_tensor(monkeypatch):
    """When no module attributes fit (checked only after slicing), nothing stays sliced."""
    model = tiny_model("gpt2")  # GPT-2 derives head_dim: attributes, not the config, change
    graph = build_graph(model)
    snapshot = _snapshot(model)

    def refuse(*_args, **_kwargs):
        raise PlanError("no setting of module attributes fits")

    monkeypatch.setattr("pruning.apply.sync_by_extent", refuse)
    with pytest.raises(PlanError, match="no setting"):
        apply_plan(model, {"transformer.h.0.attn": [1]}, graph)
    _assert_unchanged(model, snapshot)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))  # still the model it was


def test_falcon_with_as_many_kv_heads_as_heads_prunes_blocks_differently():
    """Found by the property test: blocks that lose different head counts used to find no
    attribute setting, because one new value was tried for every block at once."""
    dims = Dims(hidden_heads=6, kv_heads=6, head_dim=4, intermediate=3, layers=2)
    model = tiny_model("falcon", dims, seed=835)
    graph = build_graph(model)
    plan = {"transformer.h.0.self_attention": [0, 2], "transformer.h.1.self_attention": [2],
            "transformer.h.0.mlp": list(range(0, 96, 3))}
    ids = torch.randint(0, dims.vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    pruned = apply_plan(copy.deepcopy(model), plan, graph)
    zeroed = zero_plan(copy.deepcopy(model), plan, graph)
    assert [m.num_heads for m in (pruned.transformer.h[0].self_attention,
                                  pruned.transformer.h[1].self_attention)] == [4, 5]
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, zeroed(ids).logits, atol=1e-9, rtol=0)


def test_a_config_that_its_class_refuses_is_not_saved_as_exact(tmp_path):
    """Found by the property test: 3 of 4 heads of 4 with hidden 16 is a valid model, but
    LlamaConfig refuses hidden % heads != 0 when saving and loading. The folder must then
    record the plan on the original config, and load_pruned must rebuild it."""
    from pruning import load_pruned, save_pruned

    dims = Dims(hidden_heads=4, kv_heads=4, head_dim=4, intermediate=3, layers=1)
    model = tiny_model("llama", dims, seed=8427)
    graph = build_graph(model)
    pruned = apply_plan(copy.deepcopy(model), {"model.layers.0.self_attn": [1]}, graph)
    assert pruned.config.depgraph["config_exact"] is False
    out = save_pruned(pruned, tmp_path / "model")
    ids = torch.randint(0, dims.vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(load_pruned(out, dtype=torch.float64)(ids).logits,
                              pruned(ids).logits, atol=1e-9, rtol=0)
