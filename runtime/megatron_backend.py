"""A tensor-parallel transformer block on megatron-core layers (the megatron stage backend).

Owns ``MegatronTransformerBlock``, one megatron-core ``TransformerLayer`` (local, non-Transformer-
Engine spec) that computes exactly the runtime's plain-torch block (runtime/modules.py): pre-LN, no
dropout, ``x = x + proj(attn(ln1(x)))``, ``x = x + fc2(gelu(fc1(ln2(x))))``, LayerNorm eps 1e-5,
biased linears, non-causal softmax attention, exact GELU. It also owns the weight and gradient
mapping between that plain block (the reference layout) and this rank's TP shards:
``load_reference``, ``gather_reference_weights`` and ``gather_reference_grads``. Like the plain
block, it makes the gradient of the key part of the qkv bias exactly zero (its true value).

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
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from runtime import megatron_compat

logger = logging.getLogger(__name__)

LAYERNORM_EPS = 1e-5


@dataclass(frozen=True)
class _ParamMap:
    """Where a reference parameter lives in the megatron layer and how it is split over TP.

    kind: "replicated" (full copy on every rank), "column" (split along dim 0), "row" (split along
    dim 1), or "qkv" (split along dim 0 after re-ordering ``[q | k | v]`` into megatron's per-head
    ``[q_h, k_h, v_h]`` groups).
    """

    megatron_name: str
    kind: str


# Reference name -> megatron TransformerLayer parameter. The row-parallel biases are applied after
# the all-reduce, so megatron keeps them whole on every rank.
PARAM_MAP: dict[str, _ParamMap] = {
    "ln1.weight": _ParamMap("input_layernorm.weight", "replicated"),
    "ln1.bias": _ParamMap("input_layernorm.bias", "replicated"),
    "qkv.weight": _ParamMap("self_attention.linear_qkv.weight", "qkv"),
    "qkv.bias": _ParamMap("self_attention.linear_qkv.bias", "qkv"),
    "proj.weight": _ParamMap("self_attention.linear_proj.weight", "row"),
    "proj.bias": _ParamMap("self_attention.linear_proj.bias", "replicated"),
    "ln2.weight": _ParamMap("pre_mlp_layernorm.weight", "replicated"),
    "ln2.bias": _ParamMap("pre_mlp_layernorm.bias", "replicated"),
    "fc1.weight": _ParamMap("mlp.linear_fc1.weight", "column"),
    "fc1.bias": _ParamMap("mlp.linear_fc1.bias", "column"),
    "fc2.weight": _ParamMap("mlp.linear_fc2.weight", "row"),
    "fc2.bias": _ParamMap("mlp.linear_fc2.bias", "replicated"),
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


def build_layer_config(hidden_size: int, num_heads: int, ffn_hidden_size: int, tp_size: int):
    """The megatron ``TransformerConfig`` that makes one TransformerLayer equal the plain block.

    Fusions are off on purpose: megatron's fused bias-GELU is the tanh approximation, and the plain
    block uses exact GELU.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        ffn_hidden_size=ffn_hidden_size,
        tensor_model_parallel_size=tp_size,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=True,
        layernorm_epsilon=LAYERNORM_EPS,
        normalization="LayerNorm",
        activation_func=torch.nn.functional.gelu,
        gated_linear_unit=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_query_key_layer_scaling=False,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        sequence_parallel=False,
    )


def _non_causal_layer_spec():
    """The local GPT layer spec with self-attention switched from causal to unmasked.

    ``AttnMaskType.padding`` with ``attention_mask=None`` makes the local ``DotProductAttention``
    apply no mask (``no_mask`` is documented as TE-only, so it is not used).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType

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
    """One pre-LN transformer block as a megatron-core TransformerLayer, tensor parallel over tp_group.

    Args:
        hidden_size: model width h; divisible by num_heads.
        num_heads: attention heads; divisible by tp_size.
        ffn_hidden_size: MLP width f; divisible by tp_size.
        tp_group: the process group this block's TP collectives run on (size tp_size, containing
            this process as rank tp_rank). A real group is needed even at tp_size 1.
        tp_rank, tp_size: this process's rank in tp_group and the group size (checked against it).

    forward maps (B, S, H) to (B, S, H), float32, no mask. Parameters are created on CPU
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
    ) -> None:
        super().__init__()
        _validate_shapes(hidden_size, num_heads, ffn_hidden_size, tp_group, tp_rank, tp_size)
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.transformer_layer import TransformerLayer

        _ensure_global_memory_buffer()
        _check_rng_seeded()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.ffn_hidden_size = ffn_hidden_size
        self.tp_group = tp_group
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        # Only tp is used by the local-spec layer; cp (rotary/CP paths) and pp (layer offset, read
        # through get_pg_rank, which maps None to rank 0) stay None.
        pg_collection = ProcessGroupCollection(tp=tp_group, cp=None, pp=None)
        spec = _non_causal_layer_spec()
        config = build_layer_config(hidden_size, num_heads, ffn_hidden_size, tp_size)
        self.layer = TransformerLayer(
            config=config, submodules=spec.submodules, layer_number=1, pg_collection=pg_collection
        )
        # Every megatron parameter must have a reference counterpart, or load/gather would miss it.
        layer_names = {name for name, _ in self.layer.named_parameters()}
        assert layer_names == {m.megatron_name for m in PARAM_MAP.values()}, sorted(layer_names)
        self.layer.self_attention.linear_qkv.bias.register_hook(self._zero_key_bias_grad)

    def _zero_key_bias_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Make the key part of the qkv bias gradient exactly zero, as the plain block does.

        A key bias adds the same q.b_k to every score of a query, which softmax ignores, so its true
        gradient is zero; autograd leaves float noise there, which AdamW would amplify into updates.
        Local layout: per local head, rows [q (d), k (d), v (d)].
        """
        local_heads = self.num_heads // self.tp_size
        grad = grad.clone()
        grad.view(local_heads, 3, -1)[:, 1, :] = 0
        return grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, H) -> (B, S, H); megatron works in [S, B, H] inside."""
        hidden = x.transpose(0, 1).contiguous()
        out, _ = self.layer(hidden, attention_mask=None)
        return out.transpose(0, 1)


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


