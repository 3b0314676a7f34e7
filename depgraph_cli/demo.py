"""``depgraph demo``: the main job end to end on one model, written into a report folder.

    depgraph demo [MODEL] --out DIR [--ratio 0.2] [--importance second_moment] [--fast]

Steps, each announced on one line with its time (tqdm bars on a terminal):

1. load the model (``default``: SmolLM2-135M, converted once and cached, see
   :mod:`depgraph_cli.models`) and its tokenizer;
2. trace its dependency graph and write ``graph.html`` (the coupled groups, block by block);
3. prune ``--ratio`` of the parameters with ``--importance`` (:func:`pruning.prune`);
4. reconstruct: refit the pruned model's linear layers block by block against the dense
   model (:func:`recovery.reconstruct`, least squares, no training; ``--no-reconstruct``);
5. evaluate the dense and 6. the pruned model: WikiText-2 perplexity, zero-shot accuracy,
   parameters, weight bytes, MACs, peak forward memory, and next-token agreement with the
   dense model;
7. sweep: the same scores, other ratios (``--sweep``): perplexity per ratio;
8. time the dense, the pruned (prefill / generation tokens/s at batch 1 and 4) and each
   sweep model (batch 1) in alternating rounds
   (:func:`evaluation.measure_latency_side_by_side`), so that a speed-up is not the
   difference between two moments of a shared machine;
9. save the pruned model (``model/``, :func:`pruning.save_pruned`);
10. write ``kept_width.png``, ``sweep.png``, ``importance.png`` (:mod:`evaluation.plots`),
    ``scores.npz`` (raw scores and plan), ``report.json`` and ``report.md``
    (:mod:`evaluation.report`).

Everything is written into a temporary folder beside ``--out`` that is renamed to ``--out``
at the end, so a failed run leaves no half-written report. The perplexity text is tokenized
once; the sweep scores its first ``sweep_tokens`` and the dense-vs-pruned comparison adds
the tokens up to ``ppl_tokens``, so the sweep's dense point is part of the main number.
The defaults keep the whole job under 20 minutes for SmolLM2-135M on 2 CPU cores;
``--fast`` uses tiny settings (for tests).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .argtypes import positive_int
from .argtypes import ratio as ratio_arg

__all__ = ["FAST", "FULL", "DemoSettings", "add_demo", "run_demo", "run_job"]


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; :data:`FULL` and :data:`FAST` are the two presets."""

    ratio: float = 0.2
    # the retraining-free criterion that leads benchmarks/RESULTS.md at 20% (one-shot prune
    # and reconstruction of SmolLM2, first 16384 tokens: 125.35; retraining_free 132.33)
    importance: str = "second_moment"
    ranking: str = "global"
    kinds: str = "mlp,attention"
    layers: str | None = None
    sweep: tuple[float, ...] = (0.1, 0.2, 0.3)
    calib: str = "bundled"
    samples: int = 10
    calib_len: int = 128
    seq_len: int = 128
    ppl_tokens: int = 16384  # as benchmarks/RESULTS.md; 32768 left the job 2 min under 20
    sweep_tokens: int = 16384
    tasks: tuple[str, ...] = ("piqa", "boolq", "arc_easy", "hellaswag", "winogrande")
    zeroshot_limit: int = 60
    batch_size: int = 8
    new_tokens: int = 16
    rounds: int = 3
    agreement_windows: int = 16
    reconstruct: bool = True
    recon_samples: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ValueError(f"--ratio must be in (0, 1), got {self.ratio!r}")
        bad = [r for r in self.sweep if not 0 < r < 1]
        if bad:
            raise ValueError(f"--sweep ratios must be in (0, 1), got {bad}")
        if self.seq_len < 2 or self.sweep_tokens < self.seq_len:
            raise ValueError(f"--sweep-tokens ({self.sweep_tokens}) must be at least --seq-len "
                             f"({self.seq_len}) and --seq-len at least 2")


#: Defaults for the real run (SmolLM2-135M, 2 CPU cores, < 20 minutes).
FULL = DemoSettings()
#: Tiny settings for tests (``--fast``).
FAST = DemoSettings(sweep=(0.2, 0.4), samples=2, calib_len=32, seq_len=32, ppl_tokens=512,
                    sweep_tokens=256, tasks=("piqa", "winogrande"), zeroshot_limit=4,
                    batch_size=4, new_tokens=4, rounds=1, agreement_windows=4,
                    recon_samples=4)

