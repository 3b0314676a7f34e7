"""The steps of ``depgraph demo`` (:mod:`depgraph_cli.demo` runs them in order)."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from depgraph.progress import progress_bar

if TYPE_CHECKING:  # the settings are defined beside the command that takes them
    from .demo import DemoSettings

def plain(settings: DemoSettings) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}


def text_ids(tokenizer, settings: DemoSettings):
    """WikiText-2 test windows of ``seq_len`` (BOS first where the tokenizer adds one):
    ``sweep_tokens`` worth, then up to ``ppl_tokens`` (the sweep part is a prefix of the main
    comparison)."""
    from evaluation import load_text, token_windows, tokenize_text, window_bos

    ids = tokenize_text(tokenizer, load_text("wikitext2"))
    main = max(settings.ppl_tokens, settings.sweep_tokens)
    if ids.numel() < main:
        raise ValueError(f"WikiText-2 has {ids.numel()} tokens with this tokenizer, fewer than "
                         f"--ppl-tokens {settings.ppl_tokens}")
    windows = token_windows(ids, settings.seq_len, main, bos=window_bos(tokenizer))
    sweep = max(1, settings.sweep_tokens // settings.seq_len)
    return {"sweep": windows[:sweep], "rest": windows[sweep:]}


def graph(dense, html_path: Path) -> tuple[Any, dict]:
    from depgraph import build_graph
    from depgraph.html_view import write_html

    graph = build_graph(dense)
    blocks = sorted({g.layer for g in graph.groups() if g.layer is not None})
    layer = blocks[len(blocks) // 2] if blocks else None  # a typical block, not the first
    write_html(graph, html_path, layer=layer)
    by_kind: dict[str, dict[str, int]] = {}
    for group in graph.groups():
        row = by_kind.setdefault(group.kind, {"groups": 0, "units": 0})
        row["groups"] += 1
        row["units"] += group.num_units
    return graph, {"groups": len(graph.groups()), "by_kind": by_kind, "blocks": len(blocks),
                   "layer": layer, "html": html_path.name}


@dataclass
class Pruned:
    """What the demo keeps of the pruning step (JSON-ready but for the arrays)."""

    stats: dict
    plan: dict[str, list[int]]
    scores: dict
    kept_rows: list[dict]
    kinds_summary: dict
    importance: list[dict]


def prune(dense, tokenizer, graph, settings: DemoSettings) -> tuple[Any, Pruned]:
    """Prune a copy of ``dense``; returns it and what the report shows of it."""
    import numpy as np

    from pruning import prune
    from pruning.calibration import calibration_tokens
    from pruning.importance import get_importance
    from pruning.selection import group_scale

    tokens = None
    if get_importance(settings.importance)[1]:
        tokens = calibration_tokens(tokenizer, settings.calib, n_samples=settings.samples,
                                    seq_len=settings.calib_len, seed=settings.seed, model=dense)
    bar = progress_bar(total=settings.samples, desc="calibration")
    model = copy.deepcopy(dense)
    result = prune(model, settings.ratio, settings.importance, tokenizer=tokenizer,
                   tokens=tokens, kinds=settings.kinds, layers=settings.layers,
                   ranking=settings.ranking, round_to=settings.round_to, seed=settings.seed,
                   graph=graph, progress=bar)
    bar.close()
    stats = {**result.stats, "ranking": settings.ranking, "kinds": settings.kinds,
             "layers": settings.layers, "calib": settings.calib,
             "removed_units": int(sum(len(v) for v in result.plan.values()))}
    kept_rows, importance = [], []
    for group in graph.groups():
        removed = sorted(int(u) for u in result.plan.get(group.id, ()))
        if group.layer is not None:
            kept_rows.append({"group": group.id, "kind": group.kind, "layer": group.layer,
                              "units": group.num_units, "kept": group.num_units - len(removed)})
        if group.id in result.scores:
            raw = np.asarray(result.scores[group.id], dtype=np.float64)
            scale = group_scale(raw) or 1.0  # as the global ranking normalises
            importance.append({"group": group.id, "kind": group.kind, "layer": group.layer,
                               "raw": raw, "scores": raw / scale, "removed": removed})
    return model, Pruned(stats, result.plan, result.scores, kept_rows,
                          kinds_summary(graph, result.plan), importance)


def kinds_summary(graph, plan: dict) -> dict:
    out: dict[str, dict] = {}
    for group in graph.groups():
        kept = group.num_units - len(set(plan.get(group.id, ())))
        row = out.setdefault(group.kind, {"groups": 0, "units": 0, "kept": 0, "kept_min": kept,
                                          "kept_max": kept, "params_removed": 0})
        row["groups"] += 1
        row["units"] += group.num_units
        row["kept"] += kept
        row["kept_min"], row["kept_max"] = min(row["kept_min"], kept), max(row["kept_max"], kept)
        row["params_removed"] += (group.num_units - kept) * int(group.params_per_unit)
    for row in out.values():
        row.update(units_mean=row["units"] / row["groups"], kept_mean=row["kept"] / row["groups"],
                   kept_fraction=row["kept"] / row["units"])
    return out


def reconstruct(dense, pruned, tokenizer, settings: DemoSettings, result: Pruned
                 ) -> tuple[Any, dict]:
    """Least-squares reconstruction of the pruned model against the dense one
    (:func:`recovery.reconstruct`, arXiv 2407.19126) on ``recon_samples`` fresh windows of
    the calibration source; ``--no-reconstruct`` skips it."""
    if not settings.reconstruct:
        return pruned, {"status": "off", "detail": "--no-reconstruct was given"}
    from pruning.calibration import calibration_tokens
    from recovery import reconstruct
    from recovery.blocks import find_blocks

    tokens = calibration_tokens(tokenizer, settings.calib, n_samples=settings.recon_samples,
                                seq_len=settings.calib_len, seed=settings.seed + 1, model=dense)
    bar = progress_bar(total=len(find_blocks(dense)[1]), desc="reconstruction")
    stats = reconstruct(pruned, dense, tokens, plan=result.plan, progress=bar)
    bar.close()
    stats.pop("blocks")
    detail = (f"every linear layer refit block by block on {tokens.shape[0]} x "
              f"{tokens.shape[1]} tokens of {settings.calib}; mean relative layer output error "
              f"{stats['mean_error_before']:.4f} -> {stats['mean_error_after']:.4f}")
    return pruned, {"status": "applied", "detail": detail, **stats}


def distill(dense, pruned, tokenizer, settings: DemoSettings) -> tuple[Any, dict]:
    """Distillation of the pruned model from the dense one (:func:`recovery.distill`: forward
    KL of the next-token distributions, every block parameter, bfloat16 autocast where the
    CPU has it) on at most ``distill_tokens`` tokens of the calibration source and for at most
    about ``distill_seconds`` (fewer tokens on a slower machine), held-out KL on windows of
    other text; ``--distill-tokens 0`` skips it."""
    if not settings.distill_tokens:
        return pruned, {"status": "off", "detail": "--distill-tokens 0 was given"}
    from pruning.calibration import calibration_tokens
    from recovery import DistillSettings
    from recovery import distill as run

    options = DistillSettings(tokens=settings.distill_tokens, seq_len=settings.calib_len,
                              batch_size=settings.distill_batch, val_windows=settings.distill_val,
                              checkpoint_steps=10**9, seed=settings.seed, patience=2,
                              seconds=settings.distill_seconds or None)
    options = replace(options, eval_steps=max(1, math.ceil(options.steps / 4)))
    train = calibration_tokens(tokenizer, settings.calib, n_samples=options.train_windows,
                               seq_len=settings.calib_len, seed=settings.seed + 2,
                               region=(0.0, 0.9), model=dense)
    val = calibration_tokens(tokenizer, settings.calib, n_samples=options.val_windows,
                             seq_len=settings.calib_len, seed=settings.seed + 3,
                             region=(0.9, 1.0), model=dense)
    result = run(pruned, dense, train, val, options,
                 progress=lambda line: print(f"      {line}", flush=True))
    stats = {k: result.stats[k] for k in ("steps", "steps_planned", "train_tokens", "stopped",
                                          "seconds_budget", "val_kl_before",
                                          "val_kl_best", "tokens_per_second", "seconds",
                                          "precision_used", "learning_rate", "params")}
    budget = (f", within {settings.distill_seconds:g} s of {settings.distill_tokens:,} tokens"
              if settings.distill_seconds else "")
    detail = (f"{stats['train_tokens']:,} tokens of {settings.calib} "
              f"({stats['steps']} steps{budget}, {stats['precision_used']}, "
              f"{stats['tokens_per_second']:.0f} tokens/s); held-out KL to the dense model "
              f"{stats['val_kl_before']:.4f} -> {stats['val_kl_best']:.4f}")
    return result.model, {"status": "applied", "detail": detail, **stats}


def ppl(model, ids: dict, settings: DemoSettings) -> dict:
    """Perplexity over the sweep part, then over both parts (token-weighted NLL)."""
    from evaluation import perplexity

    parts = {name: perplexity(model, None, part, seq_len=settings.seq_len,
                              batch_size=settings.batch_size)
             for name, part in ids.items() if part.shape[0] > 0}
    tokens = sum(p["tokens"] for p in parts.values())
    nll = sum(p["nll"] * p["tokens"] for p in parts.values()) / tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": tokens, "seq_len": settings.seq_len,
            "windows": sum(p["windows"] for p in parts.values()), "text": "wikitext2 (test)",
            "sweep_part": parts["sweep"]}


def evaluate(model, tokenizer, ids: dict, settings: DemoSettings) -> dict:
    from evaluation import efficiency_report, evaluate_zeroshot

    results: dict[str, Any] = {"perplexity": ppl(model, ids, settings)}
    if settings.tasks:
        results["zeroshot"] = evaluate_zeroshot(model, tokenizer, settings.tasks,
                                                limit=settings.zeroshot_limit,
                                                batch_size=settings.batch_size)
    # timed later, next to the other models: see timings
    results["efficiency"] = efficiency_report(model, seq_len=settings.seq_len, repeats=0)
    return results


def agreement(dense, pruned, ids: dict, settings: DemoSettings) -> dict:
    from evaluation import next_token_agreement

    windows = ids["sweep"][: settings.agreement_windows]
    return next_token_agreement(dense, pruned, windows, batch_size=settings.batch_size)


def sweep_ratios(settings: DemoSettings) -> list[float]:
    return sorted({round(r, 6) for r in (*settings.sweep, settings.ratio)})


def sweep(dense, pruned, graph, result: Pruned, dense_results, pruned_results, ids,
           settings: DemoSettings, reuse_main: bool) -> tuple[list[dict], dict[float, Any]]:
    """Dense, then each ratio: the main plan's scores re-selected, applied to a dense copy.
    Returns the points (speeds filled in by :func:`timings`) and the model of each."""
    from evaluation import count_parameters, perplexity
    from pruning.apply import apply_plan
    total = count_parameters(dense)
    eligible = [g for g in graph.groups() if g.id in result.scores]

    def point(ratio, model, ppl):
        params = count_parameters(model)
        return {"ratio": ratio, "ratio_removed": 1 - params / total, "params": params,
                "ppl": ppl["ppl"], "ppl_tokens": ppl["tokens"]}

    points = [point(0.0, dense, dense_results["perplexity"]["sweep_part"])]
    models = {0.0: dense}
    for ratio in sweep_ratios(settings):
        if reuse_main and math.isclose(ratio, settings.ratio):
            points.append(point(ratio, pruned, pruned_results["perplexity"]["sweep_part"]))
            models[ratio] = pruned
            continue
        print(f"      ratio {ratio}: select, apply, perplexity", flush=True)
        plan = _plan_at(eligible, result, ratio, total, settings)
        model = apply_plan(copy.deepcopy(dense), plan, graph)
        ppl = perplexity(model, None, ids["sweep"], seq_len=settings.seq_len,
                         batch_size=settings.batch_size)
        points.append(point(ratio, model, ppl))
        models[ratio] = model
    return points, models


def _plan_at(eligible: list, result: Pruned, ratio: float, total: int,
             settings: DemoSettings) -> dict:
    """The main run's scores (and measured allocation curves) re-selected at ``ratio``."""
    import numpy as np

    from pruning.allocation import allocate_plan
    from pruning.selection import select_plan

    if settings.ranking == "allocate":
        curves = {gid: (np.array(c["removed"]), np.array(c["kl"]))
                  for gid, c in result.stats["allocation"].items()}
        return allocate_plan(eligible, result.scores, curves, ratio=ratio, total_params=total,
                             round_to=settings.round_to)
    return select_plan(eligible, result.scores, ratio=ratio, total_params=total,
                       kinds={g.kind for g in eligible}, ranking=settings.ranking,
                       round_to=settings.round_to)


