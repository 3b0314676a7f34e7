"""The engine's vocabulary: group kinds and the tags rules put on axes.

Both are string enums that equal, hash and print as their values (``Kind.MLP == "mlp"``,
``f"{Kind.MLP}"`` is ``mlp``, ``json.dumps`` writes ``"mlp"``), so ids, reports and saved
plans read as before, while code names them once.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Kind", "Role", "Tag", "selects"]


class _Name(StrEnum):
    __hash__ = str.__hash__  # a member is found in sets and dicts keyed by its value


class Kind(_Name):
    """What a coupled group is, as the graph shows it (see :mod:`depgraph.groups`)."""

    HIDDEN = "hidden"  # an axis whose members span several blocks (the residual stream)
    MLP = "mlp"  # any other block-local axis (the inner channels of a depth-2 module)
    ATTENTION_HEAD = "attention_head"  # the head axis of an attention op
    KV_GROUP = "kv_group"  # one KV head and the query heads that share it
    QUERY_HEAD = "query_head"  # one query head of every KV group (the same slot in each)
    EXPERT = "expert"  # rows looked up by routing indices (topk over a router)


class Role(_Name):
    """What a parameter dim does with a group's channels, as the traced ops show it
    (:mod:`depgraph.roles`); a member of a group may have several (a tied embedding is read
    by the embedding lookup and by the output projection)."""

    PRODUCER = "producer"  # the output axis of a matrix product: writes the channels
    CONSUMER = "consumer"  # the contracted (input) axis of a matrix product: reads them
    BIAS = "bias"  # added to a matrix product's output channels
    NORM = "norm"  # an elementwise scale or shift along the channels (norm weights, biases)
    EMBEDDING = "embedding"  # the feature axis of a table looked up by token or position ids
    LOOKUP = "lookup"  # rows picked by indices (a vocabulary, experts picked by a router)
    OTHER = "other"  # any other use (views and ops the role pass does not follow)


class Tag(_Name):
    """What an op did to an axis (kept on the axis in :class:`depgraph.layout.AxisStore`)."""

    NORMALIZING = "normalizing"  # reduced so that zeroing a channel is not removing it
    SUM = "sum"  # summed over
    ACTIVATION_CONTRACTION = "activation_contraction"  # contracted between two activations
    ATTENTION_LOGITS = "attention_logits"  # the dim queries and keys contract over
    ATTENTION_HEADS = "attention_heads"  # the head axis of an attention op
    REPEAT = "repeat"  # made by expanding (KV heads repeated for grouped queries)
    LOOKED_UP = "looked_up"  # rows picked by routing indices
    CREATED = "created"  # meets a tensor the model creates at run time from a size
    SELECTS = "selects"  # topk picks k channels: tagged (Tag.SELECTS, k), see selects()


def selects(k: int) -> tuple[Tag, int]:
    """The tag of an axis that ``topk`` picks ``k`` channels of: at least ``k`` must stay."""
    return (Tag.SELECTS, int(k))
