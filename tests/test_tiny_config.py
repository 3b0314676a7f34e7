"""The generic shrinking function of the coverage sweep (``evaluation/tiny_config.py``).

Each rule is checked on what it must keep true, on synthetic field sets (any names, random
sizes) and on the transformers defaults that once did not shrink to a model that builds.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from evaluation.tiny_config import _Shrinker, tiny_config


def _shrunk(values: dict) -> dict:
    return {**values, **_Shrinker(values).changes()}


@given(heads=st.sampled_from([16, 32, 64, 128]), per_head=st.sampled_from([8, 16, 32, 64, 128]),
       prefix=st.sampled_from(["mamba_", "ssm_", ""]))
@settings(max_examples=40, deadline=None)
def test_a_state_space_width_stays_heads_times_head_size(heads, per_head, prefix):
    values = {"hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 4,
              f"{prefix}n_heads": heads, f"{prefix}d_head": per_head,
              f"{prefix}d_ssm": heads * per_head}
    out = _shrunk(values)
    assert out[f"{prefix}n_heads"] * out[f"{prefix}d_head"] == out[f"{prefix}d_ssm"]
    assert out[f"{prefix}d_ssm"] < values[f"{prefix}d_ssm"] or values[f"{prefix}d_ssm"] <= 64


@given(hidden=st.sampled_from([1024, 2560, 4096]), expand=st.sampled_from([2, 4]),
       heads=st.sampled_from([8, 16, 32]))
@settings(max_examples=30, deadline=None)
def test_heads_times_head_size_follows_the_hidden_size_times_expand(hidden, expand, heads):
    values = {"hidden_size": hidden, "num_attention_heads": 16, "num_hidden_layers": 4,
              "mamba_expand": expand, "n_mamba_heads": heads, "mamba_headdim": hidden * expand // heads}
    out = _shrunk(values)
    assert out["n_mamba_heads"] * out["mamba_headdim"] == out["mamba_expand"] * out["hidden_size"]


@given(count=st.integers(9, 80), first=st.integers(0, 7), step=st.integers(2, 9))
@example(count=64, first=1, step=2)  # 1 + 3 + ... + 63 = 1024: once shrunk as a hidden split
@settings(max_examples=40, deadline=None)
def test_a_list_of_block_indices_keeps_one_of_its_blocks(count, first, step):
    indices = list(range(first, count, step))
    values = {"num_hidden_layers": count, "hidden_size": 1024, "num_attention_heads": 16,
              "attn_layer_indices": indices}
    out = _shrunk(values)
    kept = out["num_hidden_layers"]
    assert 2 <= kept <= 8
    assert out["attn_layer_indices"] and all(0 <= i < kept for i in out["attn_layer_indices"])
    assert len(out["attn_layer_indices"]) < kept or len(indices) == count  # other blocks stay too


@given(pattern=st.lists(st.sampled_from(["recurrent", "attention", "mlp"]), min_size=2, max_size=6)
       .filter(lambda kinds: len(set(kinds)) > 1), count=st.integers(12, 60))
@settings(max_examples=40, deadline=None)
def test_a_repeating_list_of_block_kinds_keeps_every_kind(pattern, count):
    values = {"num_hidden_layers": count, "hidden_size": 1024, "num_attention_heads": 16,
              "block_types": pattern}
    out = _shrunk(values)
    kept = [pattern[i % len(pattern)] for i in range(out["num_hidden_layers"])]
    assert set(kept) == set(pattern)
    assert out["block_types"] == pattern


def test_a_count_of_all_blocks_stays_all_blocks():
    values = {"num_hidden_layers": 30, "hidden_size": 1024, "num_attention_heads": 16,
              "num_kv_shared_layers": 30, "num_blocks": 30, "num_random_blocks": 3,
              "layer_types": ["sliding"] * 5 + ["full"] + ["sliding"] * 24}
    out = _shrunk(values)
    assert out["num_kv_shared_layers"] == out["num_blocks"] == out["num_hidden_layers"] == 6
    assert out["num_random_blocks"] == 3  # not a count of blocks of the model


def test_sizes_a_default_leaves_unset_get_transformers_convention():
    values = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": None,
              "head_dim": None, "num_hidden_layers": 4, "num_local_experts": 8,
              "num_experts_per_tok": None, "moe_intermediate_size": 1407}
    out = _shrunk(values)
    assert out["num_key_value_heads"] == out["num_attention_heads"]
    assert out["head_dim"] * out["num_attention_heads"] == out["hidden_size"]
    assert out["num_experts_per_tok"] == 2
    assert out["moe_intermediate_size"] % 8 == 0  # grouped-GEMM rows of 16 bytes


@pytest.mark.parametrize("model_type", ["gemma4_text", "dots3_note_text"])
def test_per_layer_attributes_shrink(model_type):
    """transformers refuses to read these fields globally; their per-block values shrink too."""
    config = tiny_config(model_type)
    per_layer = config.to_dict()["per_layer_config"]
    blocks = config.num_hidden_layers
    assert 2 <= blocks <= 8
    assert all(0 <= int(key) < blocks for key in per_layer)
    assert all(value <= 64 for settings in per_layer.values() for key, value in settings.items()
               if "head_dim" in key)


def test_a_causal_lm_built_from_an_encoder_config_is_a_decoder():
    assert tiny_config("bert").is_decoder
    assert tiny_config("reformer").is_decoder


@given(per_stack=st.sampled_from([4, 8, 16]), stacks=st.integers(2, 8))
@settings(max_examples=20, deadline=None)
def test_blocks_counted_as_stacks_keep_one_block_per_stack(per_stack, stacks):
    values = {"num_hidden_layers": per_stack * stacks, "num_layers_per_stack": per_stack,
              "hidden_size": 1024, "num_attention_heads": 16}
    out = _shrunk(values)
    assert out["num_layers_per_stack"] == 1
    assert out["num_hidden_layers"] == stacks