def timings(dense, pruned, sweep_models: dict, dense_results: dict, pruned_results: dict,
             sweep: list[dict], settings: DemoSettings) -> None:
    """Latency of the dense, the pruned (batch 1 and 4) and each sweep model (batch 1), timed
    in alternating rounds so that their ratios do not mix two moments of the machine; fills
    the ``efficiency`` entries and the sweep points in place."""
    from evaluation import latency_medians, measure_latency_rounds, timing_spread

    models = {"dense": dense, "pruned": pruned}
    names = {}
    for ratio, model in sweep_models.items():
        names[ratio] = next((n for n, m in models.items() if m is model), f"sweep {ratio}")
        models.setdefault(names[ratio], model)
    batches = {name: (1, 4) if name in ("dense", "pruned") else (1,) for name in models}
    rounds = measure_latency_rounds(models, rounds=settings.rounds, batch_sizes=batches,
                                    prompt_len=settings.seq_len, new_tokens=settings.new_tokens)
    speeds = {name: latency_medians(rows) for name, rows in rounds.items()}
    for name, results in (("dense", dense_results), ("pruned", pruned_results)):
        results["efficiency"].update(speeds[name], timing_rounds=settings.rounds,
                                     timing_spread=timing_spread(rounds[name]))
    for point in sweep:
        speed = speeds[names[point["ratio"]]]
        point.update(prefill_tok_s=speed.get("prefill_b1_tok_s"),
                     gen_tok_s=speed.get("gen_b1_tok_s"))


def figures(work: Path, report: dict, result: Pruned) -> dict:
    import numpy as np

    from evaluation.plots import plot_importance, plot_kept_width, plot_sweep

    name, prune = report["model"], report["pruning"]
    plot_kept_width(report["kept_widths"], work / "kept_width.png",
                    title=f"{name}: kept width per block ({prune['ratio_removed']:.1%} of "
                          f"parameters removed, {prune['criterion']})")
    plot_sweep(report["sweep"], work / "sweep.png", highlight=prune["ratio_removed"],
               title=f"{name}: {prune['criterion']} importance, {prune['ranking']} ranking, "
                     "one-shot, no reconstruction or distillation")
    plot_importance(result.importance, work / "importance.png",
                    title=f"{name}: {prune['criterion']} importance (normalised per group)")
    arrays = {f"score/{g['group']}": g["raw"] for g in result.importance}
    arrays.update({f"removed/{g}": np.asarray(u, dtype=np.int64) for g, u in result.plan.items()})
    np.savez_compressed(work / "scores.npz", **arrays)
    return {"kept_width": "kept_width.png", "sweep": "sweep.png", "importance": "importance.png",
            "scores": "scores.npz"}

