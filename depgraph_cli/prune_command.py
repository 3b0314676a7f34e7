"""``depgraph prune``: the pruning subcommand (registered by :mod:`depgraph_cli.main`).

Two modes: ``--ratio R`` scores the groups with ``--importance`` (a registered name, an
installed plug-in's name, or ``package.module:function``) and removes the weakest;
``--plan PLAN.json`` applies a plan made by any other tool, ``{group_id: [units]}`` with
the ids of ``depgraph inspect --json``, validated exactly as :func:`pruning.apply_plan`
validates it. Both take ``--compensate`` (bias compensation over the calibration text).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from . import defaults
from .argtypes import positive_int, ratio

__all__ = ["add_prune", "run_prune"]


def add_prune(subparsers) -> None:
    from pruning.importance import available_importance

    parser = subparsers.add_parser(
        "prune", help="score coupled groups, remove the weakest, save a normal HF folder",
        description="Criteria: " + "; ".join(f"{k}: {v}" for k, v in available_importance().items()))
    parser.add_argument("model", help="local folder, hub id, or 'default'")
    parser.add_argument("--ratio", type=ratio, default=None,
                        help="fraction of parameters to remove (or --plan)")
    parser.add_argument("--plan", type=Path, default=None, metavar="PLAN.json",
                        help="apply this plan instead of choosing one: a JSON object "
                             "{group_id: [units]} (ids from `depgraph inspect --json`)")
    parser.add_argument("--importance", default=None,
                        help="criterion: a name above, an installed plug-in's name, or "
                             f"package.module:function (default: {defaults.IMPORTANCE})")
    parser.add_argument("--compensate", action="store_true",
                        help="add the mean contribution of removed channels back as biases "
                             "(FLAP's bias compensation; reads --calib)")
    parser.add_argument("--calib", default="bundled",
                        help="bundled | wikitext2 | self | FILE | FOLDER | hf:NAME[:CONFIG[:SPLIT]]")
    parser.add_argument("--samples", type=positive_int, default=10, help="calibration samples (default 10)")
    parser.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sample (default 128)")
    parser.add_argument("--kinds", default=None,
                        help="group kinds that may shrink: mlp, attention, hidden, experts, "
                             f"query_head (default: {defaults.KINDS})")
    parser.add_argument("--layers", default=None, help="blocks that may shrink, e.g. 3:-2")
    parser.add_argument("--ranking", default=None,
                        choices=["global", "global_raw", "local", "allocate"],
                        help="how units are compared across groups; allocate: measure each "
                             "block's damage on the model's outputs and spend the budget where "
                             f"it hurts least (default: {defaults.RANKING} with --reconstruct, "
                             f"else the criterion's own, else {defaults.RANKING_ONE_SHOT})")
    parser.add_argument("--round-to", type=positive_int, default=None,
                        help=f"kept widths are multiples of N (default: {defaults.ROUND_TO})")
    parser.add_argument("--aggregation", default=None, choices=["sum", "mean", "max", "prod", "last"],
                        help="how a unit's per-parameter scores combine (default: sum)")
    parser.add_argument("--tau", type=float, default=None, help="JS threshold for retraining_free")
    parser.add_argument("--reconstruct", nargs="?", const="both", default=None,
                        choices=["pre", "post", "both"],
                        help="least-squares reconstruction while pruning block by block: "
                             "before each block is pruned (pre), after (post) or both "
                             "(the default when the flag is given alone)")
    parser.add_argument("--recon-samples", type=positive_int, default=32,
                        help="calibration windows for --reconstruct (default 32)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="arithmetic of --reconstruct's block runs and least-squares "
                             "products: bf16 where the CPU (AMX, AVX512-BF16) or GPU multiplies "
                             "it natively (auto), or always fp32 / bf16 (default auto)")
    parser.add_argument("--stream", action="store_true",
                        help="prune a model bigger than memory: read, score, cut and write one "
                             "block at a time from a local safetensors folder (resumable; "
                             "activation criteria: second_moment, l2, l1, random); chosen "
                             "automatically when the weights would not fit")
    parser.add_argument("--device", default="cpu",
                        help="where the model (with --stream: each block) runs, e.g. cuda:0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ppl-tokens", type=int, default=4096,
                        help="WikiText-2 tokens for the quick before/after perplexity (0: skip)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers as JSON")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.set_defaults(handler=run_prune)


def quick_ppl(model, tokenizer, tokens: int) -> float | None:
    if tokens <= 0:
        return None
    from evaluation import load_text, perplexity

    return float(perplexity(model, tokenizer, load_text("wikitext2"), seq_len=128,
                            max_tokens=tokens)["ppl"])


#: Options that choose a plan, which ``--plan`` makes meaningless.
_CHOOSING = ("ratio", "importance", "kinds", "layers", "ranking", "round_to", "aggregation",
             "tau", "reconstruct")


def _check_options(args: argparse.Namespace) -> None:
    """Options that would be silently ignored are refused; the defaults are filled in."""
    from pruning.importance import available_importance, importance_options

    if args.plan is not None:
        given = [f"--{name.replace('_', '-')}" for name in _CHOOSING
                 if getattr(args, name) is not None]
        if given:
            raise ValueError(f"--plan applies the given plan; {', '.join(given)} would choose "
                             f"another: drop {'it' if len(given) == 1 else 'them'}")
        return
    if args.ratio is None:
        raise ValueError("--ratio is required (or --plan PLAN.json to apply a given plan)")
    if args.compensate and args.reconstruct:
        raise ValueError("--compensate and --reconstruct do not combine: the least-squares "
                         "refit of the layers that read removed channels replaces the "
                         "compensation; choose one")
    args.importance = args.importance or defaults.IMPORTANCE
    args.kinds = args.kinds or defaults.KINDS
    args.round_to = args.round_to or defaults.ROUND_TO
    args.aggregation = args.aggregation or "sum"
    if args.ranking is None and args.reconstruct and not args.stream:
        args.ranking = defaults.RANKING  # one-shot (and streamed): the criterion's own ranking
    if args.tau is not None and "tau" not in importance_options(args.importance):
        users = [name for name in available_importance() if "tau" in importance_options(name)]
        raise ValueError(f"--tau is read only by --importance {' or '.join(users)}; "
                         f"{args.importance!r} would ignore it")


def read_plan(path: Path) -> dict:
    """The plan in a JSON file: an object ``{group_id: [units]}``; ValueError otherwise
    (group ids and units are checked against the model by :func:`pruning.apply_plan`)."""
    from pruning.apply import plan_units

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--plan {str(path)!r} cannot be read ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"--plan {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--plan {str(path)!r} must hold a JSON object {{group_id: [units]}}, "
                         f"got {type(data).__name__}")
    if isinstance(data.get("plan"), dict) and "criterion" in data:
        raise ValueError(f"--plan {str(path)!r} looks like the --json report of `depgraph "
                         f"prune`: write its \"plan\" object to a file of its own")
    for group_id, units in data.items():
        plan_units(group_id, units)  # PlanError: not a list of integers
    return data


def _preflight(args: argparse.Namespace):
    """Every check that needs no weights, before any work: returns the model's location."""
    from pruning.calibration import check_source
    from pruning.importance import get_importance

    from .model_checks import check_seq_len, check_tokenizer_files, check_weight_files
    from .models import load_config, resolve_model_path
    from .outputs import Output, check_outputs

    _check_options(args)
    _check_device(args.device)
    if args.plan is None:
        get_importance(args.importance)  # fail fast on an unknown name
    source = resolve_model_path(args.model)
    if args.stream:
        _check_stream(args, source)
    inputs = [("MODEL", source), ("--calib", args.calib)]
    check_outputs([Output("--out", args.out, folder=True), Output("--json", args.json)],
                  inputs + ([("--plan", args.plan)] if args.plan is not None else []),
                  overwrite=args.overwrite)
    if args.plan is not None:
        args.plan_data = read_plan(args.plan)
    check_seq_len(load_config(source), args.seq_len, "--seq-len")
    if isinstance(source, Path):
        check_weight_files(source)
        check_tokenizer_files(source)
    check_source(args.calib)
    return source


