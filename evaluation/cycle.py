"""The whole cycle a user walks through, checked on one model: prune, run, save, reload.

:func:`check_cycle` takes a model and a random seed and does what a user does, checking
everything that can be checked exactly:

1. ``build_graph``; a random plan over the *zero-equivalent* groups: the physically pruned
   model must give the logits of the original with the same slices zeroed, and its
   parameter shapes must be what ``slices`` promised;
2. a random plan over groups of every kind (hidden and experts included, widths not
   aligned by hand beyond the constraints the groups declare), applied with bias
   compensation (:func:`pruning.compensation_biases` from the inputs of a few tokens: every
   layer that reads removed channels gets a bias, one it lacked is added): the pruned model
   runs, its re-built graph holds the same groups with the removed units gone, the added
   biases make ``config_exact`` false (plain ``from_pretrained`` would drop them), and both
   save paths (``model.save_pretrained`` and :func:`pruning.save_pruned`) reload through
   :func:`pruning.load_pruned` to the same logits in the same dtype;
3. a *uniform* plan (every block loses as many units of each kind): where the config
   describes the pruned model, plain ``AutoModelForCausalLM.from_pretrained`` reloads it.

:func:`cycle_row` runs it on a model type's tiny config, after
:func:`pruning.probe.exclude_unprunable` has taken out the groups whose removal the model's
code cannot follow (as ``prune`` does), and sorts the outcome into
``pass`` / ``refused`` (the tool said why, in one line) / ``unconstructible`` (the tiny
config or its dense forward fails in transformers itself) / ``FAIL`` (a crash or a silent
mismatch). ``benchmarks/coverage.py`` runs it over every causal-LM type of transformers.
"""

from __future__ import annotations

import copy
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from depgraph import DepGraphError, RuleError, build_graph
from pruning import (
    apply_plan,
    compensation_biases,
    input_statistics,
    load_pruned,
    plan_slices,
    save_pruned,
    zero_plan,
)
from pruning.apply import library_class
from pruning.probe import exclude_unprunable

from .tiny_config import build_tiny_model, tiny_config

__all__ = ["CycleFailure", "check_cycle", "cycle_row", "tiny_dense_model", "random_plan", "uniform_plan",
           "CycleRow"]


class CycleFailure(AssertionError):
    """A step of the cycle gave a wrong result (a silent mismatch, not a refusal)."""


@dataclass
class CycleRow:
    model_type: str
    status: str  # pass | refused | unconstructible | FAIL
    reason: str = ""
    groups: str = ""  # e.g. "hidden 1, mlp 2, kv_group 2"


def _counts(group, rng: random.Random) -> int | None:
    """A random number of units to remove that the group's constraints allow."""
    choices = [n for n in range(1, group.num_units) if group.allows(group.num_units - n)]
    return rng.choice(choices) if choices else None


def random_plan(graph, rng: random.Random, kinds: set[str] | None = None,
                zero_only: bool = False, skip: float = 0.3) -> dict[str, list[int]]:
    """Random units of random groups (each group kept with probability ``1 - skip``)."""
    plan = {}
    for group in graph.groups():
        if (zero_only and not group.zero_equivalent) or (kinds and group.kind not in kinds):
            continue
        if rng.random() < skip:
            continue
        count = _counts(group, rng)
        if count:
            plan[group.id] = sorted(rng.sample(range(group.num_units), count))
    return plan


def uniform_plan(graph, rng: random.Random) -> dict[str, list[int]]:
    """As many units of each (kind, size) in every block; model-wide groups prune too."""
    by_shape: dict[tuple, list] = {}
    for group in graph.groups():
        by_shape.setdefault((group.kind, group.num_units, group.layer is None), []).append(group)
    plan = {}
    for groups in by_shape.values():
        allowed = [n for n in range(1, groups[0].num_units)
                   if all(g.allows(g.num_units - n) for g in groups)]
        if not allowed:
            continue
        count = rng.choice(allowed)
        for group in groups:
            plan[group.id] = sorted(rng.sample(range(group.num_units), count))
    return plan


def _input_ids(model: nn.Module, seed: int) -> torch.Tensor:
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 64) or 64)
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out[0]


_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4}


def _tolerance(model: nn.Module) -> float:
    return _TOLERANCE.get(next(model.parameters()).dtype, 5e-2)


