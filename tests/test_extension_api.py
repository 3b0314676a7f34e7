"""The extension API as another pruning method's author uses it (issue 15).

``plugin_method.py`` is such a method in a file of its own, written only with the names the
README's "Writing a pruning method" section documents; here it registers a criterion, reads
input statistics and roles, chooses a plan without applying it, applies it with bias
compensation, saves with ``model.save_pretrained``, reloads exactly with ``load_pruned`` and
runs from the command line. The built-in ``flap`` and ``wanda_sp`` are held to the same
rule (public names only).
"""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

import numpy as np
import plugin_method
import pytest
import torch
from archs import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import pruning
from depgraph import PlanError, Role, build_graph
from depgraph.paths import models_dir
from depgraph_cli.main import main
from pruning import (
    PruneSettings,
    ScoringContext,
    available_importance,
    compensation_biases,
    input_statistics,
    load_pruned,
    prune,
    register_importance,
    resolve_importance,
    score_groups,
)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
STORIES = models_dir() / "stories260K"


def _stories():
    return (AutoModelForCausalLM.from_pretrained(STORIES).eval(),
            AutoTokenizer.from_pretrained(STORIES))


def _tokens(vocab: int, n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _same_tensors(model, other) -> bool:
    ours, theirs = model.state_dict(), other.state_dict()
    return set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


# ---------------------------------------------------------------- documented names only
def _extension_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Writing a pruning method\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "README.md has a section '## Writing a pruning method'"
    return match.group(1)


@pytest.mark.parametrize("path", ["tests/plugin_method.py", "pruning/importance/flap.py",
                                  "pruning/importance/wanda_sp.py"])
def test_methods_import_only_names_the_readme_documents(path):
    section = _extension_section()
    imported = []
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module in {"__future__", "depgraph", "pruning",
                                                       "numpy", "torch"}, (path, node.module)
            if node.module in ("depgraph", "pruning"):
                imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            assert {alias.name for alias in node.names} <= {"numpy", "torch"}, path
    assert imported
    undocumented = [name for name in imported if not re.search(rf"`[^`]*\b{name}\b", section)]
    assert not undocumented, f"{path} imports {undocumented}, which README does not document"
    for name in imported:  # and they are public
        module = pruning if hasattr(pruning, name) else __import__("depgraph")
        assert name in module.__all__, name


# ---------------------------------------------------------------- the whole path of a plug-in
def test_a_plugin_chooses_applies_with_compensation_saves_and_reloads_exactly(tmp_path):
    model, _ = _stories()
    tokens = _tokens(model.config.vocab_size)
    assert plugin_method.NAME in available_importance()
    dense = copy.deepcopy(model)
    graph = build_graph(model)

    plan = plugin_method.choose(model, tokens, 0.2, graph)
    assert plan and set(plan) <= {g.id for g in graph.groups()}
    assert _same_tensors(model, dense)  # chosen, not applied

    # roles say which layers read each group's channels; the statistics are of their inputs
    stats = input_statistics(dense, [graph.group(g) for g in plan], tokens)
    for group_id in plan:
        readers = plugin_method.consumers(graph, group_id)
        assert readers and {feed.module for feed in stats[group_id]} == set(readers)
        assert all(feed.stats.count == tokens.numel() for feed in stats[group_id])

    assert plugin_method.prune_compensated(model, tokens, 0.2) == plan
    record = model.config.depgraph
    assert record["added"] and record["config_exact"] is False
    # the compensation oracle: fed the mean input, every compensated layer gives exactly
    # the dense layer's output (the removed channels' mean contribution is in the bias)
    for group_id, units in plan.items():
        for feed in stats[group_id]:
            keep = torch.from_numpy(~np.isin(feed.units, units))
            mean = feed.stats.mean.float()
            layer, dense_layer = model.get_submodule(feed.module), dense.get_submodule(feed.module)
            assert layer.bias is not None and dense_layer.bias is None
            with torch.no_grad():
                torch.testing.assert_close(layer(mean[keep]), dense_layer(mean),
                                           rtol=1e-5, atol=1e-5)

    ids = tokens[:2]
    model.save_pretrained(tmp_path / "out")
    reloaded = load_pruned(tmp_path / "out")
    assert _same_tensors(reloaded, model)
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))

    # prune() with the same function, tokens and ranking composes the same steps
    again = prune(copy.deepcopy(dense), 0.2, plugin_method.output_energy, tokens=tokens,
                  compensate=True, kinds="mlp,attention")
    assert again.plan == plan and again.stats["ranking"] == "global_raw"
    assert again.stats["criterion"] == plugin_method.NAME
    assert torch.equal(_logits(again.model, ids), _logits(model, ids))


