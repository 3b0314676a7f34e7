"""Size, compute, memory and speed of a model: what structural pruning is supposed to buy.

* :func:`count_parameters`: ``sum(p.numel())`` over unique parameters (tied weights once).
* :func:`weight_memory_bytes`: bytes of unique parameters (and buffers) in their dtypes.
* :func:`macs_per_token`: multiply-accumulates of one prefill forward divided by its tokens.
  Counted at the aten level with :class:`torch.utils.flop_counter.FlopCounterMode` (so any
  ``nn.Linear``, ``F.linear`` or ``matmul`` counts, whatever module calls it), plus the CPU
  flash-attention kernel, which that counter does not know. Attention score/value matmuls
  are counted in full (``seq x seq``, no causal halving, as torch's counter and most papers
  do) and so depend on ``seq_len``. Norms, activations, softmax, rotary and embedding
  lookups are not MACs and are not counted. ``linear_macs_per_token`` is counted separately
  from forward hooks on ``nn.Linear`` modules (exact ``in x out`` per token).
* :func:`peak_forward_memory`: extra memory a forward needs beyond weights and inputs. On
  CUDA: ``torch.cuda.max_memory_allocated`` around the forward. On CPU, where neither
  ``tracemalloc`` (it does not see torch's allocator) nor ``ru_maxrss`` (a process-lifetime
  high-water mark that only moves when a new record is set) works, a dispatch mode adds up
  the bytes of every tensor storage created during the forward while it is alive (kernel
  scratch space and allocator overhead are not seen).
* :func:`measure_latency`: median wall time of a prefill forward and of ``model.generate``
  (greedy, exactly ``new_tokens`` new tokens) for several batch sizes.
* :func:`measure_latency_side_by_side`: the same for several models timed in alternation,
  so that a ratio between two of them is not a difference between two moments of a noisy
  machine; :func:`measure_latency_rounds` keeps every round and :func:`timing_spread` says
  how much they disagree.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary

from ._common import check_positive_int, eval_mode, forward_logits, progress_bar, resolve_device

__all__ = [
    "count_parameters",
    "efficiency_report",
    "macs_per_token",
    "measure_latency",
    "latency_medians",
    "measure_latency_rounds",
    "measure_latency_side_by_side",
    "peak_forward_memory",
    "timing_spread",
    "weight_memory_bytes",
]

_ATTENTION_OPS = ("bmm", "baddbmm", "scaled_dot_product")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of unique parameters (``requires_grad`` ones only if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def weight_memory_bytes(model: nn.Module, include_buffers: bool = True) -> int:
    """Bytes held by the unique parameters (and buffers) of ``model``, in their own dtypes."""
    tensors = list(model.parameters()) + (list(model.buffers()) if include_buffers else [])
    return sum(t.numel() * t.element_size() for t in tensors)


def _sample_ids(model: nn.Module, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    check_positive_int("batch_size", batch)
    check_positive_int("seq_len", seq_len)
    vocab = None
    if hasattr(model, "get_input_embeddings") and model.get_input_embeddings() is not None:
        vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    vocab = vocab or getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        raise ValueError(f"cannot tell the vocabulary size of {type(model).__name__!r}")
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)


def _cpu_sdpa_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return sdpa_flop_count(q, k, v)


def macs_per_token(
    model: nn.Module, seq_len: int = 128, batch_size: int = 1,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """MACs per token of one forward over ``batch_size x seq_len`` random tokens.

    Returns
    -------
    dict
        ``macs_per_token`` (all counted matmuls), ``linear_macs_per_token`` (``nn.Linear``
        hooks only), ``attention_macs_per_token`` (bmm / SDPA ops) and ``seq_len``.
    """
    dev = resolve_device(model, device)
    ids = _sample_ids(model, batch_size, seq_len, dev)
    linear = [0]

    def hook(mod: nn.Module, inputs: tuple[Any, ...], _out: Any) -> None:
        linear[0] += inputs[0].numel() // mod.in_features * mod.in_features * mod.out_features

    mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    try:
        with eval_mode(model), counter:
            forward_logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    flops = counter.get_flop_counts().get("Global", {})
    attention = sum(v for k, v in flops.items() if any(s in str(k) for s in _ATTENTION_OPS))
    tokens = ids.numel()
    return {
        "macs_per_token": counter.get_total_flops() / 2 / tokens,
        "linear_macs_per_token": linear[0] / tokens,
        "attention_macs_per_token": attention / 2 / tokens,
        "seq_len": seq_len,
    }


class _LiveStorageBytes(TorchDispatchMode):
    """Track the bytes of tensor storages created under this mode while they are alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if id(storage) in inputs or storage in self._seen:
                continue  # a view / in-place result of an existing tensor
            nbytes = storage.nbytes()
            self._seen[storage] = nbytes
            weakref.finalize(storage, self._free, nbytes)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


