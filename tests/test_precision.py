"""The training precision of recovery: bfloat16 autocast only where the device has it."""

from __future__ import annotations

import pytest
import torch

from recovery import LoraSettings
from recovery.precision import compute_autocast, fused_adamw_ok, native_bf16, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize(("capabilities", "expected"), [
    ({"amx_bf16": True, "avx512_bf16": True}, "bf16"),
    ({"amx_bf16": False, "avx512_bf16": True}, "bf16"),
    ({"avx512_f": True, "avx2": True}, "fp32"),  # bf16 would be emulated: slower
    ({}, "fp32"),
])
def test_auto_uses_bf16_only_on_cpus_that_multiply_it(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert native_bf16(CPU) is (expected == "bf16")
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"


def test_autocast_runs_products_in_bf16_and_fp32_leaves_them():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with compute_autocast("bf16", CPU):
        assert layer(x).dtype == torch.bfloat16
    with compute_autocast("fp32", CPU):
        assert layer(x).dtype == torch.float32
    assert layer.weight.dtype == torch.float32


def test_fused_adamw_takes_float_tensors_on_cpu_only():
    assert fused_adamw_ok([torch.zeros(3, requires_grad=True)])
    assert not fused_adamw_ok([])
    assert not fused_adamw_ok([torch.zeros(3, device="meta")])


def test_bad_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="precision must be one of .* got 'fp8'"):
        resolve_precision("fp8", CPU)
    with pytest.raises(ValueError, match="precision must be one of .* got 'half'"):
        LoraSettings(precision="half")
