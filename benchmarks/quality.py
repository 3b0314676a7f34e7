"""Quality of pruned models: WikiText-2 perplexity per criterion, ratio and recovery.

    python benchmarks/quality.py --criteria all --ratios 0.2 --layers all,3:-2 --tp
    python benchmarks/quality.py --criteria second_moment --ratios 0.2,0.3 \\
        --recovery none,reconstruct,reconstruct+lora,lora --lora-steps 60

Every cell runs in a fresh interpreter (so its peak memory is its own) on the same model
(default: SmolLM2-135M, float32), the same calibration windows (``--calib``, seeded) and the
same evaluation text: the first ``--ppl-tokens`` tokens of the WikiText-2 raw test split in
windows of 128 tokens. A cell is

* ``dense``: the model as it is;
* a depgraph criterion at a ratio of parameters, on a block range (``all`` or ``3:-2``,
  LLM-Pruner's choice: the first 3 and last 2 blocks stay), global ranking of the MLP
  channels and (KV) heads (or the ranking the criterion was registered with: ``flap``
  global_raw, ``wanda_sp`` local), with recovery ``none``, ``compensate`` (FLAP's bias
  compensation from the calibration windows), ``reconstruct`` (sequential least
  squares before and after each block, :mod:`recovery.sequential`), ``refit`` (one-shot
  pruning, then :func:`recovery.reconstruct` against the dense model, as ``depgraph demo``
  does), ``lora``
  (``--lora-steps`` steps of LoRA on the calibration prose), ``distill`` / ``distill_lora``
  (distillation from the dense model, every block parameter / LoRA, ``--distill-tokens``
  tokens of the calibration prose, :func:`recovery.distill`), or ``reconstruct+`` any of
  those three;
* ``torch-pruning``: LLM-Pruner's Taylor pruning through torch-pruning (``tp_baseline.py``),
  on the same block range, at the channel fraction that removes the same share: ``--tp``
  configured as torch-pruning's ``prune_llm.py`` (heads, MLP and hidden channels),
  ``--tp-mlp`` LLM-Pruner's block-wise setting on the MLP channels only (compare it with
  depgraph cells run with ``--kinds mlp``).

``--pruned-cache DIR`` keeps each pruned (and reconstructed) model in ``DIR``
(``save_pruned``) and reads it back (``load_pruned``) for the next cell with the same pruning
inputs, so that recoveries compared on one pruned model prune it once.

Printed: a markdown table with perplexity, the share of parameters removed, and wall time
and peak RSS of each step. ``--json FILE`` keeps every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import markdown_table, run_worker, step  # noqa: E402

ALL_CRITERIA = ("random", "l1", "l2", "second_moment_datafree", "taylor", "taylor_element",
                "taylor_second", "second_moment", "retraining_free", "flap", "wanda_sp")
RANKINGS = ("global", "global_raw", "local", "allocate")
RECOVERY = ("none", "compensate", "reconstruct", "refit", "lora", "reconstruct+lora", "distill",
            "reconstruct+distill", "distill_lora", "reconstruct+distill_lora")


# ------------------------------------------------------------------------------ worker
def _blocks(layers: str, count: int) -> range:
    from pruning.selection import parse_layers

    return range(count) if layers == "all" else parse_layers(layers, count)


def _perplexity(model, tokenizer, tokens: int, seq_len: int = 128) -> float:
    from evaluation import load_text, perplexity

    return float(perplexity(model, tokenizer, load_text("wikitext2"), seq_len=seq_len,
                            batch_size=max(1, 1024 // seq_len), max_tokens=tokens)["ppl"])


def _distill(model, dense, tokenizer, spec: dict, record: dict, recovery: str):
    from pruning.calibration import calibration_tokens
    from recovery import DistillSettings, distill

    settings = DistillSettings(
        params="lora" if recovery.endswith("distill_lora") else "full",
        tokens=spec["distill_tokens"], seq_len=128, batch_size=4,
        learning_rate=spec["distill_lr"] or DistillSettings.learning_rate,
        temperature=spec["temperature"], lm_weight=spec["lm_weight"], val_windows=16,
        eval_steps=max(1, math.ceil(spec["distill_tokens"] / 512 / 4)), patience=2,
        checkpoint_steps=10**9, seed=spec["seed"])
    train = calibration_tokens(tokenizer, spec["calib"], n_samples=settings.train_windows,
                               seq_len=128, seed=spec["seed"] + 2, region=(0.0, 0.9))
    val = calibration_tokens(tokenizer, spec["calib"], n_samples=16, seq_len=128,
                             seed=spec["seed"] + 3, region=(0.9, 1.0))
    with step(record, "train"):
        result = distill(model, dense, train, val, settings, progress=None)
    record["distill"] = {k: result.stats[k] for k in ("steps", "stopped", "val_kl_before",
                                                       "val_kl_best", "tokens_per_second",
                                                       "learning_rate", "params")}
    return result.model


def _lora(model, tokenizer, spec: dict, record: dict):
    from recovery import LoraSettings, merge, train_lora

    settings = LoraSettings(max_steps=spec["lora_steps"], eval_steps=max(1, spec["lora_steps"] // 3),
                            seq_len=128, batch_size=4, learning_rate=2e-4,
                            max_examples=spec["lora_steps"] * 4 + 40, patience=2)
    with step(record, "train"):
        result = train_lora(model, tokenizer, spec["calib"], settings, progress=None)
        model = merge(result.model)
    record["lora_val_ppl"] = [round(result.stats["val_ppl_before"], 2),
                              round(result.stats["val_ppl_best"], 2)]
    return model


def _prune_mode(recovery: str) -> str:
    """What the prune step of a cell does besides pruning (the rest of ``recovery`` trains)."""
    if "reconstruct" in recovery:
        return "sequential"  # recovery.prune_and_reconstruct
    return recovery if recovery in ("refit", "compensate") else "none"


def _cache_key(spec: dict) -> str:
    """The cells whose pruned model is the same: same pruning inputs, whatever trains after."""
    import hashlib

    fields = ("model", "criterion", "ratio", "layers", "kinds", "ranking", "round_to", "calib",
              "calib_samples", "recon_samples", "recon_damping", "seed")
    text = json.dumps([spec.get(f) for f in fields] + [_prune_mode(spec.get("recovery", ""))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _depgraph_pruned(model, tokenizer, calib, spec: dict, record: dict):
    """The pruned (and, as the recovery says, reconstructed) model of a depgraph cell; with
    ``--pruned-cache`` read back from the cache (``load_pruned``) when an earlier cell of the
    same pruning inputs wrote it there, so cells that differ in training only prune once."""
    cache = spec.get("pruned_cache")
    if not cache:
        return _prune_cell(model, tokenizer, calib, spec, record)
    from filelock import FileLock  # huggingface_hub's dependency

    from pruning import load_pruned, save_pruned

    folder = Path(cache) / _cache_key(spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # a second cell waits for the first one's prune
        if folder.is_dir():
            saved = json.loads((folder / "pruning.json").read_text())["benchmark_cell"]
            record.update(saved, pruned_from_cache=str(folder))
            return load_pruned(folder, dtype="float32").eval()
        model = _prune_cell(model, tokenizer, calib, spec, record)
        keep = {k: record[k] for k in ("prune", "ranking_used", "reconstruction_seconds")
                if k in record}
        save_pruned(model, folder, extra={"benchmark_cell": keep})
    return model


def _sequential(spec: dict):
    """The sequential pass's settings: the library's ("both"), the damping as ``spec`` says."""
    from recovery import SequentialSettings

    if spec.get("recon_damping") is None:
        return "both"
    return SequentialSettings(damping=spec["recon_damping"])


def _prune_cell(model, tokenizer, calib, spec: dict, record: dict):
    from pruning import prune
    from pruning.calibration import calibration_tokens
    from recovery import prune_and_reconstruct

    mode = _prune_mode(spec.get("recovery", "none"))
    recon_tokens = None
    if mode in ("sequential", "refit"):
        recon_tokens = calibration_tokens(tokenizer, spec["calib"],
                                          n_samples=spec["recon_samples"], seq_len=128,
                                          seed=spec["seed"] + 1)
    layers = None if spec["layers"] == "all" else spec["layers"]
    dense = copy.deepcopy(model) if mode == "refit" else None
    with step(record, "prune"):
        options = dict(tokenizer=tokenizer, tokens=calib, layers=layers, seed=spec["seed"],
                       kinds="mlp,attention" if spec.get("kinds", "default") == "default"
                       else spec["kinds"], ranking=spec.get("ranking"),
                       round_to=spec.get("round_to", 1), compensate=mode == "compensate")
        if mode == "sequential":
            result = prune_and_reconstruct(model, spec["ratio"], spec["criterion"],
                                           reconstruct=_sequential(spec), recon_tokens=recon_tokens,
                                           **options)
        else:
            result = prune(model, spec["ratio"], spec["criterion"], **options)
        if mode == "refit":
            from recovery import reconstruct

            reconstruct(result.model, dense, recon_tokens, plan=result.plan)
    record["ranking_used"] = result.stats.get("ranking")
    if "reconstruction" in result.stats:
        record["reconstruction_seconds"] = result.stats["reconstruction"]["seconds"]
    return result.model


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from depgraph_cli.models import load_model, load_tokenizer
    from pruning.calibration import calibration_tokens

    record: dict = dict(spec)
    tokenizer = load_tokenizer(spec["model"])
    model = load_model(spec["model"], dtype=torch.float32).eval()
    total = sum(p.numel() for p in model.parameters())
    teacher = copy.deepcopy(model) if "distill" in spec.get("recovery", "") else None
    calib = calibration_tokens(tokenizer, spec["calib"], n_samples=spec["calib_samples"],
                               seq_len=128, seed=spec["seed"])
    recovery = spec.get("recovery", "none")
    if spec["tool"] == "torch-pruning":
        from tp_baseline import torch_pruning_taylor

        blocks = _blocks(spec["layers"], model.config.num_hidden_layers)
        with step(record, "prune"):
            model, info = torch_pruning_taylor(model, calib, spec["ratio"], blocks,
                                               mlp_only=spec.get("kinds") == "mlp")
        record.update(info)
    elif spec["tool"] == "depgraph":
        model = _depgraph_pruned(model, tokenizer, calib, spec, record)
    if recovery.endswith("+lora") or recovery == "lora":
        model = _lora(model, tokenizer, spec, record)
    elif "distill" in recovery:
        model = _distill(model, teacher, tokenizer, spec, record, recovery)
        del teacher
    record["ratio_removed"] = 1 - sum(p.numel() for p in model.parameters()) / total
    with step(record, "eval"):
        record["ppl"] = _perplexity(model, tokenizer, spec["ppl_tokens"])
        for seq_len in spec.get("ppl_seq_lens", ()):
            if seq_len != 128:
                record[f"ppl@{seq_len}"] = _perplexity(model, tokenizer, spec["ppl_tokens"], seq_len)
    return record


# ------------------------------------------------------------------------------ driver
def _cells(args) -> list[dict]:
    base = {"model": args.model, "calib": args.calib, "calib_samples": args.calib_samples,
            "recon_samples": args.recon_samples, "recon_damping": args.recon_damping,
            "lora_steps": args.lora_steps,
            "ppl_tokens": args.ppl_tokens, "threads": args.threads, "seed": args.seed,
            "distill_tokens": args.distill_tokens, "distill_lr": args.distill_lr,
            "temperature": args.temperature, "lm_weight": args.lm_weight,
            "ppl_seq_lens": args.ppl_seq_lens,
            "kinds": args.kinds, "round_to": args.round_to,
            "pruned_cache": str(args.pruned_cache) if args.pruned_cache else None}
    cells = [{**base, "tool": "dense", "criterion": "-", "ratio": 0.0, "layers": "-"}]
    for ratio in args.ratios:
        for layers in args.layers:
            for criterion in args.criteria:
                for ranking in args.ranking:
                    for recovery in args.recovery:
                        cells.append({**base, "tool": "depgraph", "criterion": criterion,
                                      "ranking": ranking, "ratio": ratio, "layers": layers,
                                      "recovery": recovery})
            for wanted, kinds in ((args.tp, "default"), (args.tp_mlp, "mlp")):
                if wanted:
                    cells.append({**base, "tool": "torch-pruning", "kinds": kinds,
                                  "criterion": "taylor (LLM-Pruner)", "ratio": ratio,
                                  "layers": layers, "recovery": "none"})
    return cells


def _seconds(cell: dict, name: str) -> str:
    value = cell.get(name, {}).get("seconds")
    return "" if value is None else f"{value:.0f}"


def _peak(cell: dict, name: str) -> str:
    value = cell.get(name, {}).get("peak_mb")
    return "" if value is None else f"{value / 1024:.2f}"


def _kinds(cell: dict) -> str:
    if cell["tool"] == "dense":
        return "-"
    return "mlp" if cell.get("kinds") == "mlp" else "heads+mlp" + (
        "+hidden" if cell["tool"] == "torch-pruning" else "")


def _ranking(cell: dict) -> str:
    """The ranking asked for; ``default`` (the criterion's own) when none was."""
    if cell["tool"] != "depgraph":
        return "-"
    return cell.get("ranking") or "default"


def table(cells: list[dict]) -> str:
    header = ["tool", "criterion", "ratio", "blocks", "kinds", "ranking", "recovery", "removed",
              "ppl", "prune s", "prune GiB", "train s", "train GiB"]
    longer = sorted({k for c in cells for k in c if k.startswith("ppl@")}, key=lambda k: int(k[4:]))
    header[header.index("ppl") + 1:header.index("ppl") + 1] = longer
    rows = []
    for cell in cells:
        if "error" in cell:
            rows.append([cell["tool"], cell["criterion"], cell["ratio"], cell["layers"],
                         _kinds(cell), _ranking(cell), cell.get("recovery", ""), "",
                         f"error: {cell['error'][:120]}", *[""] * len(longer), "", "", "", ""])
            continue
        rows.append([cell["tool"], cell["criterion"], cell["ratio"], cell["layers"],
                     _kinds(cell), _ranking(cell), cell.get("recovery", "-"),
                     f"{cell['ratio_removed']:.1%}",
                     f"{cell['ppl']:.2f}", *[f"{cell[k]:.2f}" if k in cell else "" for k in longer],
                     _seconds(cell, "prune"), _peak(cell, "prune"),
                     _seconds(cell, "train"), _peak(cell, "train")])
    return markdown_table(header, rows)


def _list(kind):
    return lambda text: [kind(item) for item in text.split(",") if item]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="default")
    parser.add_argument("--criteria", default="second_moment",
                        help="comma-separated criteria, or 'all'")
    parser.add_argument("--ratios", type=_list(float), default=[0.2])
    parser.add_argument("--layers", type=_list(str), default=["all"])
    parser.add_argument("--recovery", type=_list(str), default=["none"])
    parser.add_argument("--kinds", default="default",
                        help="group kinds depgraph may shrink, comma-separated (default: "
                             "MLP channels and (KV) heads)")
    parser.add_argument("--ranking", type=_list(str), default=[None],
                        help="how depgraph compares units across groups, comma-separated "
                             f"for a cell each: {', '.join(RANKINGS)} (default: the "
                             "criterion's own ranking, else global)")
    parser.add_argument("--tp", action="store_true",
                        help="add torch-pruning configured as its prune_llm.py")
    parser.add_argument("--tp-mlp", action="store_true",
                        help="add torch-pruning on the MLP channels only (LLM-Pruner block-wise)")
    parser.add_argument("--calib", default="bundled")
    parser.add_argument("--calib-samples", type=int, default=10)
    parser.add_argument("--recon-samples", type=int, default=32)
    parser.add_argument("--recon-damping", type=float, default=None,
                        help="damping of the sequential reconstruction (default: the library's)")
    parser.add_argument("--lora-steps", type=int, default=60)
    parser.add_argument("--distill-tokens", type=int, default=30_720,
                        help="training tokens of distillation (default 30720, as 60 LoRA steps)")
    parser.add_argument("--distill-lr", type=float, default=None,
                        help="distillation learning rate (default 2e-4, full or LoRA)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lm-weight", type=float, default=0.0)
    parser.add_argument("--ppl-seq-lens", type=_list(int), default=[128],
                        help="perplexity window lengths (128 always; e.g. 128,2048)")
    parser.add_argument("--round-to", type=int, default=1,
                        help="kept widths are multiples of this (default 1)")
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells run at once (use --threads 1 --jobs 2 on 2 cores: more "
                             "cells per hour, but each cell's seconds are then measured "
                             "under contention)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pruned-cache", type=Path, default=None,
                        help="folder keeping each pruned (and reconstructed) model, so that "
                             "cells differing only in training prune once (saved and "
                             "reloaded with save_pruned / load_pruned)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker)), default=str))
        return 0
    args.criteria = list(ALL_CRITERIA) if args.criteria == "all" else args.criteria.split(",")
    bad = [r for r in args.recovery if r not in RECOVERY]
    if bad:
        parser.error(f"--recovery {bad[0]!r}: expected some of {', '.join(RECOVERY)}")
    bad = [r for r in args.ranking if r not in (None, *RANKINGS)]
    if bad or not args.ranking:
        parser.error(f"--ranking {(bad or [''])[0]!r}: expected some of {', '.join(RANKINGS)}")
    if args.jobs < 1:
        parser.error(f"--jobs must be a positive integer, got {args.jobs}")
    start = time.perf_counter()

    def run(spec: dict) -> dict:
        label = f"{spec['tool']} {spec['criterion']} {spec['ratio']} {spec['layers']} " \
                f"{spec.get('ranking') or ''} {spec.get('recovery', '')}"
        print(f"[{time.perf_counter() - start:7.0f} s] {label}", file=sys.stderr, flush=True)
        cell = run_worker(__file__, spec, args.timeout)
        if "error" in cell:
            print(f"    {label}: {cell['error']}", file=sys.stderr, flush=True)
        return cell

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each cell is its own process
        cells = list(pool.map(run, _cells(args)))
    print(table(cells))
    lengths = " and ".join(str(n) for n in sorted({128, *args.ppl_seq_lens}))
    print(f"\n{len(cells)} cells in {time.perf_counter() - start:.0f} s; evaluation text: "
          f"WikiText-2 raw test, first {args.ppl_tokens} tokens, windows of {lengths} (BOS "
          f"first where the tokenizer adds one); calibration and training text: {args.calib} "
          f"(never the evaluation text), {args.calib_samples} x 128 for scores (seed "
          f"{args.seed}); {args.threads} thread(s) per cell, {args.jobs} cell(s) at a time.")
    if args.json:
        args.json.write_text(json.dumps(cells, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
