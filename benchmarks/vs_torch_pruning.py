"""depgraph next to torch-pruning (``pip install torch-pruning``, the ``bench`` extra).

Part A -- cost of building the graph of a ~1B Llama-shaped model (hidden 2048, 16 layers,
32 heads / 8 KV heads, intermediate 8192, vocab 32000; float32 weights on the CPU, ~4.4 GB,
because torch-pruning traces with real tensors). Each tool runs in its own fresh
subprocess, so peak RSS figures are its own:

* ``depgraph``: ``build_graph(model)`` on the real-weight model;
* ``depgraph-meta``: the same on a model built on the ``meta`` device (no weights at all);
* ``tp`` and ``tp-cache``: ``tp.DependencyGraph().build_dependency(model, example_inputs=...,
  output_transform=lambda out: out.logits)``; then the first attention group a pruner asks
  for (``DG.get_pruning_group`` on layer 0's ``q_proj``, the query channels of KV group 0);
  then ``tp.pruner.BasePruner`` set up the way torch-pruning's ``examples/LLMs/prune_llm.py``
  does it (``num_heads`` for q/k/v, ``ignored_layers=[lm_head]``, ``prune_num_heads=True``,
  ``prune_head_dims=False``, ``round_to=4``, ``GroupMagnitudeImportance(p=2)``), whose
  constructor builds its own graph and walks every group once. ``tp-cache`` passes the token
  ids alone, exactly like ``prune_llm.py`` (so the model runs with its KV cache on); ``tp``
  passes ``{"input_ids": ids, "use_cache": False}``.

Each step reports its wall time and the peak RSS during it (``VmHWM`` reset through
``/proc/self/clear_refs`` right before it). A step that runs past its limit (``--timeout``
for builds, ``--hang-timeout`` for the group query and the pruner) is reported as a timeout.

Part B -- does each tool group correctly? For each of the 14 tiny architectures of
``tests/archs.py`` and each tool, two units of layer 0 are pruned physically: one MLP
channel (four for Mixtral, whose grouped-mm expert kernels want 16-byte aligned widths) and
one attention unit (a KV group -- one KV head and its query heads -- for grouped-query
models, else one head). Oracle: the pruned model must run, and its logits must equal those
of the original model with exactly the removed parameter slices zeroed (float64, atol 1e-8;
float32 and atol 2e-5 for Mixtral, as in tests/archs.py). What was removed is read off the
parameters themselves (each kept slice is matched, in order, to its original index), so the
oracle is the same for every tool and trusts no tool's bookkeeping.

* ``depgraph``: the ``mlp`` / ``attention_head`` / ``kv_group`` group of layer 0 from
  ``build_graph(model).groups()``, removed with ``pruning.apply_plan``.
* ``torch-pruning``: ``DG.get_pruning_group(layer, tp.prune_linear_out_channels, idxs)`` with
  ``idxs`` the unit's output channels in the first MLP projection (``up_proj``, ``fc1``,
  ``c_fc``, ``dense_h_to_4h``; both halves of a fused ``gate_up_proj``, as
  ``out_channel_groups=2`` makes the pruner do) or in the query-carrying projection
  (``q_proj``, ``qkv_proj``, ``c_attn``, ``query_key_value``: the query channels of head 0,
  or of KV group 0's query heads), then ``group.prune()``; then the head counts a
  torch-pruning user must fix by hand (``num_heads``, ``num_key_value_heads``,
  ``num_key_value_groups``, ``split_size``; ``prune_llm.py`` does the same) are set from
  what was removed. The graph is traced with ``use_cache=False``.
* ``torch-pruning+cache``: the same, traced with the token ids alone (cache on), as
  ``prune_llm.py`` does.

Outcomes: ``correct``; ``mismatch`` (runs, logits differ); ``crash`` (an exception at any
step: build, group, prune, attribute fix-up, forward); ``timeout`` (with the step it was
in); ``refused`` (the tool offers no such group and says why -- depgraph for Bloom heads,
whose ALiBi slopes depend on the head count, so no head can be removed exactly).

    python benchmarks/vs_torch_pruning.py                   # both parts, ~12 min on 2 cores
    python benchmarks/vs_torch_pruning.py --part archs      # part B only
    python benchmarks/vs_torch_pruning.py --part scale --json scale.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests", ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from measure import peak_mb, reset_peak, rss_mb  # noqa: E402

SCALE_CONFIG = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192,
                    vocab=32000)
SCALE_TOOLS = ["depgraph", "depgraph-meta", "tp", "tp-cache"]
SCALE_LABELS = {"depgraph": "depgraph, real weights",
                "depgraph-meta": "depgraph, meta model (no weights)",
                "tp": "torch-pruning, `use_cache=False`",
                "tp-cache": "torch-pruning, `example_inputs=input_ids` (as prune_llm.py)"}


class StepTimeout(Exception):
    pass


# ============================================================================ part A
def _scale_config(args):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "llama", hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, intermediate_size=args.intermediate,
        vocab_size=args.vocab, max_position_embeddings=4096, tie_word_embeddings=False)


def _alarm(seconds: float):
    def handler(signum, frame):
        raise StepTimeout(f"still running after {seconds:.0f} s")

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))


def _measure(res: dict, name: str, limit: float, fn) -> object:
    """Run ``fn()`` as step ``name``: wall time, peak RSS during it, outcome."""
    step = {"step": name, "limit_s": limit}
    res["steps"].append(step)
    step["rss_before_mb"] = rss_mb()
    step["peak_reset"] = reset_peak()
    start = time.perf_counter()
    value = None
    try:
        _alarm(limit)
        value = fn()
        step["outcome"] = "ok"
    except StepTimeout as error:
        step["outcome"] = "timeout"
        step["error"] = str(error)
    except Exception as error:  # noqa: BLE001 - reported
        step["outcome"] = "crash"
        step["error"] = f"{type(error).__name__}: {_first_line(error)}"
        step["traceback"] = traceback.format_exc()[-3000:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    step["seconds"] = time.perf_counter() - start
    step["peak_during_mb"] = peak_mb() if step["peak_reset"] else None
    return value


def scale_worker(args) -> dict:
    """One row group of part A, in a fresh interpreter; returns a dict (printed as JSON)."""
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    tool = args.scale_worker
    res: dict = {"tool": tool, "threads": torch.get_num_threads(), "steps": []}
    if tool.startswith("tp"):
        import torch_pruning as tp
    else:
        from depgraph import build_graph
    res["rss_after_import_mb"] = rss_mb()
    cfg = _scale_config(args)
    start = time.perf_counter()
    if tool == "depgraph-meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg)  # float32 on the CPU, random init
    model.eval()
    res["model_s"] = time.perf_counter() - start
    res["params"] = sum(p.numel() for p in model.parameters())
    res["rss_model_mb"] = rss_mb()
    ids = torch.randint(0, args.vocab, (1, args.seq_len),
                        generator=torch.Generator().manual_seed(0))

    if tool.startswith("depgraph"):
        graph = _measure(res, "build_graph(model)", args.timeout, lambda: build_graph(model))
        if graph is not None:
            kinds: dict[str, int] = {}
            for group in graph.groups():
                kinds[group.kind] = kinds.get(group.kind, 0) + 1
            res["groups_by_kind"] = kinds
        return res

    # torch-pruning: prune_llm.py passes the token ids alone (so the KV cache is on)
    inputs = ids if tool == "tp-cache" else {"input_ids": ids, "use_cache": False}
    dg = _measure(res, "DependencyGraph().build_dependency", args.timeout,
                  lambda: tp.DependencyGraph().build_dependency(
                      model, example_inputs=inputs, output_transform=lambda out: out.logits,
                      verbose=False))
    if dg is not None:
        q_proj = model.model.layers[0].self_attn.q_proj
        idxs = list(range((args.heads // args.kv_heads) * (args.hidden // args.heads)))
        group = _measure(res, "get_pruning_group(layer 0 q_proj, KV group 0)",
                         args.hang_timeout,
                         lambda: dg.get_pruning_group(q_proj, tp.prune_linear_out_channels,
                                                      idxs))
        if group is not None:
            res["attn_group_items"] = len(group.items)
    dg = group = None  # the pruner builds its own graph
    gc.collect()
    num_heads = {}
    for name, module in model.named_modules():  # as in examples/LLMs/prune_llm.py
        if name.endswith("self_attn"):
            num_heads[module.q_proj] = cfg.num_attention_heads
            num_heads[module.k_proj] = cfg.num_key_value_heads
            num_heads[module.v_proj] = cfg.num_key_value_heads
    _measure(res, "BasePruner(...) as in prune_llm.py", args.hang_timeout,
             lambda: tp.pruner.BasePruner(
                 model, example_inputs=inputs,
                 importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
                 global_pruning=False, output_transform=lambda out: out.logits,
                 pruning_ratio=0.2, ignored_layers=[model.lm_head], num_heads=num_heads,
                 prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.2,
                 round_to=4))
    return res


def run_scale(args) -> list[dict]:
    rows = []
    for tool in args.scale_tools:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--scale-worker", tool,
               "--threads", str(args.threads), "--timeout", str(args.timeout),
               "--hang-timeout", str(args.hang_timeout), "--seq-len", str(args.seq_len)]
        for key in SCALE_CONFIG:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
        print(f"[part A] {tool} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        limit = args.timeout + 2 * args.hang_timeout + 300  # + imports and weight init
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                                  timeout=limit)
        except subprocess.TimeoutExpired:
            rows.append({"tool": tool, "error": f"subprocess killed after {limit} s",
                         "steps": []})
            continue
        marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not marker:
            tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
            rows.append({"tool": tool, "error": f"worker exit {proc.returncode}: {tail}",
                         "steps": []})
            continue
        row = json.loads(marker[-1][len("RESULT "):])
        row["subprocess_wall_s"] = time.perf_counter() - start
        rows.append(row)
    return rows


def print_scale(args, rows: list[dict]) -> None:
    print(f"## Part A: building the graph of a Llama-shaped model (hidden {args.hidden}, "
          f"{args.layers} layers, {args.heads}/{args.kv_heads} heads, intermediate "
          f"{args.intermediate}, vocab {args.vocab}, float32), {args.threads} torch "
          f"thread(s), one subprocess per tool\n")
    print("| tool | step | result | wall time | peak RSS during the step | "
          "RSS of the process before it |")
    print("|---|---|---|---:|---:|---:|")
    for row in rows:
        label = SCALE_LABELS.get(row["tool"], row["tool"])
        if row.get("error"):
            print(f"| {label} | — | CRASH: {row['error'][:200]} | — | — | — |")
        for step in row["steps"]:
            outcome = step["outcome"]
            result = {"ok": "ok", "timeout": f"TIMEOUT ({step.get('error')})"}.get(
                outcome, f"CRASH: {step.get('error', '')[:160]}")
            wall = f"{step['seconds']:.1f} s" if outcome == "ok" else f"> {step['seconds']:.0f} s" \
                if outcome == "timeout" else f"{step['seconds']:.1f} s"
            during = f"{step['peak_during_mb'] / 1024:.2f} GiB" if step.get("peak_during_mb") \
                else "—"
            before = f"{step['rss_before_mb'] / 1024:.2f} GiB"
            print(f"| {label} | `{step['step']}` | {result} | {wall} | {during} | {before} |")
    print()
    for row in rows:
        if "model_s" in row:
            print(f"- {SCALE_LABELS.get(row['tool'], row['tool'])}: model of "
                  f"{row['params'] / 1e9:.2f} B parameters built in {row['model_s']:.1f} s, "
                  f"RSS {row['rss_model_mb'] / 1024:.2f} GiB after it; "
                  f"subprocess wall {row.get('subprocess_wall_s', 0):.0f} s")
        if row.get("groups_by_kind"):
            print(f"- {SCALE_LABELS.get(row['tool'], row['tool'])}: groups "
                  f"{row['groups_by_kind']}, ready when build_graph returns")
        if row.get("attn_group_items"):
            print(f"- {SCALE_LABELS.get(row['tool'], row['tool'])}: the attention group has "
                  f"{row['attn_group_items']} items")
    print("- 'peak RSS during the step' is VmHWM after resetting it (/proc/self/clear_refs) "
          "right before the step, so it includes the process's RSS before it (the model).")
    print()


# ============================================================================ part B
_ATTN = re.compile(r"(^|\.)0\.(self_attn|attn|attention|self_attention)$")
_Q_NAMES = ("q_proj", "qkv_proj", "c_attn", "query_key_value")
_MLP_NAMES = ("mlp.up_proj", "mlp.fc1", "mlp.c_fc", "mlp.dense_h_to_4h", "fc1",
              "mlp.gate_up_proj")


def _head_counts(cfg) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim) of a tiny config of any family."""
    heads = next(getattr(cfg, k) for k in ("num_attention_heads", "n_head") if hasattr(cfg, k))
    kv = heads
    for key in ("num_key_value_heads", "num_kv_heads"):
        if getattr(cfg, key, None):
            kv = getattr(cfg, key)
            break
    hidden = next(getattr(cfg, k) for k in ("hidden_size", "n_embd") if hasattr(cfg, k))
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return heads, kv, head_dim


