"""Least-squares reconstruction: the solver, one block, whole models, the sequential pass."""

from __future__ import annotations

import copy

import pytest
import torch
from archs import Dims, tiny_model
from torch import nn

from depgraph import build_graph
from evaluation.cycle import tiny_dense_model
from pruning import apply_plan, load_pruned
from recovery import (
    ReconstructionError,
    SequentialSettings,
    kept_channels,
    prune_and_reconstruct,
    reconstruct,
)
from recovery.blocks import BlockCall, batches, capture_calls, find_blocks, record_calls, same_value
from recovery.lstsq import NormalEquations, fit, solve
from recovery.refit import InputRecord, Refit, block_outputs, dense_targets, refit_block
from recovery.structure import CallTrace, block_structure, linear_layers, passes_through

torch.set_num_threads(1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ the solver
def _design(x: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1) if bias else x


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", ["mean", "diag"])
def test_streamed_normal_equations_match_the_closed_form(bias, mode):
    x = torch.randn(300, 7, generator=_gen(0), dtype=torch.float64) * torch.linspace(0.1, 30, 7)
    y = torch.randn(300, 3, generator=_gen(1), dtype=torch.float64)
    prior = torch.randn(3, 7 + bias, generator=_gen(2), dtype=torch.float64)
    equations = NormalEquations("layer", bias=bias)
    for chunk in range(0, 300, 64):  # batches of different sizes
        equations.add(x[chunk:chunk + 64], y[chunk:chunk + 64])
    damping = 0.05
    weight, fitted_bias = solve(equations, damping, prior=prior, mode=mode)
    found = fit(equations, damping, prior=prior, mode=mode)
    residual = _design(x, bias) @ torch.cat([found.weight.T] + (
        [found.bias[None]] if bias else [])) - y
    assert found.error == pytest.approx(float(residual.square().sum() / y.square().sum()),
                                        rel=1e-9)
    design = _design(x, bias)
    gram = design.T @ design
    penalty = (damping * gram.diagonal() if mode == "diag"
               else damping * gram.diagonal().mean() * torch.ones(gram.shape[0], dtype=torch.float64))
    reference = torch.linalg.solve(gram + torch.diag(penalty),
                                   design.T @ y + penalty[:, None] * prior.T)
    assert torch.allclose(weight, reference[:7].T, atol=1e-10)
    if bias:
        assert torch.allclose(fitted_bias, reference[7], atol=1e-10)
    else:
        assert fitted_bias is None
    assert equations.tokens == 300


@pytest.mark.parametrize("width", [6, 1100])  # 1100: XᵀX built from three column bands
def test_float32_batches_accumulate_in_float64(width):
    x = torch.randn(4096, width, generator=_gen(3))
    y = torch.randn(4096, 2, generator=_gen(4))
    equations = NormalEquations("layer", bias=False)
    for chunk in range(0, 4096, 512):
        equations.add(x[chunk:chunk + 512], y[chunk:chunk + 512])
    assert equations.xtx.dtype == torch.float64
    exact = x.double().T @ x.double()
    assert torch.allclose(equations.xtx, exact, rtol=0, atol=1e-6 * float(exact.abs().max()))


def test_the_prior_wins_where_the_data_says_nothing():
    """A channel that is always zero keeps its prior weight instead of dropping to zero."""
    x = torch.randn(200, 3, generator=_gen(5), dtype=torch.float64)
    x[:, 2] = 0
    true = torch.tensor([[1.0, -2.0, 0.0]], dtype=torch.float64)
    equations = NormalEquations("layer", bias=False)
    equations.add(x, x @ true.T)
    prior = torch.tensor([[0.5, 0.5, 7.0]], dtype=torch.float64)
    weight, _ = solve(equations, 1e-6, prior=prior, mode="mean")
    assert torch.allclose(weight, torch.tensor([[1.0, -2.0, 7.0]], dtype=torch.float64), atol=1e-4)


def test_an_exact_linear_map_is_recovered():
    x = torch.randn(200, 5, generator=_gen(2), dtype=torch.float64)
    true = torch.randn(4, 5, generator=_gen(3), dtype=torch.float64)
    equations = NormalEquations("exact", bias=False)
    equations.add(x, x @ true.T)
    weight, _ = solve(equations, damping=1e-12)
    assert torch.allclose(weight, true, atol=1e-8)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_numbers_are_a_clear_error(precision, bad):
    x = torch.ones(4, 3)
    x[1, 2] = bad
    equations = NormalEquations("model.layers.3.mlp.down_proj", bias=False, precision=precision)
    with pytest.raises(ReconstructionError, match="down_proj: non-finite activations"):
        equations.add(x, torch.ones(4, 2))
    y = torch.ones(4, 2)
    y[3, 0] = bad
    equations = NormalEquations("model.layers.3.mlp.down_proj", bias=True, precision=precision)
    with pytest.raises(ReconstructionError, match="down_proj: non-finite targets"):
        equations.add(torch.ones(4, 3), y)


def test_bfloat16_products_stay_close_to_float32():
    """``precision="bf16"``: the products in bfloat16, accumulated in float64; each entry
    keeps about three significant digits, so the damped solution barely moves."""
    x = torch.randn(2048, 24, generator=_gen(7)) * torch.linspace(0.5, 4, 24)
    y = x @ torch.randn(24, 5, generator=_gen(8)) + 0.1 * torch.randn(2048, 5, generator=_gen(9))
    exact, rounded = NormalEquations("a", bias=True), NormalEquations("a", bias=True,
                                                                      precision="bf16")
    for chunk in range(0, 2048, 512):
        exact.add(x[chunk:chunk + 512], y[chunk:chunk + 512])
        rounded.add(x[chunk:chunk + 512], y[chunk:chunk + 512])
    assert rounded.xtx.dtype == torch.float64
    assert (rounded.xtx - exact.xtx).norm() < 1e-2 * exact.xtx.norm()
    w_exact, b_exact = solve(exact, 4.0)
    w_rounded, b_rounded = solve(rounded, 4.0)
    assert (w_rounded - w_exact).norm() < 2e-2 * w_exact.norm()
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16'\), got 'fp16'"):
        NormalEquations("a", bias=False, precision="fp16")


def test_bfloat16_equations_solve_in_float32_as_well_as_in_float64():
    """Channels whose energies span twelve orders of magnitude: the float32 solve of
    bfloat16 equations (scaled to a unit diagonal) gives float64's weights and error."""
    x = torch.randn(4096, 40, generator=_gen(10)) * torch.logspace(-3, 3, 40)
    y = x @ torch.randn(40, 6, generator=_gen(11)) + torch.randn(4096, 6, generator=_gen(12))
    equations = NormalEquations("a", bias=True, precision="bf16")
    equations.add(x, y)
    assert equations.solve_dtype == torch.float32
    single = fit(equations, 4.0)
    equations.solve_dtype = torch.float64
    equations._damped.clear()
    double = fit(equations, 4.0)
    assert (single.weight - double.weight).norm() < 1e-5 * double.weight.norm()
    assert single.error == pytest.approx(double.error, rel=1e-5)
    exact = NormalEquations("a", bias=False, precision="bf16")
    exact.add(x.double(), y.double())  # float64 data keeps float64 products and solves
    assert exact.solve_dtype == torch.float64


def test_targets_of_one_input_share_one_factorization(monkeypatch):
    """q, k and v (or gate and up) read one input: one Cholesky per damping, not per layer;
    a new batch invalidates it."""
    calls = []
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda a: calls.append(a.shape) or real(a))
    x = torch.randn(256, 8, generator=_gen(13), dtype=torch.float64)
    equations = NormalEquations("qkv", bias=False)
    equations.add(x, {"q": x @ torch.randn(8, 4, dtype=torch.float64, generator=_gen(14)),
                      "k": x[:, :3], "v": x[:, 5:]})
    found = {key: fit(equations, 0.5, key=key) for key in ("q", "k", "v")}
    assert len(calls) == 1
    alone = NormalEquations("k", bias=False)
    alone.add(x, x[:, :3])
    assert torch.allclose(fit(alone, 0.5).weight, found["k"].weight, atol=1e-12)
    fit(equations, 2.0, key="q")
    equations.add(x, {"q": x[:, :4], "k": x[:, :3], "v": x[:, 5:]})
    fit(equations, 0.5, key="v")
    assert len(calls) == 4  # the alone system, a new damping, new data


