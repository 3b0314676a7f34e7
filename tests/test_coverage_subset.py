"""The coverage sweep's fast subset (``benchmarks/coverage.py`` runs every causal-LM type).

Each type gets the tiny config of the one generic shrinking function and walks the whole
cycle of :func:`evaluation.cycle.cycle_row` (zero oracle, random plans over every kind, both
save paths, plain ``from_pretrained`` for uniform plans). The 14 named families run in
``test_properties.py``; these are a dozen more (state-space, MoE, multimodal, encoder-style
and older families) and the types whose failures were fixed after a sweep found them.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from depgraph import Kind, PlanError, build_graph
from evaluation.cycle import cycle_row, tiny_dense_model
from evaluation.reconstruct_cycle import _refusal, reconstruct_row
from pruning import PruneSettings, apply_plan, load_pruned
from pruning.probe import exclude_unprunable
from pruning.rollback import check_runs

torch.set_num_threads(1)

MORE_FAMILIES = ["mpt", "olmo2", "falcon_mamba", "minimax_m2", "emu3", "fuyu", "ctrl",
                 "persimmon", "granitemoe", "gpt_bigcode", "cohere", "bert"]
# each once failed the sweep: openai-gpt (the attribute search lost the failing block),
# zaya (expert rows unaligned for the grouped-GEMM kernel), got_ocr2 (a text
# model's attention read the top-level config), minicpm3 (re-built graph lost a group),
# cpmant (its cache cannot decode one more token even dense: every plan was refused),
# phimoe (two max() calls pick two experts: a plan that kept one gave NaN logits),
# mamba2 (its conv_kernel_size equals its heads per group: the search changed both),
# rwkv (its state is sized from the config), big_bird (its forward swaps its attention),
# gemma3n_text (a scale buffer recomputed from the hidden size on reload; a constant of
# torch.distributions made on meta inside from_pretrained), dots3_note_text (heads per block:
# transformers refuses a global read of the count), hunyuan_v1_moe (one expert: no looked-up
# axis said its stacked rows run through the grouped-GEMM kernel), dory (saves twice its
# blocks, reads them back halved; a gate scale computed from the hidden size)
FIXED = ["openai-gpt", "zaya", "got_ocr2", "minicpm3", "cpmant", "phimoe", "mamba2", "rwkv",
         "big_bird", "gemma3n_text", "dots3_note_text", "hunyuan_v1_moe", "dory"]


@pytest.mark.parametrize("model_type", MORE_FAMILIES + FIXED)
def test_the_whole_cycle_passes(model_type):
    row = cycle_row(model_type)
    assert row.status == "pass", f"{model_type}: {row.status}: {row.reason}"


# slower (minutes): zamba (one transformer block tied into every hybrid layer: compensation
# biases of the shared layers were untied, and reload ran init code written for dense sizes)
@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["zamba"])
def test_the_whole_cycle_passes_slow(model_type):
    row = cycle_row(model_type)
    assert row.status == "pass", f"{model_type}: {row.status}: {row.reason}"


def test_router_and_stacked_experts_are_one_group():
    """Phimoe picks its top-2 experts with two max() calls and a concatenation: the indices
    still point into the router's axis, so pruning an expert removes its router row and its
    stacked weights together (once, the router row went alone: a silently wrong model).
    The concatenated picks say the router needs two experts: the group keeps at least two,
    and a plan that leaves it one is refused naming that constraint (once the model came back
    with NaN logits)."""
    graph = build_graph(tiny_dense_model("phimoe"))
    experts = [g for g in graph.groups() if g.kind == Kind.EXPERT]
    assert experts
    for group in experts:
        params = {m.param.rsplit(".", 1)[-1] for m in group.members}
        assert {"gate_up_proj", "down_proj"} <= params, group.members
        assert group.min_units == 2, group.constraints
    model, group = tiny_dense_model("phimoe"), experts[0]
    with pytest.raises(PlanError, match="must keep at least 2 units"):
        apply_plan(model, {group.id: list(range(1, group.num_units))}, graph)


def test_a_single_experts_stacked_rows_stay_aligned():
    """One expert stacked in a 3-d weight (Hunyuan's default) has no looked-up axis of size
    > 1, yet the grouped-GEMM kernel runs it and needs 16-byte rows: its intermediate width
    keeps a multiple of 8, and a plan that breaks that is refused naming the constraint (once
    it failed with "no setting of module attributes": the real run crashed in the kernel)."""
    model = tiny_dense_model("hunyuan_v1_moe")
    graph = build_graph(model)
    stacked = [g for g in graph.groups() if g.id.endswith("mlp.experts")]
    assert stacked and all(g.multiple == 8 for g in stacked), [(g.id, g.multiple) for g in stacked]
    with pytest.raises(PlanError, match="multiple of 8"):
        apply_plan(model, {stacked[0].id: list(range(5))}, graph)


def test_a_scale_computed_from_a_size_makes_removal_differ_from_zeroing():
    """Dory's attention gates by ``hidden_size ** 0.25``: a pruned model (what its smaller
    config builds) rescales, so its hidden group is not zero-equivalent (once the oracle
    claimed it was: pruned and zeroed differed by 0.02). Its config saves twice its blocks
    and reads them back halved: a uniform plan keeps the model's own block count."""
    model = tiny_dense_model("dory")
    graph = build_graph(model)
    assert graph.group("hidden").zero_equivalent  # the graph alone cannot see the scale
    exclude_unprunable(model, graph)
    hidden = graph.group("hidden")
    assert not hidden.zero_equivalent and "s_gate_scale" in hidden.zero_reason
    assert all(g.zero_equivalent for g in graph.groups() if g.kind == Kind.MLP)
    blocks = model.config.num_hidden_layers
    apply_plan(model, {g.id: [0] for g in graph.groups() if g.kind == Kind.MLP}, graph)
    assert model.config.depgraph["config_exact"]
    assert model.config.num_hidden_layers == blocks == len(model.config.layer_types)
    check_runs(model)