def _layer0_attention(model):
    return next((name, m) for name, m in model.named_modules() if _ATTN.search(name))


def _mlp_units(arch: str) -> int:
    return 4 if arch == "mixtral" else 1


def removed_slices(original, pruned) -> dict[tuple[str, int], list[int]]:
    """What was physically removed: ``(param, dim) -> original indices``, read off the
    parameters (each kept slice matched, in order, to its original index)."""
    import torch

    after = dict(pruned.named_parameters())
    out: dict[tuple[str, int], list[int]] = {}
    for name, old in original.named_parameters():
        if name not in after:
            raise RuntimeError(f"parameter {name} disappeared")
        new = after[name].detach()
        old = old.detach()
        if new.shape == old.shape:
            if not torch.equal(new, old):
                raise RuntimeError(f"parameter {name} kept its shape but changed values")
            continue
        dims = [d for d in range(old.dim()) if new.shape[d] != old.shape[d]]
        if len(dims) != 1 or new.shape[dims[0]] > old.shape[dims[0]]:
            raise RuntimeError(f"parameter {name}: {tuple(old.shape)} -> {tuple(new.shape)}")
        dim = dims[0]
        gone, i = [], 0
        for j in range(new.shape[dim]):
            kept = new.select(dim, j)
            while i < old.shape[dim] and not torch.equal(old.select(dim, i), kept):
                gone.append(i)
                i += 1
            if i == old.shape[dim]:
                raise RuntimeError(f"parameter {name}: kept slice {j} matches no original slice")
            i += 1
        gone.extend(range(i, old.shape[dim]))
        out[(name, dim)] = gone
    return out


