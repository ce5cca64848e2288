"""runtime.megatron_backend's parameter maps: fusing reference tensors into megatron's layout and splitting them back,
and which rows a tensor-parallel rank holds (no megatron import needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from runtime.megatron_backend import PARAM_MAPS


def block(tp_size: int, heads: int = 4, kv: int = 2, hidden: int = 16) -> SimpleNamespace:
    return SimpleNamespace(tp_size=tp_size, num_heads=heads, num_kv_heads=kv, hidden_size=hidden)


@pytest.mark.parametrize("variant", sorted(PARAM_MAPS))
@pytest.mark.parametrize("tp", [1, 2])
def test_fuse_then_split_is_the_identity(variant, tp):
    shapes = {"qkv.weight": (48, 16), "qkv.bias": (48,), "q_proj.weight": (16, 16), "k_proj.weight": (8, 16),
              "v_proj.weight": (8, 16), "gate_proj.weight": (24, 16), "up_proj.weight": (24, 16)}
    for where in PARAM_MAPS[variant].values():
        tensors = [torch.randn(shapes.get(r, (16, 16))) for r in where.references]
        back = where.split(where.fuse(tensors, block(tp)), block(tp))
        assert all(torch.equal(a, b) for a, b in zip(tensors, back)), where.megatron_name


def test_a_rank_holds_whole_query_groups_and_its_own_gate_and_up_rows():
    maps, b = PARAM_MAPS["llama"], block(2)
    q, k, v = torch.arange(16.0).view(16, 1), 100 + torch.arange(8.0).view(8, 1), 200 + torch.arange(8.0).view(8, 1)
    qkv = maps["self_attention.linear_qkv.weight"].fuse([q, k, v], b).chunk(2)[1]  # rank 1: kv group 1
    d = 4  # head width: 16 / 4 heads
    assert torch.equal(qkv.flatten(), torch.cat([q[2 * d:4 * d], k[d:2 * d], v[d:2 * d]]).flatten())
    gate, up = torch.arange(6.0).view(6, 1), 10 + torch.arange(6.0).view(6, 1)
    fc1 = maps["mlp.linear_fc1.weight"].fuse([gate, up], b).chunk(2)[0]  # rank 0: first halves, gate then up
    assert torch.equal(fc1.flatten(), torch.tensor([0.0, 1, 2, 10, 11, 12]))
