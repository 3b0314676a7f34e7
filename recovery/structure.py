"""How a block calls its linear layers, found by running it once.

The refits of :mod:`recovery.refit` solve a block's layers stage by stage: layers that read
the same input tensor form one stage (q, k, v; gate, up), in the order the block calls them,
and a layer whose output passes unchanged into the block's output (a residual branch's last
projection) can take up the block's output error. Both are read off a forward of the block,
never assumed from an architecture:

* :class:`CallTrace` watches one forward: which layer read which tensor, and output shapes;
* :func:`block_structure` turns a trace into :class:`BlockStructure` (stages, call counts,
  and with ``probe`` the pass-through layers, :func:`passes_through`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import BlockCall, run_block
from .precision import compute_autocast

__all__ = ["BlockStructure", "CallTrace", "block_structure", "linear_layers", "passes_through",
           "weight_rows", "run_quietly", "record_io"]


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


#: Whether a subclass of ``nn.Linear`` that overrides ``forward`` computes its weight's linear
#: map, by class (checked once, :func:`_computes_linear`).
_LINEAR_CLASSES: dict[type, bool] = {}


def _computes_linear(module: nn.Linear) -> bool:
    """Whether the module's output is ``x Wᵀ + b``: ``nn.Linear``'s own forward, or an
    override checked once per class on a random input (Falcon's linear adds its bias apart
    and is one; Llama 4's and PhiMoE's routers are ``nn.Linear`` subclasses that return
    routing scores and are not: a refit or an adapter of them would be wrong)."""
    cls = type(module)
    if cls.forward is nn.Linear.forward:
        return True
    if cls not in _LINEAR_CLASSES:
        weight = module.weight
        if weight.is_meta:
            return False
        x = torch.randn(2, module.in_features, generator=torch.Generator().manual_seed(0))
        x = x.to(weight.device, weight.dtype)
        with torch.no_grad():
            try:
                out = module(x)
            except Exception:  # noqa: BLE001 - any failure means: not a plain linear map
                out = None
            want = nn.functional.linear(x, weight, module.bias).float()
            _LINEAR_CLASSES[cls] = (isinstance(out, torch.Tensor) and out.shape == want.shape
                                    and torch.allclose(out.float(), want, rtol=1e-2,
                                                       atol=1e-2 * float(want.abs().max()) + 1e-6))
    return _LINEAR_CLASSES[cls]


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The block's linear layers by path inside the block: ``nn.Linear`` modules whose
    output is their linear map (:func:`_computes_linear`), and GPT-2's ``Conv1D``."""
    return {name: module for name, module in block.named_modules()
            if (isinstance(module, nn.Linear) and _computes_linear(module)) or _is_conv1d(module)}