def test_the_plugin_runs_from_the_cli_and_its_plan_replays_with_plan_json(tmp_path, capsys):
    first, report = tmp_path / "first", tmp_path / "first.json"
    common = ["--compensate", "--samples", "2", "--seq-len", "32", "--ppl-tokens", "0",
              "--threads", "1"]
    assert main(["prune", str(STORIES), "--ratio", "0.2", "--importance",
                 "plugin_method:output_energy", *common, "--out", str(first),
                 "--json", str(report)]) == 0
    assert "bias compensation" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["criterion"] == plugin_method.NAME and data["ranking"] == "global_raw"
    assert data["compensation"]["modules"] > 0 and data["plan"]

    plan_file, second = tmp_path / "plan.json", tmp_path / "second"
    plan_file.write_text(json.dumps(data["plan"]))
    assert main(["prune", str(STORIES), "--plan", str(plan_file), *common,
                 "--out", str(second)]) == 0
    assert json.loads((second / "pruning.json").read_text())["criterion"] == "given plan"
    ids = _tokens(512, n=2, length=16, seed=3)
    a, b = load_pruned(first), load_pruned(second)
    assert a.config.depgraph["added"] and a.config.depgraph["added"] == b.config.depgraph["added"]
    assert torch.equal(_logits(a, ids), _logits(b, ids))  # same plan, same compensation


