"""Coverage sweep: the whole prune / run / save / reload cycle on every causal-LM type.

For every model type in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, a tiny random
config from one generic shrinking function (:mod:`evaluation.tiny_config`), then
:func:`evaluation.cycle.cycle_row`: zero-equivalence oracle, random plans over every group
kind, both save paths, plain ``from_pretrained`` for uniform plans. One row per type:
``pass`` / ``refused`` (the tool's one-line reason) / ``unconstructible`` / ``FAIL``.

Each type runs in its own interpreter (a crash or a hang costs one row, not the sweep)::

    python benchmarks/coverage.py --jobs 2 --json out/coverage.json > coverage.md
    python benchmarks/coverage.py --types llama,gpt2,mixtral      # a few types
    python benchmarks/coverage.py --json out/coverage.json --resume  # go on after a stop

``--path reconstruct`` checks the default path of ``depgraph prune --reconstruct`` instead
(:func:`evaluation.reconstruct_cycle.reconstruct_row`: allocation, sequential reconstruction,
``save_pretrained``, ``load_pruned``, ``generate``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the encoder-decoder, recurrent and non-text families: the tool must refuse them in one line
# or pass; "decoder-only attention families" are all other types (see `attention_family`)


def all_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def attention_family(model_type: str) -> bool:
    """Decoder-only with attention: not an encoder(-decoder) config, not attention-free."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(model_type)
    except Exception:  # noqa: BLE001 - transformers' own default config is invalid
        return False
    text = getattr(config, "text_config", None) or config
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        return False
    keys = set(text.to_dict())
    heads = any("head" in k and ("num" in k or k.startswith("n_")) for k in keys)
    return heads and "bert" not in model_type and not model_type.startswith(("xlm", "roberta"))


def default_config_error(model_type: str) -> str:
    """Why transformers' own full-size default config of ``model_type`` does not build or run
    a forward (on the meta device: no memory, shapes only), or "" when it does. An
    unconstructible row whose error the default reproduces is transformers' case, not the
    shrinking function's."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(model_type)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
            model(torch.zeros(1, 8, dtype=torch.long))
    except Exception as error:  # noqa: BLE001 - the reason is the result
        text = str(error).strip().splitlines()
        return f"{type(error).__name__}: {text[0][:200] if text else ''}"
    return ""


def _reproduced(row: dict) -> bool:
    """The full-size default config fails with this row's own error."""
    default = row.get("default") or ""
    return bool(default) and default[:60] in row.get("reason", "")


#: ``--path``: the function that checks one model type, by module.
PATHS = {"cycle": ("evaluation.cycle", "cycle_row"),
         "reconstruct": ("evaluation.reconstruct_cycle", "reconstruct_row")}


def _run_one(model_type: str, seed: int, timeout: float, threads: int,
             path: str = "cycle") -> dict:
    module, function = PATHS[path]
    code = ("import json,sys,logging,warnings;warnings.filterwarnings('ignore');"
            f"logging.disable(logging.WARNING);import torch;torch.set_num_threads({threads});"
            f"from {module} import {function};"
            f"r={function}({model_type!r}, seed={seed});print('ROW'+json.dumps(r.__dict__))")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=timeout,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"model_type": model_type, "status": "FAIL", "reason": f"timed out after {timeout:.0f} s",
                "groups": "", "seconds": timeout}
    rows = [line[3:] for line in done.stdout.splitlines() if line.startswith("ROW")]
    if rows:
        row = json.loads(rows[-1])
    else:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        row = {"model_type": model_type, "status": "FAIL", "groups": "",
               "reason": f"interpreter died (exit {done.returncode}): {tail[:300]}"}
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict]) -> str:
    lines = ["| model type | attention family | result | groups / reason | s |", "|---|---|---|---|---|"]
    for row in rows:
        detail = row.get("groups") if row["status"] == "pass" else row.get("reason", "")
        if row["status"] == "unconstructible" and _reproduced(row):
            detail += " (transformers' full-size default config fails the same way)"
        lines.append(f"| {row['model_type']} | {'yes' if row['attention'] else 'no'} | "
                     f"{row['status']} | {_cell(detail)} | {row['seconds']} |")
    counts = Counter(r["status"] for r in rows)
    attention = [r for r in rows if r["attention"]]
    passed = sum(r["status"] == "pass" for r in attention)
    built = [r for r in attention if r["status"] != "unconstructible"]
    own = [r["model_type"] for r in attention if r["status"] == "unconstructible" and _reproduced(r)]
    lines += ["", "Counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
              + f" (of {len(rows)} types).",
              f"Of the unconstructible attention families, {len(own)} fail the same way in "
              f"transformers' own full-size default config ({', '.join(own) or 'none'}).",
              f"Decoder-only attention families: {passed} of {len(attention)} pass "
              f"({100 * passed / max(1, len(attention)):.1f}%); of the {len(built)} whose tiny "
              f"model transformers builds and runs, {100 * passed / max(1, len(built)):.1f}%."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", help="comma-separated model types (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--path", choices=sorted(PATHS), default="cycle",
                        help="what each type goes through: random plans over every group kind "
                             "(cycle) or the default of prune --reconstruct (reconstruct)")
    parser.add_argument("--json", type=Path, help="the rows, rewritten after each one")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --json and run only the other types")
    args = parser.parse_args(argv)
    types = args.types.split(",") if args.types else all_types()
    kept = json.loads(args.json.read_text()) if args.resume and args.json and args.json.exists() else []
    done = {row["model_type"]: row for row in kept if row["model_type"] in types}
    todo = [t for t in types if t not in done]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {t: pool.submit(_run_one, t, args.seed, args.timeout, args.threads, args.path) for t in todo}
        for model_type in todo:
            row = futures[model_type].result()
            row["attention"] = attention_family(model_type)
            print(f"{model_type}: {row['status']} {row.get('reason') or row.get('groups')} "
                  f"({row['seconds']} s)", file=sys.stderr, flush=True)
            done[model_type] = row
            if args.json:  # an interrupted sweep keeps what it finished (--resume goes on)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps([done[t] for t in types if t in done], indent=1))
    for row in done.values():  # cheap (meta device): said of every unconstructible row
        if row["status"] == "unconstructible" and "default" not in row:
            row["default"] = default_config_error(row["model_type"])
    if args.json:
        args.json.write_text(json.dumps([done[t] for t in types if t in done], indent=1))
    print(markdown([done[t] for t in types]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
