"""Tensor-parallel transformer blocks on megatron-core layers (the megatron stage backend).

Owns ``MegatronTransformerBlock``, one megatron-core ``TransformerLayer`` (local, non-Transformer-
Engine spec) that computes exactly one of the runtime's plain-torch blocks (runtime/modules.py):
``variant="transformer"``: the encoder block (pre-LN, no dropout, ``x = x + proj(attn(ln1(x)))``,
``x = x + fc2(gelu(fc1(ln2(x))))``, LayerNorm eps 1e-5, biased linears, non-causal softmax attention,
exact GELU); ``variant="llama"``: the llama block (RMSNorm eps 1e-6, causal grouped-query attention as
megatron's query groups, SwiGLU as its gated linear unit, no biases). It also owns the weight and
gradient mapping between the plain block (the reference layout) and this rank's TP shards
(:data:`PARAM_MAPS`): ``load_reference``, ``gather_reference_weights`` and ``gather_reference_grads``.
Like the plain encoder block, it makes the gradient of the key part of the qkv bias exactly zero
(its true value). runtime.megatron_pretrained subclasses the block for pretrained Hugging Face layers (variant
"pretrained"): it replaces the parameter map, the layer's config and spec and the layer's extra forward arguments
(``_param_map``, ``_layer_config``, ``_layer_spec``, ``_layer_kwargs``).

Process groups: megatron-core 0.16.1 lets every layer take its groups explicitly, so each block is
built on the ``tp_group`` it is given and megatron's global ``parallel_state`` is never
initialised. Each MetaOp slice can therefore have its own TP group, and one process may hold blocks
on different groups (tested: a TP=2 block on {0, 1} and a TP=1 block on {rank} in one process).
What is still process-global in megatron, and shared by all blocks of a process:
- the RNG states tracker (``tensor_parallel.random``): one tensor-parallel dropout stream per
  process, seeded for one ``tp_rank`` by ``seed_model_parallel_rng``. Irrelevant here (no dropout),
  but a block with dropout in two groups where the process has different TP ranks would draw from
  the stream of one rank;
- the global memory buffer (``parallel_state._GLOBAL_MEMORY_BUFFER``) ``DotProductAttention``
  uses as scratch for its score matmul; it has no group semantics, so this module creates it when
  absent (normally ``initialize_model_parallel`` does).
megatron's ``sharded_state_dict`` (dist checkpointing) reads the global data-parallel group unless
its metadata carries ``dp_cp_group``; it is not used or tested here. Checkpoint the full tensors
from ``gather_reference_weights`` instead.

megatron-core is imported lazily (inside functions) so importing this module stays cheap. On CPU,
apply ``runtime.megatron_compat.apply_cpu_compat()`` in the worker process first.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from runtime import megatron_compat

logger = logging.getLogger(__name__)

LAYERNORM_EPS = 1e-5


def _whole(tensors: list[torch.Tensor], block: MegatronTransformerBlock) -> torch.Tensor:
    return tensors[0]


def _unwhole(full: torch.Tensor, block: MegatronTransformerBlock) -> list[torch.Tensor]:
    return [full]


@dataclass(frozen=True)
class _ParamMap:
    """One megatron parameter and the reference parameters it holds.

    ``fuse(reference tensors, block)`` gives the full tensor in a layout whose ``tp_size`` chunks along ``dim``
    are the ranks' shards (``dim`` None: replicated, a full copy on every rank); ``split`` is its inverse.
    """

    megatron_name: str
    references: tuple[str, ...]
    dim: int | None
    fuse: Callable = _whole
    split: Callable = _unwhole


def _mha_fuse(tensors: list[torch.Tensor], block: MegatronTransformerBlock) -> torch.Tensor:
    """``[q | k | v]`` rows (each heads x d) -> megatron's per-head ``[q_0, k_0, v_0, q_1, ...]``."""
    return _per_head(list(tensors[0].chunk(3)), block)


def _mha_split(full: torch.Tensor, block: MegatronTransformerBlock) -> list[torch.Tensor]:
    return [torch.cat(_per_head_split(3)(full, block))]


