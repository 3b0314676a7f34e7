"""Module attributes for pruned models whose config cannot describe them.

GPT-2, OPT, Bloom, Falcon and GPT-NeoX derive ``head_dim = hidden / heads``, and Bloom fixes
its MLP at ``4 × hidden``: no config says "10 heads of 64" or "an MLP of 2900". For those,
the sizes that modules keep as attributes (``num_heads``, ``split_size``, a parameter-free
norm's ``normalized_shape`` ...) are updated from the graph itself (:mod:`pruning.extents`):
each integer attribute (or tuple of integers) of a module in a pruned group's scope that
equals an old extent may take the new value, or keep its own.

Sizes coincide (GPT-2's ``split_size`` is the attention width, which equals the hidden size
until one of them shrinks), so each choice is verified, and the search is guided by where
verification fails:

1. every attribute starts at its most specific candidate (the new value of the innermost
   group whose scope holds the module; keeping the old value comes last), and the search
   moves away from there and from "all keep their value" in turns, fewest changes first;
2. a meta copy is exported (as ``build_graph`` does); when that fails, the traceback names
   the module that failed, and only the attributes of that block move to their next
   combination (blocks run in order, so each block is settled before the next one fails);
3. once the export runs, the graph must hold every parameter dim laid out as the
   plan expects; blocks whose parameters differ move to their next combination;
4. then, given a ``verify`` (``apply_plan`` passes a real forward and one decoded token),
   the model runs for real: the trace does not decode, and a size that only the cache uses
   (Mamba-2's ``conv_kernel_size``, equal to its heads per group) must keep its value; the
   block the run fails in moves on.

The chosen attributes are recorded with the plan (:func:`restore_attributes` sets them on
reload), so a meta-device replay need not tell coinciding sizes apart again.

Attributes of layers that own their weights (``Linear``, ``Embedding``, ``Conv1D``, a
``LayerNorm`` with a weight, a convolution of one group or depthwise) are set from those
weights and are not candidates (a convolution's kernel size, equal to Mamba-2's heads per
group, is what transformers 5.25 gives its cache).
"""

from __future__ import annotations

import itertools

from torch import nn

from depgraph import DependencyGraph
from depgraph.errors import DepGraphError, PlanError, TraceError
from depgraph.graph import graph_of_trace
from depgraph.groups import block_index
from depgraph.trace import meta_copy, trace_copy

from .config_solver import with_changes
from .extents import expected_signatures, group_extents, kept_sizes
from .plan_configs import convolution_owns_its_sizes

__all__ = ["sync_by_extent", "restore_attributes", "STANDARD_LAYERS"]

STANDARD_LAYERS = ("Linear", "Embedding", "LayerNorm", "Conv1D")
_MAX_TRIALS = 256
_Key = tuple[str, str]  # (module path, attribute)


def _scope(graph: DependencyGraph, group_id: str) -> str:
    group = graph.group(group_id)
    parts = [m.param.split(".")[:-1] for m in group.members]
    prefix = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return ".".join(prefix)


def _owns_its_sizes(module: nn.Module) -> bool:
    """Standard layers whose sizes follow their own weights (set by ``apply_plan``)."""
    standard = isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)) or any(
        cls.__name__ in STANDARD_LAYERS for cls in type(module).__mro__)
    return (standard and getattr(module, "weight", None) is not None) or \
        convolution_owns_its_sizes(module)


def _new_value(value, extents: dict[int, int]):
    """``value`` with every integer that is an old extent replaced, or ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return extents.get(value)
    if isinstance(value, (tuple, list)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        if not any(v in extents for v in value):
            return None
        return type(value)(extents.get(v, v) for v in value)
    return None


def _candidates(model: nn.Module, graph: DependencyGraph, plan: dict) -> dict[_Key, list]:
    """``{(path, attr): [values to try, in order]}``: the innermost group's new value first,
    the attribute's own value last."""
    found: dict[_Key, list[tuple[int, object]]] = {}
    kept = kept_sizes(graph, plan)
    for group_id, units in plan.items():
        if not len(set(units)):
            continue
        extents = group_extents(graph, group_id, len(set(units)), kept)
        scope = _scope(graph, group_id)
        depth = scope.count(".") + 1 if scope else 0
        for path, module in model.named_modules():
            if _owns_its_sizes(module):
                continue
            if scope and not (path == scope or path.startswith(scope + ".")):
                continue
            for key, value in vars(module).items():
                new = None if key.startswith("_") else _new_value(value, extents)
                if new is not None:
                    found.setdefault((path, key), []).append((-depth, new))
    modules = dict(model.named_modules())
    options = {}
    for (path, key), ranked in found.items():
        if _is_block_index(model, path, key):
            continue
        values = []
        for _, value in sorted(ranked, key=lambda item: item[0]):
            if value not in values:
                values.append(value)
        options[(path, key)] = [*values, getattr(modules[path], key)]
    return options


