"""Rules for factories and for ops that produce no tensor (asserts, symbolic sizes)."""

from __future__ import annotations

import torch
import torch.fx

from ..dimmap import Broadcast, Coupling
from .common import shape
from .registry import register


@register("aten::zeros", "aten::ones", "aten::full", "aten::empty", "aten::scalar_tensor",
          "aten::new_ones", "aten::new_zeros", "aten::new_full", "aten::new_empty",
          "aten::rand", "aten::randn", "aten::randint", "aten::linspace", "aten::eye",
          "aten::empty_strided", "aten::new_empty_strided", "aten::tensor", "aten::lift_fresh",
          "aten::empty_permuted", "aten::logspace")
def factory(node: torch.fx.Node) -> Coupling:
    """A new tensor: each dim is a fresh axis that no input channel maps to."""
    return Coupling(outputs=[[Broadcast(size) for size in shape(node)]], edge_kind="factory",
                    created=True)


@register("aten::_assert_tensor_metadata", "aten::_assert_scalar", "aten::sym_size",
          "aten::sym_numel", "aten::sym_stride", "aten::sym_constrain_range",
          "aten::sym_constrain_range_for_size", "aten::_assert_async", "aten::item",
          "aten::_local_scalar_dense", "aten::_functional_assert_async", "aten::is_nonzero",
          "aten::equal", "aten::dim", "aten::size", "aten::numel", "aten::_check_is_size",
          "aten::_is_all_true", "aten::_is_any_true")
def no_tensor(node: torch.fx.Node) -> Coupling:
    """Checks and scalar reads: nothing flows to channels."""
    del node
    return Coupling(outputs=[])


__all__ = ["factory", "no_tensor"]