def _gqa_fuse(tensors: list[torch.Tensor], block: MegatronTransformerBlock) -> torch.Tensor:
    """q ``(heads*d, ...)``, k and v ``(groups*d, ...)`` -> megatron's per query group ``[q of its heads, k_g, v_g]``
    (query head i belongs to group i // (heads / groups), as the plain block's repeat_interleave); weights ``(.., h)``
    and biases alike."""
    q, k, v = tensors
    groups, rest = block.num_kv_heads, q.shape[1:]
    return torch.cat([t.reshape(groups, -1, *rest) for t in (q, k, v)], dim=1).reshape(-1, *rest)


def _gqa_split(full: torch.Tensor, block: MegatronTransformerBlock) -> list[torch.Tensor]:
    groups, rest, d = block.num_kv_heads, full.shape[1:], block.head_dim
    per_group = full.reshape(groups, -1, *rest)
    q, k, v = per_group.split([block.num_heads // groups * d, d, d], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def _glu_fuse(tensors: list[torch.Tensor], block: MegatronTransformerBlock) -> torch.Tensor:
    """gate and up ``(f, h)`` -> rank by rank ``[gate_r; up_r]``: megatron's gated fc1 splits each rank's output
    in two halves, ``silu(first) * second``."""
    gate, up = (t.chunk(block.tp_size, dim=0) for t in tensors)
    return torch.cat([torch.cat([g, u]) for g, u in zip(gate, up)])


def _glu_split(full: torch.Tensor, block: MegatronTransformerBlock) -> list[torch.Tensor]:
    halves = [shard.chunk(2, dim=0) for shard in full.chunk(block.tp_size, dim=0)]
    return [torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])]


def _per_head(tensors: list[torch.Tensor], block: MegatronTransformerBlock) -> torch.Tensor:
    """Rows of each reference tensor (each heads x d) interleaved per head: ``[a_0, b_0, .., a_1, b_1, ..]``, the
    layout of megatron's fused qkv (self) and kv (cross) projections."""
    heads, rest = block.num_heads, tensors[0].shape[1:]
    return torch.stack([t.reshape(heads, -1, *rest) for t in tensors], dim=1).reshape(-1, *rest)


def _per_head_split(count: int) -> Callable:
    def split(full: torch.Tensor, block: MegatronTransformerBlock) -> list[torch.Tensor]:
        heads, rest = block.num_heads, full.shape[1:]
        return [t.reshape(-1, *rest) for t in full.reshape(heads, count, -1, *rest).unbind(dim=1)]
    return split


def _no_key_bias(first: int) -> tuple[Callable, Callable]:
    """(fuse, split) of a fused per-head bias whose key part the reference does not have (it cannot change the
    output): the key rows are zeros; ``first`` says whether a query bias comes first (qkv) or not (kv)."""
    def fuse(tensors: list[torch.Tensor], block: MegatronTransformerBlock) -> torch.Tensor:
        zeros = torch.zeros_like(tensors[-1])
        return _per_head([tensors[0], zeros, tensors[1]] if first else [zeros, tensors[0]], block)

    def split(full: torch.Tensor, block: MegatronTransformerBlock) -> list[torch.Tensor]:
        parts = _per_head_split(3 if first else 2)(full, block)
        return [parts[0], parts[2]] if first else [parts[1]]
    return fuse, split


def _maps(*rows: tuple) -> dict[str, _ParamMap]:
    return {row[0]: _ParamMap(*row) for row in rows}