@pytest.mark.parametrize("argv, message", [
    (["--plan", "PLAN", "--ratio", "0.2"], "--ratio"),
    (["--plan", "PLAN", "--importance", "l2"], "--importance"),
    (["--plan", "BADGROUP"], "nope.mlp"),
    (["--plan", "BADUNIT"], "9999"),
    (["--plan", "NOTLIST"], "'model.layers.0.mlp'"),
    (["--ratio", "0.2", "--importance", "no_such_module_xyz:score"], "no_such_module_xyz"),
    (["--ratio", "0.2", "--importance", "plugin_method:no_such_function"], "no_such_function"),
    (["--ratio", "0.2", "--compensate", "--reconstruct"], "--compensate"),
])
def test_cli_plan_and_plugin_errors_are_one_line_and_status_2(argv, message, tmp_path, capsys):
    plans = {"PLAN": {"model.layers.0.mlp": [0]}, "BADGROUP": {"nope.mlp": [0]},
             "BADUNIT": {"model.layers.0.mlp": [9999]}, "NOTLIST": {"model.layers.0.mlp": 3}}
    for index, arg in enumerate(argv):
        if arg in plans:
            (tmp_path / "plan.json").write_text(json.dumps(plans[arg]))
            argv = [*argv[:index], str(tmp_path / "plan.json"), *argv[index + 1:]]
    code = main(["prune", str(STORIES), *argv, "--ppl-tokens", "0", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- criteria as names or functions
def test_a_criterion_is_a_callable_a_module_function_or_a_replaced_name():
    def halves(ctx):
        return {g.id: np.arange(g.num_units, dtype=float) for g in ctx.groups}

    model = tiny_model("llama")
    graph = build_graph(model)
    groups = [g for g in graph.groups() if g.kind == "mlp"]
    context = ScoringContext(model, graph, groups, tokens=_tokens(61, 1, 4))
    assert resolve_importance(halves).needs_data  # unregistered: the safe assumption
    np.testing.assert_array_equal(score_groups(context, halves)[groups[0].id],
                                  np.arange(groups[0].num_units))
    assert resolve_importance("plugin_method:output_energy").name == plugin_method.NAME
    plan = prune(copy.deepcopy(model), 0.1, halves, tokens=_tokens(61, 2, 8), kinds="mlp").plan
    assert all(units == list(range(len(units))) for units in plan.values())  # lowest first

    register_importance("test_ext_twice", needs_data=False, summary="first")(halves)
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        register_importance("test_ext_twice", needs_data=False, summary="second")(halves)
    register_importance("test_ext_twice", needs_data=False, summary="second",
                        replace=True)(lambda ctx: halves(ctx))
    assert available_importance()["test_ext_twice"] == "second"
    for bad in ("", "a:b"):
        with pytest.raises(ValueError, match="without ':'"):
            register_importance(bad, needs_data=False, summary="")
    with pytest.raises(ValueError, match="'sideways'"):
        register_importance("x", needs_data=False, summary="", ranking="sideways")


def test_a_criterion_that_returns_bad_scores_is_refused_naming_the_group():
    model = tiny_model("llama")
    graph = build_graph(model)
    group = graph.groups()[1]
    context = ScoringContext(model, graph, [group], tokens=_tokens(61, 1, 4))
    with pytest.raises(ValueError, match=rf"scores of group '{re.escape(group.id)}' must be"):
        score_groups(context, lambda ctx: {group.id: [1.0]})
    with pytest.raises(ValueError, match="gave no scores"):
        score_groups(context, lambda ctx: {})


def test_an_installed_plugin_is_found_by_its_entry_point(tmp_path, monkeypatch):
    package = tmp_path / "ext_energy_plugin"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import numpy as np\n\n"
        "def score(ctx):\n"
        "    return {g.id: np.ones(g.num_units) for g in ctx.groups}\n")
    info = tmp_path / "ext_energy_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ext-energy-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[depgraph.importance]\next_energy = ext_energy_plugin:score\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "ext_energy" in available_importance()
    assert PruneSettings(importance="ext_energy").ranking == "global"
    model = tiny_model("llama")
    graph = build_graph(model)
    scores = score_groups(ScoringContext(model, graph, graph.groups(), tokens=_tokens(61, 1, 4)),
                          "ext_energy")
    assert all((values == 1).all() for values in scores.values())


# ---------------------------------------------------------------- statistics and compensation
def test_input_statistics_are_the_moments_of_what_each_consumer_reads():
    model = tiny_model("gpt2")  # Conv1D: reads its input along weight dim 0
    graph = build_graph(model)
    groups = [g for g in graph.groups() if g.kind in ("mlp", "hidden")]
    tokens = _tokens(61, 3, 8)
    stats = input_statistics(model, groups, tokens, gram=True)
    seen: dict[str, list] = {}
    hooks = [model.get_submodule(feed.module).register_forward_pre_hook(
        lambda module, args, path=feed.module: seen.setdefault(path, []).append(
            args[0].detach().reshape(-1, args[0].shape[-1]).double()))
        for group in groups for feed in stats[group.id]]
    with torch.no_grad():
        for row in tokens:
            model(input_ids=row[None])
    for hook in hooks:
        hook.remove()
    assert stats["transformer.h.0.mlp"][0].module == "transformer.h.0.mlp.c_proj"
    assert len(stats["hidden"]) > 2  # every projection after a norm, and lm_head
    for group in groups:
        for feed in stats[group.id]:
            assert Role.CONSUMER in feed.member.roles
            x = torch.cat(seen[feed.module][:len(tokens)])
            assert feed.stats.count == x.shape[0] == tokens.numel()
            torch.testing.assert_close(feed.stats.mean, x.mean(0))
            torch.testing.assert_close(feed.stats.second_moment, (x * x).mean(0))
            torch.testing.assert_close(feed.stats.gram, x.T @ x / x.shape[0])
            assert (feed.stats.variance >= 0).all()
    with pytest.raises(ValueError, match="exactly one of tokens"):
        input_statistics(model, groups)
    with pytest.raises(ValueError, match=r"torch.Size\(\[3\]\)"):
        input_statistics(model, groups, torch.ones(3, dtype=torch.long))


def test_compensation_biases_are_the_removed_columns_times_their_mean_input():
    model = tiny_model("llama")
    graph = build_graph(model)
    group = graph.group("model.layers.0.mlp")
    tokens = _tokens(61, 2, 8)
    stats = input_statistics(model, [group], tokens)
    plan = {group.id: [0, 3, 5]}
    biases = compensation_biases(model, plan, stats, graph)
    feed, = stats[group.id]
    weight = model.get_submodule(feed.module).weight.detach().double()
    positions = torch.from_numpy(np.nonzero(np.isin(feed.units, plan[group.id]))[0])
    assert list(biases) == [feed.module]
    torch.testing.assert_close(biases[feed.module],
                               weight[:, positions] @ feed.stats.mean[positions])
    with pytest.raises(PlanError, match="'nope'"):
        compensation_biases(model, {"nope": [0]}, stats, graph)


@pytest.mark.parametrize("importance", ["flap", "wanda_sp"])
def test_flap_and_wanda_sp_prune_with_compensation_and_reload_exactly(importance, tmp_path):
    model, tokenizer = _stories()
    result = prune(model, 0.2, importance, tokenizer=tokenizer, n_samples=2, seq_len=32,
                   compensate=True)
    assert result.stats["ranking"] == resolve_importance(importance).ranking
    assert result.stats["compensation"]["modules"] > 0
    if importance == "wanda_sp":  # local: groups of one size lose as many units each
        counts: dict = {}
        for group in build_graph(_stories()[0]).groups():
            if group.kind in ("mlp", "kv_group"):
                counts.setdefault(group.num_units, set()).add(len(result.plan.get(group.id, ())))
        assert all(len(found) == 1 for found in counts.values()), counts
        assert max(max(found) for found in counts.values()) > 0
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    result.model.save_pretrained(tmp_path / "out")
    reloaded = load_pruned(tmp_path / "out")
    assert _same_tensors(reloaded, result.model)
    assert torch.equal(_logits(reloaded, ids), _logits(result.model, ids))


def test_flap_is_the_fluctuation_standardised_per_layer_and_module():
    """FLAP's AL-AM by hand: Var(x_j) * ||W[:, j]||^2 per channel read, standardised over
    the channels of each layer's module; a unit (a KV group here) is its channels' mean."""
    model = tiny_model("llama")
    graph = build_graph(model)
    groups = [g for g in graph.groups() if g.kind in ("mlp", "kv_group")]
    tokens = _tokens(61, 2, 8)
    scores = score_groups(ScoringContext(model, graph, groups, tokens=tokens), "flap")
    stats = input_statistics(model, groups, tokens)
    by_hand = {}
    for group in groups:
        feed, = stats[group.id]
        weight = model.get_submodule(feed.module).weight.detach().double()
        values = (feed.stats.variance * (weight ** 2).sum(0)).numpy()
        standard = (values - values.mean()) / values.std(ddof=1)
        by_hand[group.id] = np.array([standard[feed.units == u].mean()
                                      for u in range(group.num_units)])
    lowest = min(v.min() for v in by_hand.values())
    assert any(g.kind == "kv_group" for g in groups)
    for group in groups:
        np.testing.assert_allclose(scores[group.id], by_hand[group.id] - lowest, atol=1e-9)


def test_compensation_and_reconstruction_do_not_combine():
    from recovery import prune_and_reconstruct

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="compensate=True does not combine with reconstruction"):
        prune_and_reconstruct(model, 0.2, "l2", compensate=True, tokens=_tokens(61, 2, 8))
