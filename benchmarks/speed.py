"""Speed and memory of a pruned model next to its dense original, measured in one process.

    python benchmarks/speed.py --ratio 0.2 --criterion second_moment

The dense model (default: SmolLM2-135M, float32 on the CPU) and a copy pruned to ``--ratio``
of its parameters are timed in alternation, ``--rounds`` times, so that both see the same
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
    pruned = prune(copy.deepcopy(dense), args.ratio, args.criterion, tokenizer=tokenizer,
                   n_samples=args.samples, ranking=args.ranking, round_to=args.round_to).model
    models = {"dense": dense, "pruned": pruned}
    report = {"static": {name: _static(m, args.seq_len) for name, m in models.items()}}
    report["median"] = measure_latency_side_by_side(
        models, rounds=args.rounds, batch_sizes=(1, args.batch), prompt_len=args.seq_len,
        new_tokens=args.new_tokens, repeats=args.repeats)
    return report


def _rows(report: dict, batch: int) -> list[list]:
    static, median = report["static"], report["median"]
    rows = []
    for key, label, scale in (("params", "parameters (M)", 1e-6),
                              ("weight_bytes", "weights (MB)", 1e-6),
                              ("macs_per_token", "MACs per token (M)", 1e-6),
                              ("peak_forward_bytes", "peak forward memory (MB)", 1e-6)):
        d, p = static["dense"].get(key), static["pruned"].get(key)
        if d:
            rows.append([label, f"{d * scale:.1f}", f"{p * scale:.1f}", f"{p / d:.3f}"])
    for b in (1, batch):
        for key, label in ((f"prefill_b{b}_tok_s", f"prefill tokens/s, batch {b}"),
                           (f"gen_b{b}_tok_s", f"generation tokens/s, batch {b}")):
            d, p = median["dense"].get(key), median["pruned"].get(key)
            if d:
                rows.append([label, f"{d:.1f}", f"{p:.1f}", f"{p / d:.3f}"])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--criterion", default="second_moment")
    parser.add_argument("--ranking", default="global")
    parser.add_argument("--round-to", type=int, default=1)
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
    print(markdown_table(["", "dense", "pruned", "pruned / dense"], _rows(report, args.batch)))
    print(f"\n{args.model} {args.dtype}, {args.criterion} ({args.ranking}, round_to "
          f"{args.round_to}) at ratio {args.ratio}; prompt {args.seq_len} tokens, "
          f"{args.new_tokens} new tokens greedy; medians of {args.rounds} alternating rounds "
          f"of {args.repeats} runs; {args.threads} threads.")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
