"""Tiny random configs for every architecture the test suite covers.

``tiny_config(arch, **dims)`` builds a small config of that family from shared dimension
names, so Hypothesis can draw (hidden, heads, kv_heads, head_dim, intermediate, layers,
tied, bias) once and get a model of any family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi", "phi3", "gpt2",
         "gpt_neox", "falcon", "bloom", "opt", "mixtral"]
GQA_ARCHS = {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "mixtral", "phi",
             "falcon"}
EXPLICIT_HEAD_DIM = {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "mixtral"}


@dataclass(frozen=True)
class Dims:
    hidden_heads: int = 4  # query heads
    kv_heads: int = 2
    head_dim: int = 8
    intermediate: int = 24  # multiple of 4 keeps MoE kernels' alignment after pruning
    layers: int = 2
    vocab: int = 61
    tied: bool = False
    bias: bool = False
    experts: int = 4


def tiny_config(arch: str, dims: Dims = Dims()):
    heads, head_dim = dims.hidden_heads, dims.head_dim
    kv = dims.kv_heads if arch in GQA_ARCHS else heads
    hidden = heads * head_dim
    common = dict(vocab_size=dims.vocab, tie_word_embeddings=dims.tied)
    if arch in ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "mixtral"):
        extra = dict(hidden_size=hidden, intermediate_size=dims.intermediate,
                     num_hidden_layers=dims.layers, num_attention_heads=heads,
                     num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=64)
        if arch == "llama":
            extra.update(attention_bias=dims.bias, mlp_bias=dims.bias)
        if arch == "mixtral":
            extra.update(num_local_experts=dims.experts, num_experts_per_tok=2)
        if arch in ("gemma2", "gemma3_text"):
            extra.update(sliding_window=4, query_pre_attn_scalar=head_dim)
        if arch == "gemma3_text":
            extra.update(layer_types=["sliding_attention", "full_attention"] * dims.layers)
            extra["layer_types"] = extra["layer_types"][:dims.layers]
        return AutoConfig.for_model(arch, **common, **extra)
    if arch == "phi":
        return AutoConfig.for_model(arch, hidden_size=hidden, intermediate_size=dims.intermediate,
                                    num_hidden_layers=dims.layers, num_attention_heads=heads,
                                    num_key_value_heads=kv, partial_rotary_factor=0.5,
                                    max_position_embeddings=64, **common)
    if arch == "phi3":
        return AutoConfig.for_model(arch, hidden_size=hidden, intermediate_size=dims.intermediate,
                                    num_hidden_layers=dims.layers, num_attention_heads=heads,
                                    num_key_value_heads=kv, max_position_embeddings=64,
                                    pad_token_id=0, **common)
    if arch == "gpt2":
        return AutoConfig.for_model(arch, n_embd=hidden, n_layer=dims.layers, n_head=heads,
                                    n_inner=dims.intermediate, n_positions=64, **common)
    if arch == "gpt_neox":
        return AutoConfig.for_model(arch, hidden_size=hidden, intermediate_size=dims.intermediate,
                                    num_hidden_layers=dims.layers, num_attention_heads=heads,
                                    rotary_pct=0.5, max_position_embeddings=64, **common)
    if arch == "falcon":
        return AutoConfig.for_model(arch, hidden_size=hidden, num_hidden_layers=dims.layers,
                                    num_attention_heads=heads, new_decoder_architecture=True,
                                    num_kv_heads=kv, bias=dims.bias, **common)
    if arch == "bloom":
        return AutoConfig.for_model(arch, hidden_size=hidden, n_layer=dims.layers, n_head=heads,
                                    **common)
    if arch == "opt":
        return AutoConfig.for_model(arch, hidden_size=hidden, ffn_dim=dims.intermediate,
                                    num_hidden_layers=dims.layers, num_attention_heads=heads,
                                    word_embed_proj_dim=hidden, max_position_embeddings=64,
                                    **common)
    raise ValueError(f"unknown arch {arch!r}")


def tiny_model(arch: str, dims: Dims = Dims(), seed: int = 0, dtype=None):
    torch.manual_seed(seed)
    # grouped-mm MoE kernels have no float64 path
    dtype = dtype or (torch.float32 if arch == "mixtral" else torch.float64)
    # built in its dtype, as from_pretrained builds it: buffers computed at construction
    # (Gemma's embedding scale) then round the same way in the model and in its reload
    model = AutoModelForCausalLM.from_config(tiny_config(arch, dims), dtype=dtype)
    with torch.no_grad():  # non-trivial norms and biases so every coupling shows in outputs
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()