def _check_device(device: str) -> None:
    import torch

    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--device {device!r} cannot be used here ({reason}); expected e.g. "
                         "cpu or cuda:0") from None


def _check_stream(args: argparse.Namespace, source) -> None:
    """What --stream cannot do is refused before any work, with the reason."""
    from recovery.stream import check_streamable

    if not isinstance(source, Path):
        raise ValueError(f"--stream reads a local model folder; {args.model!r} is a hub id "
                         "(download it first, e.g. with huggingface-cli download)")
    if args.plan is not None:
        raise ValueError("--plan applies a given plan to the model in memory; --stream chooses "
                         "its own plan block by block (drop one of them)")
    check_streamable(_settings(args))


def _settings(args: argparse.Namespace):
    from pruning.prune import PruneSettings

    return PruneSettings(
        ratio=args.ratio, importance=args.importance, calib=args.calib, n_samples=args.samples,
        seq_len=args.seq_len, kinds=args.kinds, layers=args.layers, ranking=args.ranking,
        round_to=args.round_to, aggregation=args.aggregation, seed=args.seed,
        options={"tau": args.tau} if args.tau is not None else {},
        compensate=getattr(args, "compensate", False))


class BlockProgress:
    """One line per finished block on stderr: pass, block, seconds per block, ETA."""

    def __init__(self, passes: int = 2):
        import time

        self.clock = time.perf_counter
        self.start = self.clock()
        self.passes = passes
        self.done = 0

    def __call__(self, phase: str, index: int, count: int) -> None:
        import sys

        self.done += 1
        per_block = (self.clock() - self.start) / self.done
        left = max(self.passes * count - self.done, 0) * per_block
        print(f"{phase} block {index + 1}/{count}  {per_block:.1f} s/block  "
              f"ETA {int(left // 60)}m{int(left % 60):02d}s", file=sys.stderr, flush=True)