# Per variant: megatron TransformerLayer parameter -> the reference parameters it holds. Row-parallel biases are
# applied after the all-reduce, so megatron keeps them whole on every rank.
PARAM_MAPS: dict[str, dict[str, _ParamMap]] = {
    "transformer": _maps(
        ("input_layernorm.weight", ("ln1.weight",), None),
        ("input_layernorm.bias", ("ln1.bias",), None),
        ("self_attention.linear_qkv.weight", ("qkv.weight",), 0, _mha_fuse, _mha_split),
        ("self_attention.linear_qkv.bias", ("qkv.bias",), 0, _mha_fuse, _mha_split),
        ("self_attention.linear_proj.weight", ("proj.weight",), 1),
        ("self_attention.linear_proj.bias", ("proj.bias",), None),
        ("pre_mlp_layernorm.weight", ("ln2.weight",), None),
        ("pre_mlp_layernorm.bias", ("ln2.bias",), None),
        ("mlp.linear_fc1.weight", ("fc1.weight",), 0),
        ("mlp.linear_fc1.bias", ("fc1.bias",), 0),
        ("mlp.linear_fc2.weight", ("fc2.weight",), 1),
        ("mlp.linear_fc2.bias", ("fc2.bias",), None),
    ),
    "llama": _maps(
        ("input_layernorm.weight", ("attn_norm.weight",), None),
        ("self_attention.linear_qkv.weight", ("q_proj.weight", "k_proj.weight", "v_proj.weight"), 0,
         _gqa_fuse, _gqa_split),
        ("self_attention.linear_proj.weight", ("o_proj.weight",), 1),
        ("pre_mlp_layernorm.weight", ("mlp_norm.weight",), None),
        ("mlp.linear_fc1.weight", ("gate_proj.weight", "up_proj.weight"), 0, _glu_fuse, _glu_split),
        ("mlp.linear_fc2.weight", ("down_proj.weight",), 1),
    ),
    "decoder": _maps(
        ("input_layernorm.weight", ("ln1.weight",), None),
        ("input_layernorm.bias", ("ln1.bias",), None),
        ("self_attention.linear_qkv.weight", ("q_self.weight", "k_self.weight", "v_self.weight"), 0, _per_head,
         _per_head_split(3)),
        ("self_attention.linear_qkv.bias", ("q_self.bias", "v_self.bias"), 0, *_no_key_bias(first=True)),
        ("self_attention.linear_proj.weight", ("self_proj.weight",), 1),
        ("self_attention.linear_proj.bias", ("self_proj.bias",), None),
        ("pre_cross_attn_layernorm.weight", ("ln2.weight",), None),
        ("pre_cross_attn_layernorm.bias", ("ln2.bias",), None),
        ("cross_attention.linear_q.weight", ("q_cross.weight",), 0),
        ("cross_attention.linear_q.bias", ("q_cross.bias",), 0),
        ("cross_attention.linear_kv.weight", ("k_cross.weight", "v_cross.weight"), 0, _per_head, _per_head_split(2)),
        ("cross_attention.linear_kv.bias", ("v_cross.bias",), 0, *_no_key_bias(first=False)),
        ("cross_attention.linear_proj.weight", ("cross_proj.weight",), 1),
        ("cross_attention.linear_proj.bias", ("cross_proj.bias",), None),
        ("pre_mlp_layernorm.weight", ("ln3.weight",), None),
        ("pre_mlp_layernorm.bias", ("ln3.bias",), None),
        ("mlp.linear_fc1.weight", ("fc1.weight",), 0),
        ("mlp.linear_fc1.bias", ("fc1.bias",), 0),
        ("mlp.linear_fc2.weight", ("fc2.weight",), 1),
        ("mlp.linear_fc2.bias", ("fc2.bias",), None),
        ("ln_mem.weight", ("ln_mem.weight",), None),  # on the block: megatron's layer does not normalise its context
        ("ln_mem.bias", ("ln_mem.bias",), None),
    ),
}


def seed_model_parallel_rng(seed: int, tp_rank: int) -> None:
    """Seed megatron's RNG tracker for this process (needed before building or running a block).

    On a CPU process with the compatibility layer applied this is ``megatron_compat.seed``; on GPU
    it is megatron's ``model_parallel_cuda_manual_seed`` with explicit ranks (no global state read).
    """
    if megatron_compat.is_applied():
        megatron_compat.seed(seed, tp_rank)
        return
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)


def build_layer_config(hidden_size: int, num_heads: int, ffn_hidden_size: int, tp_size: int,
                       variant: str = "transformer", num_kv_heads: int | None = None, **overrides):
    """The megatron ``TransformerConfig`` that makes one TransformerLayer equal the plain block of ``variant``;
    ``overrides`` replace or add ``TransformerConfig`` fields (a pretrained layer's eps, head width, qkv bias).

    Fusions are off on purpose: megatron's fused bias-GELU is the tanh approximation, and the plain
    block uses exact GELU.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    llama = variant == "llama"
    return TransformerConfig(**dict(
        num_layers=1,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        num_query_groups=num_kv_heads if llama else None,
        ffn_hidden_size=ffn_hidden_size,
        tensor_model_parallel_size=tp_size,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=not llama,
        layernorm_epsilon=1e-6 if llama else LAYERNORM_EPS,
        normalization="RMSNorm" if llama else "LayerNorm",
        activation_func=torch.nn.functional.silu if llama else torch.nn.functional.gelu,
        gated_linear_unit=llama,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_query_key_layer_scaling=False,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        sequence_parallel=False,
    ) | overrides)


def _layer_spec(variant: str):
    """The local layer spec of ``variant``: GPT's for the encoder block with self-attention switched from causal to
    unmasked (``AttnMaskType.padding`` with ``attention_mask=None`` makes the local ``DotProductAttention`` apply no
    mask; ``no_mask`` is documented as TE-only); GPT's for llama, causal with RMSNorm; T5's decoder layer (self-
    and cross-attention) for the decoder, unmasked too. Causal blocks pass their mask themselves: megatron would
    allocate its default one on CUDA."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    if variant == "llama":
        return get_gpt_layer_local_spec(normalization="RMSNorm")
    if variant == "decoder":  # T5's decoder layer; the block passes a causal mask when it has one
        from megatron.core.models.T5.t5_spec import decoder_model_with_local_spec

        spec = copy.deepcopy(decoder_model_with_local_spec())
        spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.padding}
        return spec
    spec = copy.deepcopy(get_gpt_layer_local_spec())
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.padding}
    return spec


