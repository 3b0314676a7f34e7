"""Run the benchmarks and gather their tables into ``benchmarks/RESULTS.md``.

    python benchmarks/run_all.py                      # every section (hours on 2 CPU cores)
    python benchmarks/run_all.py --sections speed     # re-run some; the others are kept

Each section is one script run in its own process; its markdown output goes into the
section under its heading together with the exact command, the date and the wall time, so
every figure in RESULTS.md says how it was produced. A section that fails keeps its old
text and gets the error appended.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
PY = "python"

#: name -> (title, script and arguments, what the section shows)
#: two cells at a time on one thread each (2 cores), and the sweep's evaluation text
_TWO_CELLS = ["--threads", "1", "--jobs", "2"]
_SWEEP_EVAL = ["--ppl-tokens", "4096", *_TWO_CELLS]

SECTIONS: dict[str, tuple[str, list[str], str]] = {
    "graph_scale": (
        "Graph of a Llama-3-70B-shaped model on the meta device",
        ["graph_scale.py"],
        "Target: under 60 s and 3 GiB peak RSS on 2 CPU cores (issue 2)."),
    "vs_torch_pruning": (
        "depgraph next to torch-pruning: graph cost at ~1B and correct grouping on 14 architectures",
        ["vs_torch_pruning.py", "--part", "all"],
        "Each tool prunes one MLP channel group and one attention unit of layer 0 of every "
        "architecture; `correct` means the pruned model's logits equal the original's with "
        "exactly the removed slices zeroed."),
    "criteria": (
        "SmolLM2-135M at 20% of parameters removed: every criterion, and torch-pruning's Taylor",
        ["quality.py", "--criteria", "all", "--ratios", "0.2", "--layers", "all,3:-2", "--tp"],
        "No retraining, no reconstruction. Same calibration (10 x 128 tokens of the bundled "
        "prose) for every row; `3:-2` keeps the first 3 and the last 2 blocks whole as "
        "LLM-Pruner does. depgraph ranks globally (scores normalised per group). The "
        "torch-pruning rows are configured as its `prune_llm.py` (heads, MLP and hidden "
        "channels): on SmolLM2's 9 query / 3 KV heads `pruner.step()` fails with `shape "
        "'[9, -1]' is invalid for input of size 192`; the MLP-only comparisons follow."),
    "vs_llm_pruner": (
        "SmolLM2-135M at 20%, MLP channels only: depgraph next to torch-pruning's LLM-Pruner",
        ["quality.py", "--criteria", "taylor,second_moment", "--kinds", "mlp", "--ratios", "0.2",
         "--layers", "all,3:-2", "--tp-mlp"],
        "torch-pruning's own head pruning fails on SmolLM2's 9 query / 3 KV heads (the "
        "criteria section's error rows; see tp_baseline.py), so the like-for-like comparison "
        "is LLM-Pruner's block-wise setting on the MLP channels, which torch-pruning handles: "
        "same calibration (10 x 128), same criterion (Taylor) and same share of parameters. "
        "No retraining, no reconstruction."),
    "vs_llm_pruner_local": (
        "SmolLM2-135M at 20%, MLP channels only, ranked per block as torch-pruning does",
        ["quality.py", "--criteria", "taylor_element", "--kinds", "mlp", "--ranking", "local",
         "--ratios", "0.2", "--layers", "3:-2", "--recovery", "none,reconstruct", "--tp-mlp"],
        "torch-pruning prunes the same fraction of every block (`global_pruning=False`, as in "
        "LLM-Pruner) with element-wise Taylor scores; depgraph with the same criterion and "
        "`ranking=local` chooses the same channels. Least-squares reconstruction (sequential, "
        "pre and post, 32 x 128 tokens; no training) then goes below it."),
    "recovery": (
        "Recovery on SmolLM2-135M: pruned, + reconstruction, + LoRA",
        ["quality.py", "--criteria", "second_moment", "--ratios", "0.2,0.3", "--recovery",
         "none,reconstruct,lora,reconstruct+lora", "--lora-steps", "60", "--threads", "1",
         "--jobs", "2"],
        "Reconstruction: the sequential least-squares pass (pre and post, damping 2, output "
        "correction on, 32 x 128 tokens of the calibration prose); LoRA: 60 steps of batch "
        "4 x 128 tokens of the same prose, rank 8. Two cells run at a time on one thread each "
        "(both kinds of cell under the same contention), so seconds are longer than alone."),
    "recovery_memory": (
        "Reconstruction memory against depth",
        ["recon_memory.py", "--layers", "4,8,16"],
        "Target: the memory a reconstruction step needs beyond the weights does not grow with "
        "the number of blocks (issue 4)."),
    "stream_memory": (
        "Streamed pruning of models bigger than memory: Llama-3-8B widths at 2, 4 and 8 blocks",
        ["stream_memory.py", "--blocks", "2,4,8"],
        "Target: peak RSS <= 4 GiB and flat with depth, the output reloads and runs (issue 17). "
        "Random bf16 weights, written shard by shard; second_moment at 20% on 10 x 128 random "
        "tokens, global ranking, 1 torch thread; every step in a fresh interpreter, peak RSS "
        "= its VmHWM (imports and file pages mapped included). The machine's 2 cores were "
        "shared with other jobs, so seconds are upper bounds."),
    "sweep": (
        "Ratio sweep on SmolLM2-135M: every criterion at 10/30/50%, no recovery",
        ["quality.py", "--criteria", "all", "--ratios", "0.1,0.3,0.5", *_SWEEP_EVAL],
        "One-shot pruning, global ranking, same calibration (10 x 128 tokens of the bundled "
        "prose) for every row; 20% is the criteria section. Perplexity on the first 4096 "
        "tokens here (enough to rank; the dense row differs from the other sections'). Two "
        "cells run at a time on one thread each, so the seconds are measured under "
        "contention."),
    "sweep_recovery": (
        "Ratio sweep on SmolLM2-135M: reconstruction and LoRA at 10% and 50%",
        ["quality.py", "--criteria", "second_moment", "--ratios", "0.1,0.5",
         "--recovery", "none,reconstruct,lora", "--lora-steps", "60", *_SWEEP_EVAL],
        "The recovery section's settings (which has 20% and 30%) at the ends of the sweep, "
        "for the criterion that leads it. Perplexity on the first 4096 tokens; two cells at "
        "a time on one thread each."),
    "sweep_lora": (
        "Ratio sweep on SmolLM2-135M: LoRA after the other activation-based criteria",
        ["quality.py", "--criteria", "retraining_free,taylor,taylor_element",
         "--ratios", "0.1,0.2,0.3,0.5", "--recovery", "lora", "--lora-steps", "60",
         *_SWEEP_EVAL],
        "The recovery section's LoRA (60 steps of 4 x 128 tokens of the calibration prose, "
        "rank 8) after each criterion that leads the one-shot sweep besides second_moment "
        "(which the recovery and sweep_recovery sections cover). Perplexity on the first "
        "4096 tokens; two cells at a time on one thread each."),
    "sweep_reconstruct": (
        "Ratio sweep on SmolLM2-135M: reconstruction after retraining_free",
        ["quality.py", "--criteria", "retraining_free",
         "--ratios", "0.1,0.3,0.5", "--recovery", "reconstruct", *_SWEEP_EVAL],
        "The recovery section's reconstruction (sequential, pre and post, damping 2, output "
        "correction, 32 x 128 tokens of the calibration prose) after the criterion that "
        "leads the one-shot sweep at 30% (second_moment: sweep_recovery; 20%: "
        "criteria_reconstruct; the other criteria: sweep_taylor_reconstruct and "
        "sweep_datafree_reconstruct). Perplexity on the first 4096 tokens; two cells at a "
        "time on one thread each."),
    "criteria_reconstruct": (
        "SmolLM2-135M at 20%: every criterion, pruned and reconstructed",
        ["quality.py", "--criteria", "all", "--ratios", "0.2", "--recovery", "none,reconstruct",
         *_SWEEP_EVAL],
        "The criteria section again on the sweep's evaluation (the first 4096 tokens), each "
        "criterion also followed by the sequential reconstruction: can it rescue the "
        "data-free criteria?"),
    "demo_criterion": (
        "SmolLM2-135M at 20%, the demo's pipeline: one-shot pruning, then reconstruction",
        ["quality.py", "--criteria", "second_moment,retraining_free", "--ratios", "0.2",
         "--recovery", "none,refit", *_TWO_CELLS],
        "`depgraph demo` prunes in one shot and then refits the pruned model against the "
        "dense one (`refit`: recovery.reconstruct, 32 x 128 tokens, damping 4, output "
        "correction); the two leading retraining-free criteria of the sections above in that "
        "pipeline choose its default. Perplexity on the first 16384 tokens (the demo's); two "
        "cells at a time on one thread each."),
    "sweep_taylor_reconstruct": (
        "Ratio sweep on SmolLM2-135M: reconstruction after the Taylor criteria",
        ["quality.py", "--criteria", "taylor,taylor_element,taylor_second",
         "--ratios", "0.1,0.3,0.5", "--recovery", "reconstruct", *_SWEEP_EVAL],
        "LLM-Pruner's criteria followed by the recovery section's reconstruction (20%: "
        "criteria_reconstruct). The sequential pass re-scores a Taylor criterion on the "
        "model pruned so far before each block (a forward and a backward to that block per "
        "calibration sample), which makes these the slowest cells. Perplexity on the first "
        "4096 tokens; two cells at a time on one thread each."),
    "sweep_datafree_reconstruct": (
        "Ratio sweep on SmolLM2-135M: reconstruction after the data-free criteria",
        ["quality.py", "--criteria", "random,l1,l2,second_moment_datafree",
         "--ratios", "0.1,0.3,0.5", "--recovery", "reconstruct", *_SWEEP_EVAL],
        "The criteria that read no data, followed by the recovery section's reconstruction "
        "(which does read the calibration prose; 20%: criteria_reconstruct). Perplexity on "
        "the first 4096 tokens; two cells at a time on one thread each."),
    "sweep_lora_taylor_second": (
        "Ratio sweep on SmolLM2-135M: LoRA after taylor_second",
        ["quality.py", "--criteria", "taylor_second", "--ratios", "0.1,0.2,0.3,0.5",
         "--recovery", "lora", "--lora-steps", "60", *_SWEEP_EVAL],
        "sweep_lora's LoRA (60 steps of 4 x 128 tokens, rank 8) after LLM-Pruner's "
        "second-order criterion. Perplexity on the first 4096 tokens; two cells at a time "
        "on one thread each."),
    "sweep_second_moment_fill": (
        "Ratio sweep on SmolLM2-135M: second_moment at 20% and 30% with reconstruction or LoRA",
        ["quality.py", "--criteria", "second_moment", "--ratios", "0.2,0.3",
         "--recovery", "reconstruct,lora", "--lora-steps", "60", *_SWEEP_EVAL],
        "The recovery section's cells (measured there on 16384 tokens) again on the sweep's "
        "first 4096 tokens, so that the summary table has them. Two cells at a time on one "
        "thread each."),
    "sweep_lora_datafree": (
        "Ratio sweep on SmolLM2-135M: LoRA after the data-free criteria at 10% and 20%",
        ["quality.py", "--criteria", "random,l1,l2,second_moment_datafree",
         "--ratios", "0.1,0.2", "--recovery", "lora", "--lora-steps", "60",
         *_SWEEP_EVAL],
        "sweep_lora's LoRA after the criteria that read no data (30% and 50%: "
        "sweep_lora_datafree_high; two sections of about 35 minutes rather than one). "
        "Perplexity on the first 4096 tokens; two cells at a time on one thread each."),
    "sweep_lora_datafree_high": (
        "Ratio sweep on SmolLM2-135M: LoRA after the data-free criteria at 30% and 50%",
        ["quality.py", "--criteria", "random,l1,l2,second_moment_datafree",
         "--ratios", "0.3,0.5", "--recovery", "lora", "--lora-steps", "60",
         *_SWEEP_EVAL],
        "sweep_lora_datafree at the two higher ratios. Perplexity on the first 4096 tokens; "
        "two cells at a time on one thread each."),
    "extension_criteria": (
        "SmolLM2-135M: FLAP, Wanda-sp and second_moment at 10/20/30%, without and with bias "
        "compensation, and with reconstruction",
        ["quality.py", "--criteria", "flap,wanda_sp,second_moment", "--ratios", "0.2,0.1,0.3",
         "--recovery", "none,compensate,reconstruct", "--ppl-tokens", "4096", "--threads", "1"],
        "The two methods written as plug-ins against the public extension API (issue 15) next "
        "to the built-in second_moment. Calibration text (what the criteria, the compensation "
        "and the reconstruction saw): the bundled Gutenberg prose, 10 x 128 tokens for scoring "
        "and for the compensation means (seed 0), 32 x 128 other windows of it for the "
        "reconstruction (seed 1). Evaluation text (what the perplexities saw, never used for "
        "anything else): the first 4096 tokens of the WikiText-2 raw test split, windows of "
        "128, the summary's text. Each criterion ranks as it was registered: flap "
        "`global_raw` (channel scores standardised per layer and module, a head or KV group "
        "the mean of its channels, compared directly: FLAP's adaptive structure), wanda_sp `local` (the same fraction of every group), second_moment "
        "`global`. `compensate`: FLAP's baseline bias compensation (removed channels' mean "
        "input times their weight columns, added as a bias to the layer that read them); "
        "`reconstruct`: the sequential least-squares pass (pre and post, damping 4, output "
        "correction), without compensation (the two do not combine). One cell at a time on "
        "one thread; 20% ran first."),
    "speed": (
        "Speed and memory of SmolLM2-135M pruned by 20% next to dense",
        ["speed.py", "--ratio", "0.2", "--batch", "16", "--round-to", "64"],
        "Target: at least 1.2x generation tokens/s on the CPU and a matching drop in memory."),
    "summary": (
        "SmolLM2-135M quality at a glance: every criterion and ratio, with and without recovery",
        ["summary.py", "--tokens", "4096"],
        "The cells of the sweep sections and of criteria_reconstruct (all evaluated on the "
        "first 4096 tokens) in one table; run after them. The sections evaluated on 16384 "
        "tokens (criteria, recovery, demo_criterion) are not mixed in; reconstruction and "
        "LoRA together are in the recovery section."),
}


def _machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def _run(name: str, timeout: float) -> str:
    title, command, note = SECTIONS[name]
    shown = " ".join([PY, f"benchmarks/{command[0]}", *command[1:]])
    start = time.perf_counter()
    print(f"== {name}: {shown}", file=sys.stderr, flush=True)
    try:
        done = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]],
                              capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
        body, ok = done.stdout.strip(), done.returncode == 0
        error = "" if ok else (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    except subprocess.TimeoutExpired:
        body, ok, error = "", False, f"timed out after {timeout:.0f} s"
    minutes = (time.perf_counter() - start) / 60
    head = (f"## {title}\n\n<!-- section: {name} -->\n\nCommand: `{shown}` "
            f"({time.strftime('%Y-%m-%d')}, {minutes:.0f} min, {_machine()}).\n\n{note}\n\n")
    if not ok:
        return head + (body + "\n\n" if body else "") + f"**Failed:** {error}\n"
    return head + body + "\n"


def _split(text: str) -> dict[str, str]:
    """Sections by name. A section runs from its heading (the ``## `` line just before its
    marker) to the next section's heading, so headings in a script's output stay inside."""
    heads = list(re.finditer(r"^## [^\n]*\n\n<!-- section: (\w+) -->", text, flags=re.M))
    ends = [m.start() for m in heads[1:]] + [len(text)]
    return {m.group(1): text[m.start():end].rstrip() + "\n"
            for m, end in zip(heads, ends, strict=True)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="per section, seconds")
    args = parser.parse_args(argv)
    chosen = [s for s in args.sections.split(",") if s]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; expected some of {', '.join(SECTIONS)}")
    sections = _split(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in chosen:
        sections[name] = _run(name, args.timeout)
        ordered = [sections[n] for n in SECTIONS if n in sections]
        RESULTS.write_text("# Benchmark results\n\nWritten by `python benchmarks/run_all.py` "
                           "(see benchmarks/README.md); each section names the command that "
                           "produced it.\n\n" + "\n".join(ordered))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