def test_solve_without_tokens_is_a_clear_error():
    with pytest.raises(ReconstructionError, match="no calibration tokens"):
        solve(NormalEquations("layer", bias=True), 0.01)


# ------------------------------------------------------------------ one block
class _Mlp(nn.Module):
    """A depth-2 block: down(relu(up(x))) + x."""

    def __init__(self, width: int, inner: int):
        super().__init__()
        self.up, self.down = nn.Linear(width, inner), nn.Linear(inner, width, bias=False)

    def forward(self, hidden):
        return hidden + self.down(torch.relu(self.up(hidden)))


def test_level2_refit_is_the_least_squares_solution_on_kept_channels():
    torch.manual_seed(0)
    dense = _Mlp(6, 10).double()
    pruned = copy.deepcopy(dense)
    keep = torch.tensor([0, 2, 3, 5, 7, 8])
    with torch.no_grad():  # remove inner channels 1, 4, 6, 9 physically
        pruned.up.weight.data = dense.up.weight[keep].clone()
        pruned.up.bias.data = dense.up.bias[keep].clone()
        pruned.down.weight.data = dense.down.weight[:, keep].clone()
    states = [torch.randn(3, 5, 6, generator=_gen(s), dtype=torch.float64) for s in range(4)]
    calls = [BlockCall((), {}) for _ in states]
    _, targets = dense_targets(dense, states, calls, ["down"])
    report = refit_block(pruned, states, calls, {"down": Refit()}, targets, damping=1e-9)
    inner = torch.cat([torch.relu(pruned.up(s)).reshape(-1, 6) for s in states])
    target = torch.cat([dense.down(torch.relu(dense.up(s))).reshape(-1, 6) for s in states])
    reference = torch.linalg.lstsq(inner, target).solution.T
    assert torch.allclose(pruned.down.weight, reference, atol=1e-6)
    assert report["down"]["error_after"] < report["down"]["error_before"]


