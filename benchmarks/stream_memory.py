"""Streamed pruning of models bigger than memory: peak RSS against depth, time per block.

Part A: random-weight bf16 checkpoints with Llama-3-8B widths (hidden 4096, MLP 14336, 32
query / 8 KV heads, vocab 128256, untied head), written shard by shard (one tensor in memory
at a time) at each depth of ``--blocks``, pruned by ``--ratio`` with
:func:`recovery.prune_streamed` in a fresh interpreter: its peak RSS (``VmHWM``, everything the
process ever held, imports included), wall time per block of each pass, then the output
folder reloaded with ``load_pruned`` and run on a few tokens (another interpreter). Only one
checkpoint and its output exist at a time (deleted afterwards).

Part B: SmolLM2-135M (the project's default model) pruned in memory (``pruning.prune`` on the
loaded model) and streamed from its folder, each in a fresh interpreter: equal plans, peak
RSS, wall time and their ratio.

    python benchmarks/stream_memory.py --blocks 2,4,8 --json stream.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import markdown_table, peak_mb, run_worker  # noqa: E402

WIDTHS = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
              num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
              rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5)


def make_checkpoint(folder: Path, blocks: int, seed: int = 0) -> dict:
    """A random bf16 Llama checkpoint of 8B widths, one shard per block (see module doc)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from pruning.shards import shard_name, write_index, write_shard

    config = LlamaConfig(num_hidden_layers=blocks, dtype="bfloat16", **WIDTHS)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    shards: list[list] = [[] for _ in range(blocks + 1)]
    for name, param in skeleton.named_parameters():
        index = int(name.split(".")[2]) + 1 if name.startswith("model.layers.") else 0
        shards[index].append((name, torch.bfloat16, tuple(param.shape)))

    def produce(name):
        shape = dict(skeleton.named_parameters())[name].shape
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        std = 1.0 if "embed" in name else shape[1] ** -0.5
        return (torch.randn(shape, generator=generator, dtype=torch.bfloat16) * std)

    weight_map, total = {}, 0
    for index, entries in enumerate(shards):
        name = shard_name(index, len(shards))
        total += write_shard(folder / name, entries, produce)
        weight_map.update({key: name for key, _, _ in entries})
    write_index(folder, weight_map, total)
    config.save_pretrained(folder)
    return {"bytes": total}


def _stream(spec: dict) -> dict:
    import torch

    from pruning import PruneSettings
    from recovery import prune_streamed

    torch.set_num_threads(spec["threads"])
    tokens = torch.randint(0, spec["vocab"], (spec["samples"], spec["seq_len"]),
                           generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"score": [], "write": []}
    last = [time.perf_counter()]

    def on_block(phase, _index, _count):
        now = time.perf_counter()
        times[phase].append(now - last[0])
        last[0] = now

    start = time.perf_counter()
    settings = PruneSettings(ratio=spec["ratio"], importance=spec["importance"],
                             n_samples=spec["samples"], seq_len=spec["seq_len"])
    result = prune_streamed(spec["source"], spec["out"], settings, tokens=tokens,
                            on_block=on_block, overwrite=True)
    plan = json.dumps(result.plan, sort_keys=True)
    return {**spec, "seconds": round(time.perf_counter() - start, 1),
            "score_s_per_block": round(sum(times["score"]) / max(len(times["score"]), 1), 1),
            "write_s_per_block": round(sum(times["write"]) / max(len(times["write"]), 1), 1),
            "peak_mb": round(peak_mb()), "ratio_removed": round(result.stats["ratio_removed"], 4),
            "plan_sha": hashlib.sha256(plan.encode()).hexdigest()[:12]}