def _ensure_global_memory_buffer() -> None:
    """Create megatron's process-global scratch buffer if ``initialize_model_parallel`` has not."""
    from megatron.core import parallel_state

    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()


def _check_rng_seeded() -> None:
    from megatron.core.tensor_parallel import random as mc_random

    states = mc_random.get_cuda_rng_tracker().get_states()
    if mc_random._MODEL_PARALLEL_RNG_TRACKER_NAME not in states:
        raise RuntimeError(
            "megatron's RNG tracker has no tensor-parallel state; call "
            "runtime.megatron_backend.seed_model_parallel_rng(seed, tp_rank) in this process "
            "before building a MegatronTransformerBlock"
        )


class MegatronTransformerBlock(nn.Module):
    """One plain block as a megatron-core TransformerLayer, tensor parallel over tp_group.

    Args:
        hidden_size: model width h; divisible by num_heads.
        num_heads: attention heads; divisible by tp_size.
        ffn_hidden_size: MLP width f; divisible by tp_size.
        tp_group: the process group this block's TP collectives run on (size tp_size, containing
            this process as rank tp_rank). A real group is needed even at tp_size 1.
        tp_rank, tp_size: this process's rank in tp_group and the group size (checked against it).
        variant: "transformer" (the encoder block), "llama" or "decoder".
        num_kv_heads: llama's key/value heads (megatron's query groups); divisible by tp_size.
        causal: a decoder's self-attention is causal (a token decoder; llama is always, the encoder never).
        head_dim: the width of one attention head (megatron's kv_channels); default hidden_size / num_heads.

    forward maps (B, S, H) to (B, S, H), float32 (a decoder's: ``(state, stream_len)`` as runtime.modules'
    DecoderBlock, the memory rows after the stream, normalised by the block's own ``ln_mem`` and passed through). Parameters are created on CPU
    (``use_cpu_initialization``) from megatron's init; move the module to a GPU yourself, and call
    ``load_reference`` to copy a plain block's weights in. Requires
    ``seed_model_parallel_rng`` first (and, on CPU, ``megatron_compat.apply_cpu_compat``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        ffn_hidden_size: int,
        tp_group: dist.ProcessGroup,
        tp_rank: int,
        tp_size: int,
        variant: str = "transformer",
        num_kv_heads: int | None = None,
        causal: bool = False,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        _validate_shapes(hidden_size, num_heads, ffn_hidden_size, tp_group, tp_rank, tp_size)
        if num_kv_heads % tp_size:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) is not divisible by tp_size ({tp_size})")
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.transformer_layer import TransformerLayer

        _ensure_global_memory_buffer()
        _check_rng_seeded()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.ffn_hidden_size = ffn_hidden_size
        self.tp_group = tp_group
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.variant = variant
        self.causal = causal or variant == "llama"
        self.param_map = self._param_map()
        if variant == "decoder":
            self.ln_mem = nn.LayerNorm(hidden_size, eps=LAYERNORM_EPS)
        # Only tp is used by the local-spec layer; cp (rotary/CP paths) and pp (layer offset, read
        # through get_pg_rank, which maps None to rank 0) stay None.
        pg_collection = ProcessGroupCollection(tp=tp_group, cp=None, pp=None)
        config = self._layer_config()
        self.layer = TransformerLayer(
            config=config, submodules=self._layer_spec().submodules, layer_number=1, pg_collection=pg_collection
        )
        if variant == "decoder":
            _rebuild_cross_projections(self.layer.cross_attention, config, tp_group)
        # Every megatron parameter must have a reference counterpart, or load/gather would miss it.
        assert set(_mapped(self)) == set(self.param_map), sorted(_mapped(self))
        # the key part of a fused bias (per local head [q, k, v] (self) or [k, v] (cross)): see _zero_key_bias_grad
        if variant in ("transformer", "decoder"):
            self.layer.self_attention.linear_qkv.bias.register_hook(functools.partial(self._zero_key_bias_grad, 3, 1))
        if variant == "decoder":
            self.layer.cross_attention.linear_kv.bias.register_hook(functools.partial(self._zero_key_bias_grad, 2, 0))

    # What a subclass (runtime.megatron_pretrained's block) replaces: the parameter map, the layer's config and spec,
    # and extra arguments of the layer's forward for a sequence of seq_len positions (its rotary embedding).
    def _param_map(self) -> dict[str, _ParamMap]:
        assert self.variant in PARAM_MAPS, self.variant
        return PARAM_MAPS[self.variant]

    def _layer_config(self):
        return build_layer_config(self.hidden_size, self.num_heads, self.ffn_hidden_size, self.tp_size, self.variant,
                                  self.num_kv_heads)

    def _layer_spec(self):
        return _layer_spec(self.variant)

    def _layer_kwargs(self, seq_len: int) -> dict:
        return {}

    def _zero_key_bias_grad(self, parts: int, key: int, grad: torch.Tensor) -> torch.Tensor:
        """Make the key part of a fused bias gradient exactly zero, as the plain block (which has no key bias) does.

        A key bias adds the same q.b_k to every score of a query, which softmax ignores, so its true
        gradient is zero; autograd leaves float noise there, which AdamW would amplify into updates.
        Local layout: per local head, ``parts`` row blocks of d, the key's at index ``key``.
        """
        local_heads = self.num_heads // self.tp_size
        grad = grad.clone()
        grad.view(local_heads, parts, -1)[:, key, :] = 0
        return grad

    def forward(self, x: torch.Tensor, stream_len: int | None = None) -> torch.Tensor:
        """(B, S, H) -> (B, S, H); megatron works in [S, B, H] inside."""
        memory = None
        if self.variant == "decoder":
            x, memory = x[:, :stream_len], x[:, stream_len:]
        hidden = x.transpose(0, 1).contiguous()
        mask = None
        if self.causal:  # True = masked: key j > query i
            s = x.shape[1]
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1).view(1, 1, s, s)
        if memory is None:
            out, _ = self.layer(hidden, attention_mask=mask, **self._layer_kwargs(x.shape[1]))
            return out.transpose(0, 1)
        context = self.ln_mem(memory).transpose(0, 1).contiguous()
        out, _ = self.layer(hidden, attention_mask=mask, context=context, context_mask=None)
        return torch.cat([out.transpose(0, 1), memory], dim=1)


def _rebuild_cross_projections(attention: nn.Module, config, tp_group: dist.ProcessGroup) -> None:
    """megatron-core 0.16.1's ``CrossAttention`` builds ``linear_q`` and ``linear_kv`` without its process groups'
    ``tp_group`` (its self-attention passes it), so they fall back to the global parallel state, which this backend
    never initialises, and come out whole on every rank while the attention splits its heads over ``tp_group``.
    Rebuild both as column-parallel over ``tp_group``, with the arguments megatron uses."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    for name, width in (("linear_q", attention.query_projection_size), ("linear_kv", 2 * attention.kv_projection_size)):
        setattr(attention, name, ColumnParallelLinear(
            config.hidden_size, width, config=config, init_method=config.init_method, gather_output=False,
            bias=config.add_bias_linear, skip_bias_add=False, is_expert=False, tp_group=tp_group,
        ))