def weight_rows(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever the storage (a view for GPT-2's Conv1D)."""
    return module.weight.T if _is_conv1d(module) else module.weight


def record_io(modules: dict[str, nn.Module], take: str) -> tuple[dict[str, list], list]:
    """Forward hooks keeping each module's input (``take="input"``) or output per call."""
    seen: dict[str, list] = {name: [] for name in modules}

    def hook(name):
        def keep(_module, args, output):
            seen[name].append((args[0] if take == "input" else output).detach())
        return keep

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    return seen, handles


@dataclass(frozen=True)
class BlockStructure:
    """How a block calls its linear layers, found once per block by running it.

    ``stages``: layer names in call order, grouped by the input tensor they read;
    ``counts``: calls per layer in one forward; ``through``: the layers whose output passes
    unchanged into the block's output (:func:`passes_through`; probed only when asked).
    """

    stages: list[list[str]]
    counts: dict[str, int]
    through: frozenset[str] = frozenset()


@dataclass
class CallTrace:
    """What one forward of a block showed of its linear layers: which layer read which tensor,
    in call order, and the shapes of their outputs and of the block's (filled by
    :func:`block_structure`'s own run, or by a run of an identical block that the caller
    makes anyway: :func:`dense_targets`' first batch)."""

    order: list[tuple[str, int]] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    output_shape: tuple[int, ...] | None = None

    def watch(self, layers: dict[str, nn.Module]) -> list:
        """Hooks that fill the trace during the next forward (remove them after it)."""
        alive: list[torch.Tensor] = []  # held so that no id is reused during the pass

        def note(name):
            def before(_module, args):
                alive.append(args[0])
                self.order.append((name, id(args[0])))

            def after(_module, _args, output):
                self.shapes[name] = tuple(output.shape)
            return before, after

        handles = []
        for name, module in layers.items():
            before, after = note(name)
            handles += [module.register_forward_pre_hook(before),
                        module.register_forward_hook(after)]
        handles.append(_Release(alive))
        return handles


class _Release:
    """A handle whose ``remove`` lets go of the tensors a trace held during its forward."""

    def __init__(self, alive: list):
        self.alive = alive

    def remove(self) -> None:
        self.alive.clear()


def block_structure(block: nn.Module, hidden: torch.Tensor, call: BlockCall,
                    probe: bool = True, known: dict | None = None,
                    precision: str = "fp32", trace: CallTrace | None = None) -> BlockStructure:
    """The block's stages and call counts, and with ``probe`` its pass-through layers.

    Only layers called once whose output has the block output's shape can pass through, so
    only those are probed (one nudged run each, against one shared unchanged run).
    ``known``: a dict this fills with the probes' answers, keyed by the block's class, stages
    and candidates; a block of the same class that calls the same layers in the same stages
    takes the answer from it instead of probing again (one probe per model, not per block).
    ``precision``: the arithmetic of the run that finds the stages (the probes, which compare
    outputs to a thousandth, run in float32). ``trace``: that run's :class:`CallTrace` when
    the caller already ran an identical block (same wiring) on the same kind of call.
    """
    layers = linear_layers(block)
    base = None
    if trace is None or trace.output_shape is None:
        trace = CallTrace()
        handles = trace.watch(layers)
        try:
            output = run_quietly(block, hidden, call, precision)
        finally:
            for handle in handles:
                handle.remove()
        trace.output_shape = tuple(output.shape)
        base = output if precision == "fp32" else None
    stages: list[list[str]] = []
    last_input = None
    for name, source in trace.order:
        if stages and source == last_input and name not in stages[-1]:
            stages[-1].append(name)
        elif not any(name in stage for stage in stages):
            stages.append([name])
        last_input = source
    counts = {name: sum(1 for n, _ in trace.order if n == name) for name, _ in trace.order}
    through: frozenset[str] = frozenset()
    if probe:
        candidates = tuple(name for name in counts
                           if counts[name] == 1 and trace.shapes.get(name) == trace.output_shape)
        key = (type(block), tuple(map(tuple, stages)), candidates)
        if known is not None and key in known:
            return BlockStructure(stages, counts, known[key])
        try:
            if base is None:  # the probes compare against a float32 run
                base = run_quietly(block, hidden, call, "fp32")
            through = frozenset(name for name in candidates
                                if _moves_output(block, hidden, call, layers[name], base))
        except RuntimeError:
            # the call carries tensors of the pass's precision that the block cannot mix with
            # float32 (Gemma-3n's KV, computed by an earlier block in bfloat16 and shared):
            # no layer is taken to pass through (no output correction; the refits stay right)
            through = frozenset()
        if known is not None:
            known[key] = through
    return BlockStructure(stages, counts, through)


def run_quietly(block: nn.Module, hidden: torch.Tensor, call: BlockCall, precision: str) -> torch.Tensor:
    """:func:`run_block` without gradients, its products in ``precision`` ("fp32" or "bf16")."""
    with torch.no_grad(), compute_autocast(precision, hidden.device):
        return run_block(block, hidden, call)


def passes_through(block: nn.Module, hidden: torch.Tensor, call: BlockCall,
                   layer: nn.Module) -> bool:
    """Whether ``layer``'s output reaches the block's output unchanged (added to it), as a
    residual branch's last projection does (Llama's down_proj; GPT-J's out_proj and fc_out).

    Probed, not assumed: a small random change of the layer's output must change the
    block's output by exactly that much.
    """
    with torch.no_grad():
        base = run_block(block, hidden, call)
    return _moves_output(block, hidden, call, layer, base)


def _moves_output(block: nn.Module, hidden: torch.Tensor, call: BlockCall, layer: nn.Module,
                  base: torch.Tensor) -> bool:
    """:func:`passes_through` given the block's unchanged output ``base``."""
    generator = torch.Generator().manual_seed(0)
    delta: list[torch.Tensor] = []

    def nudge(_module, _args, output):
        if delta:  # called more than once per forward: not a single pass-through
            delta.append(delta[0])
            return output
        noise = torch.randn(output.shape, generator=generator, dtype=torch.float32)
        delta.append((noise * output.float().std().clamp_min(1e-6) * 1e-2).to(output))
        return output + delta[0]

    handle = layer.register_forward_hook(nudge)
    try:
        with torch.no_grad():
            moved = run_block(block, hidden, call)
    finally:
        handle.remove()
    if len(delta) != 1 or moved.shape != delta[0].shape:
        return False
    change, expected = (moved - base).float(), delta[0].float()
    return bool((change - expected).norm() <= 1e-3 * expected.norm())