class _Gated(nn.Module):
    """x + down(x * up(x)): ``down``'s output reaches the block's output; ``up``'s does not."""

    def __init__(self, width: int):
        super().__init__()
        self.up, self.down = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, hidden):
        return hidden + self.down(hidden * self.up(hidden))


def test_pass_through_layers_are_probed_not_assumed():
    states = torch.randn(2, 3, 6, generator=_gen(0))
    mlp, gated = _Mlp(6, 10), _Gated(6)
    assert passes_through(mlp, states, BlockCall((), {}), mlp.down)
    assert not passes_through(mlp, states, BlockCall((), {}), mlp.up)
    assert passes_through(gated, states, BlockCall((), {}), gated.down)
    assert not passes_through(gated, states, BlockCall((), {}), gated.up)


def test_block_structure_finds_stages_and_the_pass_through_layers_in_one_pass():
    states = torch.randn(2, 3, 6, generator=_gen(0))
    gated = _Gated(6)  # up has the output's shape too, so it is probed and refused
    found = block_structure(gated, states, BlockCall((), {}))
    assert found.stages == [["up"], ["down"]] and found.counts == {"up": 1, "down": 1}
    assert found.through == {"down"}
    assert block_structure(gated, states, BlockCall((), {}), probe=False).through == set()


def test_blocks_called_alike_are_probed_once(monkeypatch):
    """With ``known``, a second block of the same class calling the same layers in the same
    stages takes the first one's answer; a block called differently is probed."""
    states = torch.randn(2, 3, 6, generator=_gen(0))
    known: dict = {}
    first = block_structure(_Gated(6), states, BlockCall((), {}), known=known)
    probes = []
    monkeypatch.setattr("recovery.structure._moves_output", lambda *a: probes.append(a) or True)
    again = block_structure(_Gated(6), states, BlockCall((), {}), known=known)
    assert again.through == first.through == {"down"} and probes == []
    other = block_structure(_Mlp(6, 10), states, BlockCall((), {}), known=known)
    assert probes and other.through == {"down"}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "phi"])
