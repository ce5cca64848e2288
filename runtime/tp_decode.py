"""Tensor-parallel decoding: a megatron-core llama block (runtime.megatron_backend.MegatronTransformerBlock, or
runtime.megatron_pretrained's block of a pretrained Llama-family layer) on new positions with a KV cache of this
rank's heads, and the weight hand-off that delivers a TP rank its shard.

:func:`decode` is what runtime.modules.LlamaBlock.decode computes (and, for a pretrained block, with RoPE and the
prompt mask, what runtime.generate.PretrainedDecoder does), on the block's own megatron modules: the input
norm, megatron's fused column-parallel ``linear_qkv`` split into this rank's query heads and key/value groups by
megatron's own ``get_query_key_value_tensors``, softmax attention of the local heads over the cached keys and values
(query head i of a rank reads its local group i // (heads / groups), as megatron's ``DotProductAttention`` repeats
them), the row-parallel ``linear_proj`` (its all-reduce over the block's TP group sums the heads of every rank), the
residual, then megatron's ``_forward_mlp`` (pre-MLP norm, column-parallel gated fc1, row-parallel fc2, residual). The
cache of a rank holds its ``num_kv_heads / tp`` groups: ``(B, P, groups / tp, d)`` keys and values per layer. Every
TP rank of a group runs the same positions and ends with the same hidden state (the all-reduces), so the replicated
LM head gives the same logits on each; runtime.generate still draws each token on the group's first rank and
broadcasts it (:func:`agree_on_first`), so the ranks agree whatever the collectives' rounding.

Hand-off (runtime.rollout.Roles): a decoding rank that does not train the layers receives, after each optimizer step,
its TP shard only (:func:`shard_of`: the reference layer's parameters fused and cut as megatron lays them out, the
order of the block's parameter map): a trainer at the same degree and TP rank sends its own shard; a trainer that
holds the whole layer (tensor_parallel 1) cuts it; a trainer holding another shard first gathers the whole layer in
its TP group (:func:`needs_gather`), then cuts it (a whole-layer receiver, decoding at tensor_parallel 1 or a
``weights_from`` copy run whole, takes it all).
:func:`flat_shard` and :func:`receive_order` are the two ends.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def decode(block: nn.Module, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None,
           positions: torch.Tensor | None = None, mask: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``block`` (a llama MegatronTransformerBlock, or runtime.megatron_pretrained's block of a Llama-family layer) on
    ``x`` ``(B, s, H)``, the positions after ``past`` (keys and values ``(B, P, local groups, d)``; None: the prompt's
    prefill, causal). A pretrained block rotates queries and keys by the model's RoPE at ``positions`` ``(B, s)`` (its
    rotary embedding's frequencies, megatron's non-interleaved halves) and attends where ``mask`` ``(B, 1, s, P + s)``
    is True (None: causal over the prefill, every cached position after it), as runtime.generate.PretrainedDecoder.
    Returns the output ``(B, s, H)`` (the same on every rank of the block's TP group) and the keys and values of all
    ``P + s`` positions."""
    assert block.variant in ("llama", "pretrained"), block.variant
    assert past is None or x.shape[1] == 1, "decode takes the whole prompt, then one position at a time"
    layer, attn = block.layer, block.layer.self_attention
    hidden = x.transpose(0, 1).contiguous()  # megatron's [s, B, H]
    query, key, value = attn.get_query_key_value_tensors(layer.input_layernorm(hidden))  # q/k norms applied
    if block.variant == "pretrained":
        query, key = (_rotate(t, block, positions) for t in (query, key))
    k, v = key.transpose(0, 1), value.transpose(0, 1)  # (B, s, groups, d)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
    per_group = query.shape[2] // k.shape[2]
    q = query.permute(1, 2, 0, 3)  # (B, heads, s, d)
    keys, values = (t.repeat_interleave(per_group, dim=2).transpose(1, 2) for t in (k, v))
    context = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=past is None and mask is None)
    context = context.permute(2, 0, 1, 3).reshape(hidden.shape[0], hidden.shape[1], -1)  # [s, B, heads * d]
    out, bias = attn.linear_proj(context)
    hidden = hidden + (out if bias is None else out + bias)
    hidden = layer._forward_mlp(hidden)
    if isinstance(hidden, tuple):
        hidden = hidden[0]
    return hidden.transpose(0, 1), (k, v)


