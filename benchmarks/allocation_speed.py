"""Allocation's measuring passes, starting at each group's block against full passes.

    python benchmarks/allocation_speed.py --every 3

On SmolLM2-135M (float32), with the demo's allocation settings (second_moment scores on 10
calibration windows of 128 tokens, damage measured on the first 4, kinds ``mlp,attention``,
widths rounded to 64), :func:`pruning.allocation.sensitivity_curves` runs twice in one
process, in turn: passes that skip the blocks before the group's (the default) and full
passes (``reuse_prefix=False``). It prints both times, their ratio and the largest
difference between the two sets of curves (the skipped blocks compute nothing new, so it
should be 0). ``--every N`` measures the groups of every N-th block only (a shorter run with
the same spread of depths).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import markdown_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=1, help="measure the groups of every N-th block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from depgraph import build_graph
    from depgraph_cli.models import load_model, load_tokenizer
    from pruning import PruneSettings, eligible_groups, score
    from pruning.allocation import SAMPLES, sensitivity_curves
    from pruning.calibration import calibration_tokens

    model = load_model("default", dtype=torch.float32).eval()
    tokens = calibration_tokens(load_tokenizer("default"), "bundled", n_samples=10,
                                seq_len=128, seed=0)
    settings = PruneSettings(ratio=0.2, importance="second_moment", kinds="mlp,attention",
                             ranking="allocate", round_to=64)
    graph = build_graph(model)
    groups = [g for g in eligible_groups(graph, settings, model) if g.layer % args.every == 0]
    scores, _ = score(model, graph, groups, settings, tokens=tokens)
    seconds, curves = {}, {}
    for reuse in (True, False):
        start = time.perf_counter()
        curves[reuse] = sensitivity_curves(model, groups, scores, tokens[:SAMPLES], round_to=64,
                                           progress=False, reuse_prefix=reuse)
        seconds[reuse] = time.perf_counter() - start
        print(f"reuse_prefix={reuse}: {seconds[reuse]:.1f} s", file=sys.stderr, flush=True)
    passes = sum(c[0].size for c in curves[True].values())
    diff = max(float(np.abs(curves[True][k][1] - curves[False][k][1]).max(initial=0.0))
               for k in curves[True])
    print(markdown_table(
        ["passes", "groups", "full passes (s)", "from the group's block (s)", "speed-up",
         "largest curve difference"],
        [[passes, len(groups), f"{seconds[False]:.1f}", f"{seconds[True]:.1f}",
          f"x{seconds[False] / seconds[True]:.2f}", f"{diff:.2g}"]]))
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": {str(k): v for k, v in seconds.items()},
                                               "passes": passes, "groups": len(groups),
                                               "max_difference": diff, **vars(args)}, indent=2))


if __name__ == "__main__":
    main()