def test_block_structure_of_real_blocks(arch):
    """Sequential residual blocks pass only the MLP's last projection through; parallel
    ones (GPT-NeoX, Phi: attention and MLP both added to the input) also the attention's."""
    model = tiny_model(arch)
    path, blocks = find_blocks(model)
    tokens = torch.randint(0, model.config.vocab_size, (2, 7), generator=_gen(1))
    states, calls = capture_calls(model, blocks, batches(tokens, 2))
    found = block_structure(blocks[0], states[0], calls[0][0])
    flat = [name for stage in found.stages for name in stage]
    assert sorted(flat) == sorted(n for n, m in blocks[0].named_modules()
                                  if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
    last_mlp = found.stages[-1][-1]
    expected = {last_mlp}
    if arch in ("gpt_neox", "phi"):
        expected.add(next(n for n in flat if n.endswith(".dense")
                          and n.startswith(("attention", "self_attn"))))
    assert found.through == expected
    # the dense targets' first run of an identical block shows the same structure: with its
    # trace, and the probe's answer known, the structure costs no run at all
    trace, known = CallTrace(), {}
    block_structure(blocks[0], states[0], calls[0][0], known=known)
    dense_targets(copy.deepcopy(blocks[0]), states, [c[0] for c in calls], flat, trace=trace)
    runs = []
    handle = blocks[0].register_forward_pre_hook(lambda *a: runs.append(1))
    again = block_structure(blocks[0], states[0], calls[0][0], known=known, trace=trace)
    handle.remove()
    assert (again.stages, again.counts, again.through) == (found.stages, found.counts,
                                                           found.through) and runs == []


def _off_dense(seed: int, batches: int, noise: float):
    """An MLP block, its copy, dense inputs and the copy's inputs: the dense ones plus noise."""
    torch.manual_seed(seed)
    dense = _Mlp(6, 10).double()
    dense_states = [torch.randn(3, 5, 6, generator=_gen(s), dtype=torch.float64)
                    for s in range(batches)]
    states = [x + noise * torch.randn(x.shape, generator=_gen(10 + i), dtype=torch.float64)
              for i, x in enumerate(dense_states)]
    return dense, copy.deepcopy(dense), dense_states, states, [BlockCall((), {}) for _ in states]


@pytest.mark.parametrize("correction", [0.0, 0.5, 1.0])
def test_residual_correction_fits_the_block_output_error(correction):
    """With the pruned inputs off the dense ones, the pass-through layer is fit to
    ``Y + c·(R - R̂)``; c = 1 makes the block output match the dense one as well as it can."""
    dense, pruned, dense_states, states, calls = _off_dense(2, 4, 0.3)
    outputs, targets = dense_targets(dense, dense_states, calls, ["down"])
    refit_block(pruned, states, calls, {"down": Refit()}, targets, damping=1e-9,
                outputs=outputs, correction=correction)
    inner = torch.cat([torch.relu(pruned.up(x)).reshape(-1, 10) for x in states])
    wanted = torch.cat([(dense.down(torch.relu(dense.up(x))) + correction * (x - xh)).reshape(-1, 6)
                        for x, xh in zip(dense_states, states, strict=True)])
    reference = torch.linalg.lstsq(inner, wanted).solution.T
    assert torch.allclose(pruned.down.weight, reference, atol=1e-6)
    with pytest.raises(ValueError, match="correction must be in"):
        refit_block(pruned, states, calls, {"down": Refit()}, targets, damping=1.0,
                    outputs=outputs, correction=2.0)


def test_the_reported_errors_are_the_layer_output_errors():
    """``error_before``: the present layer's outputs against the targets; ``error_after``: the
    refit layer's, from the normal equations; both relative to the targets' energy."""
    torch.manual_seed(3)
    dense = _Mlp(6, 10).double()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned.up.weight.mul_(0.7)
    states = [torch.randn(4, 5, 6, generator=_gen(s), dtype=torch.float64) for s in range(3)]
    calls = [BlockCall((), {}) for _ in states]
    _, targets = dense_targets(dense, states, calls, ["down"])
    wanted = torch.cat([t[0] for t in targets["down"]])

    def error() -> float:
        with torch.no_grad():
            found = torch.cat([pruned.down(torch.relu(pruned.up(x))) for x in states])
        return float((found - wanted).square().sum() / wanted.square().sum())

    first = error()
    report = refit_block(pruned, states, calls, {"down": Refit()}, targets, damping=0.3)
    assert report["down"]["error_before"] == pytest.approx(first, rel=1e-9)
    assert report["down"]["error_after"] == pytest.approx(error(), rel=1e-6)
    assert report["down"]["error_after"] < first


@pytest.mark.parametrize("refit", ["down", "up"])
def test_outputs_after_a_pass_through_refit_equal_a_fresh_run(refit):
    """When the last refit stage is a pass-through layer's, refit_block hands back the
    block's new outputs (its whole-block run with the layer's change), as running it gives."""
    dense, pruned, dense_states, states, calls = _off_dense(4, 3, 0.2)
    outputs, targets = dense_targets(dense, dense_states, calls, ["up", "down"])
    after: list = []
    refit_block(pruned, states, calls, {refit: Refit()}, targets, damping=0.1, outputs=outputs,
                correction=1.0, outputs_after=after)
    if refit == "up":  # not a pass-through layer: nothing comes for free
        assert after == []
        return
    fresh = block_outputs(pruned, states, calls)
    assert len(after) == len(fresh)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(after, fresh, strict=True))


