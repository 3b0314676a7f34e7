"""How long ``build_graph`` takes, and how much memory it needs, on a very large model.

The model is a Llama-3-70B-shaped config (hidden 8192, 80 layers, 64 query heads / 8 KV
heads, intermediate 28672, vocab 128256) built on the ``meta`` device, so no weight is ever
allocated: what is measured is the tracer, the rules and the group search alone.

The measurement runs in a fresh subprocess (``--worker``), so the peak RSS it reports
(``VmHWM`` of ``/proc/self/status``, falling back to ``ru_maxrss``) is that of one Python
process that imported torch + transformers, built the meta model and the graph, nothing else.

    python benchmarks/graph_scale.py                       # the 70B shape, targets 60 s / 3 GB
    python benchmarks/graph_scale.py --layers 8            # a smaller slice of it
    python benchmarks/graph_scale.py --profile cprofile    # + the 25 hottest functions
    python benchmarks/graph_scale.py --json out.json

Prints a markdown table; exits 0 whether or not the targets are met (it is a benchmark, not
a test), 1 when the worker crashed or timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from measure import peak_mb as peak_rss_mb  # noqa: E402
from measure import rss_mb  # noqa: E402

LLAMA3_70B = dict(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672,
                  vocab=128256)


# ----------------------------------------------------------------------------- worker
def _config(args):
    from transformers import AutoConfig

    head_dim = args.head_dim or args.hidden // args.heads
    return AutoConfig.for_model(
        "llama", hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=head_dim,
        intermediate_size=args.intermediate, vocab_size=args.vocab,
        max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)


def _timed(owner, name: str, phases: dict, label: str) -> None:
    """Wrap ``owner.name`` so its wall time adds to ``phases[label]`` (benchmark only)."""
    original = getattr(owner, name)

    def wrapper(*a, **k):
        start = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            phases[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    import depgraph.graph as dg_graph

    result: dict = {"threads": torch.get_num_threads(), "rss_after_import_mb": rss_mb()}

    cfg = _config(args)
    start = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    result["model_s"] = time.perf_counter() - start
    result["params"] = sum(p.numel() for p in model.parameters())
    result["rss_after_model_mb"] = rss_mb()

    # phase timings: wrap the three stages build_graph calls (nothing in the library changes)
    phases: dict[str, float] = defaultdict(float)
    _timed(dg_graph, "trace_model", phases, "trace (torch.export)")
    _timed(dg_graph.Propagator, "run", phases, "propagate (rules)")
    _timed(dg_graph.DependencyGraph, "_find_groups", phases, "find groups")
    _timed(dg_graph.DependencyGraph, "_annotate", phases, "annotate nx nodes")

    profiler = None
    if args.profile == "cprofile":
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    graph = dg_graph.build_graph(model)
    result["build_s"] = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
    result["phases_s"] = dict(phases)
    result["peak_rss_mb"] = peak_rss_mb()
    result["rss_after_build_mb"] = rss_mb()
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    groups = graph.groups()
    by_kind = Counter(g.kind for g in groups)
    units = defaultdict(Counter)
    for g in groups:
        units[g.kind][g.num_units] += 1
    result["groups"] = len(groups)
    result["groups_by_kind"] = dict(by_kind)
    result["units_by_kind"] = {k: {str(n): c for n, c in v.items()} for k, v in units.items()}
    result["nx_nodes"] = graph.nx.number_of_nodes()
    result["nx_edges"] = graph.nx.number_of_edges()
    result["fx_nodes"] = len(graph.trace.program.graph_module.graph.nodes)

    if profiler is not None:
        import io
        import pstats

        for key in ("cumulative", "tottime"):
            buf = io.StringIO()
            pstats.Stats(profiler, stream=buf).sort_stats(key).print_stats(25)
            result[f"profile_{key}"] = buf.getvalue()
    return result


# ----------------------------------------------------------------------------- parent
def expected_groups(args) -> dict[str, tuple[int, int]]:
    """kind -> (count, units) that a Llama config of these dims must give."""
    out = {"hidden": (1, args.hidden),
           "mlp": (args.layers, args.intermediate)}
    if args.kv_heads < args.heads:
        out["kv_group"] = (args.layers, args.kv_heads)
    else:
        out["attention_head"] = (args.layers, args.heads)
    return out


def check_groups(args, res: dict) -> tuple[bool, list[str]]:
    notes, ok = [], True
    for kind, (count, units) in expected_groups(args).items():
        got = res["groups_by_kind"].get(kind, 0)
        got_units = res["units_by_kind"].get(kind, {})
        good = got == count and got_units == {str(units): count}
        ok &= good
        notes.append(f"{kind}: {got} (expected {count} with {units} units; got units "
                     f"{got_units}) {'ok' if good else 'MISMATCH'}")
    extra = set(res["groups_by_kind"]) - set(expected_groups(args))
    if extra:
        ok = False
        notes.append(f"unexpected kinds: {sorted(extra)}")
    return ok, notes


def run_worker(args) -> tuple[dict | None, str]:
    """Run the measurement in a fresh interpreter; returns (result, error)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"] + _forward(args)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    if args.profile == "py-spy":
        svg = Path(args.pyspy_out).resolve()
        cmd = ["py-spy", "record", "--nonblocking", "-r", "50", "-f", "speedscope"
               if svg.suffix == ".json" else "flamegraph", "-o", str(svg), "--"] + cmd
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {args.timeout} s"
    wall = time.perf_counter() - start
    marker = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not marker:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return None, f"worker exit {proc.returncode}:\n{tail}"
    res = json.loads(marker[-1][len("RESULT "):])
    res["subprocess_wall_s"] = wall
    return res, ""


