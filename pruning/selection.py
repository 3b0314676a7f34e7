"""Selection: which units to remove, given per-unit importance scores (higher = keep).

``select_plan(groups, scores, ratio=0.2, total_params=n)`` returns a plan
``{group_id: [unit, ...]}`` (sorted units, groups in the given order, untouched groups left
out) that :func:`pruning.apply_plan` consumes. Three rankings:

``"global"`` (default, LLM-Pruner's global pruning)
    Each group's scores are divided by the group's typical score (the geometric mean of the
    non-zero magnitudes, :func:`group_scale`), so that groups whose scores live on different
    scales (layers, kinds, parameter counts) become comparable; then
    all eligible units are sorted together and removed, lowest first, until at least
    ``ratio × total_params`` parameters are gone. The plan overshoots the target by less than
    the cost of the last unit taken (with ``round_to > 1``: of the last chunk, see below).
``"global_raw"``
    The same without the normalisation: raw scores compared across groups.
``"allocate"``
    Counts measured on the model's outputs (:mod:`pruning.allocation`): not computed here,
    since it needs the model and calibration windows; :func:`pruning.select` runs it.
``"local"`` (LLM-Pruner's default, a uniform per-layer ratio)
    The same fraction ``f`` of units leaves every eligible group, each group dropping its
    lowest-scored units; ``f`` is the smallest fraction whose removal reaches the target
    (found by bisection over the fractions the groups can actually realise; each group
    removes the smallest realisable count ``>= f × num_units``).

``kind_ratios={"mlp": 0.3, "kv_group": 0.25}`` replaces ``ratio``: each eligible group of
that kind removes that fraction of its units (rounded to the nearest realisable count).

Constraints on every group: at least ``max(min_keep, 1)`` units stay, and the kept count
satisfies the group's own constraints (``Group.allows``: the experts a router picks per
token, rows that grouped-GEMM kernels need aligned); in channel-level
groups (kinds ``mlp`` and ``hidden``) the kept count is a multiple of ``round_to`` (a group
whose width is not a multiple may stay untouched). Whole units (heads, KV groups, experts)
ignore ``round_to``. With ``round_to > 1`` the global rankings move in *chunks*: a group's
lowest-scored units are cut into the steps between realisable counts, and each chunk is
ranked by the mean of its (normalised) scores.

Ties are broken by group order, then by unit index, so equal scores give the same plan.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from depgraph.kinds import Kind

from .checks import check_int

__all__ = ["KINDS", "CHANNEL_KINDS", "DEFAULT_KINDS", "RANKINGS", "LLM_PRUNER_LAYERS",
           "allowed_counts", "greedy_counts", "group_scale", "parse_layers", "removed_params",
           "select_plan"]

#: Group kinds (see :mod:`depgraph.groups`).
KINDS: tuple[Kind, ...] = tuple(Kind)
#: Kinds whose unit is one channel; ``round_to`` applies to them.
CHANNEL_KINDS = frozenset({Kind.HIDDEN, Kind.MLP})
#: What shrinks by default: the inner channels of MLPs and whole attention heads / KV groups.
DEFAULT_KINDS = frozenset({Kind.MLP, Kind.ATTENTION_HEAD, Kind.KV_GROUP})
RANKINGS: tuple[str, ...] = ("global", "global_raw", "local", "allocate")
#: LLM-Pruner's layer range for 32-block LLaMA-7B: blocks 4..29 shrink (``--block_*_layer_start
#: 4 --block_*_layer_end 30``); the first 4 and the last 2 stay whole.
LLM_PRUNER_LAYERS = "4:-2"


# ------------------------------------------------------------------------------- layers
def _layer_index(text: str, spec: str, num_layers: int, *, bound: bool) -> int | None:
    if text.strip() == "" and bound:
        return None
    try:
        index = int(text)
    except ValueError:
        raise ValueError(f"bad layer spec {spec!r}: expected 'all', an index like '5' or a "
                         f"slice like '4:-2' (Python slice over {num_layers} layers)") from None
    if not bound and not -num_layers <= index < num_layers:
        raise ValueError(f"layer {index} in spec {spec!r} is out of range (expected "
                         f"-{num_layers} <= layer < {num_layers})")
    return index


def parse_layers(spec: str, num_layers: int) -> range:
    """The blocks a spec names, as a ``range`` over ``num_layers`` blocks.

    ``"all"`` or ``""``: every block; ``"5"``: block 5 only (``"-1"``: the last); ``"a:b"``
    or ``"a:b:step"``: a Python slice, negative bounds counting from the end. LLM-Pruner prunes
    blocks 4..29 of 32 (:data:`LLM_PRUNER_LAYERS` ``= "4:-2"``).

    >>> parse_layers("4:-2", 32)
    range(4, 30)
    >>> parse_layers("all", 5), parse_layers("-1", 5)
    (range(0, 5), range(4, 5))
    """
    check_int("num_layers", num_layers)
    if not isinstance(spec, str):
        raise ValueError(f"layer spec must be a str like '4:-2', got {spec!r}")
    text = spec.strip().lower()
    if text in ("", "all", ":"):
        return range(num_layers)
    parts = text.split(":")
    if len(parts) == 1:
        index = _layer_index(parts[0], spec, num_layers, bound=False) % num_layers
        return range(index, index + 1)
    if len(parts) > 3:
        raise ValueError(f"bad layer spec {spec!r}: expected 'start:stop[:step]'")
    bounds = [_layer_index(part, spec, num_layers, bound=True) for part in parts]
    if len(bounds) == 3 and bounds[2] is not None and bounds[2] < 1:
        raise ValueError(f"bad layer spec {spec!r}: the step must be >= 1, got {bounds[2]}")
    selected = range(num_layers)[slice(*bounds)]
    if len(selected) == 0:
        raise ValueError(f"layer spec {spec!r} selects no block of {num_layers}")
    return selected


# ------------------------------------------------------------------------------- helpers
def removed_params(groups: Sequence[Any], plan: Mapping[str, Sequence[int]]) -> int:
    """Parameters a plan removes: ``len(units) × params_per_unit`` summed over its groups.

    Groups are counted independently, as ``Group.params_per_unit`` is: where a hidden channel
    and an inner channel share a weight entry, both count it (so do a KV group and a query-head
    slot of the same layer, for the query head where they cross).
    """
    by_id = {group.id: group for group in groups}
    total = 0
    for group_id, units in plan.items():
        if group_id not in by_id:
            raise ValueError(f"plan names group {group_id!r}, which is not among the "
                             f"{len(by_id)} groups given")
        total += len(set(units)) * int(by_id[group_id].params_per_unit)
    return total


def allowed_counts(group: Any, round_to: int = 1, min_keep: int = 1) -> np.ndarray:
    """Realisable numbers of removed units (ascending, without 0)."""
    n, floor = int(group.num_units), max(min_keep, 1)
    if group.kind in CHANNEL_KINDS and round_to > 1:
        kept = np.arange(math.ceil(floor / round_to) * round_to, n, round_to)
        counts = (n - kept)[::-1].astype(np.int64)
    else:
        counts = np.arange(1, max(n - floor, 0) + 1, dtype=np.int64)
    allows = getattr(group, "allows", None)  # the group's own constraints (Group.allows)
    if allows is not None:
        counts = counts[[bool(allows(n - int(c))) for c in counts]] if counts.size else counts
    return counts


def _ascending_units(values: np.ndarray) -> np.ndarray:
    """Unit indices from least to most important (stable: equal scores by unit index)."""
    return np.argsort(values, kind="stable")


def _check_scores(groups: Sequence[Any], scores: Mapping[str, Any]) -> list[np.ndarray]:
    checked = []
    for group in groups:
        if group.id not in scores:
            raise ValueError(f"no scores for eligible group {group.id!r} (scores has "
                             f"{len(scores)} groups)")
        values = np.asarray(scores[group.id], dtype=np.float64).reshape(-1)
        if values.shape != (group.num_units,):
            raise ValueError(f"scores of group {group.id!r} have {values.size} entries, "
                             f"expected {group.num_units} (one per unit)")
        if not np.isfinite(values).all():
            raise ValueError(f"scores of group {group.id!r} contain NaN or infinity")
        checked.append(values)
    return checked


def group_scale(values: np.ndarray) -> float:
    """The typical magnitude of a group's scores: the geometric mean of the non-zero |s|.

    Scores span decades, and a few units of some blocks (the channels behind the massive
    activations of Llama-like models) score orders of magnitude above the rest: divided by
    the arithmetic mean, every other unit of such a block looks unimportant and global
    ranking empties it (SmolLM2 lost 98% of four blocks' MLPs; perplexity 242 where the
    geometric mean gives 166, second_moment at 20%).
    """
    magnitudes = np.abs(np.asarray(values, dtype=np.float64))
    magnitudes = magnitudes[magnitudes > 0]
    return float(np.exp(np.log(magnitudes).mean())) if magnitudes.size else 0.0


def _normalised(values: np.ndarray) -> np.ndarray:
    scale = group_scale(values)
    return values / scale if scale > 0 else values


# ------------------------------------------------------------------------------- rankings
def _select_global(groups, values, allowed, target: float, normalise: bool) -> list[int]:
    """Removed-unit counts per group: chunks sorted by (mean score, group, chunk), greedy."""
    keys = []
    for scores, steps in zip(values, allowed, strict=True):
        if steps.size == 0:
            keys.append(np.zeros(0))
            continue
        ranked = (_normalised(scores) if normalise else scores)[_ascending_units(scores)]
        sums = np.concatenate([[0.0], np.cumsum(ranked)])
        sizes = np.diff(np.concatenate([[0], steps]))
        keys.append((sums[steps] - sums[steps - sizes]) / sizes)
    return greedy_counts(groups, keys, allowed, target)


def greedy_counts(groups: Sequence[Any], keys: Sequence[np.ndarray],
                  allowed: Sequence[np.ndarray], target: float) -> list[int]:
    """Removed-unit counts per group from chunk costs: ``keys[g][i]`` ranks the chunk that
    takes group ``g`` from ``allowed[g][i-1]`` to ``allowed[g][i]`` removed units (lowest
    first; made non-decreasing within a group, since a chunk needs the ones before it);
    chunks are taken in order until ``target`` parameters are gone."""
    group_index, chunk_index, costs, counts_at, ordered = [], [], [], [], []
    for g, (group, key, steps) in enumerate(zip(groups, keys, allowed, strict=True)):
        if steps.size == 0:
            continue
        sizes = np.diff(np.concatenate([[0], steps]))
        ordered.append(np.maximum.accumulate(np.asarray(key, dtype=np.float64)))
        group_index.append(np.full(steps.size, g))
        chunk_index.append(np.arange(steps.size))
        costs.append(sizes * int(group.params_per_unit))
        counts_at.append(steps)
    counts = [0] * len(groups)
    if not ordered:
        return counts
    group_index, chunk_index = np.concatenate(group_index), np.concatenate(chunk_index)
    order = np.lexsort((chunk_index, group_index, np.concatenate(ordered)))
    cumulative = np.cumsum(np.concatenate(costs)[order])
    last = int(np.searchsorted(cumulative, target, side="left"))
    steps_of = np.concatenate(counts_at)
    for position in order[:last + 1]:
        g = int(group_index[position])
        counts[g] = max(counts[g], int(steps_of[position]))
    return counts


def _count_at_fraction(n: int, steps: np.ndarray, fraction: float) -> int:
    """The smallest realisable count ``>= fraction × n`` (the largest if none is)."""
    if steps.size == 0 or fraction <= 0:
        return 0
    at = int(np.searchsorted(steps, fraction * n - 1e-9, side="left"))
    return int(steps[min(at, steps.size - 1)])


def _select_local(groups, allowed, target: float) -> list[int]:
    """Counts at the smallest common fraction whose removal reaches ``target``."""
    costs = [int(g.params_per_unit) for g in groups]

    def counts_at(fraction: float) -> list[int]:
        return [_count_at_fraction(int(g.num_units), steps, fraction)
                for g, steps in zip(groups, allowed, strict=True)]

    fractions = np.unique(np.concatenate(
        [steps / int(g.num_units) for g, steps in zip(groups, allowed, strict=True)] + [[1.0]]))
    low, high = 0, fractions.size - 1  # counts_at(1.0) takes every group's maximum
    while low < high:
        middle = (low + high) // 2
        if sum(c * cost for c, cost in zip(counts_at(fractions[middle]), costs, strict=True)) >= target:
            high = middle
        else:
            low = middle + 1
    return counts_at(float(fractions[low]))


def _nearest_count(n: int, steps: np.ndarray, fraction: float) -> int:
    """The realisable count nearest to ``fraction × n`` (ties: fewer removed)."""
    options = np.concatenate([[0], steps])
    return int(options[np.argmin(np.abs(options - fraction * n))])


# ------------------------------------------------------------------------------- validation
def _check_fraction(name: str, value: Any, *, allow_zero: bool = False) -> float:
    low_ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low_ok and value < 1):
        bracket = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must be in {bracket}, got {value!r}")
    return float(value)


def _check_kinds(kinds: Collection[str] | None, kind_ratios: Mapping[str, float] | None
                 ) -> frozenset[str]:
    if isinstance(kinds, str):
        raise ValueError(f"kinds must be a set of kind names, got the string {kinds!r}")
    chosen = frozenset(kinds) if kinds is not None else (
        frozenset(kind_ratios) if kind_ratios is not None else DEFAULT_KINDS)
    unknown = sorted((set(chosen) | set(kind_ratios or ())) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown group kinds {unknown}: expected names from {KINDS}")
    outside = sorted(set(kind_ratios or ()) - chosen)
    if outside:
        raise ValueError(f"kind_ratios names kinds {outside} that are not in kinds "
                         f"{sorted(chosen)}")
    return chosen


def _check_options(ratio, kind_ratios, total_params, ranking, round_to, min_keep) -> None:
    if (ratio is None) == (kind_ratios is None):
        raise ValueError("pass exactly one of ratio (a fraction of all parameters) and "
                         f"kind_ratios (a fraction per kind); got ratio={ratio!r}, "
                         f"kind_ratios={kind_ratios!r}")
    if ratio is not None:
        _check_fraction("ratio", ratio)
    for kind, value in (kind_ratios or {}).items():
        _check_fraction(f"kind_ratios[{kind!r}]", value, allow_zero=True)
    check_int("total_params", total_params)
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    for name, value in (("round_to", round_to), ("min_keep", min_keep)):
        check_int(name, value)


# ------------------------------------------------------------------------------- entry point
def select_plan(groups: Sequence[Any], scores: Mapping[str, Any], *,
                ratio: float | None = None, kind_ratios: Mapping[str, float] | None = None,
                total_params: int, layers: range | None = None,
                kinds: Collection[str] | None = None, ranking: str = "global",
                round_to: int = 1, min_keep: int = 1) -> dict[str, list[int]]:
    """Choose the units to remove (see :mod:`pruning.selection` for the rules).

    Parameters
    ----------
    groups : sequence of :class:`depgraph.groups.Group` (anything with ``id``, ``kind``,
        ``layer``, ``num_units``, ``params_per_unit``).
    scores : ``{group_id: array of num_units scores}``, higher = more important; needed for
        every eligible group.
    ratio : fraction of ``total_params`` to remove, in (0, 1); or ``kind_ratios``.
    kind_ratios : ``{kind: fraction of each group's units}``, each in [0, 1).
    total_params : the model's parameter count (the base of ``ratio``).
    layers : blocks that may shrink (:func:`parse_layers`); ``None`` = all. Groups without a
        block (``hidden``) are eligible whenever their kind is.
    kinds : kinds that may shrink; default :data:`DEFAULT_KINDS` (with ``kind_ratios``: its
        keys, which must lie within ``kinds`` when both are given; a kind of ``kinds`` that
        ``kind_ratios`` does not name keeps all its units).
    ranking : ``"global"``, ``"global_raw"`` or ``"local"`` (ignored with ``kind_ratios``).
    round_to : kept widths of channel groups are multiples of it.
    min_keep : units every group keeps at least (never fewer than 1).

    Returns
    -------
    dict
        ``{group_id: sorted unit indices}`` for the groups that lose units, in group order.

    Raises
    ------
    ValueError
        Bad options (quoting the value and the allowed range), missing or malformed scores,
        or a ratio that the eligible units cannot reach.
    """
    _check_options(ratio, kind_ratios, total_params, ranking, round_to, min_keep)
    if ranking == "allocate":
        raise ValueError("ranking 'allocate' measures the model's outputs: use pruning.select "
                         "(or pruning.allocation.allocate_plan with measured curves)")
    chosen = _check_kinds(kinds, kind_ratios)
    eligible = [g for g in groups if g.kind in chosen
                and (layers is None or g.layer is None or g.layer in layers)]
    values = _check_scores(eligible, scores)
    allowed = [allowed_counts(g, round_to, min_keep) for g in eligible]
    if kind_ratios is not None:
        counts = [_nearest_count(int(g.num_units), steps, kind_ratios.get(g.kind, 0.0))
                  for g, steps in zip(eligible, allowed, strict=True)]
    else:
        target = ratio * total_params
        removable = sum(int(s[-1]) * int(g.params_per_unit)
                        for g, s in zip(eligible, allowed, strict=True) if s.size)
        if removable < target:
            where = "all layers" if layers is None else f"layers {layers}"
            share = f"{removable / total_params:.2f}"
            share = share if float(share) < ratio else f"{removable / total_params:.6f}"
            raise ValueError(f"ratio {ratio} cannot be reached: at most {share} of the "
                             f"parameters are removable with kinds {sorted(chosen)} and {where}")
        counts = (_select_local(eligible, allowed, target) if ranking == "local" else
                  _select_global(eligible, values, allowed, target, ranking == "global"))
    return {g.id: sorted(int(u) for u in _ascending_units(v)[:c])
            for g, v, c in zip(eligible, values, counts, strict=True) if c > 0}
