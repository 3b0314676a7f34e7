"""Reconstruction memory does not grow with depth: peak RSS above the weights, per block count.

    python benchmarks/recon_memory.py --layers 4,8,16

Each cell builds a random Llama-shaped model (hidden 512, 8 heads / 4 KV heads, MLP 1536,
float32) with the given number of blocks, in a fresh interpreter, and measures one step:

* ``reconstruct``: a copy pruned by 20% (L2, local) refit against the dense model with
  :func:`recovery.reconstruct` (32 x 128 calibration tokens); before the step both models
  are resident;
* ``sequential``: :func:`recovery.prune_and_reconstruct` (2nd-moment scores,
  pre- and post-pruning refits, block by block); before the step the model is resident.

``above weights`` is the step's peak RSS minus the RSS before it: what the step itself
needed. Issue 4 asks that it not grow with the number of blocks; the last column divides it
by the smallest model's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import markdown_table, rss_mb, run_worker, step  # noqa: E402

MODES = ("reconstruct", "sequential")


def _model(layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                         num_key_value_heads=4, num_hidden_layers=layers, vocab_size=4096,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def worker(spec: dict) -> dict:
    import copy

    import torch

    torch.set_num_threads(spec["threads"])
    from pruning import prune
    from recovery import prune_and_reconstruct, reconstruct

    model = _model(spec["layers"], spec["seed"])
    tokens = torch.randint(0, 4096, (spec["samples"], 128),
                           generator=torch.Generator().manual_seed(spec["seed"]))
    record = dict(spec, weights_mb=sum(p.numel() * p.element_size()
                                       for p in model.parameters()) / 2**20)
    if spec["mode"] == "reconstruct":
        pruned = prune(copy.deepcopy(model), ratio=0.2, importance="l2", ranking="local").model
        record["before_mb"] = rss_mb()
        with step(record, "step"):
            reconstruct(pruned, model, tokens)
    else:
        record["before_mb"] = rss_mb()
        with step(record, "step"):
            prune_and_reconstruct(model, ratio=0.2, importance="second_moment",
                                  tokens=tokens[:8], reconstruct="both", recon_tokens=tokens)
    return record


def table(cells: list[dict]) -> str:
    rows, base = [], {}
    for cell in cells:
        if "error" in cell:
            rows.append([cell["mode"], cell["layers"], "", "", "", f"error: {cell['error'][:100]}",
                         ""])
            continue
        peak = cell["step"]["peak_mb"]
        extra = peak - cell["before_mb"] if peak is not None else float("nan")
        base.setdefault(cell["mode"], extra)
        rows.append([cell["mode"], cell["layers"], f"{cell['weights_mb']:.0f}",
                     f"{cell['before_mb']:.0f}", f"{peak:.0f}", f"{extra:.0f}",
                     f"{extra / base[cell['mode']]:.2f}x"])
    return markdown_table(["step", "blocks", "weights MiB", "RSS before MiB", "peak MiB",
                           "above weights MiB", "vs fewest blocks"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--layers", default="4,8,16")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    base = {"samples": args.samples, "threads": args.threads, "seed": args.seed}
    cells = [run_worker(__file__, {**base, "mode": mode, "layers": int(layers)}, 3600)
             for mode in MODES for layers in args.layers.split(",")]
    print(table(cells))
    print(f"\nRandom Llama-shaped models, hidden 512, MLP 1536, {args.samples} x 128 "
          f"calibration tokens, {args.threads} threads.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
