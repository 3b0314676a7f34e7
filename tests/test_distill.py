"""Distillation recovery: the loss goes down, a killed run resumes to the same result, a
non-finite loss stops it, and the top-k teacher cache stands in for the live teacher."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from archs import tiny_model

from depgraph import build_graph
from pruning import apply_plan
from recovery.checkpoint import CHECKPOINT_FILE
from recovery.distill import DistillDivergedError, DistillSettings, _Loop, distill
from recovery.precision import resolve_precision
from recovery.teacher import CachedTeacher, Targets, distill_loss, write_teacher_cache

torch.set_num_threads(1)

SETTINGS = dict(seq_len=16, batch_size=4, tokens=16 * 4 * 12, eval_steps=4, patience=10,
                checkpoint_steps=4, warmup_steps=2, learning_rate=3e-3)
LONG = {**SETTINGS, "tokens": 16 * 4 * 60, "eval_steps": 20}  # 60 steps of 4 x 16 tokens


@pytest.fixture(scope="module")
def dense():
    """A tiny Llama with weights scaled up, so that its next-token distributions are far from
    uniform and half its MLP channels matter (held-out KL of the pruned copy: about 0.1)."""
    model = tiny_model("llama", dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(8)
    return model


def _pruned(dense):
    model = copy.deepcopy(dense)
    graph = build_graph(model)
    plan = {g.id: list(range(g.num_units // 2)) for g in graph.groups() if g.kind == "mlp"}
    return apply_plan(model, plan, graph)


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 61, (n, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("params", "lr", "precision"),
                         [("full", 3e-3, "fp32"), ("full", 3e-3, "bf16"), ("lora", 1e-2, "auto")])
def test_distillation_lowers_the_held_out_kl(dense, params, lr, precision):
    settings = DistillSettings(params=params, precision=precision,
                               **{**LONG, "learning_rate": lr})
    result = distill(_pruned(dense), dense, _tokens(240, 0), _tokens(8, 1), settings,
                     progress=None)
    stats = result.stats
    assert stats["steps"] == 60 and stats["train_tokens"] == 60 * 64 and stats["stopped"] == "budget"
    assert stats["val_kl_best"] < 0.8 * stats["val_kl_before"]
    assert stats["precision_used"] == resolve_precision(precision, torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast only
    assert [row["step"] for row in result.history] == [20, 40, 60]
    assert not any(type(m).__name__.startswith("Lora") for m in result.model.modules())
    # the returned model is the best one: its held-out KL is the best one recorded
    val = _tokens(8, 1)
    with torch.no_grad():
        kl, _ = distill_loss(result.model(val).logits, val, Targets(logits=dense(val).logits))
    assert float(kl) == pytest.approx(stats["val_kl_best"], rel=1e-4)


def test_a_killed_run_resumes_where_it_stopped(dense, tmp_path, monkeypatch):
    settings = DistillSettings(params="full", **SETTINGS)
    train, val = _tokens(48, 0), _tokens(8, 1)
    whole = distill(_pruned(dense), dense, train, val, settings, progress=None)

    real_step = _Loop.train_step

    def dies_at_step_7(loop):
        if loop.step == 6:
            raise KeyboardInterrupt
        return real_step(loop)

    monkeypatch.setattr(_Loop, "train_step", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        distill(_pruned(dense), dense, train, val, settings, checkpoint=tmp_path, progress=None)
    assert (tmp_path / CHECKPOINT_FILE).is_file()  # written at step 4
    monkeypatch.setattr(_Loop, "train_step", real_step)
    with pytest.raises(ValueError, match="holds a checkpoint of an earlier run"):
        distill(_pruned(dense), dense, train, val, settings, checkpoint=tmp_path, progress=None)
    resumed = distill(_pruned(dense), dense, train, val, settings, checkpoint=tmp_path,
                      resume=True, progress=None)
    assert resumed.stats["resumed_at"] == 4 and resumed.stats["steps"] == 12
    assert [r["step"] for r in resumed.history] == [r["step"] for r in whole.history]
    assert [r["val_kl"] for r in resumed.history] == pytest.approx(
        [r["val_kl"] for r in whole.history], rel=1e-5)
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters(),
                            strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    other = DistillSettings(params="full", **{**SETTINGS, "learning_rate": 1e-3})
    with pytest.raises(ValueError, match="made with other settings \\(learning_rate"):
        distill(_pruned(dense), dense, train, val, other, checkpoint=tmp_path, resume=True,
                progress=None)


class _Clock:
    """A clock that moves only when told: a training step takes 1 s, an evaluation 2 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_a_time_budget_sets_the_steps_after_the_warm_up(dense, tmp_path, monkeypatch):
    """60 steps of tokens, 41 s of time: after step 3 (2 warm-up steps, the rate measured
    from the first step's end) 1 s a step, 2 s an evaluation every 20 steps and one at the
    end give 33 steps (5 s spent, 34 s left at 1.1 s a step after 2 s kept for the last
    evaluation: 30 more), the schedule decays over them, and the run ends within 41 s. A budget that
    does not bind leaves the token budget; a killed run resumes to the same steps."""
    module = sys.modules[_Loop.__module__]  # recovery.distill (the package's name is the function)
    clock, lrs = _Clock(), []
    monkeypatch.setattr(module, "time", clock)
    real_step, real_eval = _Loop.train_step, _Loop.held_out_kl

    def step(loop):
        clock.now += 1.0
        out = real_step(loop)
        lrs.append(loop.scheduler.get_last_lr()[0])
        return out

    def evaluate(loop):
        clock.now += 2.0
        return real_eval(loop)

    monkeypatch.setattr(_Loop, "train_step", step)
    monkeypatch.setattr(_Loop, "held_out_kl", evaluate)
    train, val = _tokens(240, 0), _tokens(8, 1)
    settings = DistillSettings(params="full", seconds=41, **{**LONG, "checkpoint_steps": 10})
    result = distill(_pruned(dense), dense, train, val, settings, progress=None)
    assert result.stats["steps"] == result.stats["steps_planned"] == 33
    assert [row["step"] for row in result.history] == [20, 33] and clock.now <= 41
    assert lrs[-1] == pytest.approx(0.1 * LONG["learning_rate"])
    assert result.stats["val_kl_best"] < result.stats["val_kl_before"]

    clock.now = 0.0
    loose = DistillSettings(params="full", seconds=1000, **LONG)
    assert distill(_pruned(dense), dense, train, val, loose, progress=None).stats["steps"] == 60

    clock.now = 0.0

    def dies_at_step_13(loop):
        if loop.step == 12:
            raise KeyboardInterrupt
        return step(loop)

    monkeypatch.setattr(_Loop, "train_step", dies_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        distill(_pruned(dense), dense, train, val, settings, checkpoint=tmp_path, progress=None)
    monkeypatch.setattr(_Loop, "train_step", step)
    clock.now = 0.0
    resumed = distill(_pruned(dense), dense, train, val, settings, checkpoint=tmp_path,
                      resume=True, progress=None)
    assert resumed.stats["resumed_at"] == 10 and resumed.stats["steps"] == 33
    assert [r["val_kl"] for r in resumed.history] == pytest.approx(
        [r["val_kl"] for r in result.history], rel=1e-5)


def test_a_non_finite_loss_stops_training(dense, tmp_path):
    student = _pruned(dense)
    calls = [0]

    def poison(_module, _args, output):
        calls[0] += 1
        return output * float("nan") if calls[0] == 7 else output  # 1 held-out eval, 6 steps

    student.lm_head.register_forward_hook(poison)
    settings = DistillSettings(params="full", **{**SETTINGS, "val_windows": 1})
    with pytest.raises(DistillDivergedError, match="became nan at step 5"):
        distill(student, dense, _tokens(48, 0), _tokens(4, 1), settings, checkpoint=tmp_path,
                progress=None)
    assert (tmp_path / CHECKPOINT_FILE).is_file()  # step 4's checkpoint stays
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_top_k_cache_stands_in_for_the_live_teacher(dense, tmp_path):
    train, val = _tokens(240, 0), _tokens(8, 1)
    settings = DistillSettings(params="full", **LONG)
    tokens = torch.cat([train[:settings.train_windows], val])
    cache = write_teacher_cache(dense, tokens, tmp_path / "cache", top_k=16)
    teacher = CachedTeacher(cache, tokens)
    targets = teacher.targets(torch.tensor([0, 3]), tokens[[0, 3]])
    with torch.no_grad():
        top = torch.topk(dense(tokens[[0, 3]]).logits, 16, dim=-1)
    assert torch.equal(targets.indices, top.indices)
    assert torch.allclose(targets.values, top.values, atol=1e-2)  # float16 on disk
    student = _pruned(dense)
    before = _full_kl(student, dense, val)
    result = distill(student, teacher, train, val, settings, progress=None)
    assert result.stats["teacher"] == "CachedTeacher"
    assert result.stats["val_kl_best"] < result.stats["val_kl_before"]
    assert _full_kl(result.model, dense, val) < 0.95 * before  # on the whole vocabulary too
    with pytest.raises(ValueError, match="was written for other tokens"):
        CachedTeacher(cache, _tokens(248, 5))
    with pytest.raises(ValueError, match="is not a teacher cache"):
        CachedTeacher(tmp_path, tokens)


def _full_kl(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(distill_loss(student(ids).logits, ids, Targets(logits=teacher(ids).logits))[0])


def test_full_vocabulary_kl_is_exact():
    student, teacher = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    ids = torch.randint(0, 11, (2, 3))
    loss, parts = distill_loss(student, ids, Targets(logits=teacher), temperature=2.0)
    p, q = torch.softmax(teacher / 2, -1), torch.softmax(student / 2, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * 4
    assert float(loss) == pytest.approx(float(expected), rel=1e-5) and "lm" not in parts
    same, _ = distill_loss(teacher, ids, Targets(logits=teacher))
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    mixed, parts = distill_loss(student, ids, Targets(logits=teacher), lm_weight=0.5)
    assert float(mixed) == pytest.approx(0.5 * parts["kl"] + 0.5 * parts["lm"], rel=1e-5)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"params": "half"}, "params must be one of"),
    ({"temperature": 0}, "temperature must be a positive number, got 0"),
    ({"lm_weight": 1.5}, "lm_weight must be in \\[0, 1\\], got 1.5"),
    ({"tokens": 0}, "tokens must be an integer >= 1, got 0"),
    ({"seq_len": 1}, "seq_len must be an integer >= 2"),
    ({"precision": "half"}, "precision must be one of \\('auto', 'fp32', 'bf16'\\), got 'half'"),
    ({"seconds": 0}, "seconds must be a positive number, got 0"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillSettings(**kwargs)


def test_too_few_windows_for_the_budget(dense):
    with pytest.raises(ValueError, match="needs 12 training windows, got 5"):
        distill(_pruned(dense), dense, _tokens(5, 0), _tokens(2, 1),
                DistillSettings(**{**SETTINGS, "tokens": 16 * 4 * 3}), progress=None)