def _same(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """``got`` equals ``want`` to ``tol`` (relative to the largest logit), or to what the
    logits' own dtype can hold (Dory returns float32 logits from float64 weights)."""
    tol = max(tol, _TOLERANCE.get(want.dtype, 5e-2))
    if got.shape != want.shape:
        raise CycleFailure(f"{name}: logits of shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        raise CycleFailure(f"{name}: non-finite logits")
    diff = (got - want).abs().max().item()
    if diff > tol * max(1.0, want.abs().max().item()):
        raise CycleFailure(f"{name}: max logit difference {diff:.3g}")


def _check_shapes(model: nn.Module, pruned: nn.Module, graph, plan: dict) -> None:
    expected = {name: list(p.shape) for name, p in model.named_parameters()}
    for (name, dim), indices in plan_slices(graph, plan).items():
        expected[name][dim] -= len(indices)
    added = set((getattr(getattr(pruned, "config", None), "depgraph", None) or {}).get("added", ()))
    found = {name: list(p.shape) for name, p in pruned.named_parameters() if name not in added}
    if found != expected:
        wrong = sorted(n for n in expected if found.get(n) != expected[n])[:3]
        raise CycleFailure(f"shapes differ from slices() at {wrong}: "
                           f"{[(found.get(n), expected[n]) for n in wrong]}")


def _check_regroup(pruned: nn.Module, graph, plan: dict) -> None:
    """The pruned model's graph holds every group that keeps more than one unit, with the
    removed units gone. Groups are matched by their first member (a parameter dim) and by
    whether they are query-head slots (which share their first member with the layer's KV
    groups), not by id (among groups that share a first member, the one of the expected size
    and kind): a group left with one unit is no group any more, and a sibling that
    shared its module path may then drop the kind from its id. KV groups left with one query
    head each are plain attention heads."""
    def key(group):
        return group.members[0].param, group.members[0].dim, group.kind == "query_head"

    rebuilt: dict[tuple, list] = {}
    for found in build_graph(pruned).groups():  # nested axes (SSM heads and head dims) can
        rebuilt.setdefault(key(found), []).append(found)  # share their first member
    left = {g.id: g.num_units - len(set(plan.get(g.id, ()))) for g in graph.groups()}
    slots = {key(g)[:2]: left[g.id] for g in graph.groups() if g.kind == "query_head"}
    for group in graph.groups():
        want, kind = left[group.id], group.kind
        if kind == "kv_group" and slots.get(key(group)[:2], 2) <= 1:
            kind = "attention_head"
        candidates = rebuilt.get(key(group), [])
        found = next((g for g in candidates if (g.num_units, g.kind) == (want, kind)),
                     candidates[0] if candidates else None)
        if want > 1 and (found is None or found.num_units != want or found.kind != kind):
            raise CycleFailure(f"re-built graph: group {group.id!r} has "
                               f"{found and (found.id, found.kind, found.num_units)}, expected "
                               f"{want} units of kind {kind}")


def _check_reload(pruned: nn.Module, ids: torch.Tensor, folder: Path, plain: bool) -> None:
    want, tol = _logits(pruned, ids), _tolerance(pruned)
    dtype = next(pruned.parameters()).dtype
    for label, save in (("save_pretrained", lambda out: pruned.save_pretrained(out)),
                        ("save_pruned", lambda out: save_pruned(pruned, out))):
        out = folder / label
        save(out)
        reloaded = load_pruned(out)
        if next(reloaded.parameters()).dtype != dtype:
            raise CycleFailure(f"{label} + load_pruned: dtype {next(reloaded.parameters()).dtype}, "
                               f"saved {dtype}")
        _same(f"{label} + load_pruned", _logits(reloaded, ids), want, tol)
    record = getattr(pruned.config, "depgraph", None) or {}
    if plain and record.get("config_exact"):
        from transformers import AutoModelForCausalLM

        # what a user calls: the Auto class where it knows the config (some text configs map
        # to no causal-LM class of their own: then the class itself, as for the dense model)
        loader = (AutoModelForCausalLM if type(pruned.config) in AutoModelForCausalLM._model_mapping
                  else library_class(pruned))
        reloaded = loader.from_pretrained(folder / "save_pretrained")
        if next(reloaded.parameters()).dtype != dtype:
            raise CycleFailure(f"from_pretrained: dtype {next(reloaded.parameters()).dtype}")
        _same("from_pretrained", _logits(reloaded.eval(), ids), want, tol)


def check_cycle(model: nn.Module, seed: int = 0, folder: str | Path | None = None,
                graph=None) -> dict:
    """Run the whole cycle (module doc) on ``model``; ``CycleFailure`` on a wrong result.

    Returns counts of what was checked: ``{"groups": {kind: n}, "zero": units, ...}``.
    """
    graph = graph or build_graph(model)
    rng = random.Random(seed)
    ids = _input_ids(model, seed)
    tol = _tolerance(model)
    kinds: dict[str, int] = {}
    for group in graph.groups():
        kinds[group.kind] = kinds.get(group.kind, 0) + 1
    done = {"groups": kinds}
    zero = random_plan(graph, rng, zero_only=True)
    if zero:
        pruned = apply_plan(copy.deepcopy(model), zero, graph)
        _check_shapes(model, pruned, graph, zero)
        _same("pruned vs zeroed", _logits(pruned, ids),
              _logits(zero_plan(copy.deepcopy(model), zero, graph), ids), tol)
        done["zero"] = sum(len(v) for v in zero.values())
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for label, plan in (("any", random_plan(graph, rng, skip=0.2)),
                            ("uniform", uniform_plan(graph, rng))):
            if not plan:
                continue
            pruned = copy.deepcopy(model)
            biases = _compensation(pruned, graph, plan, ids) if label == "any" else None
            apply_plan(pruned, plan, graph, biases=biases)
            _check_added(pruned, biases)
            _check_shapes(model, pruned, graph, plan)
            _logits(pruned, ids)
            _check_regroup(pruned, graph, plan)
            out = Path(tmp) / label
            out.mkdir()
            _check_reload(pruned, ids, out, plain=label == "uniform")
            done[label] = sum(len(v) for v in plan.values())
            if biases:
                done["compensated_layers"] = len(biases)
    return done


def _compensation(model: nn.Module, graph, plan: dict, ids: torch.Tensor) -> dict:
    """Bias compensation of ``plan`` from the consumers' inputs on ``ids``."""
    stats = input_statistics(model, [graph.group(group_id) for group_id in plan], ids)
    return compensation_biases(model, plan, stats, graph)


def _check_added(pruned: nn.Module, biases: dict | None) -> None:
    """Every compensated layer has its bias, every added tensor is recorded and in the
    model, and config_exact no longer claims that the config alone describes the model."""
    record = getattr(getattr(pruned, "config", None), "depgraph", None) or {}
    added = set(record.get("added", ()))
    names = set(dict(pruned.named_parameters()))
    if added - names:
        raise CycleFailure(f"recorded added tensors {sorted(added - names)[:3]} are not in the model")
    without = [path for path in biases or {} if pruned.get_submodule(path).bias is None]
    if without:
        raise CycleFailure(f"compensation left {without[:3]} without a bias")
    if added and record.get("config_exact"):
        raise CycleFailure(f"config_exact claims a plain load, but {sorted(added)[:3]} were added")


def tiny_dense_model(model_type: str, seed: int = 0) -> nn.Module:
    """The tiny model in float64 where it runs so (float32 otherwise). Where it does not build
    or run with one block of each kind, two of each are tried (a model that ties one block's
    weights to the next of its kind needs a next); the error said is that of the first."""
    errors, configs = [], []
    for per_kind in (1, 2):
        try:
            config = tiny_config(model_type, blocks_per_kind=per_kind)
        except Exception as error:  # noqa: BLE001 - transformers refuses the config itself
            errors.append(f"config: {type(error).__name__}: {_one_line(error)}")
            continue
        if any(config.to_dict() == seen for seen in configs):
            continue
        configs.append(config.to_dict())
        try:
            return _run_dense(config, seed)
        except ValueError as error:
            errors.append(str(error))
    raise ValueError(errors[0])


def _run_dense(config, seed: int) -> nn.Module:
    errors = []
    for dtype in (torch.float64, torch.float32):
        model = build_tiny_model(config, dtype=dtype, seed=seed)
        try:
            _logits(model, _input_ids(model, seed))
            return model
        except Exception as error:  # noqa: BLE001 - try the next dtype, then report
            errors.append(f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}")
    raise ValueError(f"dense forward fails: {errors[-1]}")


def cycle_row(model_type: str, seed: int = 0) -> CycleRow:
    """Run :func:`check_cycle` on ``model_type``'s tiny config and classify the outcome."""
    try:
        model = tiny_dense_model(model_type, seed)
    except ValueError as error:
        return CycleRow(model_type, "unconstructible", _one_line(error))
    try:
        graph = build_graph(model)
    except RuleError as error:  # a crash inside depgraph, not a reason
        return CycleRow(model_type, "FAIL", f"RuleError: {_one_line(error)}")
    except DepGraphError as error:  # the tool's own one-line reason
        return CycleRow(model_type, "refused", _one_line(error))
    except Exception as error:  # noqa: BLE001 - anything else is a crash
        return CycleRow(model_type, "FAIL", f"{type(error).__name__}: {_one_line(error)}")
    try:  # groups whose removal the model's code cannot follow are not offered (a reason each)
        excluded = exclude_unprunable(model, graph)
    except Exception as error:  # noqa: BLE001 - a crash of the probe is a failure to fix
        return CycleRow(model_type, "FAIL", f"probe: {type(error).__name__}: {_one_line(error)}")
    if not graph.groups() and excluded:
        return CycleRow(model_type, "refused", next(iter(excluded.values())))
    try:  # from here on, the tool offered these groups: a refusal to prune them is a failure
        done = check_cycle(model, seed=seed, graph=graph)
    except Exception as error:  # noqa: BLE001 - every other outcome is a failure to fix
        return CycleRow(model_type, "FAIL", f"{type(error).__name__}: {_one_line(error)}")
    groups = ", ".join(f"{k} {v}" for k, v in sorted(done["groups"].items()))
    if excluded:
        groups += f" ({len(excluded)} excluded by the probe)"
    if not done["groups"]:
        return CycleRow(model_type, "refused", "no prunable group (every channel is fixed)")
    return CycleRow(model_type, "pass", "", groups)


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:400] if text else type(error).__name__