def test_masked_refit_keeps_pruned_rows_and_columns_zero():
    torch.manual_seed(1)
    dense = _Mlp(6, 10).double()
    masked = copy.deepcopy(dense)
    dropped = torch.tensor([1, 4])
    with torch.no_grad():
        masked.up.weight[dropped] = 0
        masked.up.bias[dropped] = 0
        masked.down.weight[:, dropped] = 0
    kept = torch.tensor([0, 2, 3, 5, 6, 7, 8, 9])
    states = [torch.randn(4, 6, generator=_gen(s), dtype=torch.float64) + 1 for s in range(3)]
    calls = [BlockCall((), {}) for _ in states]
    refits = {"up": Refit(rows=kept, targets=kept), "down": Refit(cols=kept)}
    _, targets = dense_targets(dense, states, calls, ["up", "down"])
    refit_block(masked, states, calls, refits, targets, damping=1e-6)
    assert masked.up.weight[dropped].abs().max() == 0 and masked.up.bias[dropped].abs().max() == 0
    assert masked.down.weight[:, dropped].abs().max() == 0


# ------------------------------------------------------------------ whole models
def _half_plan(graph, with_hidden: bool = False) -> dict:
    return {g.id: list(range(g.num_units // 2)) for g in graph.groups()
            if g.kind != "hidden" or with_hidden}


def _output_error(model, dense, ids) -> float:
    with torch.no_grad():
        return float(((model(ids).logits - dense(ids).logits) ** 2).mean())


@pytest.mark.parametrize("arch, with_hidden, precision", [
    ("llama", False, "fp32"), ("gpt2", False, "fp32"), ("phi3", False, "fp32"),
    ("llama", True, "fp32"), ("llama", False, "bf16"), ("llama", True, "bf16")])
def test_reconstruction_lowers_held_out_output_error(arch, with_hidden, precision):
    """In float64 and float32 models; bfloat16 arithmetic (autocast) on a float32 one."""
    dtype = torch.float32 if precision == "bf16" else None
    dense = tiny_model(arch, Dims(layers=2, intermediate=32), seed=0, dtype=dtype)
    graph = build_graph(dense)
    pruned = apply_plan(copy.deepcopy(dense), _half_plan(graph, with_hidden), graph)
    vocab = dense.config.vocab_size
    calib = torch.randint(0, vocab, (32, 16), generator=_gen(1))
    held_out = torch.randint(0, vocab, (8, 16), generator=_gen(2))
    before = _output_error(pruned, dense, held_out)
    stats = reconstruct(pruned, dense, calib, targets="all", batch_size=8, precision=precision)
    assert _output_error(pruned, dense, held_out) < before
    assert stats["mean_error_after"] < stats["mean_error_before"]
    assert stats["precision"] == precision
    assert {p.dtype for p in pruned.parameters()} == {next(dense.parameters()).dtype}
    assert stats["layers_refit"] > 0


def test_reconstructing_an_unpruned_model_changes_nothing():
    dense = tiny_model("qwen2", Dims(layers=2), seed=3)
    copy_ = copy.deepcopy(dense)
    calib = torch.randint(0, dense.config.vocab_size, (64, 16), generator=_gen(4))
    stats = reconstruct(copy_, dense, calib, plan={}, damping=1e-10)
    ids = torch.randint(0, dense.config.vocab_size, (4, 16), generator=_gen(5))
    assert _output_error(copy_, dense, ids) < 1e-12
    assert stats["mean_error_before"] < 1e-10


def test_the_pre_refit_leaves_what_the_post_refit_solves_again():
    """Blocks 0 and 1 lose MLP channels: block 1's down_proj is fit once, after the pruning,
    its other layers before it (block 0 sees the dense inputs: nothing to fit before); block 2
    loses nothing: every layer is fit before (there is no after)."""
    from recovery.sequential import prune_sequential

    model = tiny_model("llama", Dims(layers=3, intermediate=24), seed=4)
    graph = build_graph(model)
    mlp = [g for g in graph.groups() if g.kind == "mlp" and g.layer in (0, 1)]
    calib = torch.randint(0, model.config.vocab_size, (16, 16), generator=_gen(6))
    _, info = prune_sequential(model, graph, {g.id: 6 for g in mlp}, "l2", None, calib,
                               SequentialSettings(precision="fp32", batch_size=8))
    second, third = (set(block["layers"]) for block in info["stats"]["blocks"][1:])
    assert "post:mlp.down_proj" in second and "pre:mlp.down_proj" not in second
    assert {"pre:mlp.gate_proj", "pre:mlp.up_proj", "pre:self_attn.o_proj"} <= second
    assert "pre:mlp.down_proj" in third and not any(k.startswith("post:") for k in third)
    assert model.model.layers[1].mlp.down_proj.in_features == 24 - 6


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["kv_group", "query_head"])
def test_the_post_refit_of_o_proj_takes_the_inputs_the_pre_refit_recorded(monkeypatch, precision,
                                                                          kind):
    """Blocks losing KV groups or query heads (whose zeroed heads still attend): o_proj's
    post refit reads the inputs the pre refit's MLP stage recorded (checked equal on batch 0's
    kept columns) and ends exactly where running the block again for them ends."""
    from recovery.sequential import prune_sequential

    holds = InputRecord.holds

    def run(reuse: bool) -> tuple[nn.Module, list]:
        model = tiny_model("llama", Dims(layers=3, hidden_heads=4, kv_heads=2), seed=5)
        graph = build_graph(model)
        heads = [g for g in graph.groups() if g.kind == kind]
        answers = []

        def spy(self, names, *args):
            found = holds(self, names, *args)
            if names == ["self_attn.o_proj"]:
                answers.append(found)
            return found and reuse

        monkeypatch.setattr(InputRecord, "holds", spy)
        calib = torch.randint(0, model.config.vocab_size, (24, 16), generator=_gen(7))
        prune_sequential(model, graph, {g.id: 1 for g in heads}, "l2", None, calib,
                         SequentialSettings(precision=precision, batch_size=8))
        return model, answers

    reused, answers = run(True)
    again, _ = run(False)
    assert answers == [True, True]  # blocks 1 and 2 (block 0 sees dense inputs: no pre refit)
    for (name, a), b in zip(reused.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_kept_channels_compose_two_plans():
    dense = tiny_model("llama", Dims(layers=1))
    graph = build_graph(dense)
    group = next(g for g in graph.groups() if g.kind == "mlp")
    first = {group.id: [0, 1, 2]}
    once = apply_plan(copy.deepcopy(dense), first, graph)
    second = {group.id: [0, 5]}  # positions in the pruned model: originals 3 and 8
    kept = kept_channels(dense, [first, second])
    assert kept[(f"{group.id}.up_proj.weight", 0)].tolist() == [
        i for i in range(24) if i not in (0, 1, 2, 3, 8)]
    assert kept[(f"{group.id}.down_proj.weight", 1)].tolist() == kept[(f"{group.id}.up_proj.weight", 0)].tolist()
    del once


def test_block_inputs_are_captured_once_per_batch():
    model = tiny_model("gemma2", Dims(layers=3))  # per-layer masks (sliding / full)
    path, blocks = find_blocks(model)
    assert path == "model.layers" and len(blocks) == 3
    ids = torch.randint(0, 61, (5, 8), generator=_gen(6))
    hidden, calls = capture_calls(model, blocks, batches(ids, 2))
    assert [h.shape[0] for h in hidden] == [2, 2, 1]
    assert all(len(per_batch) == 3 for per_batch in calls)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "bloom", "falcon"])