_STEPS = ("load model and tokenizer", "trace the dependency graph, write graph.html",
          "score and prune", "reconstruct", "evaluate the dense model",
          "evaluate the pruned model", "ratio sweep", "time every model side by side",
          "save the pruned model",
          "plots and report")


# ------------------------------------------------------------------------------ CLI
def _ratios(text: str) -> tuple[float, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(ratio_arg(part.strip()) for part in text.split(","))


def _names(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    names = tuple(part.strip() for part in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty name in {text!r}")
    return names


def add_demo(subparsers) -> None:
    """Register ``depgraph demo`` (called from :data:`depgraph_cli.main.COMMANDS`)."""
    parser = subparsers.add_parser(
        "demo", help="prune, evaluate and report on one model, end to end",
        description="Load MODEL (default: the built-in SmolLM2-135M), trace its graph, prune "
                    "it, evaluate dense vs pruned, sweep ratios, and write report.md, "
                    "report.json, PNG plots, graph.html and the pruned model into --out.")
    parser.add_argument("model", nargs="?", default="default", metavar="MODEL",
                        help="local folder, hub id or 'default' (default: default)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="report folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing non-empty --out")
    parser.add_argument("--fast", action="store_true",
                        help="tiny settings (tests); explicit options still win")
    option = {"default": None}
    parser.add_argument("--ratio", type=ratio_arg, **option, help="fraction of parameters to remove "
                        f"(default {FULL.ratio})")
    parser.add_argument("--importance", **option, help=f"criterion (default {FULL.importance})")
    parser.add_argument("--ranking", choices=["global", "global_raw", "local"], **option,
                        help=f"how units are compared across groups (default {FULL.ranking})")
    parser.add_argument("--kinds", **option, help=f"group kinds that may shrink ({FULL.kinds})")
    parser.add_argument("--layers", **option, help="blocks that may shrink, e.g. 3:-2 (all)")
    parser.add_argument("--sweep", type=_ratios, **option,
                        help="comma-separated ratios for the sweep, or 'none' (0.1,0.2,0.3)")
    parser.add_argument("--calib", **option, help=f"calibration source ({FULL.calib})")
    parser.add_argument("--samples", type=positive_int, **option,
                        help=f"calibration samples ({FULL.samples})")
    parser.add_argument("--seq-len", type=positive_int, **option,
                        help=f"perplexity window and speed prompt length ({FULL.seq_len})")
    parser.add_argument("--ppl-tokens", type=positive_int, **option,
                        help=f"WikiText-2 tokens for dense vs pruned ({FULL.ppl_tokens})")
    parser.add_argument("--sweep-tokens", type=positive_int, **option,
                        help=f"WikiText-2 tokens per sweep point ({FULL.sweep_tokens})")
    parser.add_argument("--zeroshot-limit", type=positive_int, **option,
                        help=f"items per zero-shot task ({FULL.zeroshot_limit})")
    parser.add_argument("--tasks", type=_names, **option,
                        help=f"zero-shot tasks or 'none' ({','.join(FULL.tasks)})")
    parser.add_argument("--batch-size", type=positive_int, **option,
                        help=f"evaluation batch size ({FULL.batch_size})")
    parser.add_argument("--no-reconstruct", dest="reconstruct", action="store_false",
                        default=None, help="evaluate the pruned model without reconstruction")
    parser.add_argument("--recon-samples", type=positive_int, **option,
                        help=f"calibration windows for reconstruction ({FULL.recon_samples})")
    parser.add_argument("--seed", type=int, **option)
    parser.add_argument("--threads", type=positive_int, default=2, metavar="N",
                        help="CPU threads for torch (default: 2)")
    parser.set_defaults(handler=run_demo)


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """The preset (``--fast`` or not) with every option the user gave."""
    names = {f.name for f in fields(DemoSettings)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return replace(FAST if args.fast else FULL, **given)


def run_demo(args: argparse.Namespace) -> int:
    """The ``depgraph demo`` handler: run the job, print where the report is."""
    from pruning.importance import get_importance

    settings = settings_from_args(args)
    get_importance(settings.importance)  # fail fast on an unknown name
    _check_inputs(args.model, settings)
    _check_out(args.out, args.overwrite, args.model, settings)
    command = "depgraph " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["demo"] else \
        f"depgraph demo {args.model} --out {args.out}"
    report = run_job(args.model, args.out, settings, overwrite=args.overwrite,
                     threads=args.threads, command=command)
    out = Path(args.out).resolve()
    print(f"\nreport: {out / 'report.md'}\n        {out / 'report.json'}, plots "
          f"{', '.join(report['files'][k] for k in ('kept_width', 'sweep', 'importance'))}, "
          f"{report['files']['graph_html']}, pruned model in {out / 'model'}")
    return 0


def _check_out(out: Path, overwrite: bool, spec: str, settings: DemoSettings) -> None:
    """``--out`` can be written and is none of the inputs (see depgraph.outputs)."""
    from .models import resolve_model_path
    from .outputs import Output, check_outputs

    check_outputs([Output("--out", Path(out), folder=True)],
                  [("MODEL", resolve_model_path(spec)), ("--calib", settings.calib)], overwrite)


def _check_inputs(spec: str, settings: DemoSettings) -> None:
    """The model's files, config and position limit, and the calibration text."""
    from pruning.calibration import check_source

    from .model_checks import check_seq_len, check_tokenizer_files, check_weight_files
    from .models import load_config, resolve_model_path

    source = resolve_model_path(spec)
    config = load_config(source)
    check_seq_len(config, settings.seq_len, "--seq-len")
    check_seq_len(config, settings.calib_len, "calibration length")
    if isinstance(source, Path):
        check_weight_files(source)
        check_tokenizer_files(source)
    check_source(settings.calib)


# ------------------------------------------------------------------------------ the job
class _Steps:
    """Prints ``[k/n] name`` before a step and its time after; keeps the times."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names, self.times = names, []

    @contextmanager
    def __call__(self, name: str, note: str = ""):
        print(f"[{len(self.times) + 1}/{len(self.names)}] {name}{note} ...", flush=True)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.times.append({"name": name, "seconds": round(seconds, 2)})
        print(f"      done in {seconds:.1f} s", flush=True)


def run_job(model_spec: str, out: str | os.PathLike[str], settings: DemoSettings = FULL, *,
            overwrite: bool = False, threads: int | None = None, command: str = "") -> dict:
    """Run every step (see the module docstring) and return the ``report.json`` dict."""
    import torch

    out = Path(out)
    _check_out(out, overwrite, model_spec, settings)
    if threads:
        torch.set_num_threads(threads)
    from depgraph.paths import atomic_folder
    from evaluation.report import write_report

    with atomic_folder(out) as work:
        report = _steps(model_spec, work, settings, out)
        report.update(command=command, threads=torch.get_num_threads())
        write_report(work, report)
    return report


def _steps(spec: str, work: Path, settings: DemoSettings, out: Path) -> dict:
    from .fingerprint import dense_record
    from .model_checks import check_finite
    from .models import load_model, load_tokenizer, resolve_model_path

    start = time.perf_counter()
    step = _Steps(_STEPS)
    with step(_STEPS[0], f" ({spec})"):
        source = resolve_model_path(spec)
        dense, tokenizer = load_model(spec), load_tokenizer(spec)
        check_finite(dense, spec)
        ids = _text_ids(tokenizer, settings)
    with step(_STEPS[1]):
        graph = _graph(dense, work / "graph.html")
    with step(_STEPS[2], f" ({settings.importance}, ratio {settings.ratio})"):
        pruned, result = _prune(dense, tokenizer, graph.pop("graph"), settings)
    with step(_STEPS[3]):
        recon = _reconstruct(dense, pruned, tokenizer, settings, result)
        pruned = recon.pop("model")
    with step(_STEPS[4]):
        dense_results = _evaluate(dense, tokenizer, ids, settings)
    with step(_STEPS[5]):
        pruned_results = _evaluate(pruned, tokenizer, ids, settings)
        agreement = _agreement(dense, pruned, ids, settings)
    with step(_STEPS[6], f" ({', '.join(str(r) for r in _sweep_ratios(settings))})"):
        sweep, sweep_models = _sweep(dense, pruned, result, dense_results, pruned_results, ids,
                                     settings, reuse_main=recon["status"] != "applied")
    with step(_STEPS[7], f" ({settings.rounds} round{'s' * (settings.rounds != 1)})"):
        _timings(dense, pruned, sweep_models, dense_results, pruned_results, sweep, settings)
        del sweep_models
    with step(_STEPS[8]):
        from pruning.io import save_pruned

        extra = {k: v for k, v in result["stats"].items() if k != "kept_widths"}
        save_pruned(pruned, work / "model", tokenizer=tokenizer,
                    extra={**extra, **dense_record(source), "model_spec": spec,
                           "reconstruction": recon["status"]})
    report = {"model": spec, "model_path": str(source), "out": str(out),
              "created": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": _plain(settings),
              "graph": graph, "pruning": result["stats"], "reconstruction": recon,
              "dense": dense_results, "pruned": pruned_results, "agreement": agreement,
              "sweep": sweep, "kept_widths": result["kept_rows"],
              "kinds_summary": result["kinds_summary"]}
    with step(_STEPS[9]):
        report["files"] = _figures(work, report, result)
        report["files"].update(graph_html="graph.html", model="model", report_md="report.md",
                               report_json="report.json")
    report.update(steps=step.times, total_seconds=round(time.perf_counter() - start, 1),
                  peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return report


def _plain(settings: DemoSettings) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}


def _text_ids(tokenizer, settings: DemoSettings):
    """WikiText-2 test token ids, cut to whole windows: ``sweep_tokens`` then up to
    ``ppl_tokens`` (the sweep part is a prefix of the main comparison)."""
    from evaluation import load_text, tokenize_text

    ids = tokenize_text(tokenizer, load_text("wikitext2"))
    sweep = settings.sweep_tokens // settings.seq_len * settings.seq_len
    main = max(settings.ppl_tokens, settings.sweep_tokens) // settings.seq_len * settings.seq_len
    if ids.numel() < main:
        raise ValueError(f"WikiText-2 has {ids.numel()} tokens with this tokenizer, fewer than "
                         f"--ppl-tokens {settings.ppl_tokens}")
    return {"sweep": ids[:sweep], "rest": ids[sweep:main]}


def _graph(dense, html_path: Path) -> dict:
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
    return {"graph": graph, "groups": len(graph.groups()), "by_kind": by_kind,
            "blocks": len(blocks), "layer": layer, "html": html_path.name}


def _prune(dense, tokenizer, graph, settings: DemoSettings):
    """Prune a copy of ``dense``; returns it and a JSON-ready summary."""
    import numpy as np

    from pruning import prune
    from pruning.calibration import calibration_tokens
    from pruning.importance import get_importance
    from pruning.selection import group_scale

    tokens = None
    if get_importance(settings.importance)[1]:
        tokens = calibration_tokens(tokenizer, settings.calib, n_samples=settings.samples,
                                    seq_len=settings.calib_len, seed=settings.seed, model=dense)
    bar = _bar(settings.samples, "calibration")
    model = copy.deepcopy(dense)
    result = prune(model, settings.ratio, settings.importance, tokenizer=tokenizer,
                   tokens=tokens, kinds=settings.kinds, layers=settings.layers,
                   ranking=settings.ranking, seed=settings.seed, graph=graph, progress=bar)
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
    summary = {"stats": stats, "plan": result.plan, "graph": graph, "kept_rows": kept_rows,
               "kinds_summary": _kinds_summary(graph, result.plan), "importance": importance,
               "scores": result.scores}
    return model, summary


def _kinds_summary(graph, plan: dict) -> dict:
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


def _reconstruct(dense, pruned, tokenizer, settings: DemoSettings, result) -> dict:
    """Least-squares reconstruction of the pruned model against the dense one
    (:func:`recovery.reconstruct`, arXiv 2407.19126) on ``recon_samples`` fresh windows of
    the calibration source; ``--no-reconstruct`` skips it."""
    if not settings.reconstruct:
        return {"model": pruned, "status": "off", "detail": "--no-reconstruct was given"}
    from pruning.calibration import calibration_tokens
    from recovery import reconstruct
    from recovery.blocks import find_blocks

    tokens = calibration_tokens(tokenizer, settings.calib, n_samples=settings.recon_samples,
                                seq_len=settings.calib_len, seed=settings.seed + 1, model=dense)
    bar = _bar(len(find_blocks(dense)[1]), "reconstruction")
    stats = reconstruct(pruned, dense, tokens, plan=result["plan"], progress=bar)
    bar.close()
    stats.pop("blocks")
    detail = (f"every linear layer refit block by block on {tokens.shape[0]} x "
              f"{tokens.shape[1]} tokens of {settings.calib}; mean relative layer output error "
              f"{stats['mean_error_before']:.4f} -> {stats['mean_error_after']:.4f}")
    return {"model": pruned, "status": "applied", "detail": detail, **stats}


def _ppl(model, ids: dict, settings: DemoSettings) -> dict:
    """Perplexity over the sweep part, then over both parts (token-weighted NLL)."""
    from evaluation import perplexity

    parts = {name: perplexity(model, None, part, seq_len=settings.seq_len,
                              batch_size=settings.batch_size)
             for name, part in ids.items() if part.numel() >= settings.seq_len}
    tokens = sum(p["tokens"] for p in parts.values())
    nll = sum(p["nll"] * p["tokens"] for p in parts.values()) / tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": tokens, "seq_len": settings.seq_len,
            "windows": sum(p["windows"] for p in parts.values()), "text": "wikitext2 (test)",
            "sweep_part": parts["sweep"]}


def _evaluate(model, tokenizer, ids: dict, settings: DemoSettings) -> dict:
    from evaluation import efficiency_report, evaluate_zeroshot

    results: dict[str, Any] = {"perplexity": _ppl(model, ids, settings)}
    if settings.tasks:
        results["zeroshot"] = evaluate_zeroshot(model, tokenizer, settings.tasks,
                                                limit=settings.zeroshot_limit,
                                                batch_size=settings.batch_size)
    # timed later, next to the other models: see _timings
    results["efficiency"] = efficiency_report(model, seq_len=settings.seq_len, repeats=0)
    return results


def _agreement(dense, pruned, ids: dict, settings: DemoSettings) -> dict:
    from evaluation import next_token_agreement

    windows = ids["sweep"].view(-1, settings.seq_len)[: settings.agreement_windows]
    return next_token_agreement(dense, pruned, windows, batch_size=settings.batch_size)


def _sweep_ratios(settings: DemoSettings) -> list[float]:
    return sorted({round(r, 6) for r in (*settings.sweep, settings.ratio)})


def _sweep(dense, pruned, result, dense_results, pruned_results, ids, settings: DemoSettings,
           reuse_main: bool) -> tuple[list[dict], dict[float, Any]]:
    """Dense, then each ratio: the main plan's scores re-selected, applied to a dense copy.
    Returns the points (speeds filled in by :func:`_timings`) and the model of each."""
    from evaluation import count_parameters, perplexity
    from pruning.apply import apply_plan
    from pruning.selection import select_plan

    graph, total = result["graph"], count_parameters(dense)
    eligible = [g for g in graph.groups() if g.id in result["scores"]]

    def point(ratio, model, ppl):
        params = count_parameters(model)
        return {"ratio": ratio, "ratio_removed": 1 - params / total, "params": params,
                "ppl": ppl["ppl"], "ppl_tokens": ppl["tokens"]}

    points = [point(0.0, dense, dense_results["perplexity"]["sweep_part"])]
    models = {0.0: dense}
    for ratio in _sweep_ratios(settings):
        if reuse_main and math.isclose(ratio, settings.ratio):
            points.append(point(ratio, pruned, pruned_results["perplexity"]["sweep_part"]))
            models[ratio] = pruned
            continue
        print(f"      ratio {ratio}: select, apply, perplexity", flush=True)
        plan = select_plan(eligible, result["scores"], ratio=ratio, total_params=total,
                           kinds={g.kind for g in eligible}, ranking=settings.ranking)
        model = apply_plan(copy.deepcopy(dense), plan, graph)
        ppl = perplexity(model, None, ids["sweep"], seq_len=settings.seq_len,
                         batch_size=settings.batch_size)
        points.append(point(ratio, model, ppl))
        models[ratio] = model
    return points, models


def _timings(dense, pruned, sweep_models: dict, dense_results: dict, pruned_results: dict,
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


def _figures(work: Path, report: dict, result: dict) -> dict:
    import numpy as np

    from evaluation.plots import plot_importance, plot_kept_width, plot_sweep

    name, prune = report["model"], report["pruning"]
    plot_kept_width(report["kept_widths"], work / "kept_width.png",
                    title=f"{name}: kept width per block ({prune['ratio_removed']:.1%} of "
                          f"parameters removed, {prune['criterion']})")
    plot_sweep(report["sweep"], work / "sweep.png", highlight=prune["ratio_removed"],
               title=f"{name}: {prune['criterion']} importance, {prune['ranking']} ranking, "
                     "no reconstruction")
    plot_importance(result["importance"], work / "importance.png",
                    title=f"{name}: {prune['criterion']} importance (normalised per group)")
    arrays = {f"score/{g['group']}": g["raw"] for g in result["importance"]}
    arrays.update({f"removed/{g}": np.asarray(u, dtype=np.int64) for g, u in result["plan"].items()})
    np.savez_compressed(work / "scores.npz", **arrays)
    return {"kept_width": "kept_width.png", "sweep": "sweep.png", "importance": "importance.png",
            "scores": "scores.npz"}


def _bar(total: int, label: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, disable=not sys.stderr.isatty(), leave=False)
