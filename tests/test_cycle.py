"""What a user walks away with: each class of failure the whole cycle once had, as a test.

The property tests (``test_properties.py``) walk the cycle on random configs of every family;
these pin down the individual promises: stable group ids, the saved dtype, constraints of
expert kernels, rollback when a pruned model fails its forward, norms without parameters,
every saved tensor restored, config edits kept, iterative pruning, and crashing rules
reported as bugs.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from archs import Dims, tiny_model
from torch import nn

import depgraph.graph
from depgraph import PlanError, RuleError, build_graph
from evaluation.cycle import random_plan
from pruning import (
    apply_plan,
    compensation_biases,
    input_statistics,
    load_pruned,
    prune,
    save_pruned,
    zero_plan,
)
from pruning.apply import add_biases, check_biases

torch.set_num_threads(1)


def _ids(vocab: int = 61) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=None):
    with torch.no_grad():
        return model(_ids() if ids is None else ids).logits


def _state(model):
    return ({n: p.detach().clone() for n, p in model.state_dict().items()},
            json.dumps(model.config.to_dict(), sort_keys=True, default=str))


def _same_state(model, state) -> bool:
    tensors, config = state
    after = model.state_dict()
    return (set(after) == set(tensors) and json.dumps(model.config.to_dict(), sort_keys=True,
                                                      default=str) == config
            and all(after[n].shape == t.shape and torch.equal(after[n], t) for n, t in tensors.items()))


# ------------------------------------------------------------------- group ids
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_the_hidden_group_is_named_hidden_in_every_build(arch, tmp_path):
    """Tied embeddings once named it after the module path ('model', 'transformer',
    'model.decoder'), and load_pruned's build (untied while constructing) called it 'hidden'."""
    model = tiny_model(arch, Dims(tied=True))
    graph = build_graph(model)
    assert [g.id for g in graph.groups() if g.kind == "hidden"] == ["hidden"]
    hidden = graph.group("hidden")
    pruned = apply_plan(copy.deepcopy(model), {"hidden": list(range(0, hidden.num_units, 5))}, graph)
    pruned.save_pretrained(tmp_path / "m")
    reloaded = load_pruned(tmp_path / "m")
    assert {g.id for g in build_graph(reloaded).groups()} == {g.id for g in build_graph(pruned).groups()}
    assert torch.allclose(_logits(reloaded), _logits(pruned), atol=1e-9, rtol=0)


# ------------------------------------------------------------ query heads (GQA)
@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma3_text"])
def test_query_heads_inside_kv_groups_are_units(arch, tmp_path):
    """Grouped-query attention (6 query heads, 2 KV heads): the KV groups keep their ids; a
    query_head group's unit is one query head of every KV group, so removing it leaves 2 KV
    heads of 2 query heads each: a valid config (plain from_pretrained reloads it), logits
    equal to the zeroed original; with a KV group removed too, 1 KV head of 2."""
    model = tiny_model(arch, Dims(hidden_heads=6, kv_heads=2))
    graph = build_graph(model)
    query = graph.group("model.layers.0.self_attn.query_head")
    assert query.kind == "query_head" and query.num_units == 3 and query.zero_equivalent
    assert graph.group("model.layers.0.self_attn").kind == "kv_group"
    rows = dict((param, idx.tolist()) for param, _, idx in query.slices([1]))
    q_rows = next(v for k, v in rows.items() if "q" in k.split(".")[-2])
    assert q_rows == list(range(8, 16)) + list(range(32, 40))  # head 1 of KV group 0, head 4 of 1
    uniform = {f"model.layers.{i}.self_attn.query_head": [1] for i in range(2)}
    both = {**uniform, "model.layers.1.self_attn": [0]}
    for plan in (uniform, both):
        pruned = apply_plan(copy.deepcopy(model), plan, graph)
        zeroed = zero_plan(copy.deepcopy(model), plan, graph)
        assert torch.allclose(_logits(pruned), _logits(zeroed), atol=1e-8)
    pruned = apply_plan(copy.deepcopy(model), uniform, graph)
    assert pruned.config.num_attention_heads == 4 and pruned.config.num_key_value_heads == 2
    pruned.save_pretrained(tmp_path / "m")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float64)
    assert torch.allclose(_logits(plain), _logits(pruned), atol=1e-8)
    again = build_graph(pruned).group("model.layers.0.self_attn.query_head")
    assert again.num_units == 2