def _forward(args) -> list[str]:
    out = []
    for key in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab",
                "threads"):
        value = getattr(args, key)
        if value is not None:
            out += [f"--{key.replace('_', '-')}", str(value)]
    if args.profile == "cprofile":
        out += ["--profile", "cprofile"]
    return out


def report(args, res: dict | None, error: str) -> dict:
    shape = (f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads / "
             f"{args.kv_heads} KV heads, intermediate {args.intermediate}, vocab {args.vocab}")
    print(f"## build_graph at scale: Llama-shaped, {shape} (meta device)\n")
    summary = {"config": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads",
                                                        "head_dim", "intermediate", "vocab",
                                                        "threads")},
               "targets": {"time_s": args.time_target, "peak_rss_gb": args.rss_target_gb}}
    if res is None:
        print(f"**FAILED**: {error}")
        summary.update(status="error", error=error)
        return summary
    time_ok = res["build_s"] <= args.time_target
    rss_ok = res["peak_rss_mb"] / 1024 <= args.rss_target_gb
    groups_ok, notes = check_groups(args, res)
    print("| metric | value | target | result |")
    print("|---|---:|---:|---|")
    print(f"| build_graph wall time | {res['build_s']:.1f} s | {args.time_target:g} s | "
          f"{'PASS' if time_ok else 'FAIL'} |")
    print(f"| peak RSS of the process | {res['peak_rss_mb'] / 1024:.2f} GiB | "
          f"{args.rss_target_gb:g} GiB | {'PASS' if rss_ok else 'FAIL'} |")
    print(f"| groups by kind | {res['groups_by_kind']} | see below | "
          f"{'PASS' if groups_ok else 'FAIL'} |")
    print()
    print("| detail | value |")
    print("|---|---:|")
    print(f"| parameters (meta, never allocated) | {res['params'] / 1e9:.2f} B |")
    print(f"| meta model construction | {res['model_s']:.1f} s |")
    for phase, secs in res["phases_s"].items():
        print(f"| phase: {phase} | {secs:.1f} s |")
    print(f"| RSS after importing torch/transformers/depgraph | {res['rss_after_import_mb']:.0f} MiB |")
    print(f"| RSS after building the meta model | {res['rss_after_model_mb']:.0f} MiB |")
    print(f"| RSS after build_graph (graph alive) | {res['rss_after_build_mb']:.0f} MiB |")
    print(f"| peak RSS (VmHWM) / ru_maxrss | {res['peak_rss_mb']:.0f} / "
          f"{res['ru_maxrss_mb']:.0f} MiB |")
    print(f"| FX graph nodes | {res['fx_nodes']} |")
    print(f"| networkx nodes / edges | {res['nx_nodes']} / {res['nx_edges']} |")
    print(f"| groups | {res['groups']} |")
    print(f"| torch threads | {res['threads']} |")
    print(f"| subprocess wall (incl. imports) | {res['subprocess_wall_s']:.1f} s |")
    print()
    for note in notes:
        print(f"- {note}")
    for key in ("profile_cumulative", "profile_tottime"):
        if key in res:
            print(f"\n### cProfile, sorted by {key.split('_')[1]}\n\n```\n{res[key].strip()}\n```")
    summary.update(status="ok", result=res, time_ok=time_ok, rss_ok=rss_ok, groups_ok=groups_ok,
                   group_notes=notes)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key, value in LLAMA3_70B.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--head-dim", type=int, default=None, help="default: hidden / heads")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--time-target", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--rss-target-gb", type=float, default=3.0, help="GiB (default 3)")
    parser.add_argument("--timeout", type=int, default=1800, help="worker timeout, seconds")
    parser.add_argument("--profile", choices=["none", "cprofile", "py-spy"], default="none")
    parser.add_argument("--pyspy-out", default="graph_scale.svg",
                        help="py-spy output (.svg flamegraph, or .json speedscope)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    res, error = run_worker(args)
    summary = report(args, res, error)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if res is not None else 1


if __name__ == "__main__":
    sys.exit(main())
