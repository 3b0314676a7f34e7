"""The ``depgraph`` command line: ``inspect``, ``prune``, ``recover``, ``eval`` and ``demo``.

Each subcommand is a pair of small functions, ``_add_<name>(subparsers)`` (its arguments)
and ``_run_<name>(args) -> int`` (its work); :data:`COMMANDS` lists the ``_add`` functions,
so a subcommand that lives in another module only needs its ``add`` function listed there.
User mistakes (a missing folder, an unknown task, a bad number) end with one line
``depgraph: error: ...`` on stderr and exit status 2, never with a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .argtypes import positive_int
from .errors import DepGraphError

__all__ = ["COMMANDS", "main"]


class UsageError(Exception):
    """Bad command-line input; ``main`` prints it as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _out_path(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {str(path.parent)!r} of {text!r} does not exist")
    return path


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=2, metavar="N",
                        help="CPU threads for torch (default: 2)")


# ---------------------------------------------------------------- inspect
def _add_inspect(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect", help="trace a model and print its coupled groups",
        description="Trace MODEL (a folder, 'default' or a hub id) and print its coupled "
                    "groups per layer and the parameter dims that no group may shrink.")
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("--json", type=_out_path, metavar="FILE",
                        help="write the printed report (groups, summary, fixed dims) as JSON")
    parser.add_argument("--dot", type=_out_path, metavar="FILE", help="write the graph as DOT")
    parser.add_argument("--graphml", type=_out_path, metavar="FILE",
                        help="write the graph as GraphML")
    parser.add_argument("--html", type=_out_path, metavar="FILE",
                        help="write a self-contained HTML page to browse the groups")
    parser.add_argument("--layer", type=int, metavar="N",
                        help="also list the groups of block N (and open the HTML page there)")
    parser.add_argument("--weights", action="store_true",
                        help="load the weights (default: build the model on the meta device)")
    _common(parser)
    parser.set_defaults(handler=_run_inspect)