def _in_memory(spec: dict) -> dict:
    import torch

    from pruning import PruneSettings, load_pruned, prune

    torch.set_num_threads(spec["threads"])
    tokens = torch.randint(0, spec["vocab"], (spec["samples"], spec["seq_len"]),
                           generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    model = load_pruned(spec["source"])
    settings = PruneSettings(ratio=spec["ratio"], importance=spec["importance"],
                             n_samples=spec["samples"], seq_len=spec["seq_len"])
    result = prune(model, settings=settings, tokens=tokens)
    plan = json.dumps(result.plan, sort_keys=True)
    return {**spec, "seconds": round(time.perf_counter() - start, 1), "peak_mb": round(peak_mb()),
            "ratio_removed": round(result.stats["ratio_removed"], 4),
            "plan_sha": hashlib.sha256(plan.encode()).hexdigest()[:12]}


def _reload(spec: dict) -> dict:
    import torch

    from pruning import load_pruned

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    model = load_pruned(spec["out"])
    with torch.no_grad():
        logits = model(torch.arange(8)[None]).logits
    return {**spec, "reload_seconds": round(time.perf_counter() - start, 1),
            "reload_peak_mb": round(peak_mb()), "finite": bool(torch.isfinite(logits).all()),
            "params": sum(p.numel() for p in model.parameters())}


def _make(spec: dict) -> dict:
    start = time.perf_counter()
    info = make_checkpoint(Path(spec["source"]), spec["blocks"])
    return {**spec, **info, "make_seconds": round(time.perf_counter() - start, 1),
            "make_peak_mb": round(peak_mb())}


TASKS = {"stream": _stream, "memory": _in_memory, "reload": _reload, "make": _make}


def part_a(args) -> list[dict]:
    rows = []
    for blocks in args.blocks:
        source, out = args.work / f"llama8b-{blocks}", args.work / f"llama8b-{blocks}-pruned"
        for folder in (source, out):
            shutil.rmtree(folder, ignore_errors=True)
        spec = {"source": str(source), "out": str(out), "blocks": blocks, "ratio": args.ratio,
                "importance": args.importance, "samples": args.samples, "seq_len": args.seq_len,
                "vocab": WIDTHS["vocab_size"], "threads": args.threads}
        made = run_worker(__file__, {**spec, "task": "make"}, args.timeout)
        row = {**spec, **made}
        if "error" not in made:
            row.update(run_worker(__file__, {**spec, "task": "stream"}, args.timeout))
        if "error" not in row:
            row.update(run_worker(__file__, {**spec, "task": "reload"}, args.timeout))
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
        for folder in (source, out):
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def part_b(args) -> list[dict]:
    from depgraph_cli.models import default_model_path

    source = default_model_path()
    spec = {"source": str(source), "out": str(args.work / "smollm2-streamed"), "ratio": args.ratio,
            "importance": args.importance, "samples": args.samples, "seq_len": args.seq_len,
            "vocab": 49152, "threads": args.threads}
    rows = [run_worker(__file__, {**spec, "task": task}, args.timeout) for task in ("memory", "stream")]
    shutil.rmtree(spec["out"], ignore_errors=True)
    return rows


def report(a_rows: list[dict], b_rows: list[dict]) -> str:
    lines = []
    if a_rows:
        first = a_rows[0].get("peak_mb")
        table = [[r["blocks"], f"{r.get('bytes', 0) / 2**30:.2f}", r.get("make_peak_mb", ""),
                  r.get("peak_mb", r.get("error", "")), f"{r['peak_mb'] / first:.2f}x"
                  if first and r.get("peak_mb") else "", r.get("score_s_per_block", ""),
                  r.get("write_s_per_block", ""), r.get("seconds", ""), r.get("ratio_removed", ""),
                  r.get("reload_peak_mb", ""), r.get("finite", "")] for r in a_rows]
        lines.append(markdown_table(
            ["blocks", "checkpoint GiB", "writing it: peak MiB", "streamed prune: peak MiB",
             "vs fewest blocks", "score s/block", "write s/block", "total s", "removed",
             "reload + forward: peak MiB", "logits finite"], table))
    if b_rows:
        table = [[r.get("task", ""), r.get("peak_mb", r.get("error", "")), r.get("seconds", ""),
                  r.get("ratio_removed", ""), r.get("plan_sha", "")] for r in b_rows]
        lines.append(markdown_table(["SmolLM2-135M", "peak MiB", "seconds", "removed",
                                     "plan sha256"], table))
        if all("seconds" in r for r in b_rows):
            memory, streamed = b_rows
            same = memory["plan_sha"] == streamed["plan_sha"]
            lines.append(f"plans equal: {same}; streamed / in memory: time "
                         f"{streamed['seconds'] / memory['seconds']:.2f}x, peak RSS "
                         f"{streamed['peak_mb'] / memory['peak_mb']:.2f}x")
    return "\n\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--blocks", default="2,4,8", type=lambda s: [int(x) for x in s.split(",") if x])
    parser.add_argument("--parts", default="a,b")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--importance", default="second_moment")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--work", type=Path, default=Path("/tmp/depgraph-stream-bench"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(TASKS[spec["task"]](spec)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    a_rows = part_a(args) if "a" in args.parts else []
    b_rows = part_b(args) if "b" in args.parts else []
    print(report(a_rows, b_rows))
    if args.json:
        args.json.write_text(json.dumps({"a": a_rows, "b": b_rows}, indent=1))


if __name__ == "__main__":
    main()