def _validate_shapes(
    hidden_size: int, num_heads: int, ffn_hidden_size: int, tp_group: dist.ProcessGroup,
    tp_rank: int, tp_size: int,
) -> None:
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) is not divisible by num_heads ({num_heads})")
    if num_heads % tp_size:
        raise ValueError(f"num_heads ({num_heads}) is not divisible by tp_size ({tp_size})")
    if ffn_hidden_size % tp_size:
        raise ValueError(f"ffn_hidden_size ({ffn_hidden_size}) is not divisible by tp_size ({tp_size})")
    if tp_group is None:
        raise ValueError("tp_group is None; pass a process group (a single-rank group for tp_size 1)")
    if tp_group.size() != tp_size or tp_group.rank() != tp_rank:
        raise ValueError(
            f"tp_group (size {tp_group.size()}, this rank {tp_group.rank()}) does not match "
            f"tp_size ({tp_size}) and tp_rank ({tp_rank})"
        )


def _mapped(block: MegatronTransformerBlock) -> dict[str, nn.Parameter]:
    """The block's parameters by map name: the megatron layer's, and the block's own (a decoder's ``ln_mem``)."""
    return {name.removeprefix("layer."): param for name, param in block.named_parameters()}


def _shard(full: torch.Tensor, where: _ParamMap, block: MegatronTransformerBlock) -> torch.Tensor:
    """This rank's piece of a fused full tensor."""
    return full if where.dim is None else full.chunk(block.tp_size, dim=where.dim)[block.tp_rank]


