"""The torch-pruning baseline: LLM-Pruner's Taylor pruning of a Llama-family model.

LLM-Pruner (arXiv 2305.11627) runs on torch-pruning: a ``BasePruner`` with Taylor group
importance, attention pruned in whole (KV) heads, the first and last blocks and the head left
alone, gradients of the calibration loss accumulated before ``pruner.step()``. Set up as in
torch-pruning's ``examples/LLMs/prune_llm.py``, the head counts its users must fix by hand
are fixed afterwards (``num_key_value_groups`` per attention), so the pruned model runs.

``mlp_only=True`` is LLM-Pruner's block-wise setting restricted to the MLP: only ``gate_proj``
channels are roots (attention, ``o_proj``/``down_proj`` and with them the hidden size stay
whole). It exists because torch-pruning's head pruning breaks on grouped-query attention
whose query heads per KV head do not divide as it expects: with ``prune_llm.py``'s
``num_heads`` SmolLM2 (9 query / 3 KV heads) crashes in ``pruner.step()`` (``shape '[9,
-1]' is invalid for input of size 192``), and with ``num_heads`` set to the KV count it runs
but keeps 7 query heads on 1 KV head and prunes the hidden size (perplexity in the
hundreds of thousands).

Its ``pruning_ratio`` is a per-layer channel fraction, not a fraction of parameters; the
channel fraction that removes the wanted share of parameters is found by pruning once with
an estimate and once more with the estimate rescaled by what the first attempt removed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["torch_pruning_taylor"]


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


def _prune_once(model: nn.Module, tokens: torch.Tensor, channel_ratio: float, blocks: range,
                round_to: int | None, mlp_only: bool) -> nn.Module:
    import torch_pruning as tp

    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    num_heads, ignored = {}, [model.lm_head]
    for index, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        num_heads.update({attn.q_proj: heads, attn.k_proj: kv, attn.v_proj: kv})
        if index not in blocks:
            ignored += [m for m in layer.modules() if isinstance(m, nn.Linear)]
        elif mlp_only:
            ignored += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, layer.mlp.down_proj]
    example = {"input_ids": tokens[:1, :32], "use_cache": False}
    pruner = tp.pruner.BasePruner(
        model, example_inputs=example, importance=tp.importance.GroupTaylorImportance(),
        global_pruning=False, output_transform=lambda out: out.logits,
        pruning_ratio=channel_ratio, ignored_layers=ignored,
        num_heads={} if mlp_only else num_heads, prune_num_heads=not mlp_only,
        prune_head_dims=False, head_pruning_ratio=0.0 if mlp_only else channel_ratio,
        round_to=round_to)
    model.zero_grad()
    for row in range(tokens.shape[0]):  # LLM-Pruner: the summed loss gradient of the samples
        sample = tokens[row:row + 1]
        model(input_ids=sample, labels=sample, use_cache=False).loss.backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    head_dim = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // heads
    for attn in _attention_layers(model):  # what prune_llm.py's users set by hand
        q, k = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
        attn.num_key_value_groups = q // k
    return model


def torch_pruning_taylor(model: nn.Module, tokens: torch.Tensor, ratio: float, blocks: range,
                         round_to: int | None = None, mlp_only: bool = False
                         ) -> tuple[nn.Module, dict]:
    """Prune ``ratio`` of the parameters (two attempts, see the module docs)."""
    total = sum(p.numel() for p in model.parameters())
    in_range = sum(p.numel() for i, layer in enumerate(model.model.layers) if i in blocks
                   for p in (layer.mlp if mlp_only else layer).parameters())
    estimate = min(0.95, ratio * total / in_range)
    trial = _prune_once(copy.deepcopy(model), tokens, estimate, blocks, round_to, mlp_only)
    removed = 1 - sum(p.numel() for p in trial.parameters()) / total
    del trial
    channel_ratio = min(0.95, estimate * ratio / max(removed, 1e-6))
    pruned = _prune_once(model, tokens, channel_ratio, blocks, round_to, mlp_only)
    after = sum(p.numel() for p in pruned.parameters())
    return pruned, {"channel_ratio": round(channel_ratio, 4), "first_estimate": round(estimate, 4),
                    "first_removed": round(removed, 4), "ratio_removed": 1 - after / total}
