"""Member roles and the unit <-> position map: what another pruner reads off a group."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from archs import Dims, tiny_model

from depgraph import Role, build_graph

torch.set_num_threads(1)
ARCHS = ["llama", "gpt2", "phi3", "falcon", "opt", "gpt_neox", "mixtral"]


def _linear_modules(model, member, role):
    """The projections (``nn.Linear``, ``Conv1D``) that use ``member`` in ``role``."""
    params = dict(model.named_parameters())
    for path in member.modules(role):
        module = model.get_submodule(path)
        linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        if linear and module.weight is params[member.param]:
            yield module


@pytest.mark.parametrize("arch", ARCHS)
def test_consumers_read_and_producers_write_along_the_member_dim(arch):
    """Oracle by running the layer: zeroing a consumer's weight slice at position p equals
    zeroing input channel p; zeroing a producer's slice at p leaves output p equal to the
    bias (or zero) and every other output unchanged."""
    model = tiny_model(arch, Dims(bias=True))
    checked = {Role.CONSUMER: 0, Role.PRODUCER: 0}
    generator = torch.Generator().manual_seed(0)
    for group in build_graph(model).groups():
        for member in group.members:
            for role in (Role.CONSUMER, Role.PRODUCER):
                for module in _linear_modules(model, member, role):
                    weight = module.weight
                    features = weight.shape[member.dim if role == Role.CONSUMER else 1 - member.dim]
                    x = torch.randn(3, features if role == Role.CONSUMER else
                                    weight.shape[1 - member.dim], generator=generator,
                                    dtype=weight.dtype)
                    position = int(member.size) // 2
                    with torch.no_grad():
                        before = module(x)
                        saved = weight.data.clone()
                        weight.data.index_fill_(member.dim, torch.tensor([position]), 0)
                        after = module(x)
                        weight.data.copy_(saved)
                        if role == Role.CONSUMER:
                            x[:, position] = 0
                            torch.testing.assert_close(after, module(x))
                        else:
                            bias = module.bias[position] if module.bias is not None else 0
                            torch.testing.assert_close(after[:, position],
                                                       torch.zeros(3, dtype=x.dtype) + bias)
                            others = [i for i in range(after.shape[1]) if i != position]
                            torch.testing.assert_close(after[:, others], before[:, others])
                    checked[role] += 1
    assert checked[Role.CONSUMER] > 0 and checked[Role.PRODUCER] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_every_block_group_has_producers_and_consumers(arch):
    for group in build_graph(tiny_model(arch)).groups():
        roles = {role for member in group.members for role in member.roles}
        assert roles, group.id
        if group.kind in ("mlp", "attention_head", "kv_group"):
            assert {Role.PRODUCER, Role.CONSUMER} <= roles, (group.id, roles)
        if group.kind == "expert":
            assert Role.LOOKUP in roles, (group.id, roles)


def test_roles_of_norms_biases_and_a_tied_embedding():
    model = tiny_model("llama", Dims(tied=True, bias=True))
    hidden = build_graph(model).group("hidden")
    by_param = {m.param: m for m in hidden.members}
    embedding = by_param["model.embed_tokens.weight"]
    assert embedding.roles == (Role.EMBEDDING, Role.CONSUMER)  # looked up, and read by lm_head
    assert embedding.modules(Role.CONSUMER) == ["lm_head"]
    assert by_param["model.norm.weight"].roles == (Role.NORM,)
    assert by_param["model.layers.0.mlp.down_proj.bias"].roles == (Role.BIAS,)
    assert by_param["model.layers.0.mlp.down_proj.weight"].roles == (Role.PRODUCER,)
    described = hidden.to_dict()["members"]
    assert {"role": "consumer", "module": "lm_head"} in described[0]["uses"]
    assert described[0]["roles"] == ["embedding", "consumer"]


def test_gpt2_layer_norm_is_a_norm_and_conv1d_reads_along_dim_0():
    graph = build_graph(tiny_model("gpt2"))
    mlp = graph.group("transformer.h.0.mlp")
    consumer, = mlp.members_with(Role.CONSUMER)
    assert (consumer.param, consumer.dim) == ("transformer.h.0.mlp.c_proj.weight", 0)
    hidden = {m.param: m for m in graph.group("hidden").members}
    assert hidden["transformer.h.0.ln_1.bias"].roles == (Role.NORM,)
    assert hidden["transformer.wpe.weight"].roles == (Role.EMBEDDING,)


def test_units_of_and_unit_sums_match_slices():
    graph = build_graph(tiny_model("llama"))
    group = graph.group("model.layers.1.self_attn")
    values_by_member = []
    for index, member in enumerate(group.members):
        units = group.units_of(member)
        assert units.shape == (member.size,)
        for unit in range(group.num_units):
            param, dim, positions = group.slices([unit])[index]
            assert (param, dim) == (member.param, member.dim)
            assert np.array_equal(np.nonzero(units == unit)[0], positions.numpy())
        values = np.arange(member.size, dtype=np.float64)
        sums = group.unit_sums(member, torch.from_numpy(values))
        expected = [values[units == u].sum() for u in range(group.num_units)]
        np.testing.assert_allclose(sums, expected)
        assert np.array_equal(group.unit_sums(index, values), sums)  # by index too
        values_by_member.append(values)
    units = group.units_of(0)
    units[:] = -7  # a copy: the group's own map is untouched
    assert (group.units_of(0) >= 0).all()


def test_unit_helpers_refuse_what_is_not_a_member_or_the_wrong_length():
    graph = build_graph(tiny_model("llama"))
    group, other = graph.group("model.layers.0.mlp"), graph.group("model.layers.1.mlp")
    with pytest.raises(ValueError, match="not a member of group 'model.layers.0.mlp'"):
        group.units_of(other.members[0])
    with pytest.raises(ValueError, match="member index 99 is out of range"):
        group.units_of(99)
    with pytest.raises(ValueError, match=r"have 3 entries, expected 24"):
        group.unit_sums(group.members[0], [1.0, 2.0, 3.0])