def _available_memory() -> int:
    import psutil  # an accelerate dependency

    return int(psutil.virtual_memory().available)


def _weights_in_memory(source: Path, device: str) -> int | None:
    """Bytes the in-memory command's copy of the weights takes (float32 on the CPU), or None
    when the folder holds no safetensors to measure."""
    from pruning.checkpoint import LazyCheckpoint

    from .models import compute_dtype

    try:
        checkpoint = LazyCheckpoint(source)
    except ValueError:
        return None
    dtype = compute_dtype(device)
    total = 0
    for stored, shape in checkpoint.meta.values():
        size = (dtype if dtype is not None and stored.is_floating_point else stored).itemsize
        total += size * math.prod(shape)
    return total


def _stream_if_too_big(args: argparse.Namespace, source) -> None:
    """Switch to --stream (and say so) when the weights alone would take more than 80% of
    the memory available; say why not when the options cannot be streamed."""
    if args.stream or not isinstance(source, Path):
        return
    need, available = _weights_in_memory(source, args.device), _available_memory()
    if need is None or need <= 0.8 * available:
        return
    sizes = f"the weights need {need / 2**30:.1f} GiB in memory, {available / 2**30:.1f} GiB are free"
    try:
        _check_stream(argparse.Namespace(**{**vars(args), "stream": True}), source)
    except ValueError as reason:
        print(f"note: {sizes}; --stream cannot take over: {reason}", flush=True)
        return
    print(f"{sizes}: pruning block by block from disk (as with --stream)", flush=True)
    args.stream = True


def _run_streamed(args: argparse.Namespace, source: Path) -> int:
    from recovery.stream import prune_streamed

    from .fingerprint import dense_record
    from .models import load_tokenizer

    dense = dense_record(source)
    tokenizer = load_tokenizer(source)
    stats = {**dense, "model_spec": args.model, "ppl_before": None, "ppl_after": None,
             "calib": args.calib, "seed": args.seed, "layers": args.layers, "kinds": args.kinds,
             "ranking": args.ranking}
    print(f"streaming {source} block by block on {args.device} (perplexity is not measured: "
          "it needs the whole model)", flush=True)
    from .models import compute_dtype

    dtype = compute_dtype(args.device)
    result = prune_streamed(source, args.out, _settings(args), tokenizer=tokenizer,
                            device=args.device, dtype=dtype, reconstruct=_reconstruction(args),
                            recon_samples=args.recon_samples, overwrite=args.overwrite, on_block=BlockProgress(),
                            extra=stats)
    stats = {**result.stats, **stats}
    if args.json:
        from depgraph.paths import write_text_atomically

        write_text_atomically(args.json, json.dumps({**stats, "plan": result.plan}, indent=1,
                                                    default=str))
    print(_table(stats))
    print(f"\nsaved the pruned model to {args.out}")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    from depgraph.paths import atomic_files
    from pruning.io import save_pruned

    from .fingerprint import dense_record
    from .model_checks import check_finite
    from .models import load_model, load_tokenizer

    source = _preflight(args)
    _stream_if_too_big(args, source)
    if args.stream:
        return _run_streamed(args, source)
    dense = dense_record(source)
    model = load_model(source, device=args.device)  # a pruned folder too
    tokenizer = load_tokenizer(source)
    check_finite(model, args.model)
    if args.plan is not None:
        result, before_ppl = _apply_plan_file(model, tokenizer, args)
    else:
        before_ppl = quick_ppl(model, tokenizer, args.ppl_tokens)
        result = _choose_and_prune(model, tokenizer, args)
    after_ppl = quick_ppl(result.model, tokenizer, args.ppl_tokens)
    stats = {**result.stats, **dense, "model_spec": args.model, "ppl_before": before_ppl,
             "ppl_after": after_ppl, "ppl_tokens": args.ppl_tokens, "calib": args.calib,
             "seed": args.seed, "layers": args.layers, "kinds": args.kinds,
             "plan_file": str(args.plan) if args.plan is not None else None}
    with atomic_files(*[p for p in (args.json,) if p]) as staged:  # written after --out
        for file in staged:
            file.write_text(json.dumps({**stats, "plan": result.plan}, indent=1, default=str))
        save_pruned(result.model, args.out, tokenizer=tokenizer, overwrite=args.overwrite,
                    extra={key: value for key, value in stats.items() if key != "kept_widths"})
    print(_table(stats))
    print(f"\nsaved the pruned model to {args.out}")
    return 0


