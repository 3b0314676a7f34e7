"""``depgraph demo``: the main job end to end on one model, written into a report folder.

    depgraph demo [MODEL] --out DIR [--ratio 0.2] [--importance second_moment] [--fast]

Steps, each announced on one line with its time (tqdm bars on a terminal):

1. load the model (``default``: SmolLM2-135M, converted once and cached, see
   :mod:`depgraph_cli.models`) and its tokenizer;
2. trace its dependency graph and write ``graph.html`` (the coupled groups, block by block);
3. prune ``--ratio`` of the parameters with ``--importance`` (:func:`pruning.prune`);
4. reconstruct: refit the pruned model's linear layers block by block against the dense
   model (:func:`recovery.reconstruct`, least squares, no training; ``--no-reconstruct``);
4b. distil: train the pruned model's blocks on the dense model's next-token distributions
   (:func:`recovery.distill`, ``--distill-tokens`` of the calibration source; 0 skips it);
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
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path

from . import defaults
from . import demo_steps as steps
from .argtypes import nonnegative_float, nonnegative_int, positive_int
from .argtypes import ratio as ratio_arg

__all__ = ["FAST", "FULL", "DemoSettings", "add_demo", "run_demo", "run_job"]


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; :data:`FULL` and :data:`FAST` are the two presets."""

    ratio: float = 0.2
    # what `depgraph prune` runs too: the best measured pipeline (depgraph_cli.defaults)
    importance: str = defaults.IMPORTANCE
    ranking: str = defaults.RANKING
    round_to: int = defaults.DEMO_ROUND_TO
    kinds: str = defaults.KINDS
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
    # distillation from the dense model after reconstruction (0: none): the best measured
    # recovery (benchmarks/RESULTS.md, issue 16). At most distill_tokens, and no longer than
    # distill_seconds (0: no time budget), so that the job ends within 20 minutes on a slower
    # machine too: SmolLM2-135M on 2 cores with AMX reaches the token cap in about 290 s
    # (ppl 112.6 -> 90.6); on 2 AVX512-BF16 cores (143 tokens/s) the job took 25 min with the
    # token cap alone, 16.4 min with a budget of 300 s (ppl 92.8; 273 s of distillation)
    distill_tokens: int = 81_920
    distill_seconds: float = 400.0
    distill_batch: int = 4
    distill_val: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ValueError(f"--ratio must be in (0, 1), got {self.ratio!r}")
        bad = [r for r in self.sweep if not 0 < r < 1]
        if bad:
            raise ValueError(f"--sweep ratios must be in (0, 1), got {bad}")
        if self.distill_tokens < 0:
            raise ValueError(f"--distill-tokens must be 0 (no distillation) or positive, got "
                             f"{self.distill_tokens!r}")
        if not 0 <= self.distill_seconds < float("inf"):
            raise ValueError(f"--distill-seconds must be 0 (no time budget) or positive, got "
                             f"{self.distill_seconds!r}")
        if self.seq_len < 2 or self.sweep_tokens < self.seq_len:
            raise ValueError(f"--sweep-tokens ({self.sweep_tokens}) must be at least --seq-len "
                             f"({self.seq_len}) and --seq-len at least 2")


#: Defaults for the real run (SmolLM2-135M, 2 CPU cores, < 20 minutes).
FULL = DemoSettings()
#: Tiny settings for tests (``--fast``).
FAST = DemoSettings(sweep=(0.2, 0.4), round_to=1, samples=2, calib_len=32, seq_len=32, ppl_tokens=512,
                    sweep_tokens=256, tasks=("piqa", "winogrande"), zeroshot_limit=4,
                    batch_size=4, new_tokens=4, rounds=1, agreement_windows=4,
                    recon_samples=4, distill_tokens=128, distill_seconds=0.0, distill_batch=2,
                    distill_val=2)

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
    parser.add_argument("--ranking", choices=["global", "global_raw", "local", "allocate"],
                        **option,
                        help=f"how units are compared across groups (default {FULL.ranking})")
    parser.add_argument("--round-to", type=positive_int, **option,
                        help=f"kept MLP widths are multiples of N ({FULL.round_to})")
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
    parser.add_argument("--distill-tokens", type=nonnegative_int, **option,
                        help="tokens of distillation from the dense model after "
                             f"reconstruction, 0 for none ({FULL.distill_tokens})")
    parser.add_argument("--distill-seconds", type=nonnegative_float, **option,
                        help="time budget of the distillation: fewer tokens where the machine "
                             f"is slower, 0 for none ({FULL.distill_seconds:g})")
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

    def __init__(self, total: int) -> None:
        self.total, self.times = total, []

    @contextmanager
    def __call__(self, name: str, note: str = ""):
        print(f"[{len(self.times) + 1}/{self.total}] {name}{note} ...", flush=True)
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
        report = _Job(model_spec, work, settings, out).run()
        report.update(command=command, threads=torch.get_num_threads())
        write_report(work, report)
    return report


