"""``depgraph recover DIR --method reconstruct|lora|distill --out DIR`` (registered by
depgraph_cli.main).

``reconstruct`` refits the pruned model against its dense original (named by ``--dense``,
else the ``model`` that ``depgraph prune`` recorded in ``DIR/pruning.json``) on calibration
text; ``lora`` trains LoRA adapters on ``--data`` and merges them (``--no-merge`` keeps them
in ``OUT/adapter``, loadable with ``peft.PeftModel.from_pretrained``); ``distill`` trains the
pruned model to match the dense one's next-token distributions on ``--data``
(:mod:`depgraph_cli.distill_command`). Under ``accelerate launch -m depgraph_cli recover ...``
LoRA and distillation run on every process and only the main process writes ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from .argtypes import positive_float, positive_int
from .distill_command import (
    add_distill_arguments,
    check_distill_data,
    remove_work_folders,
    run_distill,
)

__all__ = ["add_recover", "run_recover"]


def add_recover(subparsers) -> None:
    parser = subparsers.add_parser(
        "recover", help="bring a pruned model's quality back: least squares, LoRA or "
                        "distillation from the dense model",
        description="Recover the pruned model in DIR and save it to --out.")
    parser.add_argument("model", metavar="DIR", help="a folder written by `depgraph prune`")
    parser.add_argument("--method", required=True, choices=["reconstruct", "lora", "distill"])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--ppl-tokens", type=int, default=4096,
                        help="WikiText-2 tokens for the quick before/after perplexity (0: skip)")
    group = parser.add_argument_group("reconstruct")
    group.add_argument("--dense", help="the dense model (default: as recorded in DIR)")
    group.add_argument("--calib", default="bundled", help="calibration text (default: bundled)")
    group.add_argument("--samples", type=positive_int, default=32,
                       help="calibration windows (default 32)")
    group.add_argument("--calib-len", type=positive_int, default=128,
                       help="tokens per calibration window (default 128)")
    group.add_argument("--targets", default="all", choices=["all", "level2"],
                       help="refit every linear layer, or only those reading pruned channels")
    group.add_argument("--damping", type=positive_float, default=4.0,
                       help="how strongly layers stay near their weights (default 4.0)")
    group.add_argument("--correction", type=float, default=1.0,
                       help="share (0-1) of each block's output error that its last "
                            "projection is refit to cancel (default 1.0)")
    lora = parser.add_argument_group("lora")
    lora.add_argument("--data", default="bundled",
                      help="Alpaca JSON/JSONL, hf:NAME, a text file or folder (default: bundled)")
    lora.add_argument("--r", type=positive_int, default=8)
    lora.add_argument("--alpha", type=positive_int, default=16)
    lora.add_argument("--dropout", type=float, default=0.05)
    lora.add_argument("--lr", type=positive_float, default=1e-4)
    lora.add_argument("--epochs", type=positive_float, default=2.0)
    lora.add_argument("--max-steps", type=int, default=-1, help="> 0 overrides --epochs")
    lora.add_argument("--batch-size", type=positive_int, default=4)
    lora.add_argument("--grad-accum", type=positive_int, default=1)
    lora.add_argument("--seq-len", type=positive_int, default=256)
    lora.add_argument("--max-examples", type=positive_int, default=1000)
    lora.add_argument("--val-fraction", type=float, default=0.1)
    lora.add_argument("--eval-steps", type=positive_int, default=50)
    lora.add_argument("--patience", type=positive_int, default=3)
    lora.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                      help="arithmetic of the training forward (lora, distill) and of "
                           "reconstruct's block runs and least-squares products: bf16 where "
                           "the CPU (AMX, AVX512-BF16) or GPU multiplies it natively (auto), "
                           "or always fp32 / bf16 (default auto)")
    lora.add_argument("--train-on-inputs", action="store_true",
                      help="also train on the instruction part of Alpaca records")
    lora.add_argument("--no-merge", action="store_true",
                      help="keep the adapter in OUT/adapter instead of merging it")
    add_distill_arguments(parser)
    parser.set_defaults(handler=run_recover)


def _tokenizer(folder: Path, info: dict):
    from .models import load_tokenizer

    if (folder / "tokenizer_config.json").is_file():
        return load_tokenizer(folder)
    if info.get("model"):
        return load_tokenizer(info["model"])
    raise ValueError(f"{str(folder)!r} has no tokenizer and records no source model")


def _dense_source(args: argparse.Namespace, info: dict, folder: Path):
    """The dense model to refit against: ``--dense`` or the one ``pruning.json`` records,
    checked against the recorded fingerprint of its weights (see depgraph.fingerprint)."""
    from .fingerprint import fingerprint_difference, weights_fingerprint
    from .models import resolve_model_path

    spec = args.dense or info.get("model")
    if not spec:
        raise ValueError("the dense model is unknown: pass --dense MODEL (the folder or hub id "
                         "the pruned model came from)")
    source = resolve_model_path(spec)
    recorded = info.get("model_fingerprint")
    if not isinstance(source, Path):
        return source
    if not recorded:
        if not args.dense:  # a name recorded by an older depgraph, maybe relative to elsewhere
            print(f"warning: {str(folder / 'pruning.json')!r} records no fingerprint of the "
                  f"dense model; cannot check that {spec!r} is the model it was pruned from",
                  file=sys.stderr)
        return source
    difference = fingerprint_difference(recorded, weights_fingerprint(source))
    if difference:
        raise ValueError(f"dense model {spec!r} is not the model {str(folder)!r} was pruned "
                         f"from: {difference}; pass --dense with that model")
    return source


def _check_data(args: argparse.Namespace) -> None:
    from pruning.calibration import check_source
    from recovery.lora_data import check_instruction_source, is_instruction_source

    if args.method == "reconstruct":
        check_source(args.calib)
        return
    if args.method == "distill":
        check_distill_data(args)
        return
    data = Path(args.data)
    if (data.suffix or "/" in args.data) and not args.data.startswith("hf:") and not data.exists():
        raise ValueError(f"--data {args.data!r} does not exist (expected an Alpaca JSON/JSONL "
                         "file, a text file or folder, 'bundled', 'wikitext2' or hf:NAME)")
    if is_instruction_source(args.data):
        check_instruction_source(args.data)
    else:
        check_source(args.data)


def _preflight(args: argparse.Namespace, folder: Path, info: dict):
    """Every check that needs no weights, before any work: returns the dense model's source
    (``None`` for LoRA)."""
    from .model_checks import check_seq_len, check_weight_files
    from .models import load_config
    from .outputs import Output, check_outputs

    dense = _dense_source(args, info, folder) if args.method != "lora" else None
    check_outputs([Output("--out", args.out, folder=True), Output("--json", args.json)],
                  [("DIR", folder), ("--dense", args.dense),
                   ("dense model (recorded in pruning.json)", dense), ("--calib", args.calib),
                   ("--data", args.data)], overwrite=args.overwrite)
    config = load_config(folder)
    check_weight_files(folder)
    if args.method == "reconstruct":
        check_seq_len(config, args.calib_len, "--calib-len")
    else:
        check_seq_len(config, args.seq_len, "--seq-len")
    if isinstance(dense, Path):
        check_weight_files(dense)
    _check_data(args)
    return dense


def _reconstruct(model, tokenizer, dense_source, args: argparse.Namespace) -> tuple:
    from depgraph.progress import progress_bar
    from pruning.calibration import calibration_tokens
    from recovery.blocks import find_blocks
    from recovery.reconstruct import reconstruct

    from .model_checks import check_finite
    from .models import load_model

    dense = load_model(dense_source)
    check_finite(dense, str(dense_source))
    tokens = calibration_tokens(tokenizer, args.calib, n_samples=args.samples,
                                seq_len=args.calib_len, seed=args.seed)
    print(f"reconstructing against {dense_source} on {args.samples} x {args.calib_len} tokens "
          f"of {args.calib} ...", flush=True)
    bar = progress_bar(total=len(find_blocks(dense)[1]), desc="reconstruction (blocks)")
    stats = reconstruct(model, dense, tokens, targets=args.targets, damping=args.damping,
                        correction=args.correction, precision=args.precision, progress=bar)
    bar.close()
    stats.pop("blocks")
    return model, stats, None


def _lora(model, tokenizer, args: argparse.Namespace) -> tuple:
    from recovery.lora import LoraSettings, merge, train_lora

    from .prune_command import quick_ppl

    settings = LoraSettings(r=args.r, alpha=args.alpha, dropout=args.dropout,
                            learning_rate=args.lr, batch_size=args.batch_size,
                            grad_accum=args.grad_accum, epochs=args.epochs,
                            max_steps=args.max_steps, seq_len=args.seq_len,
                            max_examples=args.max_examples, val_fraction=args.val_fraction,
                            eval_steps=args.eval_steps, patience=args.patience,
                            train_on_inputs=args.train_on_inputs, seed=args.seed,
                            precision=args.precision)
    dtype = next(model.parameters()).dtype
    result = train_lora(model.float(), tokenizer, args.data, settings,
                        progress=lambda line: print(line, flush=True))
    if not args.no_merge:
        return merge(result.model, dtype), result.stats, None
    result.stats["ppl_after"] = quick_ppl(result.model, tokenizer, args.ppl_tokens)
    adapter = Path(tempfile.mkdtemp(prefix="depgraph-adapter-"))
    try:
        result.model.save_pretrained(adapter)
    except BaseException:
        shutil.rmtree(adapter, ignore_errors=True)
        raise
    return result.model.unload().to(dtype), result.stats, adapter


def run_recover(args: argparse.Namespace) -> int:
    from depgraph.paths import atomic_files
    from pruning.io import load_pruned, read_pruning_info, save_pruned

    from .model_checks import check_finite
    from .prune_command import quick_ppl

    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{args.model!r} is not a model folder (expected config.json in it)")
    info = read_pruning_info(folder)
    dense = _preflight(args, folder, info)
    tokenizer = _tokenizer(folder, info)
    model = load_pruned(folder)
    check_finite(model, args.model)
    before = quick_ppl(model, tokenizer, args.ppl_tokens)
    if args.method == "reconstruct":
        model, stats, adapter = _reconstruct(model, tokenizer, dense, args)
    else:
        model, stats, adapter = (run_distill(model, tokenizer, dense, args)
                                 if args.method == "distill" else _lora(model, tokenizer, args))
    try:  # the adapter's temporary folder goes, into OUT or away, whatever happens
        if not stats.get("is_main_process", True):
            return 0
        if "ppl_after" not in stats:  # with --no-merge it was measured with the adapter on
            stats["ppl_after"] = quick_ppl(model, tokenizer, args.ppl_tokens)
        stats.update(ppl_before=before, ppl_tokens=args.ppl_tokens, source=str(folder.resolve()))
        extra = {k: v for k, v in info.items() if k not in ("plans", "config_exact")}
        extra["recovery"] = [*extra.get("recovery", []), stats]

        def add_adapter(tmp: Path) -> None:
            if adapter is not None:
                shutil.move(str(adapter), tmp / "adapter")

        with atomic_files(*[p for p in (args.json,) if p]) as staged:  # written after --out
            for file in staged:
                file.write_text(json.dumps(stats, indent=1, default=str))
            save_pruned(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite, extra=extra,
                        writer=add_adapter)
        if args.method == "distill":
            remove_work_folders(args)
        _print(stats, args)
        return 0
    finally:
        if adapter is not None:  # moved into OUT when saving succeeded
            shutil.rmtree(adapter, ignore_errors=True)


def _print(stats: dict, args: argparse.Namespace) -> None:
    rows = [("method", stats["method"]), ("time", f"{stats['seconds']:.1f} s")]
    if stats.get("ppl_before") is not None:
        rows.append((f"wikitext2 ppl ({args.ppl_tokens} tok)",
                     f"{stats['ppl_before']:.2f} -> {stats['ppl_after']:.2f}"))
    if stats["method"] == "lora":
        rows += [("steps", str(stats["steps"])),
                 ("validation ppl", f"{stats['val_ppl_before']:.2f} -> {stats['val_ppl_best']:.2f}")]
    elif stats["method"] == "distill":
        rows += [("steps", f"{stats['steps']} ({stats['stopped']})"),
                 ("held-out KL", f"{stats['val_kl_before']:.4f} -> {stats['val_kl_best']:.4f}"),
                 ("tokens/s", f"{stats['tokens_per_second'] or 0:.0f}")]
    elif stats.get("layers_refit"):
        rows.append(("layer output error", f"{stats['mean_error_before']:.4f} -> "
                                           f"{stats['mean_error_after']:.4f}"))
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{name:{width}}  {value}" for name, value in rows))
    print(f"\nsaved the recovered model to {args.out}", file=sys.stdout)