def test_a_size_only_the_cache_uses_keeps_its_value(tmp_path):
    """Mamba-2's kernel size (4) equals its heads per group (4), and only the cache uses it:
    the trace (no cache) cannot tell which of the two a plan removing heads changes.
    transformers up to 5.24 reads the mixer's ``conv_kernel_size``: the attribute search also
    runs the model for real, decoding a token through its cache, and records the verified
    setting, which comes back from ``load_pruned`` (whose replay runs on meta tensors and
    cannot run anything). 5.25 reads ``conv1d.kernel_size``: a convolution's sizes follow
    its weight (its taps are never pruned) and are no candidates (once the search set
    ``(2,)``). Either way the reloaded model decodes."""
    model = tiny_dense_model("mamba2")
    graph = build_graph(model)
    per_group = [g for g in graph.groups() if g.num_units == 4 and "mixer" in g.id]
    assert len(per_group) == 2, [(g.id, g.num_units) for g in graph.groups()]
    apply_plan(model, {g.id: [0, 1] for g in per_group}, graph)
    mixers = [layer.mixer for layer in model.backbone.layers]
    assert [(m.num_heads, m.conv1d.kernel_size) for m in mixers] == [(4, (4,)), (4, (4,))]
    record = model.config.depgraph
    assert record["attributes"][-1]["backbone.layers.0.mixer"]["num_heads"] == 4
    reads_it = "self.conv_kernel_size" in inspect.getsource(type(mixers[0]).forward)
    if reads_it:  # a choice the real run verified: kept
        assert [m.conv_kernel_size for m in mixers] == [4, 4]
        assert record["attributes"][-1]["backbone.layers.0.mixer"]["conv_kernel_size"] == 4
    model.save_pretrained(tmp_path)
    again = load_pruned(tmp_path)
    assert [(layer.mixer.num_heads, layer.mixer.conv1d.kernel_size)
            for layer in again.backbone.layers] == [(4, (4,)), (4, (4,))]
    if reads_it:
        assert [layer.mixer.conv_kernel_size for layer in again.backbone.layers] == [4, 4]
    check_runs(again)  # a forward, finite logits and one token decoded through the cache
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_a_config_a_module_reads_at_run_time_comes_back_on_reload(tmp_path):
    """Phi-4-multimodal's attention reads ``self.config.num_attention_heads`` in its forward.
    Hidden channels pruned with query heads of one block leave no config for a whole block,
    so that module gets a config of its own; the record keeps its changes and
    ``load_pruned`` gives the rebuilt module the same (once the reloaded attention read the
    dense head count and failed its first forward)."""
    model = tiny_dense_model("phi4_multimodal")
    graph = build_graph(model)
    heads = next(g for g in graph.groups() if g.kind == Kind.QUERY_HEAD and ".1." in g.id)
    apply_plan(model, {Kind.HIDDEN: [5], heads.id: [1, 2]}, graph)
    attention = model.model.layers[1].self_attn
    assert attention.config is not model.config
    assert attention.config.num_attention_heads < model.config.num_attention_heads
    record = model.config.depgraph["attributes"][-1]["model.layers.1.self_attn"]["config"]
    assert record["num_attention_heads"] == attention.config.num_attention_heads
    model.save_pretrained(tmp_path)
    again = load_pruned(tmp_path)
    assert again.model.layers[1].self_attn.config.num_attention_heads == \
        attention.config.num_attention_heads
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_a_bias_added_to_a_layer_merged_on_disk_reloads(tmp_path):
    """transformers stores Lara's ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b`` and
    ``in_proj_a`` as one ``in_proj`` tensor and splits it on load by the model's own
    parameter sizes. A bias added to one of them gives the others a zero bias (the merge on
    disk splits back), and ``load_pruned`` restores all of them (once it refused: the
    split names were not in the file)."""
    model = tiny_dense_model("lara_mini")
    graph = build_graph(model)
    mlps = [g.id for g in graph.groups() if g.kind == Kind.MLP]
    plan = {mlps[0]: list(range(8))}  # widths of stacked experts stay multiples of 8
    layer = model.model.layers[0].linear_attn
    change = torch.randn(layer.in_proj_a.out_features, dtype=layer.in_proj_a.weight.dtype)
    apply_plan(model, plan, graph, biases={"model.layers.0.linear_attn.in_proj_a": change})
    assert torch.equal(layer.in_proj_a.bias.detach(), change)
    for name in ("in_proj_qkv", "in_proj_z", "in_proj_b"):
        assert not getattr(layer, name).bias.detach().any()
        assert f"model.layers.0.linear_attn.{name}.bias" in model.config.depgraph["added"]
    model.save_pretrained(tmp_path)
    again = load_pruned(tmp_path)
    assert torch.equal(again.model.layers[0].linear_attn.in_proj_a.bias, layer.in_proj_a.bias)
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_a_pruned_convolution_s_sizes_follow_its_weight():
    """A convolution of one group or depthwise owns its sizes, as a Linear does: after a plan
    that cuts its channels, ``in_channels``, ``out_channels``, ``groups`` and ``kernel_size``
    follow its weight (once the attribute search could take Mamba-2's kernel size, equal to
    its heads per group, for a size to shrink: transformers 5.25's cache reads it)."""
    model = tiny_dense_model("mamba2")
    graph = build_graph(model)
    plan = {g.id: list(range(g.num_units // 2)) for g in graph.groups()
            if g.layer is not None and any("conv1d" in m.param for m in g.members)}
    assert plan, [g.id for g in graph.groups()]
    apply_plan(model, plan, graph)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    assert convs
    for conv in convs:
        out, per_group, *taps = conv.weight.shape
        assert (conv.out_channels, conv.in_channels // conv.groups, conv.kernel_size) == (
            out, per_group, tuple(taps))
        assert conv.groups in (1, conv.in_channels)
    check_runs(model)


def test_a_recorded_convolution_size_that_contradicts_its_weight_is_not_restored(tmp_path):
    """A model pruned before convolutions owned their sizes may carry a recorded kernel size
    of 2 for a 4-tap weight: ``load_pruned`` restores the record, then sets the layers that
    own their sizes from their weights, so the reloaded model decodes."""
    model = tiny_dense_model("mamba2")
    graph = build_graph(model)
    per_group = [g for g in graph.groups() if g.num_units == 4 and "mixer" in g.id]
    apply_plan(model, {g.id: [0, 1] for g in per_group}, graph)
    record = model.config.depgraph["attributes"][-1]
    record.setdefault("backbone.layers.0.mixer.conv1d", {})["kernel_size"] = [2]
    model.save_pretrained(tmp_path)
    again = load_pruned(tmp_path)
    assert [layer.mixer.conv1d.kernel_size for layer in again.backbone.layers] == [(4,), (4,)]
    check_runs(again)


# the default path of prune --reconstruct (allocation, sequential reconstruction, save, reload,
# generate); each failed a sweep of it (`coverage.py --path reconstruct`): axk2 (stacked
# experts keep multiples of 8 rows; the pass asked which layers a one-unit plan touches, a plan
# that constraint refuses), jamba (attention and Mamba layers, two classes in one list: no
# blocks were found), llama4_text and phimoe (routers that subclass nn.Linear and return
# routing scores were refit as linear layers)
@pytest.mark.parametrize("model_type", ["axk2", "jamba", "llama4_text", "phimoe"])
def test_reconstruction_while_pruning_passes(model_type):
    row = reconstruct_row(model_type)
    assert row.status == "pass", f"{model_type}: {row.status}: {row.reason}"


def test_only_the_tools_own_reasons_count_as_refusals():
    def foreign():
        raise ValueError("raised outside the project")

    for call, refused in [(lambda: PruneSettings(ratio=2.0), True), (foreign, False)]:
        try:
            call()
        except ValueError as error:
            assert _refusal(error) is refused
        else:
            raise AssertionError("no error")
    assert _refusal(PlanError("a depgraph error"))
