"""``depgraph prune``: the pruning subcommand (registered by :mod:`depgraph_cli.main`)."""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--ratio", type=ratio, required=True, help="fraction of parameters to remove")
    parser.add_argument("--importance", default=defaults.IMPORTANCE,
                        help=f"criterion name (default: {defaults.IMPORTANCE})")
    parser.add_argument("--calib", default="bundled",
                        help="bundled | wikitext2 | self | FILE | FOLDER | hf:NAME[:CONFIG[:SPLIT]]")
    parser.add_argument("--samples", type=positive_int, default=10, help="calibration samples (default 10)")
    parser.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sample (default 128)")
    parser.add_argument("--kinds", default=defaults.KINDS,
                        help="group kinds that may shrink: mlp, attention, hidden, experts")
    parser.add_argument("--layers", default=None, help="blocks that may shrink, e.g. 3:-2")
    parser.add_argument("--ranking", default=None,
                        choices=["global", "global_raw", "local", "allocate"],
                        help="how units are compared across groups; allocate: measure each "
                             "block's damage on the model's outputs and spend the budget where "
                             f"it hurts least (default: {defaults.RANKING} with --reconstruct, "
                             f"else {defaults.RANKING_ONE_SHOT})")
    parser.add_argument("--round-to", type=positive_int, default=defaults.ROUND_TO,
                        help=f"kept widths are multiples of N (default: {defaults.ROUND_TO})")
    parser.add_argument("--aggregation", default="sum", choices=["sum", "mean", "max", "prod", "last"])
    parser.add_argument("--tau", type=float, default=None, help="JS threshold for retraining_free")
    parser.add_argument("--reconstruct", nargs="?", const="both", default=None,
                        choices=["pre", "post", "both"],
                        help="least-squares reconstruction while pruning block by block: "
                             "before each block is pruned (pre), after (post) or both "
                             "(the default when the flag is given alone)")
    parser.add_argument("--recon-samples", type=positive_int, default=32,
                        help="calibration windows for --reconstruct (default 32)")
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


def _check_options(args: argparse.Namespace) -> None:
    """Options that the chosen criterion would silently ignore are refused."""
    from pruning.importance import available_importance, importance_options

    if args.tau is not None and "tau" not in importance_options(args.importance):
        users = [name for name in available_importance() if "tau" in importance_options(name)]
        raise ValueError(f"--tau is read only by --importance {' or '.join(users)}; "
                         f"{args.importance!r} would ignore it")


def _preflight(args: argparse.Namespace):
    """Every check that needs no weights, before any work: returns the model's location."""
    from pruning.calibration import check_source
    from pruning.importance import get_importance

    from .model_checks import check_seq_len, check_tokenizer_files, check_weight_files
    from .models import load_config, resolve_model_path
    from .outputs import Output, check_outputs

    get_importance(args.importance)  # fail fast on an unknown name
    _check_options(args)
    source = resolve_model_path(args.model)
    check_outputs([Output("--out", args.out, folder=True), Output("--json", args.json)],
                  [("MODEL", source), ("--calib", args.calib)], overwrite=args.overwrite)
    check_seq_len(load_config(source), args.seq_len, "--seq-len")
    if isinstance(source, Path):
        check_weight_files(source)
        check_tokenizer_files(source)
    check_source(args.calib)
    return source


def run_prune(args: argparse.Namespace) -> int:
    if args.ranking is None:
        args.ranking = defaults.ranking(reconstruct=bool(args.reconstruct))
    from depgraph.paths import atomic_files
    from depgraph.progress import progress_bar
    from pruning.importance import get_importance
    from pruning.io import save_pruned
    from pruning.prune import PruneSettings, prune
    from recovery import prune_and_reconstruct

    from .fingerprint import dense_record
    from .model_checks import check_finite
    from .models import load_model, load_tokenizer

    source = _preflight(args)
    dense = dense_record(source)
    model, tokenizer = load_model(source), load_tokenizer(source)  # a pruned folder too
    check_finite(model, args.model)
    before_ppl = quick_ppl(model, tokenizer, args.ppl_tokens)
    data_passes = (get_importance(args.importance)[1] or args.reconstruct
                   or args.ranking == "allocate")  # else nothing to count
    progress = progress_bar(total=args.samples, desc="scoring") if data_passes else None
    settings = PruneSettings(
        ratio=args.ratio, importance=args.importance, calib=args.calib, n_samples=args.samples,
        seq_len=args.seq_len, kinds=args.kinds, layers=args.layers, ranking=args.ranking,
        round_to=args.round_to, aggregation=args.aggregation, seed=args.seed,
        options={"tau": args.tau} if args.tau is not None else {})
    if args.reconstruct:
        result = prune_and_reconstruct(model, settings=settings, reconstruct=args.reconstruct,
                                       tokenizer=tokenizer, recon_samples=args.recon_samples,
                                       progress=progress)
    else:
        result = prune(model, settings=settings, tokenizer=tokenizer, progress=progress)
    if progress is not None:
        progress.close()
    after_ppl = quick_ppl(result.model, tokenizer, args.ppl_tokens)
    stats = {**result.stats, **dense, "model_spec": args.model, "ppl_before": before_ppl,
             "ppl_after": after_ppl, "ppl_tokens": args.ppl_tokens, "calib": args.calib,
             "seed": args.seed, "layers": args.layers, "kinds": args.kinds,
             "ranking": args.ranking}
    with atomic_files(*[p for p in (args.json,) if p]) as staged:  # written after --out
        for file in staged:
            file.write_text(json.dumps({**stats, "plan": result.plan}, indent=1, default=str))
        save_pruned(result.model, args.out, tokenizer=tokenizer, overwrite=args.overwrite,
                    extra={key: value for key, value in stats.items() if key != "kept_widths"})
    print(_table(stats))
    print(f"\nsaved the pruned model to {args.out}")
    return 0


def _table(stats: dict) -> str:
    rows = [("parameters", f"{stats['params_before']:,}", f"{stats['params_after']:,}"),
            ("removed", "", f"{stats['ratio_removed']:.1%}")]
    if stats.get("ppl_before") is not None:
        rows.append((f"wikitext2 ppl ({stats['ppl_tokens']} tok)", f"{stats['ppl_before']:.2f}",
                     f"{stats['ppl_after']:.2f}"))
    for kind, width in sorted(stats["kept_widths"].items()):
        rows.append((f"kept {kind} units (mean)", "", f"{width:.1f}"))
    rows.append(("criterion", "", stats["criterion"]))
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