def _apply_plan_file(model, tokenizer, args: argparse.Namespace):
    """``--plan``: the plan checked against the model's groups before any other work (the
    errors of :func:`pruning.apply_plan`), then applied, compensated with ``--compensate``."""
    from depgraph import build_graph
    from pruning.apply import plan_slices
    from pruning.calibration import calibration_tokens
    from pruning.prune import apply_given_plan

    graph = build_graph(model)
    plan_slices(graph, args.plan_data)  # PlanError naming the group or unit
    before_ppl = quick_ppl(model, tokenizer, args.ppl_tokens)
    tokens = calibration_tokens(tokenizer, args.calib, n_samples=args.samples,
                                seq_len=args.seq_len, seed=args.seed,
                                model=model) if args.compensate else None
    return apply_given_plan(model, args.plan_data, graph, tokens=tokens), before_ppl


def _reconstruction(args: argparse.Namespace):
    """``--reconstruct`` and ``--precision`` as the sequential pass's settings (or None)."""
    from recovery import sequential_settings

    if not args.reconstruct:
        return None
    return dataclasses.replace(sequential_settings(args.reconstruct), precision=args.precision)


def _choose_and_prune(model, tokenizer, args: argparse.Namespace):
    """``--ratio``: score, select and apply (block by block with ``--reconstruct``)."""
    from depgraph.progress import progress_bar
    from pruning.importance import get_importance
    from pruning.prune import prune
    from recovery import prune_and_reconstruct

    data_passes = (get_importance(args.importance)[1] or args.reconstruct
                   or args.ranking == "allocate")  # else nothing to count
    progress = progress_bar(total=args.samples, desc="scoring") if data_passes else None
    settings = _settings(args)
    if args.reconstruct:
        result = prune_and_reconstruct(model, settings=settings, reconstruct=_reconstruction(args),
                                       tokenizer=tokenizer, recon_samples=args.recon_samples,
                                       progress=progress)
    else:
        result = prune(model, settings=settings, tokenizer=tokenizer, progress=progress)
    if progress is not None:
        progress.close()
    return result


def _table(stats: dict) -> str:
    rows = [("parameters", f"{stats['params_before']:,}", f"{stats['params_after']:,}"),
            ("removed", "", f"{stats['ratio_removed']:.1%}")]
    if stats.get("ppl_before") is not None:
        rows.append((f"wikitext2 ppl ({stats['ppl_tokens']} tok)", f"{stats['ppl_before']:.2f}",
                     f"{stats['ppl_after']:.2f}"))
    for kind, width in sorted(stats["kept_widths"].items()):
        rows.append((f"kept {kind} units (mean)", "", f"{width:.1f}"))
    rows.append(("criterion", "", stats["criterion"]))
    if stats.get("compensation"):
        rows.append(("bias compensation", "", f"{stats['compensation']['modules']} layers"))
    recon = stats.get("reconstruction")
    if recon:
        steps = "+".join(step for step in ("pre", "post") if recon[step])
        rows.append((f"reconstruction ({steps})", f"{recon.get('mean_error_before', 0):.4f}",
                     f"{recon.get('mean_error_after', 0):.4f}"))
    if stats.get("peak_rss_bytes"):
        rows.append(("peak memory (scoring)", "", f"{stats['peak_rss_bytes'] / 2**30:.2f} GiB"))
    rows.append(("time", "", f"{stats['total_seconds']:.1f} s"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'before':>12}  {'after':>12}"]
    lines += [f"{a:{width}}  {b:>12}  {c:>12}" for a, b, c in rows]
    return "\n".join(lines)