def test_multi_query_attention_prunes_query_heads():
    """One KV head for all query heads: a KV group cannot go (it is the only one), so before
    query-head units the attention of such a model did not shrink at all."""
    model = tiny_model("llama", Dims(hidden_heads=4, kv_heads=1))
    graph = build_graph(model)
    assert graph.group("model.layers.0.self_attn.query_head").num_units == 4
    plan = {"model.layers.0.self_attn.query_head": [0, 2]}
    pruned = apply_plan(copy.deepcopy(model), plan, graph)
    assert torch.allclose(_logits(pruned), _logits(zero_plan(copy.deepcopy(model), plan, graph)),
                          atol=1e-8)
    assert pruned.model.layers[0].self_attn.q_proj.out_features == 2 * 8


@pytest.mark.parametrize("ranking", ["global", "allocate"])
def test_prune_chooses_between_kv_groups_and_query_heads(ranking, tmp_path):
    """``kinds`` with ``query_head``: the ranking (or the allocation) weighs KV groups, query
    heads and MLP channels together; the result saves and reloads exactly."""
    model = tiny_model("llama", Dims(hidden_heads=6, kv_heads=2), dtype=torch.float32)
    tokens = torch.randint(0, 61, (8, 16), generator=torch.Generator().manual_seed(0))
    result = prune(copy.deepcopy(model), 0.3, "second_moment", tokens=tokens, ranking=ranking,
                   kinds="mlp,kv_group,query_head")
    graph = build_graph(model)
    assert {graph.group(gid).kind for gid, units in result.plan.items() if units} <= {
        "mlp", "kv_group", "query_head"}
    attention = result.model.model.layers
    for layer in attention:  # every layer keeps whole KV groups of equally many query heads
        kv_rows = layer.self_attn.k_proj.out_features // 8
        assert layer.self_attn.q_proj.out_features % (8 * kv_rows) == 0
    result.model.save_pretrained(tmp_path / "m")
    reloaded = load_pruned(tmp_path / "m")
    assert torch.equal(_logits(reloaded), _logits(result.model))


# ----------------------------------------------------------------------- dtype
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_load_pruned_keeps_the_saved_dtype(dtype, tmp_path):
    model = tiny_model("llama", dtype=dtype)
    graph = build_graph(model)
    pruned = apply_plan(model, {"model.layers.0.mlp": [1, 2, 3]}, graph)  # not uniform
    pruned.save_pretrained(tmp_path / "m")
    assert load_pruned(tmp_path / "m").dtype == dtype
    assert load_pruned(tmp_path / "m", dtype=torch.float32).dtype == torch.float32


# -------------------------------------------------------------- expert kernels
def test_expert_groups_declare_what_their_kernels_need():
    model = tiny_model("mixtral")  # 4 experts, 2 per token, expert width 24, hidden 32
    graph = build_graph(model)
    experts = graph.group("model.layers.0.mlp")
    channels = graph.group("model.layers.0.mlp.experts")
    assert (experts.kind, experts.min_units, experts.multiple) == ("expert", 2, 1)
    assert (channels.kind, channels.multiple) == ("mlp", 8)
    assert graph.group("hidden").multiple == 8
    assert not experts.allows(1) and experts.allows(2)
    assert not channels.allows(20) and channels.allows(16) and channels.allows(24)
    assert experts.to_dict()["constraints"] and channels.to_dict()["multiple"] == 8


@pytest.mark.parametrize("plan, message", [
    ({"model.layers.0.mlp.experts": [0, 1, 2]}, "multiple of 8"),
    ({"model.layers.0.mlp": [0, 1, 2]}, "at least 2 units"),
    ({"hidden": [0]}, "multiple of 8"),
])
def test_a_plan_that_breaks_a_kernel_constraint_is_refused_untouched(plan, message):
    model = tiny_model("mixtral")
    graph = build_graph(model)
    state = _state(model)
    with pytest.raises(PlanError, match=message):
        apply_plan(model, plan, graph)
    assert _same_state(model, state)