def _unshard(local: torch.Tensor, where: _ParamMap, block: MegatronTransformerBlock) -> list[torch.Tensor]:
    """The full reference tensors from every rank's piece (collective over block.tp_group)."""
    if where.dim is None:
        return where.split(local.clone(), block)
    local = local.contiguous()
    pieces = [torch.empty_like(local) for _ in range(block.tp_size)]
    dist.all_gather(pieces, local, group=block.tp_group)
    return where.split(torch.cat(pieces, dim=where.dim), block)


def load_reference(block: MegatronTransformerBlock, reference_module: nn.Module) -> None:
    """Copy a plain block's full weights into this rank's TP shards of ``block`` (no communication).

    ``reference_module`` must expose the reference parameters of the block's variant (``PARAM_MAPS``) with the
    plain block's shapes. Every rank must pass the same reference weights.
    """
    reference = dict(reference_module.named_parameters())
    local = _mapped(block)
    wanted = sorted(r for where in block.param_map.values() for r in where.references)
    missing = sorted(set(wanted) - set(reference))
    if missing:
        raise ValueError(f"reference_module lacks parameters {missing}; expected {wanted}")
    with torch.no_grad():
        for name, where in block.param_map.items():
            full = where.fuse([reference[r].detach() for r in where.references], block)
            shard = _shard(full, where, block)
            if shard.shape != local[name].shape:
                raise ValueError(
                    f"reference {', '.join(where.references)} give a shard of {tuple(shard.shape)}, but megatron's "
                    f"{name} is {tuple(local[name].shape)}"
                )
            local[name].copy_(shard)


def _gather(block: MegatronTransformerBlock, tensor_of: Callable[[nn.Parameter], torch.Tensor | None]
            ) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in _mapped(block).items():
        where, local = block.param_map[name], tensor_of(param)
        if local is not None:
            out.update(zip(where.references, _unshard(local.detach(), where, block)))
    return out


def gather_reference_weights(block: MegatronTransformerBlock) -> dict[str, torch.Tensor]:
    """Full weights of ``block`` in the reference layout (the inverse of ``load_reference``).

    A collective over ``block.tp_group``; every rank gets the full tensors (detached copies).
    """
    with torch.no_grad():
        return _gather(block, lambda p: p)


def gather_reference_grads(block: MegatronTransformerBlock) -> dict[str, torch.Tensor]:
    """Full gradients of ``block`` in the reference layout, keyed by reference parameter name.

    A collective over ``block.tp_group``: every rank of the group must call it, and every rank
    gets the full tensors. Replicated parameters (norms, row-parallel biases) already hold the
    full gradient on each rank and are returned as is. Parameters without a gradient are skipped.
    """
    return _gather(block, lambda p: p.grad)


def owned_fractions(block: MegatronTransformerBlock) -> dict[str, float]:
    """For each of ``block.named_parameters()``: the part of its gradient's squares this rank adds to a global norm
    (gradient clipping), so that the sum over the TP group counts every element of the layer once: 1 for a TP shard
    (each rank holds another part), ``1 / tp_size`` for a replicated parameter (norms, row-parallel biases: each
    rank holds all of it, with the same gradient)."""
    return {name: 1.0 if block.param_map[name.removeprefix("layer.")].dim is not None else 1.0 / block.tp_size
            for name, _ in block.named_parameters()}
