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
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from depgraph.errors import DepGraphError
from depgraph.paths import atomic_files, write_text_atomically

from .argtypes import positive_int
from .outputs import Output, check_outputs, local_path

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
    write_text_atomically(path, json.dumps(data, indent=1, default=str) + "\n")


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
                        help="also list the groups of block N (and open the HTML page there); "
                             "negative N counts from the last block, as in --layers")
    parser.add_argument("--weights", action="store_true",
                        help="load the weights (default: build the model on the meta device)")
    _common(parser)
    parser.set_defaults(handler=_run_inspect)


def _structure_model(source: Path | str, weights: bool):
    """The model to trace: built from its config on the meta device unless ``weights``."""
    import torch
    from transformers import AutoModelForCausalLM

    from pruning.apply import RECORD_KEY

    from .models import load_config

    config = load_config(source)
    record = getattr(config, RECORD_KEY, None)
    if weights or (isinstance(record, dict) and not record.get("config_exact", True)):
        return _load(source)  # a non-uniformly pruned folder: its config alone is not the model
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def _layer(requested: int | None, layers: list[int]) -> int | None:
    """``--layer N`` as a block index; negative N counts from the end, as ``--layers``."""
    if requested is None:
        return None
    if layers and -len(layers) <= requested < 0:
        return layers[requested]
    if requested not in layers:
        span = f"{layers[0]}..{layers[-1]} or -{len(layers)}..-1" if layers else "none"
        raise ValueError(f"--layer {requested} has no groups (blocks with groups: {span})")
    return requested


def _run_inspect(args: argparse.Namespace) -> int:
    from depgraph import build_graph
    from depgraph.html_view import write_html

    from .models import resolve_model_path
    from .report_text import format_inspect, inspect_report

    source = resolve_model_path(args.model)
    check_outputs([Output("--json", args.json), Output("--dot", args.dot),
                   Output("--graphml", args.graphml), Output("--html", args.html)],
                  [("MODEL", source)])
    model = _structure_model(source, args.weights)
    graph = build_graph(model)
    layer = _layer(args.layer, sorted({g.layer for g in graph.groups() if g.layer is not None}))
    total = sum(p.numel() for p in model.parameters())
    report = inspect_report(graph, args.model, total, layer=layer)
    print(format_inspect(report))
    writers = [(path, write) for path, write in (
        (args.json, lambda file: file.write_text(json.dumps(report, indent=1, default=str))),
        (args.dot, graph.write_dot), (args.graphml, graph.write_graphml),
        (args.html, lambda file: write_html(graph, file, layer=layer))) if path]
    with atomic_files(*(path for path, _ in writers)) as staged:  # all of them, or none
        for file, (_, write) in zip(staged, writers, strict=True):
            write(file)
    if writers:
        print("\nwrote " + ", ".join(str(path) for path, _ in writers))
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


def _dtype(dtype: str | None):
    import torch

    parsed = getattr(torch, dtype, None) if dtype else None
    if dtype and not isinstance(parsed, torch.dtype):
        raise ValueError(f"--dtype {dtype!r} is not a torch dtype such as 'bfloat16'")
    return parsed


def _load(spec: str | Path, dtype: str | None = None, device: str = "cpu"):
    """A model from a spec (:func:`depgraph_cli.models.load_model`: any pruned folder too)."""
    from .models import load_model

    return load_model(spec, dtype=_dtype(dtype), device=device)


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


def _eval_sources(args: argparse.Namespace) -> dict:
    """MODEL and --compare, checked (files, config, --seq-len, tokenizer) before any work."""
    from .model_checks import check_device, check_seq_len, check_tokenizer_files
    from .models import load_config, resolve_model_path

    check_device(args.device)
    _dtype(args.dtype)
    sources = {"MODEL": resolve_model_path(args.model)}
    if args.compare:
        sources["--compare"] = resolve_model_path(args.compare)
    for source in sources.values():
        check_seq_len(load_config(source), args.seq_len, "--seq-len")
        if isinstance(source, Path):
            check_tokenizer_files(source)
    return sources


def _evaluate(spec: str | Path, texts: dict, tasks: dict, args: argparse.Namespace):
    from evaluation import efficiency_report, perplexity, score_items

    from .model_checks import check_finite
    from .models import load_tokenizer

    model, tokenizer = _load(spec, args.dtype, args.device), load_tokenizer(spec)
    check_finite(model, str(spec))
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
    from evaluation import next_token_agreement, text_windows

    text = next(iter(texts.values()))
    windows = text_windows(tokenizer, text, args.seq_len, args.max_tokens)
    return next_token_agreement(dense, model, windows[:64], batch_size=args.batch_size)


def _run_eval(args: argparse.Namespace) -> int:
    from evaluation import compare

    from .report_text import compared_metrics, format_eval

    sources = _eval_sources(args)
    texts, tasks = _eval_inputs(args)
    files = [(option, name) for option, names in (("--ppl", texts), ("--zeroshot", tasks))
             for name in names if local_path(name)]
    check_outputs([Output("--json", args.json)], [*sources.items(), *files])
    model, tokenizer, results = _evaluate(sources["MODEL"], texts, tasks, args)
    report = {"model": args.model, **results}
    if args.compare:
        dense, _, dense_results = _evaluate(sources["--compare"], texts, tasks, args)
        report.update(dense_model=args.compare, dense=dense_results,
                      compare=compared_metrics(compare(dense_results, results)))
        if texts:
            report["agreement"] = _agreement(dense, model, tokenizer, texts, args)
    print(format_eval(report))
    if args.json:
        _write_json(args.json, report)
        print(f"\nwrote {args.json}")
    return 0


# ---------------------------------------------------------------- other modules
def _add_prune(subparsers) -> None:
    from .prune_command import add_prune

    add_prune(subparsers)


def _add_recover(subparsers) -> None:
    from .recover_command import add_recover

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


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like ``KeyboardInterrupt`` so that temporary files go."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input or a faulty model,
    130 after Ctrl-C, 143 after SIGTERM); outputs are written atomically, at the end."""
    previous = _on_sigterm(_terminate)
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
    except KeyboardInterrupt:
        print("\ndepgraph: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("\ndepgraph: terminated", file=sys.stderr)
        return 143
    finally:
        _on_sigterm(previous)


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM (main thread only); returns the previous one."""
    try:
        return signal.signal(signal.SIGTERM, handler or signal.SIG_DFL)
    except ValueError:  # not the main thread
        return None


#: Longest message printed; a library's multi-page report is cut (with "...") after it.
MAX_MESSAGE = 400


def _one_line(exc: BaseException) -> str:
    """The whole message on one line (lines joined, spaces collapsed), at most
    :data:`MAX_MESSAGE` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3].rstrip() + "..."


if __name__ == "__main__":
    sys.exit(main())
