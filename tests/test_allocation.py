"""Allocation: damage measured per group and width, the budget spent where it hurts least."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from archs import Dims, tiny_model

from depgraph import build_graph
from evaluation.cycle import tiny_dense_model
from pruning import PruneSettings, eligible_groups, load_pruned, prune, score, select
from pruning.allocation import allocate_plan, curve_keys, sensitivity_curves
from pruning.prefix import block_list, first_block
from pruning.selection import select_plan

torch.set_num_threads(1)


@dataclass
class FakeGroup:
    id: str
    num_units: int
    params_per_unit: int
    kind: str = "mlp"
    layer: int = 0

    def allows(self, kept: int) -> bool:
        return True


def _tokens(n: int = 4, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, 61, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", Dims(layers=3, intermediate=32), dtype=torch.float32)


def test_curves_measure_damage_and_leave_the_model_as_it_was(model):
    graph = build_graph(model)
    groups = [g for g in graph.groups() if g.kind == "mlp"]
    before = {n: p.clone() for n, p in model.named_parameters()}
    scores = {g.id: np.arange(g.num_units, dtype=float) for g in groups}
    curves = sensitivity_curves(model, groups, scores, _tokens(), fractions=(0.25, 0.5, 0.75))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    for group in groups:
        counts, kl = curves[group.id]
        assert counts.tolist() == [8, 16, 24] and (kl > 0).all()
        assert kl[-1] > kl[0]  # removing more hurts more


def _calls(module: torch.nn.Module) -> list[int]:
    count = [0]
    module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_curves_start_at_the_group_s_block_with_the_same_numbers(arch):
    """The passes measuring a block's groups skip the blocks before it (they return what they
    gave in the unpruned pass): the curves are those of full passes, and block 0's MLP runs
    only in the unpruned passes (the full one and the one-window probe)."""
    model = tiny_model(arch, Dims(layers=3, intermediate=32), dtype=torch.float32)
    graph = build_graph(model)
    groups = [g for g in graph.groups() if g.layer == 2 and g.zero_equivalent]
    scores = {g.id: np.random.default_rng(1).random(g.num_units) for g in groups}
    first_mlp = next(m for n, m in model.named_modules() if re.fullmatch(r".*\.0\.mlp", n))
    calls = _calls(first_mlp)
    reused = sensitivity_curves(model, groups, scores, _tokens(), fractions=(0.25, 0.5))
    assert calls[0] == 2
    full = sensitivity_curves(model, groups, scores, _tokens(), fractions=(0.25, 0.5),
                              reuse_prefix=False)
    assert calls[0] > 2 + len(groups)
    for group in groups:
        assert np.array_equal(reused[group.id][0], full[group.id][0])
        np.testing.assert_array_equal(reused[group.id][1], full[group.id][1])


def test_a_block_that_reads_an_earlier_block_s_state_is_measured_with_full_passes(model):
    """Block 2 also reads what block 0 returned, outside its arguments (a hook keeps it): a
    pass that skips block 0 would hand block 2 the wrong value. The one-window check sees
    the difference, and the curves stay those of full passes."""
    model = copy.deepcopy(model)
    kept = {}
    model.model.layers[0].register_forward_hook(lambda _m, _a, out: kept.update(out=out))
    model.model.layers[2].register_forward_hook(lambda _m, _a, out: out + 0.5 * kept["out"])
    groups = [g for g in build_graph(model).groups() if g.layer == 2 and g.kind == "mlp"]
    scores = {g.id: np.arange(g.num_units, dtype=float) for g in groups}
    reused = sensitivity_curves(model, groups, scores, _tokens(), fractions=(0.25, 0.5))
    full = sensitivity_curves(model, groups, scores, _tokens(), fractions=(0.25, 0.5),
                              reuse_prefix=False)
    for group in groups:
        np.testing.assert_array_equal(reused[group.id][1], full[group.id][1])


def test_the_first_block_counts_every_name_a_shared_weight_has(model):
    model = copy.deepcopy(model)
    names = [m.param for g in build_graph(model).groups() for m in g.members]
    assert block_list(model, names) == "model.layers"
    up = "model.layers.2.mlp.up_proj.weight"
    assert first_block(model, "model.layers", {up}) == 2
    model.outside = model.model.layers[2].mlp.up_proj  # also run outside the blocks
    assert first_block(model, "model.layers", {up}) == 0


def test_the_budget_goes_where_the_curves_say_it_hurts_least():
    cheap, dear = FakeGroup("cheap", 8, 10), FakeGroup("dear", 8, 10)
    curves = {"cheap": (np.array([2, 4, 6]), np.array([0.01, 0.02, 0.5])),
              "dear": (np.array([2, 4, 6]), np.array([0.2, 0.4, 0.6]))}
    scores = {"cheap": np.arange(8.0)[::-1], "dear": np.arange(8.0)}
    plan = allocate_plan([cheap, dear], scores, curves, ratio=0.25, total_params=160)
    assert plan == {"cheap": [4, 5, 6, 7]}  # 40 parameters, the cheap group's lowest units
    plan = allocate_plan([cheap, dear], scores, curves, ratio=0.5, total_params=160)
    assert sum(len(u) for u in plan.values()) * 10 >= 80 and len(plan["dear"]) >= 2
    # a noisy, non-convex curve is made convex: chunk costs never decrease within a group
    keys = curve_keys(cheap, np.arange(1, 8), (np.array([2, 4, 6]), np.array([0.3, 0.1, 0.9])))
    assert (np.diff(keys) >= -1e-12).all() and keys[0] >= 0


def test_allocation_prunes_a_block_the_model_does_not_need(model):
    """Block 1's MLP is muted (its output scaled by 1e-3): a criterion blind to that (random
    scores, normalised per group) spreads the cuts; allocation, which measures the outputs,
    takes them from the muted block."""
    muted = copy.deepcopy(model)
    with torch.no_grad():
        muted.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
    kinds, tokens = "mlp", _tokens(8)
    by_rank = {}
    for ranking in ("global", "allocate"):
        result = prune(copy.deepcopy(muted), ratio=0.1, importance="random", kinds=kinds,
                       ranking=ranking, tokens=tokens,
                       options={"allocation_fractions": (0.25, 0.5, 0.75, 0.875)})
        by_rank[ranking] = {gid: len(units) for gid, units in result.plan.items()}
        assert 0.1 <= result.stats["ratio_removed"] < 0.13
    assert by_rank["allocate"].get("model.layers.1.mlp", 0) >= 24
    assert by_rank["allocate"]["model.layers.1.mlp"] > by_rank["global"].get("model.layers.1.mlp", 0)
    assert "model.layers.1.mlp" in result.stats["allocation"]


def test_select_and_prune_and_reconstruct_take_allocation(model):
    from recovery import prune_and_reconstruct

    settings = PruneSettings(ratio=0.15, importance="second_moment", ranking="allocate",
                             options={"allocation_fractions": (0.25, 0.5)})
    graph = build_graph(model)
    groups = eligible_groups(graph, settings)
    scores, _ = score(model, graph, groups, settings, tokens=_tokens())
    plan = select(model, groups, scores, settings, tokens=_tokens())
    assert plan and set(plan) <= {g.id for g in groups}
    result = prune_and_reconstruct(copy.deepcopy(model), settings=settings, tokens=_tokens(),
                                   recon_tokens=_tokens(4))
    assert result.stats["ratio_removed"] >= 0.15 and "allocation" in result.stats


def test_groups_whose_zeroing_is_not_removal_are_measured_as_estimates(tmp_path):
    """OLMo-2 normalises q and k over all heads at once (zeroing a head is not removing it),
    and the hidden stream spans every block: allocation measures both by zeroing (it refused
    them before, so ``ranking="allocate"``, the default of ``prune --reconstruct`` and of the
    demo, failed on OLMo-2), says which numbers are estimates, and the plan saves and
    reloads as every plan does."""
    model = tiny_dense_model("olmo2").float()
    tokens = torch.randint(0, model.config.vocab_size, (8, 16),
                           generator=torch.Generator().manual_seed(0))
    result = prune(copy.deepcopy(model), ratio=0.1, importance="second_moment",
                   ranking="allocate", kinds="mlp,attention,hidden", tokens=tokens)
    estimated = set(result.stats["allocation_estimated"])
    assert {"hidden", "model.layers.0.self_attn"} <= estimated
    assert estimated <= set(result.stats["allocation"])
    assert not any(g.endswith(".mlp") for g in estimated)  # these are exact
    assert 0.1 <= result.stats["ratio_removed"] < 0.13
    result.model.save_pretrained(tmp_path)
    again = load_pruned(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=tokens[:2]).logits,
                                   result.model(input_ids=tokens[:2]).logits)


def test_reconstruction_while_pruning_keeps_whole_what_it_cannot_refit():
    """The sequential pass refits groups whose zeroing is their removal; on OLMo-2 the
    attention groups are not, so ``prune_and_reconstruct`` (``prune --reconstruct``) keeps
    them whole and says so, instead of failing whenever the allocation picks one (here it
    would: the attention is muted, the cheapest thing to remove)."""
    from recovery import prune_and_reconstruct

    model = tiny_dense_model("olmo2").float()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(1e-3)
    tokens = torch.randint(0, model.config.vocab_size, (8, 16),
                           generator=torch.Generator().manual_seed(0))
    result = prune_and_reconstruct(copy.deepcopy(model), ratio=0.1, importance="second_moment",
                                   ranking="allocate", tokens=tokens, recon_tokens=tokens)
    kept = result.stats["kept_whole"]
    assert kept and all(g.endswith("self_attn") for g in kept)
    assert result.plan and not set(result.plan) & set(kept)
    assert result.stats["ratio_removed"] >= 0.1


@pytest.mark.slow  # about 80 s on one thread: Gemma-3n's graph, probes and blocks
def test_reconstruction_while_pruning_runs_where_blocks_share_bfloat16_state():
    """Gemma-3n's later blocks read KV an earlier block computed, carried in the block call:
    in a bfloat16 pass the float32 pass-through probe cannot mix them and stopped the pass
    with a torch dtype error; now the block has no pass-through layer and the pass ends."""
    from recovery import prune_and_reconstruct
    from recovery.sequential import SequentialSettings

    model = tiny_dense_model("gemma3n_text").float()
    tokens = torch.randint(0, model.config.vocab_size, (4, 16),
                           generator=torch.Generator().manual_seed(0))
    result = prune_and_reconstruct(copy.deepcopy(model), ratio=0.05, importance="l2",
                                   tokens=tokens, recon_tokens=tokens,
                                   reconstruct=SequentialSettings(precision="bf16"))
    assert result.stats["ratio_removed"] >= 0.05
    with torch.no_grad():
        assert torch.isfinite(result.model(input_ids=tokens[:1]).logits).all()


def test_allocation_refuses_what_it_cannot_measure(model):
    graph = build_graph(model)
    hidden = [g for g in graph.groups() if g.kind == "hidden"]
    with pytest.raises(ValueError, match="use pruning.select"):
        select_plan(hidden, {}, ratio=0.1, total_params=100, ranking="allocate")
    with pytest.raises(ValueError, match="ranking 'allocate' needs calibration data"):
        prune(copy.deepcopy(model), ratio=0.1, importance="l2", ranking="allocate")
    with pytest.raises(ValueError, match="fractions must lie in"):
        sensitivity_curves(model, [], {}, _tokens(), fractions=(1.5,))
