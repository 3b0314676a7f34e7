"""Speed and memory of a pruned model next to its dense original, measured in one process.

    python benchmarks/speed.py --ratio 0.2 --criterion second_moment
    python benchmarks/speed.py --ranking allocate --round-to 64,128   # the demo's plan, two roundings

The dense model (default: SmolLM2-135M, float32 on the CPU) and a copy pruned to ``--ratio``
of its parameters (one per ``--round-to`` value) are timed in alternation, ``--rounds`` times, so that both see the same
machine state (:func:`evaluation.measure_latency_side_by_side`); each figure is the median
over rounds of :func:`evaluation.measure_latency`'s medians. Printed: parameters, weight
bytes, MACs per token, peak forward memory, prefill and generation tokens/s at batch 1 and
``--batch``, each as dense, pruned and pruned/dense.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import markdown_table  # noqa: E402


def _static(model, seq_len: int) -> dict:
    from evaluation import efficiency_report

    return efficiency_report(model, seq_len=seq_len, repeats=0)


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from depgraph_cli.models import load_model, load_tokenizer
    from evaluation import measure_latency_side_by_side
    from pruning import prune

    tokenizer = load_tokenizer(args.model)
    dense = load_model(args.model, dtype=getattr(torch, args.dtype)).eval()
    models = {"dense": dense}
    for round_to in args.round_to:
        models[_name(round_to, args.round_to)] = prune(
            copy.deepcopy(dense), args.ratio, args.criterion, tokenizer=tokenizer,
            n_samples=args.samples, ranking=args.ranking, round_to=round_to).model
    report = {"static": {name: _static(m, args.seq_len) for name, m in models.items()}}
    report["median"] = measure_latency_side_by_side(
        models, rounds=args.rounds, batch_sizes=(1, args.batch), prompt_len=args.seq_len,
        new_tokens=args.new_tokens, repeats=args.repeats)
    return report


def _name(round_to: int, all_round_to: list[int]) -> str:
    return "pruned" if len(all_round_to) == 1 else f"pruned, round_to {round_to}"


def _rows(report: dict, batch: int) -> list[list]:
    static, median = report["static"], report["median"]
    pruned = [name for name in static if name != "dense"]
    rows = []

    def row(label, d, values, scale=1.0):
        cells = [f"{v * scale:.1f}" for v in values] + [f"{v / d:.3f}" for v in values]
        rows.append([label, f"{d * scale:.1f}", *cells])

    for key, label, scale in (("params", "parameters (M)", 1e-6),
                              ("weight_bytes", "weights (MB)", 1e-6),
                              ("macs_per_token", "MACs per token (M)", 1e-6),
                              ("peak_forward_bytes", "peak forward memory (MB)", 1e-6)):
        if static["dense"].get(key):
            row(label, static["dense"][key], [static[n][key] for n in pruned], scale)
    for b in (1, batch):
        for key, label in ((f"prefill_b{b}_tok_s", f"prefill tokens/s, batch {b}"),
                           (f"gen_b{b}_tok_s", f"generation tokens/s, batch {b}")):
            if median["dense"].get(key):
                row(label, median["dense"][key], [median[n][key] for n in pruned])
    return rows


def _header(report: dict) -> list[str]:
    pruned = [name for name in report["static"] if name != "dense"]
    return ["", "dense", *pruned, *(f"{name} / dense" for name in pruned)]


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 64,128, got {text!r}")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--criterion", default="second_moment")
    parser.add_argument("--ranking", default="global")
    parser.add_argument("--round-to", type=_ints, default=[1],
                        help="kept MLP widths multiples of N; several (64,128): one pruned "
                             "model each, all timed side by side")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = run(args)
    print(markdown_table(_header(report), _rows(report, args.batch)))
    print(f"\n{args.model} {args.dtype}, {args.criterion} ({args.ranking}, round_to "
          f"{','.join(map(str, args.round_to))}) at ratio {args.ratio}; prompt {args.seq_len} tokens, "
          f"{args.new_tokens} new tokens greedy; medians of {args.rounds} alternating rounds "
          f"of {args.repeats} runs; {args.threads} threads.")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