def _rotate(t: torch.Tensor, block: nn.Module, positions: torch.Tensor) -> torch.Tensor:
    """``t`` ``[s, B, heads, d]`` rotated by ``block``'s RoPE at ``positions`` ``(B, s)``: megatron's unfused
    non-interleaved rotation (``t * cos + rotate_half(t) * sin``, the two halves of each head together; Hugging Face's
    ``rotate_half``), with the frequencies of megatron's ``RotaryEmbedding`` read per row."""
    freqs = block.rotary(int(positions.max()) + 1)[:, 0, 0, :]  # (L, d): the angles of positions 0..L-1
    angles = freqs[positions].transpose(0, 1).unsqueeze(2).to(t.dtype)  # [s, B, 1, d]
    first, second = t.chunk(2, dim=-1)
    return t * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()


class DecodingBlock:
    """A megatron llama block with the ``decode`` of runtime.modules.LlamaBlock (what runtime.generate.LoomDecoder
    calls on each layer)."""

    def __init__(self, block: nn.Module):
        self.block = block

    def decode(self, x: torch.Tensor, past=None):
        return decode(self.block, x, past)


class PretrainedTensorParallelDecoder:
    """runtime.generate.PretrainedDecoder over runtime.megatron_pretrained's tensor-parallel blocks: the model's input
    module and LM head whole (``embed``, ``head``), each layer's KV cache of this rank's key/value groups; positions
    and masks as PretrainedDecoder's (a left-padded prompt decodes as unpadded)."""

    def __init__(self, embed: nn.Module, blocks, head):
        self.embed, self.blocks, self.head = embed, list(blocks), head
        self.cache: list = []

    def start(self) -> None:
        self.cache = [None] * len(self.blocks)

    def __call__(self, ids: torch.Tensor, start: int, keys: torch.Tensor | None = None) -> torch.Tensor:
        from runtime.generate import masked_positions, query_mask

        if keys is None:
            positions = torch.arange(start, start + ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
            mask = None
        else:
            positions, mask = masked_positions(keys)[:, start:], query_mask(keys, start, ids.shape[1])
        x = self.embed(ids)
        for i, block in enumerate(self.blocks):
            x, self.cache[i] = decode(block, x, self.cache[i], positions, mask)
        return self.head(x)


def agree_on_first(group, first: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The tokens a TP group decodes next: rank ``first``'s (the group's first, global rank), broadcast over
    ``group``; every rank of the group calls it at the same decode step."""
    def agree(token: torch.Tensor) -> torch.Tensor:
        token = token.contiguous()
        dist.broadcast(token, src=first, group=group)
        return token
    return agree


def _layout(param_map, num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int):
    """The attributes of a block that the parameter map's fuse functions and ``_shard`` read
    (runtime.megatron_backend), without building one."""
    return SimpleNamespace(param_map=param_map, num_heads=num_heads, num_kv_heads=num_kv_heads, tp_size=tp_size,
                           tp_rank=tp_rank)


def shard_of(params: dict[str, torch.Tensor], param_map, num_heads: int, num_kv_heads: int, tp_size: int,
             tp_rank: int) -> list[torch.Tensor]:
    """TP rank ``tp_rank``'s shard at degree ``tp_size`` of a plain layer's parameters ``params`` (name -> tensor,
    runtime.modules' names): one tensor per entry of ``param_map`` (runtime.megatron_backend.PARAM_MAPS[variant]) in
    its order, as runtime.megatron_backend.load_reference cuts them."""
    from runtime.megatron_backend import _shard

    where_block = _layout(param_map, num_heads, num_kv_heads, tp_size, tp_rank)
    out = []
    for where in param_map.values():
        full = where.fuse([params[r].detach() for r in where.references], where_block)
        out.append(_shard(full, where, where_block))
    return out


def local_shard(block: nn.Module) -> list[torch.Tensor]:
    """A megatron block's own parameters in its parameter map's order (the shard a receiver at its degree and TP rank
    takes)."""
    from runtime.megatron_backend import _mapped

    local = _mapped(block)
    return [local[name].detach() for name in block.param_map]


def needs_gather(held: tuple[int, int] | None, receiver: tuple[int, int] | None) -> bool:
    """Whether a sender holding shard ``held`` (tp_size, tp_rank) of a layer (None: the whole layer) must first gather
    its TP group's whole layer (runtime.megatron_backend.gather_reference_weights, collective over the group) to cut
    what ``receiver`` (tp_size, tp_rank; None: the whole layer) takes: it holds a shard, and not that one. A pure
    function of the two shards, so every rank of the sender's TP group decides the same (their all-gathers pair up);
    planner.handoff.hand_off_gathers prices the same gathers."""
    return held is not None and receiver != held


def flat_shard(module: nn.Module, receiver: tuple[int, int] | None,
               whole: dict[str, torch.Tensor] | None = None, matrices: torch.dtype | None = None) -> torch.Tensor:
    """What a sender holding ``module`` puts on the wire for a receiver that runs ``receiver`` = (tp_size, tp_rank),
    flattened: its shard, cut from the whole layer (``module`` itself when plain, runtime.modules.LlamaBlock; else
    ``whole``, the layer its TP group gathered: :func:`needs_gather`) or ``module``'s own shard (a megatron block at
    that degree and rank); ``receiver`` None: every parameter of the whole module, by name. ``matrices``: the dtype a
    receiver holding a copy only to decode with keeps its matrices in (runtime.rollout.lower_matrices), which they
    then cross in (:func:`pack_wire`); None: every tensor as the sender holds it."""
    from runtime.megatron_backend import MegatronTransformerBlock

    if whole is None and not isinstance(module, MegatronTransformerBlock):
        whole = {name: p.detach() for name, p in module.named_parameters()}  # a plain module
    if whole is None:
        assert not needs_gather((module.tp_size, module.tp_rank), receiver), "gather the layer first (needs_gather)"
        tensors = local_shard(module)
    elif receiver is None:
        tensors = [whole[name] for name in sorted(whole)]
    else:
        tensors = shard_of(whole, *_cut(module), *receiver)
    return torch.cat([t.reshape(-1) for t in tensors]) if matrices is None else pack_wire(tensors, matrices)


def is_matrix(t: torch.Tensor) -> bool:
    """Whether parameter ``t`` is a matrix: in a decoded layer or LM head exactly the linear layers' weights (norms and
    biases are vectors), which a copy only to decode with holds in the compute precision."""
    return t.dim() == 2


def wire_dtype(t: torch.Tensor, matrices: torch.dtype) -> torch.dtype:
    """The dtype parameter ``t`` (or a tensor of its shape) crosses in to a receiver keeping matrices in
    ``matrices``: that for a matrix, float32 for the rest."""
    return matrices if is_matrix(t) else torch.float32


def pack_wire(tensors: list[torch.Tensor], matrices: torch.dtype) -> torch.Tensor:
    """``tensors`` as one byte buffer, each in :func:`wire_dtype`, in order (:func:`unpack_wire` is the other end)."""
    return torch.cat([t.detach().to(wire_dtype(t, matrices)).reshape(-1).view(torch.uint8) for t in tensors])


def packed_bytes(params: list[torch.Tensor], matrices: torch.dtype) -> int:
    """Bytes of :func:`pack_wire` of tensors shaped as ``params``."""
    return sum(p.numel() * wire_dtype(p, matrices).itemsize for p in params)


def unpack_wire(buf: torch.Tensor, params: list[torch.Tensor], matrices: torch.dtype | None) -> None:
    """Copy ``buf`` into ``params``: a byte buffer (:func:`pack_wire` of tensors shaped as ``params``), or with
    ``matrices`` None a flat buffer holding every tensor in its own dtype (:func:`flat_shard` without ``matrices``)."""
    flat = buf.dtype
    buf = buf.view(torch.uint8)
    offset = 0
    for p in params:
        dtype = wire_dtype(p, matrices) if matrices is not None else flat
        n = p.numel() * dtype.itemsize
        chunk = buf[offset:offset + n]
        if offset % dtype.itemsize:  # after a bf16 matrix of an odd size: not aligned for a float32 view
            chunk = chunk.clone()
        p.copy_(chunk.view(dtype).view_as(p))
        offset += n
    assert offset == buf.numel(), (offset, buf.numel())


def _cut(module: nn.Module) -> tuple:
    """(parameter map, heads, key/value heads) of a layer as megatron-core shards it: a megatron block's own, a
    pretrained Llama-family layer's (runtime.megatron_pretrained), Loom's llama block's."""
    from runtime.megatron_backend import PARAM_MAPS, MegatronTransformerBlock
    from runtime.pretrained import PretrainedLayer

    if isinstance(module, MegatronTransformerBlock):
        return module.param_map, module.num_heads, module.num_kv_heads
    if isinstance(module, PretrainedLayer):
        from runtime.megatron_pretrained import PretrainedLayerShape, pretrained_param_map

        shape = PretrainedLayerShape(module)
        return pretrained_param_map(shape.qkv_bias, shape.qk_norm), shape.num_heads, shape.num_kv_heads
    return PARAM_MAPS["llama"], module.num_heads, module.num_kv_heads


def receive_order(module: nn.Module, receiver: tuple[int, int] | None) -> list[torch.Tensor]:
    """The parameters a receiver holding ``module`` fills from the wire, in the order :func:`flat_shard` sends them:
    a megatron block's in its parameter map's order, a whole module's by name."""
    from runtime.megatron_backend import MegatronTransformerBlock, _mapped

    if receiver is not None and isinstance(module, MegatronTransformerBlock):
        local = _mapped(module)
        return [local[name] for name in module.param_map]
    return [p for _, p in sorted(module.named_parameters())]