def _pattern(path: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


def _is_block_index(model: nn.Module, path: str, key: str) -> bool:
    """Whether ``key`` holds each block's own index in every block (``layer_idx``): never a
    size, however often an index coincides with an extent."""
    pattern = _pattern(path)
    seen = [(block_index(p + "."), getattr(m, key, None)) for p, m in model.named_modules()
            if _pattern(p) == pattern]
    return len(seen) > 1 and all(block is not None and value == block for block, value in seen)


def _nearest_first(sizes: list[int], guess: tuple[int, ...] | None = None):
    """Index tuples over ``sizes`` options, fewest departures first from each center, taken
    in turns: ``guess`` (if any), every attribute at its first option (all take the new
    size) and every attribute at its last (all keep their own value). One wrong guess among
    many attributes is found in a few trials, and so is the one attribute that must change
    among many that coincide (an MLA layer's LoRA rank, equal to its head count and dims)."""
    centers = [tuple(0 for _ in sizes), tuple(size - 1 for size in sizes)]
    if guess is not None:
        centers.insert(0, guess)
    seen = set()
    for turn in itertools.zip_longest(*[_around(sizes, center) for center in centers]):
        for choice in turn:
            if choice is not None and choice not in seen:
                seen.add(choice)
                yield choice


def _around(sizes: list[int], center: tuple[int, ...]):
    """Index tuples over ``sizes`` options, by how many positions differ from ``center``."""
    for count in range(len(sizes) + 1):
        for positions in itertools.combinations(range(len(sizes)), count):
            others = [[i for i in range(sizes[p]) if i != center[p]] for p in positions]
            for values in itertools.product(*others):
                choice = list(center)
                for position, value in zip(positions, values, strict=True):
                    choice[position] = value
                yield tuple(choice)


class _Search:
    """One odometer over the attribute combinations of each block (``None``: model-wide)."""

    def __init__(self, options: dict[_Key, list]):
        self.options = options
        self.blocks: dict[int | None, list[_Key]] = {}
        for key in sorted(options):
            self.blocks.setdefault(block_index(key[0] + "."), []).append(key)
        self.combos = {block: _nearest_first([len(options[k]) for k in keys])
                       for block, keys in self.blocks.items()}
        self.choice = {block: next(combo) for block, combo in self.combos.items()}
        # what the blocks that verified chose, by attribute pattern: the same module in
        # the next block most likely needs the same (``True``: it kept its own value)
        self.learned: dict[tuple[str, str], tuple[bool, object]] = {}
        self.guessed: set[int | None] = set()

    def learn(self, failing: set) -> None:
        """Remember the choices of the blocks that verified: those before the first failing
        block (the export runs blocks in order), all of them when none fails."""
        first = min((b for b in failing if b is not None), default=None)
        for block, keys in self.blocks.items():
            if block is None or (first is not None and block >= first) or (None in failing and first is None):
                continue
            for key, index in zip(keys, self.choice[block], strict=True):
                kept = index == len(self.options[key]) - 1
                self.learned[(_pattern(key[0]), key[1])] = (kept, self.options[key][index])

    def _guess(self, block: int | None) -> tuple[int, ...] | None:
        """Each attribute as the same one chose before: kept its value, or took the same
        new value (a hidden size), else its first option."""
        guess, known = [], False
        for key in self.blocks[block]:
            options = self.options[key]
            learned = self.learned.get((_pattern(key[0]), key[1]))
            known = known or learned is not None
            if learned is None:
                guess.append(0)
            elif learned[0]:
                guess.append(len(options) - 1)
            else:
                guess.append(options.index(learned[1]) if learned[1] in options[:-1] else 0)
        return tuple(guess) if known else None

    def assignment(self) -> dict[_Key, object]:
        return {key: self.options[key][index] for block, keys in self.blocks.items()
                for key, index in zip(keys, self.choice[block], strict=True)}

    def advance(self, block: int | None) -> bool:
        """Move ``block`` to its next combination; ``False`` when it has none left."""
        if block not in self.combos:
            return False
        if block not in self.guessed:  # first try what the same modules chose before
            self.guessed.add(block)
            guess = self._guess(block)
            if guess is not None and guess != self.choice[block]:
                sizes = [len(self.options[key]) for key in self.blocks[block]]
                self.combos[block] = _nearest_first(sizes, guess)
                self.choice[block] = next(self.combos[block])
                return True
        following = next(self.combos[block], None)
        if following is None:
            return False
        self.choice[block] = following
        return True


def sync_by_extent(model: nn.Module, graph: DependencyGraph, plan: dict,
                   solved: set[str] = frozenset(), verify=None) -> dict[_Key, object]:
    """Set module attributes after slicing (see module docs) and return the setting,
    ``{(module path, attribute): value}`` (kept values too); ``PlanError`` if none verify.
    Modules inside the ``solved`` paths keep the attributes they have (a config set them);
    ``verify(model)`` (a real run, raising on failure) is the last check of a setting."""
    options = {key: values for key, values in _candidates(model, graph, plan).items()
               if not any(key[0] == s or key[0].startswith(s + ".") for s in solved)}
    modules = dict(model.named_modules())
    expected = expected_signatures(graph, plan)
    search = _Search(options)
    for _ in range(_MAX_TRIALS):
        assignment = search.assignment()
        for (path, key), value in assignment.items():
            setattr(modules[path], key, value)
        failing = _failing_blocks(model, expected) or _failing_run(model, verify)
        if not failing:
            return assignment
        search.learn(failing)
        # a block with nothing left to try may be failing for a model-wide attribute
        if not all(search.advance(block) or search.advance(None) for block in failing):
            break
    for (path, key), values in options.items():
        setattr(modules[path], key, values[-1])
    raise PlanError("no setting of module attributes makes the pruned model trace with the "
                    "expected groups; this plan cannot be applied to this architecture")


def _failing_blocks(model: nn.Module, expected: dict[tuple[str, int], str]) -> set:
    """Blocks whose attributes are wrong: the block the export fails in, else the blocks
    whose re-traced parameters differ from ``expected``; empty when all is right."""
    clone = meta_copy(model)
    paths = {id(vars(m)): path for path, m in clone.named_modules()}
    try:
        found = expected_signatures(graph_of_trace(trace_copy(clone), type(model).__name__), {})
    except TraceError as error:  # the export's traceback runs through the clone's modules
        return {_failing_block(error.__cause__ or error, paths)}
    except (DepGraphError, RuntimeError, ValueError):
        return {None}
    wrong = {block_index(param) for (param, dim), sig in expected.items() if found.get((param, dim)) != sig}
    return wrong | ({None} if set(found) != set(expected) else set())


def _failing_run(model: nn.Module, verify) -> set:
    """The block a real run of ``model`` fails in (``{None}``: somewhere else); empty when
    it runs or there is nothing to run."""
    if verify is None:
        return set()
    try:
        verify(model)
    except Exception as error:  # noqa: BLE001 - where it failed is what matters
        return {_failing_block(error, {id(vars(m)): p for p, m in model.named_modules()})}
    return set()


def restore_attributes(model: nn.Module, attributes: dict[str, dict]) -> None:
    """Set the recorded ``{module path: {attribute: value}}`` (JSON turned tuples into
    lists: an attribute that holds a tuple gets one back). A module's ``config`` is recorded
    as its changes (``config_solver.config_changes``): the module gets a copy of its config
    with them."""
    for path, values in attributes.items():
        module = model.get_submodule(path)
        for key, value in values.items():
            current = getattr(module, key, None)
            if key == "config" and isinstance(value, dict) and hasattr(current, "to_dict"):
                value = with_changes(current, value)
            elif isinstance(value, list) and isinstance(current, tuple):
                value = tuple(value)
            setattr(module, key, value)


def _failing_block(error: BaseException, paths: dict[int, str]) -> int | None:
    """The block of the innermost module of the model in ``error``'s traceback. ``paths``
    is keyed by the id of each module's ``__dict__``: the export's tracer runs proxies of
    the modules that share it (``torch.fx`` ``AttrProxy``), not the modules themselves."""
    block = None
    frame = error.__traceback__
    while frame is not None:
        owner = frame.tb_frame.f_locals.get("self")
        path = paths.get(id(getattr(owner, "__dict__", None))) if owner is not None else None
        if path is not None:
            found = block_index(path + ".")
            block = found if found is not None else block
        frame = frame.tb_next
    return block