def test_selection_keeps_expert_widths_aligned_and_the_model_runs():
    model = tiny_model("mixtral", Dims(intermediate=40))
    result = prune(model, ratio=0.3, importance="l2", kinds={"mlp", "expert", "kv_group"})
    graph = build_graph(model)
    dense = {g.id: g for g in graph.groups()}
    for group_id, units in result.plan.items():
        assert dense[group_id].allows(dense[group_id].num_units - len(units)), group_id
    assert torch.isfinite(_logits(result.model)).all()


def test_a_pruned_model_that_fails_its_forward_is_rolled_back(monkeypatch):
    """With the alignment rule switched off, the grouped-GEMM kernel itself refuses the
    unaligned width: apply_plan must say so and leave the model exactly as it was."""
    monkeypatch.setattr(depgraph.graph, "EXPERT_ROW_ALIGN", 1)
    model = tiny_model("mixtral")
    graph = build_graph(model)
    before, state = _logits(model), _state(model)
    with pytest.raises(PlanError, match="fails a forward pass .*16 bytes"):
        apply_plan(model, {"model.layers.0.mlp.experts": [0, 1, 2]}, graph)
    assert _same_state(model, state)
    assert torch.equal(_logits(model), before)


def test_the_users_hooks_do_not_see_the_forward_check():
    model = tiny_model("llama")
    calls = []
    model.model.layers[0].mlp.register_forward_hook(lambda *args: calls.append(1))
    apply_plan(model, {"model.layers.0.mlp": [0, 1]})
    assert calls == []
    _logits(model)
    assert calls == [1]


# --------------------------------------------------------------- module state
def test_a_norm_without_parameters_follows_hidden_pruning():
    model = tiny_model("gpt2")
    model.transformer.ln_f = nn.LayerNorm(model.config.n_embd, elementwise_affine=False).double()
    graph = build_graph(model)
    pruned = apply_plan(copy.deepcopy(model), {"hidden": [0, 3, 5]}, graph)
    assert pruned.transformer.ln_f.normalized_shape == (model.config.n_embd - 3,)
    assert torch.isfinite(_logits(pruned)).all()


def test_heads_as_many_as_head_dims_are_not_swapped():
    """4 heads of 4: removing 3 heads leaves '1 head of 4', which traces like '4 heads of 1'
    (the pruned model once ran with the wrong one and differed from the zeroed one)."""
    model = tiny_model("gpt2", Dims(hidden_heads=4, head_dim=4, kv_heads=4))
    graph = build_graph(model)
    plan = {"transformer.h.0.attn": [0, 1, 3]}
    pruned = apply_plan(copy.deepcopy(model), plan, graph)
    assert (pruned.transformer.h[0].attn.num_heads, pruned.transformer.h[0].attn.head_dim) == (1, 4)
    assert torch.allclose(_logits(pruned), _logits(zero_plan(copy.deepcopy(model), plan, graph)),
                          atol=1e-9, rtol=0)


# -------------------------------------------------------------------- reload
@pytest.mark.parametrize("uniform", [False, True], ids=["replayed", "exact-config"])
@pytest.mark.parametrize("save", ["save_pretrained", "save_pruned"])
def test_a_bias_added_after_pruning_survives_reload(save, uniform, tmp_path):
    model = tiny_model("llama")
    graph = build_graph(model)
    plan = ({f"model.layers.{i}.mlp": [0, 1] for i in range(2)} if uniform
            else {"model.layers.0.mlp": [0, 1]})
    pruned = apply_plan(model, plan, graph)
    assert pruned.config.depgraph["config_exact"] is uniform
    o_proj = pruned.model.layers[1].self_attn.o_proj
    o_proj.bias = nn.Parameter(torch.randn(o_proj.out_features, dtype=torch.float64))
    if save == "save_pretrained":
        pruned.save_pretrained(tmp_path / "m")
    else:
        save_pruned(pruned, tmp_path / "m")
    reloaded = load_pruned(tmp_path / "m")
    assert torch.equal(reloaded.model.layers[1].self_attn.o_proj.bias, o_proj.bias)
    assert torch.allclose(_logits(reloaded), _logits(pruned), atol=1e-9, rtol=0)


