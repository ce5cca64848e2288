"""Pretrained Llama-family layers on megatron-core: a Hugging Face decoder layer as a tensor-parallel block.

Owns :class:`PretrainedMegatronBlock`, the megatron stage backend's block (runtime.megatron_backend) for a
:class:`runtime.pretrained.PretrainedLayer` of a Llama-family causal LM (llama, qwen2, qwen3, mistral): one
megatron-core ``TransformerLayer`` whose config comes from the model's own config (width, heads, key/value heads as
query groups, head width as ``kv_channels``, MLP width, ``rms_norm_eps``, RMSNorm, SwiGLU, no linear biases but
Qwen2's q/k/v biases as ``add_qkv_bias``, Qwen3's per-head q/k RMSNorms as ``qk_layernorm``), causal, with RoPE of the
config's ``rope_theta`` through megatron's own ``RotaryEmbedding`` (non-interleaved: the two halves of each head are
rotated together, which is Hugging Face's ``rotate_half``). Its parameter map (:func:`pretrained_param_map`) names the
PretrainedLayer's parameters (``layer.self_attn.q_proj.weight``...), so ``load_reference`` copies a PretrainedLayer
in and ``gather_reference_weights``/``gather_reference_grads`` give back tensors under the PretrainedLayer's own
names: checkpoints, ``model.pt`` and the export (runtime.export) see the same names at any TP degree.

What it does not express (planner.pretrained refuses ``tensor_parallel`` > 1 for these, so a worker never sees
them): rope scaling (``rope_type`` other than ``default``), biases on the output or MLP projections (``attention_bias``
of llama/qwen3, ``mlp_bias``) and an activation other than ``silu``. Sliding-window attention (Mistral, Qwen) runs
as full causal attention, as on one device.

megatron-core is imported lazily; the caller applies runtime.megatron_compat on CPU and seeds megatron's RNG first,
as for every MegatronTransformerBlock.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from runtime.megatron_backend import (
    MegatronTransformerBlock, _glu_fuse, _glu_split, _gqa_fuse, _gqa_split, _ParamMap, build_layer_config,
    load_reference,
)


def pretrained_param_map(qkv_bias: bool, qk_norm: bool) -> dict[str, _ParamMap]:
    """megatron parameter -> the PretrainedLayer parameters it holds: q/k/v fused per query group into
    ``linear_qkv`` (weights and, with ``qkv_bias``, biases), gate and up into ``linear_fc1`` rank by rank, the two
    norms into the local spec's ``input_layernorm`` and ``pre_mlp_layernorm``, with ``qk_norm`` the per-head q/k norms
    (replicated, as the norms)."""
    attn, mlp = "layer.self_attn.", "layer.mlp."
    rows = [
        ("input_layernorm.weight", ("layer.input_layernorm.weight",), None),
        ("self_attention.linear_qkv.weight", tuple(f"{attn}{x}_proj.weight" for x in "qkv"), 0, _gqa_fuse, _gqa_split),
        ("self_attention.linear_proj.weight", (f"{attn}o_proj.weight",), 1),
        ("pre_mlp_layernorm.weight", ("layer.post_attention_layernorm.weight",), None),
        ("mlp.linear_fc1.weight", (f"{mlp}gate_proj.weight", f"{mlp}up_proj.weight"), 0, _glu_fuse, _glu_split),
        ("mlp.linear_fc2.weight", (f"{mlp}down_proj.weight",), 1),
    ]
    if qkv_bias:
        rows.append(("self_attention.linear_qkv.bias", tuple(f"{attn}{x}_proj.bias" for x in "qkv"), 0, _gqa_fuse,
                     _gqa_split))
    if qk_norm:
        rows += [("self_attention.q_layernorm.weight", (f"{attn}q_norm.weight",), None),
                 ("self_attention.k_layernorm.weight", (f"{attn}k_norm.weight",), None)]
    return {row[0]: _ParamMap(*row) for row in rows}


class PretrainedLayerShape:
    """What the megatron layer needs from a PretrainedLayer: its model config's shape and options, and the optional
    parts its modules have. Raises ValueError for a layer megatron's local spec cannot express (see the module doc)."""

    def __init__(self, reference: nn.Module):
        attn, cfg = reference.layer.self_attn, reference.layer.self_attn.config
        rope = getattr(cfg, "rope_parameters", None) or {}
        self.hidden_size, self.num_heads = cfg.hidden_size, cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.ffn_hidden_size, self.eps = cfg.intermediate_size, cfg.rms_norm_eps
        self.rope_theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        self.qkv_bias, self.qk_norm = attn.q_proj.bias is not None, hasattr(attn, "q_norm")
        mlp = reference.layer.mlp
        unsupported = [what for what, bad in (
            (f"rope_type {rope.get('rope_type')!r}", rope.get("rope_type", "default") != "default"),
            ("an o_proj bias", attn.o_proj.bias is not None),
            ("MLP biases", any(m.bias is not None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))),
            (f"hidden_act {cfg.hidden_act!r}", cfg.hidden_act != "silu")) if bad]
        if unsupported:
            raise ValueError(f"{cfg.model_type} layer with {', '.join(unsupported)}: not expressible on "
                             "megatron-core's local layer spec; run this component with tensor_parallel 1")