def _qkv_to_megatron(full: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder rows ``[q | k | v]`` (each heads x d) into ``[q_0, k_0, v_0, q_1, k_1, v_1, ...]``."""
    rest = full.shape[1:]
    head_dim = full.shape[0] // (3 * num_heads)
    return full.reshape(3, num_heads, head_dim, *rest).transpose(0, 1).reshape(full.shape)


def _qkv_from_megatron(full: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of ``_qkv_to_megatron``."""
    rest = full.shape[1:]
    head_dim = full.shape[0] // (3 * num_heads)
    return full.reshape(num_heads, 3, head_dim, *rest).transpose(0, 1).reshape(full.shape)


def _shard(full: torch.Tensor, kind: str, block: MegatronTransformerBlock) -> torch.Tensor:
    """This rank's piece of a full reference tensor."""
    if kind == "replicated":
        return full
    if kind == "qkv":
        full = _qkv_to_megatron(full, block.num_heads)
    dim = 1 if kind == "row" else 0
    return full.chunk(block.tp_size, dim=dim)[block.tp_rank]


def _unshard(local: torch.Tensor, kind: str, block: MegatronTransformerBlock) -> torch.Tensor:
    """The full reference tensor from every rank's piece (collective over block.tp_group)."""
    if kind == "replicated":
        return local.clone()
    dim = 1 if kind == "row" else 0
    local = local.contiguous()
    pieces = [torch.empty_like(local) for _ in range(block.tp_size)]
    dist.all_gather(pieces, local, group=block.tp_group)
    full = torch.cat(pieces, dim=dim)
    if kind == "qkv":
        full = _qkv_from_megatron(full, block.num_heads)
    return full


def load_reference(block: MegatronTransformerBlock, reference_module: nn.Module) -> None:
    """Copy a plain block's full weights into this rank's TP shards of ``block`` (no communication).

    ``reference_module`` must expose the parameters named in ``PARAM_MAP`` (``ln1``, ``qkv``,
    ``proj``, ``ln2``, ``fc1``, ``fc2``, each with weight and bias) with the plain block's shapes.
    Every rank must pass the same reference weights.
    """
    reference = dict(reference_module.named_parameters())
    local = dict(block.layer.named_parameters())
    missing = sorted(set(PARAM_MAP) - set(reference))
    if missing:
        raise ValueError(f"reference_module lacks parameters {missing}; expected {sorted(PARAM_MAP)}")
    with torch.no_grad():
        for name, where in PARAM_MAP.items():
            shard = _shard(reference[name].detach(), where.kind, block)
            target = local[where.megatron_name]
            if shard.shape != target.shape:
                raise ValueError(
                    f"reference {name} {tuple(reference[name].shape)} gives a shard of "
                    f"{tuple(shard.shape)}, but megatron's {where.megatron_name} is {tuple(target.shape)}"
                )
            target.copy_(shard)


def gather_reference_weights(block: MegatronTransformerBlock) -> dict[str, torch.Tensor]:
    """Full weights of ``block`` in the reference layout (the inverse of ``load_reference``).

    A collective over ``block.tp_group``; every rank gets the full tensors (detached copies).
    """
    local = dict(block.layer.named_parameters())
    with torch.no_grad():
        return {
            name: _unshard(local[where.megatron_name].detach(), where.kind, block)
            for name, where in PARAM_MAP.items()
        }


def gather_reference_grads(block: MegatronTransformerBlock) -> dict[str, torch.Tensor]:
    """Full gradients of ``block`` in the reference layout, keyed by reference parameter name.

    A collective over ``block.tp_group``: every rank of the group must call it, and every rank
    gets the full tensors. Replicated parameters (LayerNorms, row-parallel biases) already hold the
    full gradient on each rank and are returned as is. Parameters without a gradient are skipped.
    """
    local = dict(block.layer.named_parameters())
    grads: dict[str, torch.Tensor] = {}
    for name, where in PARAM_MAP.items():
        grad = local[where.megatron_name].grad
        if grad is None:
            continue
        grads[name] = _unshard(grad, where.kind, block)
    return grads