def _structure_model(spec: str, weights: bool):
    """The model to trace: built from its config on the meta device unless ``weights``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import resolve_model_path

    source = resolve_model_path(spec)
    config = AutoConfig.from_pretrained(source)
    record = getattr(config, "depgraph", None)  # pruning.apply.RECORD_KEY
    if weights or (isinstance(record, dict) and not record.get("config_exact", True)):
        return _load(spec)  # a non-uniformly pruned folder: its config alone is not the model
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def _run_inspect(args: argparse.Namespace) -> int:
    from . import build_graph
    from .report_text import format_inspect, inspect_report

    model = _structure_model(args.model, args.weights)
    graph = build_graph(model)
    layers = sorted({g.layer for g in graph.groups() if g.layer is not None})
    if args.layer is not None and args.layer not in layers:
        span = f"{layers[0]}..{layers[-1]}" if layers else "none"
        raise ValueError(f"--layer {args.layer} has no groups (blocks with groups: {span})")
    total = sum(p.numel() for p in model.parameters())
    report = inspect_report(graph, args.model, total, layer=args.layer)
    print(format_inspect(report))
    written = []
    if args.json:
        _write_json(args.json, report)
        written.append(args.json)
    for path, write in ((args.dot, graph.write_dot), (args.graphml, graph.write_graphml)):
        if path:
            write(path)
            written.append(path)
    if args.html:
        from .html_view import write_html

        write_html(graph, args.html, layer=args.layer)
        written.append(args.html)
    if written:
        print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


# ---------------------------------------------------------------- eval
def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="perplexity, zero-shot accuracy and speed of a model",
        description="Evaluate MODEL. With none of --ppl/--zeroshot/--speed: --ppl wikitext2.")
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("--ppl", metavar="SRC[,SRC]",
                        help="comma-separated text sources: wikitext2, ptb or text files")
    parser.add_argument("--seq-len", type=positive_int, default=128, metavar="N",
                        help="perplexity window and speed prompt length (default: 128)")
    parser.add_argument("--max-tokens", type=positive_int, metavar="N",
                        help="score only the first N tokens of each text")
    parser.add_argument("--zeroshot", metavar="TASKS",
                        help="comma-separated task names or JSONL files, or 'all'")
    parser.add_argument("--limit", type=positive_int, metavar="N",
                        help="first N items of each zero-shot task")
    parser.add_argument("--backend", choices=["native", "lm-eval"], default="native",
                        help="zero-shot scorer: ours (offline JSONL) or lm-evaluation-harness "
                             "(needs the lm-eval package and its datasets)")
    parser.add_argument("--batch-size", type=positive_int, default=4, metavar="N")
    parser.add_argument("--speed", action="store_true",
                        help="parameters, MACs/token, memory and latency")
    parser.add_argument("--compare", metavar="DENSE",
                        help="also evaluate DENSE and show pruned/dense ratios and agreement")
    parser.add_argument("--json", type=_out_path, metavar="FILE", help="write the numbers as JSON")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", help="e.g. bfloat16 (default: float32 on CPU)")
    _common(parser)
    parser.set_defaults(handler=_run_eval)


def _load(spec: str, dtype: str | None = None, device: str = "cpu"):
    """A model from a spec; local folders go through ``pruning.load_pruned`` (any plan)."""
    import torch

    from .models import load_model, resolve_model_path

    source = resolve_model_path(spec)
    parsed = getattr(torch, dtype, None) if dtype else None
    if dtype and not isinstance(parsed, torch.dtype):
        raise ValueError(f"--dtype {dtype!r} is not a torch dtype such as 'bfloat16'")
    try:
        from pruning import load_pruned
    except ImportError:
        load_pruned = None
    if isinstance(source, Path) and load_pruned is not None:
        return load_pruned(source, dtype=parsed, device=device)
    return load_model(source, dtype=parsed, device=device)


def _eval_inputs(args: argparse.Namespace) -> tuple[dict, dict]:
    """Texts and zero-shot items, loaded (and so checked) before any model is."""
    from evaluation import TASKS, load_task, load_text

    ppl = args.ppl or ("wikitext2" if not (args.zeroshot or args.speed) else None)
    texts = {name: load_text(name) for name in _split(ppl, "--ppl")}
    names = list(TASKS) if args.zeroshot == "all" else _split(args.zeroshot, "--zeroshot")
    if args.backend == "lm-eval":
        from evaluation.harness import HARNESS_TASKS, _lm_eval

        unknown = [n for n in names if n not in HARNESS_TASKS]
        if unknown:
            raise ValueError(f"--zeroshot {unknown[0]!r} has no lm-eval counterpart; expected "
                             f"some of {', '.join(HARNESS_TASKS)}")
        _lm_eval()  # fail before loading any model
        return texts, {name: None for name in names}
    tasks = dict(load_task(name, limit=args.limit) for name in names)
    return texts, tasks


def _split(value: str | None, option: str) -> list[str]:
    items = [v.strip() for v in (value or "").split(",")]
    if value is not None and not all(items):
        raise ValueError(f"{option} {value!r} has an empty item")
    return [v for v in items if v]


def _evaluate(spec: str, texts: dict, tasks: dict, args: argparse.Namespace):
    from evaluation import efficiency_report, perplexity, score_items

    from .models import load_tokenizer

    model, tokenizer = _load(spec, args.dtype, args.device), load_tokenizer(spec)
    results: dict = {}
    if texts:
        results["perplexity"] = {
            name: perplexity(model, tokenizer, text, seq_len=args.seq_len,
                             batch_size=args.batch_size, max_tokens=args.max_tokens)
            for name, text in texts.items()}
    if tasks and args.backend == "lm-eval":
        from evaluation.harness import evaluate_with_lm_eval

        results["zeroshot"] = evaluate_with_lm_eval(model, tokenizer, list(tasks),
                                                    limit=args.limit, batch_size=args.batch_size)
    elif tasks:
        results["zeroshot"] = {name: score_items(model, tokenizer, items, batch_size=args.batch_size)
                               for name, items in tasks.items()}
    if args.speed:
        results["efficiency"] = efficiency_report(model, seq_len=args.seq_len)
    return model, tokenizer, results


def _agreement(dense, model, tokenizer, texts: dict, args: argparse.Namespace) -> dict:
    from evaluation import next_token_agreement, token_windows, tokenize_text

    text = next(iter(texts.values()))
    windows = token_windows(tokenize_text(tokenizer, text), args.seq_len, args.max_tokens)
    return next_token_agreement(dense, model, windows[:64], batch_size=args.batch_size)


def _run_eval(args: argparse.Namespace) -> int:
    from evaluation import compare

    from .report_text import compared_metrics, format_eval

    texts, tasks = _eval_inputs(args)
    model, tokenizer, results = _evaluate(args.model, texts, tasks, args)
    report = {"model": args.model, **results}
    if args.compare:
        dense, _, dense_results = _evaluate(args.compare, texts, tasks, args)
        report.update(dense_model=args.compare, dense=dense_results,
                      compare=compared_metrics(compare(dense_results, results)))
        if texts:
            report["agreement"] = _agreement(dense, model, tokenizer, texts, args)
    print(format_eval(report))
    bad = [name for name, r in results.get("perplexity", {}).items() if not math.isfinite(r["ppl"])]
    if bad:
        print(f"warning: perplexity is not finite on {', '.join(bad)}", file=sys.stderr)
    if args.json:
        _write_json(args.json, report)
        print(f"\nwrote {args.json}")
    return 0


# ---------------------------------------------------------------- other modules
def _add_prune(subparsers) -> None:
    from pruning.cli import add_prune

    add_prune(subparsers)


def _add_recover(subparsers) -> None:
    from recovery.cli import add_recover

    add_recover(subparsers)


def _add_demo(subparsers) -> None:
    from .demo import add_demo

    add_demo(subparsers)


#: Subcommand registrars, in ``--help`` order.
COMMANDS: list[Callable] = [_add_inspect, _add_prune, _add_recover, _add_eval, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="depgraph", description="Structural pruning of causal LMs.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=_Parser)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input)."""
    try:
        args = build_parser().parse_args(argv)
        import torch

        torch.set_num_threads(getattr(args, "threads", 2))
        if not sys.stderr.isatty():  # no "Loading weights" bars in logs and pipes
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        return args.handler(args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except (UsageError, ValueError, OSError, DepGraphError) as exc:
        print(f"depgraph: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