@pytest.mark.parametrize("save", ["save_pretrained", "save_pruned"])
def test_an_added_bias_on_a_layer_renamed_on_disk_reloads(save, tmp_path):
    """transformers saves GPT-NeoX's ``lm_head`` as ``embed_out`` and reports the unexpected
    key by its loaded name: compensating hidden channels adds ``lm_head.bias``."""
    model = tiny_model("gpt_neox")
    graph = build_graph(model)
    plan = {"hidden": [0]}
    stats = input_statistics(model, [graph.group("hidden")], _ids())
    apply_plan(model, plan, graph, biases=compensation_biases(model, plan, stats, graph))
    assert "lm_head.bias" in model.config.depgraph["added"]
    if save == "save_pretrained":
        model.save_pretrained(tmp_path / "m")
    else:
        save_pruned(model, tmp_path / "m")
    reloaded = load_pruned(tmp_path / "m")
    assert torch.equal(reloaded.lm_head.bias, model.lm_head.bias)
    saved, kept = dict(reloaded.named_parameters()), dict(model.named_parameters())
    assert saved.keys() == kept.keys()
    assert all(torch.equal(saved[name], kept[name]) for name in kept)
    # equal weights, equal logits up to float64 rounding: which kernel path a product takes
    # (and so its last bit) may depend on where the tensors lie in memory (seen on an AMD CPU)
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=1e-12, rtol=0)


def test_layers_that_share_a_weight_share_one_added_bias():
    """A block tied into several places (Zamba's shared transformer) holds one weight in
    several layers: compensation gives them one bias, the mean of their changes, set on each
    (untied, a reload that ties the block again would silently drop all but one)."""
    first, second, alone = nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False), nn.Linear(4, 3)
    second.weight = first.weight
    model = nn.Sequential(first, second, alone)
    before = alone.bias.detach().clone()
    checked = check_biases(model, {"0": torch.ones(3), "1": torch.full((3,), 3.0),
                                   "2": torch.ones(3)})
    added = add_biases(model, checked, {})
    assert model[0].bias is model[1].bias
    assert torch.equal(model[0].bias.detach(), torch.full((3,), 2.0))
    assert torch.equal(alone.bias.detach(), before + 1)
    assert added == ["0.bias"]  # the name named_parameters() gives the shared tensor
    only_one = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False))
    only_one[1].weight = only_one[0].weight
    add_biases(only_one, check_biases(only_one, {"1": torch.ones(3)}), {})
    assert only_one[0].bias is only_one[1].bias


def test_a_tensor_with_no_place_in_the_model_is_an_error_not_dropped(tmp_path):
    model = tiny_model("llama")
    apply_plan(model, {"model.layers.0.mlp": [0, 1]})
    model.model.layers[0].self_attn.register_parameter("extra", nn.Parameter(torch.ones(3)))
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="model.layers.0.self_attn.extra"):
        load_pruned(tmp_path / "m")


def test_edits_to_config_json_are_kept_for_replayed_folders(tmp_path):
    model = tiny_model("llama")
    apply_plan(model, {"model.layers.0.mlp": [0, 1]})
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["rms_norm_eps"] = 0.25
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    reloaded = load_pruned(tmp_path / "m")
    assert reloaded.config.rms_norm_eps == 0.25
    assert reloaded.model.layers[0].input_layernorm.variance_epsilon == 0.25


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pruning_a_reloaded_pruned_model_composes(arch, tmp_path):
    model = tiny_model(arch, Dims(tied=True, layers=3))
    rng = random.Random(3)
    for step in range(3):
        graph = build_graph(model)
        model = apply_plan(model, random_plan(graph, rng, skip=0.4), graph)
        save_pruned(model, tmp_path / f"m{step}")
        reloaded = load_pruned(tmp_path / f"m{step}")
        assert torch.allclose(_logits(reloaded), _logits(model), atol=1e-9, rtol=0)
        assert len(reloaded.config.depgraph["plans"]) == step + 1
        assert json.loads((tmp_path / f"m{step}" / "pruning.json").read_text())["plans"] == \
            reloaded.config.depgraph["plans"]
        model = reloaded


# ----------------------------------------------------------------------- rules
def test_a_crashing_rule_is_reported_as_a_bug_not_as_an_unsupported_op(monkeypatch):
    from depgraph.rules import registry

    def broken(node):
        raise TypeError("int() argument must be a string, not 'Node'")

    monkeypatch.setitem(registry._RULES, "aten::linear", broken)
    with pytest.raises(RuleError, match="Coupling rule for aten::linear failed .*node=.*module="):
        build_graph(tiny_model("llama"))