def test_captured_calls_equal_those_of_the_real_blocks(arch):
    """The calls come from blocks that return their input; they equal those the real blocks
    receive (per-layer masks, rotary tables, ALiBi), with the same block-0 states."""
    model = tiny_model(arch, Dims(layers=3))
    _, blocks = find_blocks(model)
    ids = torch.randint(0, 61, (5, 8), generator=_gen(7))
    hidden, calls = capture_calls(model, blocks, batches(ids, 2))
    with torch.no_grad():
        real_hidden, real_calls = record_calls(model, blocks, batches(ids, 2),
                                               torch.device("cpu"))
    assert same_value(hidden, real_hidden) and same_value(calls, real_calls)
    assert not any("forward" in vars(block) for block in blocks)  # the blocks are back


class _Chained(nn.Module):
    """A model that hands each block a value computed from the previous block's output."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, input_ids, use_cache=False):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, scale=hidden.abs().mean())
        return hidden


class _Scaled(nn.Linear):
    def forward(self, hidden, scale):
        return super().forward(hidden) * scale


def test_calls_that_depend_on_earlier_blocks_come_from_the_real_blocks():
    model = _Chained()
    model.layers = nn.ModuleList(_Scaled(4, 4) for _ in range(3))
    ids = torch.randint(0, 11, (4, 5), generator=_gen(8))
    _, calls = capture_calls(model, model.layers, batches(ids, 2))
    with torch.no_grad():
        _, real = record_calls(model, model.layers, batches(ids, 2), torch.device("cpu"))
    assert same_value(calls, real)
    assert not same_value(calls[0][1].kwargs["scale"], calls[0][0].kwargs["scale"])


def test_same_value_compares_what_calls_hold():
    a = torch.arange(3.0)
    assert same_value({"x": (a, None, 2)}, {"x": (a.clone(), None, 2)})
    assert not same_value({"x": (a, None)}, {"x": (a + 1, None)})
    assert not same_value(a, a.double())
    assert not same_value((a,), [a])
    assert not same_value(object(), object())


def test_bad_arguments_are_refused():
    dense = tiny_model("llama", Dims(layers=1))
    with pytest.raises(ValueError, match="targets must be one of"):
        reconstruct(dense, dense, torch.zeros(2, 4, dtype=torch.long), targets="some")
    with pytest.raises(ValueError, match="damping must be a positive number, got -1"):
        reconstruct(dense, dense, torch.zeros(2, 4, dtype=torch.long), damping=-1)
    with pytest.raises(ValueError, match="calibration tokens must be"):
        reconstruct(dense, dense, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"correction must be a number in \[0, 1\], got 1.5"):
        reconstruct(dense, dense, torch.zeros(2, 4, dtype=torch.long), correction=1.5)
    with pytest.raises(ValueError, match="precision must be one of .*, got 'fp16'"):
        reconstruct(dense, dense, torch.zeros(2, 4, dtype=torch.long), precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of .*, got 'half'"):
        SequentialSettings(precision="half")


def test_sequential_pass_prunes_channels_of_stacked_experts(tmp_path):
    """Mixtral's stacked expert weights keep multiples of 8 channels; the pass found the layers
    it refits from a plan of one unit, which that constraint refuses, so ``prune --reconstruct``
    stopped on every family with stacked experts whenever their channels were picked."""
    model = tiny_model("mixtral", Dims()).eval()
    tokens = torch.randint(0, 61, (6, 12), generator=torch.Generator().manual_seed(0))
    result = prune_and_reconstruct(copy.deepcopy(model), ratio=0.2, importance="second_moment",
                                   kinds="mlp", tokens=tokens, recon_tokens=tokens)
    experts = {g: len(u) for g, u in result.plan.items() if g.endswith("mlp.experts")}
    assert experts and all((24 - n) % 8 == 0 for n in experts.values())
    assert result.stats["reconstruction"]["post"]
    result.model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path)(tokens[:2]).logits,
                                   result.model(tokens[:2]).logits)


def test_blocks_may_be_of_several_classes():
    """Jamba's layer list holds attention and Mamba layers, two classes: the blocks were looked
    for among lists of one class only, so ``prune --reconstruct`` found none on Jamba (its
    whole path: ``test_coverage_subset.py``)."""
    model = tiny_dense_model("jamba")
    path, blocks = find_blocks(model)
    assert path == "model.layers" and len({type(b) for b in blocks}) == 2


def test_linear_subclasses_that_compute_something_else_are_not_refit():
    """Llama 4's router subclasses nn.Linear and returns routing scores (a tuple): the refit
    hooked it as a linear layer and stopped with "'tuple' object has no attribute 'detach'".
    Whether an overriding subclass computes its linear map is checked on its outputs: Falcon's
    linear (bias added apart) is one and is refit, the router is not (the whole path of
    ``prune --reconstruct`` on Llama 4: ``test_coverage_subset.py``)."""
    falcon = tiny_model("falcon", Dims())
    assert {"self_attention.query_key_value", "mlp.dense_4h_to_h"} <= set(
        linear_layers(falcon.transformer.h[0]))
    names = set(linear_layers(tiny_dense_model("llama4_text").model.layers[0]))
    assert "feed_forward.router" not in names and "self_attn.q_proj" in names