class _NoContextParallel:
    """The context-parallel group of a layer without context parallelism: one rank. megatron-core 0.16.1's unfused
    RoPE (``apply_rotary_pos_emb``, bshd layout) takes the attention's ``pg_collection.cp`` only to fall back to the
    global parallel state when it is None (which this backend never initialises) and reads nothing else of it; the
    packed-sequence and fused paths, which would, are not used here."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


class PretrainedMegatronBlock(MegatronTransformerBlock):
    """A PretrainedLayer of a Llama-family model as a megatron-core TransformerLayer, tensor parallel over tp_group
    (``tp_size`` must divide the key/value heads and the MLP width): causal attention with the model's RoPE for
    positions ``0..S-1``, ``(B, S, H) -> (B, S, H)`` float32 as the PretrainedLayer. ``reference`` gives the shape
    and options only; copy its weights in with ``load_reference(block, reference)``."""

    def __init__(self, reference: nn.Module, tp_group: dist.ProcessGroup, tp_rank: int, tp_size: int) -> None:
        shape = PretrainedLayerShape(reference)
        self.shape = shape  # read by the hooks below, which the base constructor calls
        super().__init__(shape.hidden_size, shape.num_heads, shape.ffn_hidden_size, tp_group, tp_rank, tp_size,
                         variant="pretrained", num_kv_heads=shape.num_kv_heads, causal=True, head_dim=shape.head_dim)
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

        # no parameters; it moves its frequencies to megatron's current device on first use
        self.rotary = RotaryEmbedding(shape.head_dim, rotary_percent=1.0, rotary_interleaved=False,
                                      rotary_base=shape.rope_theta, use_cpu_initialization=True)
        self.layer.self_attention.pg_collection.cp = _NoContextParallel()
        if shape.qk_norm and tp_size > 1:
            for norm in (self.layer.self_attention.q_layernorm, self.layer.self_attention.k_layernorm):
                norm.weight.register_hook(self._sum_over_tp_group)

    def _sum_over_tp_group(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of a per-head q/k norm weight, summed over the TP group: each rank normalises its own heads
        with the whole (replicated) weight, so its gradient is the part of the sum from those heads. megatron sums
        these in its own finalize_model_grads (not used here); every rank runs this hook at the same point of the
        same backward, so the all-reduces pair up."""
        grad = grad.clone()
        dist.all_reduce(grad, group=self.tp_group)
        return grad

    def _param_map(self) -> dict[str, _ParamMap]:
        return pretrained_param_map(self.shape.qkv_bias, self.shape.qk_norm)

    def _layer_config(self):
        s = self.shape
        return build_layer_config(s.hidden_size, s.num_heads, s.ffn_hidden_size, self.tp_size, "llama", s.num_kv_heads,
                                  kv_channels=s.head_dim, layernorm_epsilon=s.eps, add_qkv_bias=s.qkv_bias,
                                  qk_layernorm=s.qk_norm, rotary_interleaved=False, apply_rope_fusion=False)

    def _layer_spec(self):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=self.shape.qk_norm)

    def _layer_kwargs(self, seq_len: int) -> dict:
        return {"rotary_pos_emb": self.rotary(seq_len)}


def build_pretrained_block(reference: nn.Module, tp_group: dist.ProcessGroup, tp_rank: int,
                           tp_size: int) -> PretrainedMegatronBlock:
    """A PretrainedMegatronBlock of ``reference`` (a runtime.pretrained.PretrainedLayer) holding this rank's shards of
    its weights."""
    block = PretrainedMegatronBlock(reference, tp_group, tp_rank, tp_size)
    load_reference(block, reference)
    return block
