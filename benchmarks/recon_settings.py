"""Reconstruction settings on SmolLM2-135M: damping, output correction, samples, pre/post,
precision, and the time of reconstruction against LoRA's.

    python benchmarks/recon_settings.py --damping 1,4,12 --correction 0,1
    python benchmarks/recon_settings.py --damping 4 --correction 1 --samples 16,32 --jobs 2 --threads 1
    python benchmarks/recon_settings.py --precision fp32,auto --lora-steps 60 --threads 1

Every cell prunes the same model by ``--ratio`` with ``--criterion`` (global ranking, the
same 10 x 128 calibration windows as ``quality.py``) through the sequential pass of
:mod:`recovery.sequential` with one :class:`recovery.SequentialSettings`, in a fresh
interpreter, and reports WikiText-2 perplexity (first ``--ppl-tokens`` tokens, windows of
128), the pruning wall time and peak RSS. A cell per combination of the listed values; the
pruned-only row comes first. This is how the defaults (correction 1; damping 4, then 2 once
the pre refit left the post refit's layers alone) were chosen.

``--precision``: the arithmetic of the reconstruction (:mod:`recovery.precision`; ``auto`` is
bfloat16 where the CPU multiplies it natively). ``--lora-steps N`` adds a cell that trains
the pruned-only model with N steps of LoRA (``quality.py``'s settings) and prints each
reconstruction's time over LoRA's, measured side by side in this one run (run it with
``--jobs 1`` so that no two cells share the cores). A reconstruction's time is its
block-by-block pass; the physical removal of the plan that follows it (as every prune has) is
reported apart ("apply s").
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import markdown_table, run_worker, step  # noqa: E402
from quality import _list  # noqa: E402


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from quality import _lora, _perplexity

    from depgraph_cli.models import load_model, load_tokenizer
    from pruning import prune
    from pruning.calibration import calibration_tokens
    from recovery import SequentialSettings, prune_and_reconstruct

    record = dict(spec)
    tokenizer = load_tokenizer(spec["model"])
    model = load_model(spec["model"], dtype=torch.float32).eval()
    calib = calibration_tokens(tokenizer, "bundled", n_samples=10, seq_len=128, seed=0)
    settings = None
    recon_tokens = None
    if spec["samples"]:
        settings = SequentialSettings(pre=spec["pre"], post=spec["post"],
                                      targets=spec["targets"], damping=spec["damping"],
                                      correction=spec["correction"], precision=spec["precision"])
        recon_tokens = calibration_tokens(tokenizer, "bundled", n_samples=spec["samples"],
                                          seq_len=128, seed=1)
    options = {"tokenizer": tokenizer, "tokens": calib, "seed": 0, "kinds": "mlp,attention"}
    with step(record, "prune"):
        if settings is None:  # the pruned-only model (and LoRA's)
            result = prune(model, spec["ratio"], spec["criterion"], **options)
        else:
            result = prune_and_reconstruct(model, spec["ratio"], spec["criterion"],
                                           reconstruct=settings, recon_tokens=recon_tokens,
                                           **options)
    model = result.model
    if settings is not None:
        recon = result.stats["reconstruction"]
        record.update(recon_seconds=recon["seconds"], apply_seconds=recon["apply_seconds"],
                      precision_used=recon["precision"])
    if spec.get("lora_steps"):
        model = _lora(model, tokenizer, {"lora_steps": spec["lora_steps"], "calib": "bundled"},
                      record)
    with step(record, "eval"):
        record["ppl"] = _perplexity(model, tokenizer, spec["ppl_tokens"])
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="default")
    parser.add_argument("--criterion", default="second_moment")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--damping", type=_list(float), default=[2.0])
    parser.add_argument("--correction", type=_list(float), default=[1.0])
    parser.add_argument("--samples", type=_list(int), default=[32],
                        help="reconstruction windows of 128 tokens")
    parser.add_argument("--steps", type=_list(str), default=["pre+post"],
                        help="pre+post (level-2 after pruning), post (every layer after), pre")
    parser.add_argument("--precision", type=_list(str), default=["auto"],
                        help="auto, fp32, bf16 (recovery.precision)")
    parser.add_argument("--lora-steps", type=int, default=0,
                        help="add a cell: the pruned-only model trained with this many LoRA "
                             "steps, and print reconstruction time / LoRA time")
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker)), default=str))
        return 0
    steps = {"pre+post": (True, True, "level2"), "post": (False, True, "all"),
             "pre": (True, False, "level2")}
    bad = [s for s in args.steps if s not in steps]
    if bad:
        parser.error(f"--steps {bad[0]!r}: expected some of {', '.join(steps)}")
    base = {"model": args.model, "criterion": args.criterion, "ratio": args.ratio,
            "ppl_tokens": args.ppl_tokens, "threads": args.threads}
    none = {**base, "samples": 0, "damping": "-", "correction": "-", "steps": "none",
            "pre": False, "post": False, "targets": "-", "precision": "-"}
    cells = [none] + ([{**none, "steps": f"lora {args.lora_steps}",
                        "lora_steps": args.lora_steps}] if args.lora_steps else [])
    for damping, correction, samples, name, precision in itertools.product(
            args.damping, args.correction, args.samples, args.steps, args.precision):
        pre, post, targets = steps[name]
        cells.append({**base, "samples": samples, "damping": damping, "correction": correction,
                      "steps": name, "pre": pre, "post": post, "targets": targets,
                      "precision": precision})
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = list(pool.map(lambda spec: run_worker(__file__, spec, args.timeout), cells))
    rows = []
    for cell in done:
        ppl = f"error: {cell['error'][:100]}" if "error" in cell else f"{cell['ppl']:.2f}"
        prune_step = cell.get("prune", {})
        rows.append([cell["steps"], cell.get("precision_used", cell["precision"]), cell["damping"],
                     cell["correction"], cell["samples"], ppl,
                     f"{prune_step.get('seconds', 0):.0f}", _seconds(cell, "recon_seconds"),
                     _seconds(cell, "apply_seconds"),
                     f"{prune_step.get('peak_mb', 0) / 1024:.2f}",
                     f"{cell['train']['seconds']:.1f}" if "train" in cell else ""])
    print(markdown_table(["steps", "precision", "damping", "correction", "samples", "ppl",
                          "prune s", "recon s", "apply s", "prune GiB", "LoRA s"], rows))
    print(f"\n{args.criterion} at {args.ratio:.0%}; WikiText-2 raw test, first {args.ppl_tokens} "
          f"tokens; {args.threads} thread(s) per cell, {args.jobs} cell(s) at a time.")
    lora = next((c for c in done if "train" in c), None)
    for cell in done:
        if lora is not None and "recon_seconds" in cell:
            print(f"reconstruction ({cell['steps']}, {cell['precision_used']}) / LoRA "
                  f"({args.lora_steps} steps): {cell['recon_seconds']:.1f} s / "
                  f"{lora['train']['seconds']:.1f} s = "
                  f"{cell['recon_seconds'] / lora['train']['seconds']:.2f}")
    return 0


def _seconds(cell: dict, key: str) -> str:
    return f"{cell[key]:.1f}" if key in cell else ""


if __name__ == "__main__":
    sys.exit(main())