def peak_forward_memory(
    model: nn.Module, seq_len: int = 128, batch_size: int = 1,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Peak extra memory (bytes) of one no-grad forward; see the module docstring for how.

    Returns
    -------
    dict
        ``peak_bytes`` and ``method`` (``"cuda_max_memory_allocated"`` or
        ``"dispatch_live_storages"``).
    """
    dev = resolve_device(model, device)
    ids = _sample_ids(model, batch_size, seq_len, dev)
    with eval_mode(model):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            forward_logits(model, ids)
            torch.cuda.synchronize(dev)
            return {"peak_bytes": torch.cuda.max_memory_allocated(dev) - base,
                    "method": "cuda_max_memory_allocated"}
        tracker = _LiveStorageBytes()
        with tracker:
            forward_logits(model, ids)
        return {"peak_bytes": tracker.peak, "method": "dispatch_live_storages"}


def _median_seconds(fn: Callable[[], Any], repeats: int, warmup: int, dev: torch.device) -> float:
    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_latency(
    model: nn.Module,
    prompt_len: int = 128,
    batch_sizes: Sequence[int] = (1, 4),
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Median latency and throughput of prefill and greedy generation.

    Parameters
    ----------
    model : nn.Module
        The model; generation is measured only if it has ``generate`` (HF models).
    prompt_len : int, default 128
        Random-token prompt length.
    batch_sizes : sequence of int, default (1, 4)
        Batch sizes to measure.
    new_tokens : int, default 32
        Tokens generated (``min_new_tokens = max_new_tokens``, greedy, KV cache on); 0 skips
        generation.
    repeats, warmup : int
        Timed runs (median reported) and untimed runs before them.
    device : str or torch.device, optional
        Defaults to the model's device.

    Returns
    -------
    dict
        For each batch size ``b``: ``prefill_b{b}_ms`` (one forward over the prompt, no KV
        cache kept), ``prefill_b{b}_tok_s`` (prompt tokens / s) and, with generation,
        ``gen_b{b}_ms`` (whole ``generate`` call, prefill included), ``gen_b{b}_tok_s`` (new
        tokens / s over that call) and ``decode_b{b}_tok_s`` (the ``new_tokens - 1`` tokens
        after the first, over ``gen - prefill`` time, an estimate of decode speed).
    """
    check_positive_int("repeats", repeats)
    check_positive_int("warmup", warmup, minimum=0)
    check_positive_int("new_tokens", new_tokens, minimum=0)
    dev = resolve_device(model, device)
    out: dict[str, float] = {}
    with eval_mode(model):
        for b in batch_sizes:
            ids = _sample_ids(model, b, prompt_len, dev)
            prefill = _median_seconds(lambda ids=ids: forward_logits(model, ids), repeats, warmup, dev)
            out[f"prefill_b{b}_ms"] = prefill * 1e3
            out[f"prefill_b{b}_tok_s"] = b * prompt_len / prefill
            if new_tokens == 0 or not hasattr(model, "generate"):
                continue
            pad = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            pad = pad[0] if isinstance(pad, (list, tuple)) else pad
            kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

            def gen(ids: torch.Tensor = ids, kwargs: dict[str, Any] = kwargs) -> None:
                produced = model.generate(ids, **kwargs).shape[1] - ids.shape[1]
                if produced != new_tokens:
                    raise RuntimeError(f"generate produced {produced} tokens, not {new_tokens}")

            total = _median_seconds(gen, repeats, warmup, dev)
            out[f"gen_b{b}_ms"] = total * 1e3
            out[f"gen_b{b}_tok_s"] = b * new_tokens / total
            if new_tokens > 1 and total > prefill:
                out[f"decode_b{b}_tok_s"] = b * (new_tokens - 1) / (total - prefill)
    return out


def measure_latency_rounds(
    models: Mapping[str, nn.Module],
    rounds: int = 3,
    batch_sizes: Sequence[int] | Mapping[str, Sequence[int]] = (1, 4),
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 1,
    warmup: int = 1,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> dict[str, list[dict[str, float]]]:
    """:func:`measure_latency` of several models in alternation, every round kept.

    Each of ``rounds`` rounds times every model once, in order (``repeats`` timed runs, and
    ``warmup`` untimed ones in the first round only), so all of them see the same machine
    state, drifts and bursts of other load included. ``batch_sizes`` is one sequence for
    every model or one per model name. Returns, per model name, one :func:`measure_latency`
    dict per round (see :func:`timing_spread` for how much the rounds disagree).
    """
    check_positive_int("rounds", rounds)
    if isinstance(batch_sizes, Mapping):
        missing = [name for name in models if name not in batch_sizes]
        if missing:
            raise ValueError(f"batch_sizes has no entry for model {missing[0]!r}; expected one "
                             f"per model of {list(models)}")
        per_model = {name: tuple(batch_sizes[name]) for name in models}
    else:
        per_model = {name: tuple(batch_sizes) for name in models}
    timings: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    bar = progress_bar(total=rounds * len(models), desc="timing", enabled=progress)
    for index in range(rounds):
        for name, model in models.items():
            timings[name].append(measure_latency(
                model, prompt_len=prompt_len, batch_sizes=per_model[name], new_tokens=new_tokens,
                repeats=repeats, warmup=warmup if index == 0 else 0, device=device))
            bar.update(1)
    bar.close()
    return timings


def _common_keys(rows: Sequence[Mapping[str, float]]) -> list[str]:
    return [key for key in rows[0] if all(key in row for row in rows)]  # decode_* may be missing


def measure_latency_side_by_side(
    models: Mapping[str, nn.Module],
    rounds: int = 3,
    batch_sizes: Sequence[int] | Mapping[str, Sequence[int]] = (1, 4),
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 1,
    warmup: int = 1,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Per model name, the median over the rounds of :func:`measure_latency_rounds` of each
    :func:`measure_latency` entry."""
    timings = measure_latency_rounds(models, rounds, batch_sizes, prompt_len, new_tokens,
                                     repeats, warmup, device, progress)
    return {name: latency_medians(rows) for name, rows in timings.items()}


def latency_medians(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The median over rounds of each entry that every round has."""
    return {key: statistics.median(row[key] for row in rows) for key in _common_keys(rows)}


def timing_spread(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """How much the rounds of one model disagree: ``(max - min) / median`` of each entry.

    0.1 means the rounds lie within 10% of their median's size; on a busy shared machine it
    can exceed 1, and then a ratio of two medians says little. Empty with fewer than 2 rounds.
    """
    if len(rows) < 2:
        return {}
    spread = {}
    for key in _common_keys(rows):
        values = [row[key] for row in rows]
        middle = statistics.median(values)
        spread[key] = (max(values) - min(values)) / middle if middle else float("inf")
    return spread


def efficiency_report(
    model: nn.Module,
    seq_len: int = 128,
    batch_sizes: Sequence[int] = (1, 4),
    new_tokens: int = 32,
    repeats: int = 3,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """All efficiency numbers in one flat dict (``repeats=0`` skips the timings).

    Returns
    -------
    dict
        ``params``, ``weight_bytes``, the :func:`macs_per_token` entries, ``peak_forward_bytes``
        (batch 1, ``seq_len`` tokens) and the :func:`measure_latency` entries.
    """
    report: dict[str, float] = {
        "params": count_parameters(model),
        "weight_bytes": weight_memory_bytes(model),
        **macs_per_token(model, seq_len=seq_len, device=device),
        "peak_forward_bytes": peak_forward_memory(model, seq_len=seq_len, device=device)["peak_bytes"],
    }
    if repeats:
        report.update(measure_latency(model, prompt_len=seq_len, batch_sizes=batch_sizes,
                                      new_tokens=new_tokens, repeats=repeats, device=device))
    return report