def oracle(original, pruned, removed, ids, tol) -> dict:
    """Run the pruned model; compare with the original with ``removed`` zeroed."""
    import torch

    reference = copy.deepcopy(original)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for (name, dim), idx in removed.items():
            params[name].index_fill_(dim, torch.tensor(idx, dtype=torch.long), 0)
        expected = reference(ids).logits
        try:
            got = pruned(ids).logits
        except Exception as error:  # noqa: BLE001 - classified
            return {"outcome": "crash", "stage": "forward",
                    "error": f"{type(error).__name__}: {_first_line(error)}"}
    if got.shape != expected.shape:
        return {"outcome": "mismatch", "detail": f"logits shape {tuple(got.shape)}"}
    diff = float((got - expected).abs().max())
    return {"outcome": "correct" if diff <= tol else "mismatch", "max_abs_diff": diff}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""


def _summary_of(removed) -> dict[str, int]:
    return {f"{name}[dim {dim}]": len(idx) for (name, dim), idx in removed.items()}


# ---------------------------------------------------------------- depgraph side
def depgraph_task(arch, unit, model, ids, tol, progress) -> dict:
    from depgraph import build_graph
    from pruning import apply_plan, plan_slices

    progress("build_graph")
    graph = build_graph(model)
    kinds = ("mlp",) if unit == "mlp" else ("attention_head", "kv_group")
    found = [g for g in graph.groups() if g.kind in kinds and g.layer == 0]
    if unit == "mlp" and arch == "mixtral":
        found = [g for g in found if "experts" in g.id] or found
    if not found:
        return {"outcome": "refused", "detail": _refusal(graph, model)}
    group = found[0]
    units = list(range(_mlp_units(arch))) if unit == "mlp" else [0]
    plan = {group.id: units}
    progress("apply_plan")
    pruned = apply_plan(copy.deepcopy(model), plan, graph)
    removed = removed_slices(model, pruned)
    claimed = {k: v.tolist() for k, v in plan_slices(graph, plan).items()}
    progress("forward")
    res = oracle(model, pruned, removed, ids, tol)
    res.update(group=group.id, kind=group.kind, removed=_summary_of(removed))
    if claimed != removed:
        res["note"] = "slices() disagree with what apply_plan removed"
        res["claimed"] = {f"{n}[dim {d}]": v for (n, d), v in claimed.items()}
    return res


