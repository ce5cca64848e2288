"""runtime.megatron_backend's parameter maps (and runtime.megatron_pretrained's, for Hugging Face layers): fusing
reference tensors into megatron's layout and splitting them back, and which rows a tensor-parallel rank holds (no
megatron import needed); and which pretrained configs planner.pretrained lets run tensor parallel."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from planner.pretrained import tensor_parallel_refusal
from runtime.megatron_backend import PARAM_MAPS
from runtime.megatron_pretrained import pretrained_param_map


def block(tp_size: int, heads: int = 4, kv: int = 2, hidden: int = 16, head_dim: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(tp_size=tp_size, num_heads=heads, num_kv_heads=kv, hidden_size=hidden,
                           head_dim=head_dim or hidden // heads)


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


@pytest.mark.parametrize("qkv_bias,qk_norm", [(False, False), (True, False), (False, True)],
                         ids=["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tp", [1, 2])
def test_pretrained_maps_fuse_then_split_to_the_layers_own_tensors(qkv_bias, qk_norm, tp):
    """Qwen3's head width (here 8) is not hidden / heads (16 / 4): the split must use the block's head_dim."""
    b, d = block(tp, head_dim=8), 8
    shapes = {"q_proj": (4 * d, 16), "k_proj": (2 * d, 16), "v_proj": (2 * d, 16), "o_proj": (16, 4 * d),
              "gate_proj": (24, 16), "up_proj": (24, 16), "down_proj": (16, 24), "q_norm": (d,), "k_norm": (d,)}
    maps = pretrained_param_map(qkv_bias, qk_norm)
    names = {r for where in maps.values() for r in where.references}
    assert ("layer.self_attn.k_proj.bias" in names) == qkv_bias
    assert ("layer.self_attn.q_norm.weight" in names) == qk_norm
    for where in maps.values():
        modules = [(r.split(".")[-2], r.endswith(".bias")) for r in where.references]
        tensors = [torch.randn(shapes[m][:1] if bias else shapes.get(m, (16,))) for m, bias in modules]  # norms: 16
        back = where.split(where.fuse(tensors, b), b)
        assert all(torch.equal(a, c) for a, c in zip(tensors, back)), where.megatron_name


def test_a_rank_holds_the_q_k_v_biases_of_its_own_query_group():
    q, k, v = torch.arange(16.0), 100 + torch.arange(8.0), 200 + torch.arange(8.0)  # 4 heads of 4, 2 kv heads
    where = pretrained_param_map(qkv_bias=True, qk_norm=False)["self_attention.linear_qkv.bias"]
    assert where.references == tuple(f"layer.self_attn.{x}_proj.bias" for x in "qkv") and where.dim == 0
    rank1 = where.fuse([q, k, v], block(2)).chunk(2)[1]
    assert torch.equal(rank1, torch.cat([q[8:], k[4:], v[4:]]))


@pytest.mark.parametrize("model_type,cfg,refused", [
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "hidden_act": "silu"}, None),
    ("qwen2", {"attention_bias": True}, None),  # Qwen2's q/k/v biases map onto add_qkv_bias; it has no o_proj bias
    ("qwen3", {"attention_bias": False}, None),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope_type 'llama3'"),
    ("mistral", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ("llama", {"attention_bias": True, "mlp_bias": True}, "attention_bias (an o_proj bias) and mlp_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("bert", {}, "'bert' layers are not mapped"),
    ("clip_vision_model", {}, "'clip_vision_model' layers are not mapped"),
])
def test_which_pretrained_configs_run_tensor_parallel(model_type, cfg, refused):
    reason = tensor_parallel_refusal(model_type, cfg)
    assert reason is None if refused is None else refused in reason, reason


@pytest.mark.parametrize("kind", ["transformer", "vit", "llama", "decoder"])
def test_the_planners_whole_parameters_per_tp_rank_are_the_maps_unsplit_ones(kind):
    """planner.kinds' ``tp_whole_per_hidden`` (what a hand-off's all-gather leaves out, planner.handoff) counts the
    parameters of a plain layer that the kind's parameter map keeps whole on every TP rank (no split dim)."""
    from planner.kinds import KINDS
    from runtime.modules import DecoderBlock, LlamaBlock, TransformerBlock

    hidden = 16
    layer = {"transformer": TransformerBlock(hidden, 2, 32), "vit": TransformerBlock(hidden, 2, 32),
             "llama": LlamaBlock(hidden, 2, 1, 32), "decoder": DecoderBlock(hidden, 2, 32, causal=True)}[kind]
    params = dict(layer.named_parameters())
    maps = PARAM_MAPS[KINDS[kind].tp_variant]
    assert {r for where in maps.values() for r in where.references} == set(params)  # the map covers the layer
    whole = sum(params[r].numel() for where in maps.values() if where.dim is None for r in where.references)
    assert whole == KINDS[kind].tp_whole_per_hidden * hidden > 0
