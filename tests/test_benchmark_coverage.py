"""benchmarks/coverage.py: the sweep's table, counts and what it says of unconstructible rows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "coverage_sweep", Path(__file__).resolve().parents[1] / "benchmarks" / "coverage.py")
sweep = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(sweep)


def _row(model_type, status, attention=True, **extra):
    return {"model_type": model_type, "status": status, "attention": attention, "seconds": 1.0,
            "reason": extra.pop("reason", ""), "groups": extra.pop("groups", ""), **extra}


def test_the_counts_say_which_unconstructible_rows_are_transformers_own():
    rows = [_row("a", "pass", groups="mlp 2"), _row("b", "refused", reason="recurrent state"),
            _row("c", "unconstructible", reason="KeyError: 'x'", default="KeyError: 'x'"),
            _row("d", "unconstructible", reason="shape", default=""),
            _row("f", "unconstructible", reason="KeyError: 'y'", default="KeyError: 'x'"),
            _row("e", "pass", attention=False, groups="hidden 1")]
    text = sweep.markdown(rows)
    assert "| c | yes | unconstructible | KeyError: 'x' (transformers' full-size default config " \
           "fails the same way) |" in text
    assert "| d | yes | unconstructible | shape |" in text
    assert "| f | yes | unconstructible | KeyError: 'y' |" in text  # another error: not said
    assert "Counts: pass 2, refused 1, unconstructible 3 (of 6 types)." in text
    assert "1 fail the same way in transformers' own full-size default config (c)" in text
    assert "Decoder-only attention families: 1 of 5 pass (20.0%); of the 2 whose tiny" in text


def test_a_default_config_that_builds_has_no_error_and_one_that_does_not_says_why():
    assert sweep.default_config_error("llama") == ""
    assert "is_decoder" in sweep.default_config_error("reformer")  # transformers' own default
    # its forward, on meta: a cache of linear-attention layers asked for an attention
    # layer's method (get_seq_length up to transformers 5.24, get_mask_sizes in 5.25)
    assert "only contain LinearAttention layers" in sweep.default_config_error("bamba")