def _refusal(graph, model) -> str:
    """Why depgraph offers no head group for layer 0 (the pins on its qkv output dim)."""
    attn_name, attn = _layer0_attention(model)
    q_name = next(s for s in _Q_NAMES if hasattr(attn, s))
    reasons = set()
    try:  # internals, for the message only
        layout = graph._param_layouts[(f"{attn_name}.{q_name}.weight", 0)]
        for atom in graph.store.atoms(layout):
            reasons.update(graph.store.pins.get(atom, []))
    except (AttributeError, KeyError):
        pass
    return "; ".join(sorted(reasons)) or "no head group"


# ----------------------------------------------------------- torch-pruning side
def _qkv_roles(arch: str, name: str, size: int, heads: int, kv: int, hd: int):
    """Role ('q', 'k', 'v') of each output channel of a query-carrying projection."""
    if name.endswith(("q_proj",)):
        return ["q"] * size
    if arch in ("gpt_neox", "bloom"):  # per head: [q | k | v]
        return [("q", "k", "v")[(i % (3 * hd)) // hd] for i in range(size)]
    if arch == "falcon":  # per KV group: [n_rep q heads | k | v]
        n_rep = heads // kv
        pos = [(i % ((n_rep + 2) * hd)) // hd for i in range(size)]
        return ["q" if p < n_rep else "k" if p == n_rep else "v" for p in pos]
    # gpt2 c_attn, phi3 qkv_proj: [all q | all k | all v]
    return ["q"] * (heads * hd) + ["k"] * (kv * hd) + ["v"] * (size - (heads + kv) * hd)


def _fix_attention(arch, attn, q_name, removed, heads, kv, hd) -> str:
    """Set the head counts a torch-pruning user must update by hand (prune_llm.py does
    ``num_heads``, ``num_key_value_groups`` and the config); '' or why it cannot."""
    prefix = next((name for name, _dim in removed if name.endswith(f"{q_name}.weight")), None)
    if prefix is None:
        return "the query projection lost no channel"
    attn_prefix = prefix.rsplit(".", 2)[0]
    counts = {"q": heads * hd, "k": kv * hd, "v": kv * hd}
    if q_name == "q_proj":
        for role, proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
            layer = getattr(attn, proj)
            counts[role] = layer.weight.shape[0]
    else:
        weight_dim = 1 if arch == "gpt2" else 0  # Conv1D keeps (in, out)
        key = (f"{attn_prefix}.{q_name}.weight", weight_dim)
        size = (heads + 2 * kv) * hd if arch in ("falcon", "phi3") else 3 * heads * hd
        roles = _qkv_roles(arch, q_name, size, heads, kv, hd)
        for i in removed.get(key, []):
            counts[roles[i]] -= 1
    if any(c % hd for c in counts.values()) or counts["k"] != counts["v"]:
        return f"channels left (q, k, v) = {counts} are not whole heads"
    new_q, new_kv = counts["q"] // hd, counts["k"] // hd
    if not new_kv or new_q % new_kv or (heads == kv and new_q != new_kv):
        return (f"heads left: {new_q} query, {new_kv} key/value (from {heads}/{kv}): "
                "no attention of this family has that shape")
    for attr in ("num_heads", "num_attention_heads", "n_head"):
        if hasattr(attn, attr):
            setattr(attn, attr, new_q)
    for attr in ("num_key_value_heads", "num_kv_heads"):
        if hasattr(attn, attr):
            setattr(attn, attr, new_kv)
    if hasattr(attn, "num_key_value_groups") and new_kv and new_q % new_kv == 0:
        attn.num_key_value_groups = new_q // new_kv
    if hasattr(attn, "split_size"):
        attn.split_size = new_q * hd
    if hasattr(attn, "config"):  # Phi-3 reads the config at run time: a private copy
        attn.config = copy.copy(attn.config)
        for attr, value in (("num_attention_heads", new_q), ("num_key_value_heads", new_kv)):
            if hasattr(attn.config, attr):
                setattr(attn.config, attr, value)
    return ""


def torch_pruning_task(arch, unit, model, ids, tol, progress, use_cache=False) -> dict:
    import torch
    import torch_pruning as tp

    heads, kv, hd = _head_counts(model.config)
    original = copy.deepcopy(model)
    unwrapped = []
    for name, module in model.named_modules():  # Mixtral's experts are 3-D parameters
        if name.endswith("experts") and hasattr(module, "gate_up_proj"):
            unwrapped += [(module.gate_up_proj, 1), (module.down_proj, 2)]
    progress("build_dependency")
    inputs = ids if use_cache else {"input_ids": ids, "use_cache": False}
    dg = tp.DependencyGraph().build_dependency(
        model, example_inputs=inputs, output_transform=lambda out: out.logits,
        unwrapped_parameters=unwrapped or None, verbose=False)
    modules = dict(model.named_modules())
    if unit == "mlp":
        n = _mlp_units(arch)
        layer0 = [name for name in modules if re.search(r"(^|\.)0$", name)][0]
        target = next((modules[f"{layer0}.{s}"] for s in _MLP_NAMES
                       if f"{layer0}.{s}" in modules), None)
        if target is not None:
            half = target.weight.shape[0] // 2
            idxs = list(range(n)) + ([half + i for i in range(n)]
                                     if target is modules.get(f"{layer0}.mlp.gate_up_proj")
                                     else [])
            fn = tp.prune_linear_out_channels
        else:  # Mixtral: fused experts, one 3-D parameter
            experts = modules[f"{layer0}.mlp.experts"]
            target, fn = experts.gate_up_proj, tp.prune_parameter_out_channels
            half = target.shape[1] // 2
            idxs = list(range(n)) + [half + i for i in range(n)]
    else:
        attn_name, attn = _layer0_attention(model)
        q_name = next(s for s in _Q_NAMES if hasattr(attn, s))
        target = getattr(attn, q_name)
        idxs = list(range((heads // kv) * hd))  # head 0, or all query heads of KV group 0
        fn = tp.prune_linear_out_channels
    progress("get_pruning_group")
    group = dg.get_pruning_group(target, fn, idxs)
    progress("group.prune")
    note = ""
    try:
        group.prune()
    except KeyError:  # torch-pruning records history by module name; a Parameter root has none
        if not isinstance(target, torch.nn.Parameter):
            raise
        group.prune(record_history=False)
        note = ("group.prune() raised KeyError (pruning history keyed by module name, and the "
                "root is a Parameter); pruned again with record_history=False")
    if unit == "mlp":
        for name, module in model.named_modules():
            if name.endswith("experts") and hasattr(module, "intermediate_dim"):
                module.intermediate_dim = module.down_proj.shape[-1]
    removed = removed_slices(original, model)
    if unit == "attention":
        problem = _fix_attention(arch, attn, q_name, removed, heads, kv, hd)
        if problem:
            res = {"outcome": "crash", "stage": "fix attributes", "error": problem}
            res.update(removed=_summary_of(removed), group_items=len(group.items))
            return res
    progress("forward")
    res = oracle(original, model, removed, ids, tol)
    res.update(removed=_summary_of(removed), group_items=len(group.items))
    if note:
        res["note"] = note
    return res


TASKS = {"depgraph": depgraph_task, "torch-pruning": torch_pruning_task,
         "torch-pruning+cache": functools.partial(torch_pruning_task, use_cache=True)}


def _child(conn, arch, tool, unit, threads):
    import torch

    torch.set_num_threads(threads)
    from archs import tiny_model

    last = ["start"]

    def progress(stage):
        last[0] = stage
        conn.send(("stage", stage))

    try:
        progress("tiny_model")
        model = tiny_model(arch)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
        tol = 1e-8 if next(model.parameters()).dtype == torch.float64 else 2e-5
        res = TASKS[tool](arch, unit, model, ids, tol, progress)
    except Exception as error:  # noqa: BLE001 - classified
        res = {"outcome": "crash", "stage": last[0],
               "error": f"{type(error).__name__}: {_first_line(error)}",
               "traceback": traceback.format_exc()[-2500:]}
    conn.send(("result", res))
    conn.close()


def run_archs(args) -> list[dict]:
    """Every (arch, tool, unit) in a forked child with a time limit, ``--jobs`` at a time."""
    import torch

    torch.set_num_threads(args.threads)
    import torch_pruning  # imported before forking, so children start fast
    import transformers
    from archs import tiny_config, tiny_model

    import depgraph
    import pruning  # noqa: F401

    print("[part B] warming up (imports, one trace per tool) ...", file=sys.stderr, flush=True)
    with torch.device("meta"):  # import every family's modeling code once, before forking
        for arch in args.archs:
            transformers.AutoModelForCausalLM.from_config(tiny_config(arch))
    warm = tiny_model("llama")
    depgraph.build_graph(warm)
    torch_pruning.DependencyGraph().build_dependency(
        warm, example_inputs=torch.zeros(1, 4, dtype=torch.long),
        output_transform=lambda out: out.logits, verbose=False)
    ctx = mp.get_context("fork")
    child_threads = max(1, args.threads // args.jobs)
    todo = [(arch, tool, unit) for arch in args.archs for tool in args.tools
            for unit in ("mlp", "attention")]
    running: list = []
    results: list[dict] = []

    def finish(item, outcome):
        (arch, tool, unit), proc, conn, start, stage = item
        outcome.update(arch=arch, tool=tool, unit=unit, seconds=time.perf_counter() - start)
        results.append(outcome)
        print(f"[part B] {arch:12s} {tool:14s} {unit:9s} {outcome['outcome']}"
              f" ({outcome['seconds']:.1f} s)", file=sys.stderr, flush=True)

    while todo or running:
        while todo and len(running) < args.jobs:
            key = todo.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(child, *key, child_threads), daemon=True)
            proc.start()
            child.close()
            running.append([key, proc, parent, time.perf_counter(), "start"])
        time.sleep(0.05)
        for item in list(running):
            key, proc, conn, start, stage = item
            result = None
            try:
                while conn.poll():
                    kind, payload = conn.recv()
                    if kind == "stage":
                        item[4] = payload
                    else:
                        result = payload
            except EOFError:
                if result is None and not proc.is_alive():
                    result = {"outcome": "crash", "error": f"child died (exit {proc.exitcode}) "
                              f"in {item[4]}"}
            if result is None and not proc.is_alive() and not conn.poll():
                proc.join()
                result = {"outcome": "crash",
                          "error": f"child died (exit {proc.exitcode}) in {item[4]}"}
            if result is None and time.perf_counter() - start > args.arch_timeout:
                proc.kill()  # only the child this loop started
                proc.join()
                result = {"outcome": "timeout", "stage": item[4],
                          "error": f"no result after {args.arch_timeout} s (in {item[4]})"}
            if result is not None:
                proc.join(timeout=5)
                running.remove(item)
                finish(item, result)
    order = {(a, t, u): i for i, (a, t, u) in enumerate(
        (a, t, u) for a in args.archs for t in args.tools for u in ("mlp", "attention"))}
    return sorted(results, key=lambda r: order[(r["arch"], r["tool"], r["unit"])])


def _cell(res: dict) -> str:
    outcome = res["outcome"]
    if outcome == "correct":
        return "correct"
    if outcome == "mismatch":
        diff = res.get("max_abs_diff")
        return f"mismatch ({diff:.2g})" if diff is not None else "mismatch"
    if outcome == "timeout":
        return f"timeout ({res.get('stage')})"
    if outcome == "refused":
        return "refused"
    stage = res.get("stage")
    return "crash" + (f" ({stage})" if stage else "")


def print_archs(args, results: list[dict]) -> None:
    print(f"## Part B: grouping correctness, layer 0 of the tiny models of tests/archs.py "
          f"(timeout {args.arch_timeout} s per cell)\n")
    by = {(r["arch"], r["tool"], r["unit"]): r for r in results}
    head = " | ".join(f"{tool} {unit}" for tool in args.tools for unit in ("mlp", "attention"))
    print(f"| arch | {head} |")
    print("|---|" + "---|" * (2 * len(args.tools)))
    for arch in args.archs:
        cells = [_cell(by[(arch, tool, unit)]) if (arch, tool, unit) in by else "—"
                 for tool in args.tools for unit in ("mlp", "attention")]
        print(f"| {arch} | " + " | ".join(cells) + " |")
    print()
    print("| tool | correct | mismatch | crash | timeout | refused |")
    print("|---|---:|---:|---:|---:|---:|")
    for tool in args.tools:
        rows = [r for r in results if r["tool"] == tool]
        counts = {k: sum(r["outcome"] == k for r in rows)
                  for k in ("correct", "mismatch", "crash", "timeout", "refused")}
        print(f"| {tool} | " + " | ".join(str(counts[k]) for k in counts) + " |")
    print()
    print("Details of every cell that is not `correct`:\n")
    for r in results:
        if r["outcome"] != "correct":
            why = r.get("error") or r.get("detail") or (
                f"max |Δlogits| = {r['max_abs_diff']:.3g}" if "max_abs_diff" in r else "")
            removed = f"; removed {r['removed']}" if r.get("removed") else ""
            print(f"- {r['arch']} / {r['tool']} / {r['unit']}: **{r['outcome']}** — "
                  f"{why}{removed}")
    notes = [r for r in results if r.get("note")]
    for r in notes:
        print(f"- NOTE {r['arch']} / {r['tool']} / {r['unit']}: {r['note']}")
    print()


# ============================================================================ main
def main(argv=None) -> int:
    from archs import ARCHS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "scale", "archs"], default="all")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--timeout", type=int, default=600,
                        help="part A: seconds a graph build may take (default 600)")
    parser.add_argument("--hang-timeout", type=int, default=90,
                        help="part A: seconds for torch-pruning's attention group query and "
                             "pruner set-up, which hang with the KV cache on (default 90)")
    parser.add_argument("--arch-timeout", type=int, default=30,
                        help="part B: seconds per cell (default 30; a cell that finishes "
                             "takes under 5 s)")
    parser.add_argument("--jobs", type=int, default=2, help="part B: cells run at once")
    parser.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    parser.add_argument("--tools", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--scale-tools", nargs="+", default=SCALE_TOOLS, choices=SCALE_TOOLS)
    parser.add_argument("--seq-len", type=int, default=16, help="part A: example input length")
    for key, value in SCALE_CONFIG.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--scale-worker", choices=SCALE_TOOLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.scale_worker:
        print("RESULT " + json.dumps(scale_worker(args)), flush=True)
        return 0
    out: dict = {"threads": args.threads}
    try:
        import torch_pruning as tp

        out["torch_pruning"] = getattr(tp, "__version__", "?")
    except ImportError:
        print("torch-pruning is not installed: pip install --no-deps torch-pruning "
              "(or the project's `bench` extra)", file=sys.stderr)
        return 2
    import torch
    import transformers

    out["torch"], out["transformers"] = torch.__version__, transformers.__version__
    print(f"torch {out['torch']}, transformers {out['transformers']}, torch-pruning "
          f"{out['torch_pruning']}, {args.threads} torch thread(s)\n")
    if args.part in ("all", "scale"):
        rows = run_scale(args)
        print_scale(args, rows)
        out["scale"] = {"config": {k: getattr(args, k) for k in SCALE_CONFIG}, "rows": rows}
    if args.part in ("all", "archs"):
        results = run_archs(args)
        print_archs(args, results)
        out["archs"] = results
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