class _Job:
    """The demo's steps, in order (:attr:`STEPS`: title and method); each step reads what
    the ones before it left on the job and adds its own results."""

    STEPS = (("load model and tokenizer", "load"),
             ("trace the dependency graph, write graph.html", "trace"),
             ("score and prune", "prune"), ("reconstruct", "reconstruct"),
             ("distil from the dense model", "distill"),
             ("evaluate the dense model", "evaluate_dense"),
             ("evaluate the pruned model", "evaluate_pruned"), ("ratio sweep", "sweep"),
             ("time every model side by side", "time"), ("save the pruned model", "save"),
             ("plots and report", "figures"))

    def __init__(self, spec: str, work: Path, settings: DemoSettings, out: Path) -> None:
        self.spec, self.work, self.settings, self.out = spec, work, settings, out

    def run(self) -> dict:
        start = time.perf_counter()
        step = _Steps(len(self.STEPS))
        for title, method in self.STEPS:
            with step(title, self._note(method)):
                getattr(self, method)()
        self.report.update(steps=step.times, total_seconds=round(time.perf_counter() - start, 1),
                           peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return self.report

    def _note(self, method: str) -> str:
        settings = self.settings
        return {"load": f" ({self.spec})",
                "prune": f" ({settings.importance}, ratio {settings.ratio})",
                "sweep": f" ({', '.join(str(r) for r in steps.sweep_ratios(settings))})",
                "time": f" ({settings.rounds} round{'s' * (settings.rounds != 1)})"}.get(method, "")

    def load(self) -> None:
        from .model_checks import check_finite
        from .models import load_model, load_tokenizer, resolve_model_path

        self.source = resolve_model_path(self.spec)
        self.dense, self.tokenizer = load_model(self.spec), load_tokenizer(self.spec)
        check_finite(self.dense, self.spec)
        self.ids = steps.text_ids(self.tokenizer, self.settings)

    def trace(self) -> None:
        self.graph, self.graph_info = steps.graph(self.dense, self.work / "graph.html")

    def prune(self) -> None:
        self.pruned, self.result = steps.prune(self.dense, self.tokenizer, self.graph, self.settings)

    def reconstruct(self) -> None:
        self.pruned, self.recon = steps.reconstruct(self.dense, self.pruned, self.tokenizer,
                                               self.settings, self.result)

    def distill(self) -> None:
        self.pruned, self.distilled = steps.distill(self.dense, self.pruned, self.tokenizer,
                                                    self.settings)

    def evaluate_dense(self) -> None:
        self.dense_results = steps.evaluate(self.dense, self.tokenizer, self.ids, self.settings)

    def evaluate_pruned(self) -> None:
        self.pruned_results = steps.evaluate(self.pruned, self.tokenizer, self.ids, self.settings)
        self.agreement = steps.agreement(self.dense, self.pruned, self.ids, self.settings)

    def sweep(self) -> None:
        self.points, self.sweep_models = steps.sweep(
            self.dense, self.pruned, self.graph, self.result, self.dense_results,
            self.pruned_results, self.ids, self.settings,
            reuse_main="applied" not in (self.recon["status"], self.distilled["status"]))

    def time(self) -> None:
        steps.timings(self.dense, self.pruned, self.sweep_models, self.dense_results,
                 self.pruned_results, self.points, self.settings)
        del self.sweep_models

    def save(self) -> None:
        from pruning.io import save_pruned

        from .fingerprint import dense_record

        extra = {k: v for k, v in self.result.stats.items() if k != "kept_widths"}
        save_pruned(self.pruned, self.work / "model", tokenizer=self.tokenizer,
                    extra={**extra, **dense_record(self.source), "model_spec": self.spec,
                           "reconstruction": self.recon["status"],
                           "distillation": self.distilled["status"]})

    def figures(self) -> None:
        self.report = {"model": self.spec, "model_path": str(self.source), "out": str(self.out),
                       "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "settings": steps.plain(self.settings), "graph": self.graph_info,
                       "pruning": self.result.stats, "reconstruction": self.recon,
                       "distillation": self.distilled,
                       "dense": self.dense_results, "pruned": self.pruned_results,
                       "agreement": self.agreement, "sweep": self.points,
                       "kept_widths": self.result.kept_rows,
                       "kinds_summary": self.result.kinds_summary}
        self.report["files"] = steps.figures(self.work, self.report, self.result)
        self.report["files"].update(graph_html="graph.html", model="model",
                                    report_md="report.md", report_json="report.json")


