"""Autoregressive decoding with a KV cache: what a ``mode: generate`` use runs (docs/runtime.md, Generation).

A generate use decodes its component's whole model in one MetaOp (the rule planner and runtime share: never split
across waves; it may be data parallel over rows and tensor parallel over a TP group's megatron-core shards,
runtime.tp_decode): it prefills the prompt (the use's ``seq_len``
tokens) in one pass, keeping every layer's keys and values, then decodes ``new_tokens`` tokens one at a time, each
step running only the newest position against the cache. Two model families:

- Loom's own ``llama`` kind (:class:`LoomDecoder`): its token embedding (learned positions, read at each new
  position), its ``LlamaBlock`` layers through :meth:`runtime.modules.LlamaBlock.decode` (keys and values cached per
  layer), and the logits of an LM head;
- a pretrained Llama-family causal LM (:class:`PretrainedDecoder`; transformers' LlamaForCausalLM, Qwen2, Qwen3,
  Mistral): the model's own decoder layers (runtime.pretrained.PretrainedLayer) with transformers' ``DynamicCache``
  passed as their ``cache`` (``past_key_values``) and the model's rotary embedding of the absolute positions.

The logits come from ``head`` (``(B, s, H) -> (B, s, V)``): :func:`lm_logits` of a runtime.heads.NextTokenHead-like
module (its final norm and output projection: for a pretrained model, the model's ``norm`` and ``lm_head``).

Sampling is reproducible whatever the placement: row ``r`` of a task's batch (prompt ``r // samples``, sample
``r % samples``) draws its ``new_tokens`` uniforms from its own ``torch.Generator`` seeded by (training seed, step,
task, prompt, sample) (:func:`row_generators`), and picks each token by inverting the CDF of the softmax of its
logits at ``temperature``; temperature 0 is greedy (argmax). So a row samples the same tokens on any worker, in any
data-parallel shard. After an ``eos_id`` token a row is finished: its later tokens are ``pad_id`` and do not count
(``Rollout.generated``).

Left-padded prompts (a ``prompt_mask``, False on the pads: runtime.tokenizer.prompt_mask_key) are decoded as if
unpadded: no position attends to a pad, and positions count the real tokens only (:func:`masked_positions`), so a row
samples what its prompt alone would. The uses reading the rollout attend the same way (runtime.modules.row_kwargs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.modules import stable_seed


@dataclass(frozen=True)
class Rollout:
    """What :func:`generate` returns: ``tokens`` ``(B, P + N)`` int64 (the prompt, then the generated tokens, ``pad_id``
    after a row's eos), ``generated`` ``(B, N)`` bool (the generated tokens that count: up to and including the first
    eos), ``logprobs`` ``(B, N)`` float32 (each generated token's log-probability under the model at temperature 1,
    0 where not ``generated``: the behaviour policy's, for an off-policy ratio), and ``logits`` ``(B, N, V)`` (the
    logits each token was drawn from, when asked for)."""

    tokens: torch.Tensor
    generated: torch.Tensor
    logprobs: torch.Tensor
    logits: torch.Tensor | None = None


def masked_positions(keys: torch.Tensor) -> torch.Tensor:
    """Position ids ``(B, S)`` of rows whose attended tokens are ``keys`` ``(B, S)`` bool: 0, 1, ... over the attended
    tokens (a left-padded prompt's first real token is 0, as unpadded), 0 before the first."""
    return (keys.long().cumsum(dim=1) - 1).clamp(min=0)


def query_mask(keys: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """The attention mask ``(B, 1, size, start + size)`` bool of queries at positions ``start..start + size - 1`` over
    every position so far: causal, never to a key outside ``keys`` ``(B, >= start + size)``; a masked query attends to
    itself only (no empty row). With ``start`` 0 it is runtime.tokenizer.document_mask of ``keys`` as segment ids."""
    total = start + size
    q = torch.arange(start, total, device=keys.device)[:, None]
    k = torch.arange(total, device=keys.device)[None, :]
    return ((keys[:, None, :total] & (k <= q)) | (k == q))[:, None]


def lm_logits(head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The logits of a next-token head (runtime.heads.NextTokenHead: its final norm, then its output projection)."""
    return lambda hidden: head.out(head.normed(hidden))


class LoomDecoder:
    """Loom's own llama kind with a KV cache: ``embed`` (runtime.embeddings.TokenEmbedding), ``layers``
    (runtime.modules.LlamaBlock) and ``head`` (hidden -> logits)."""

    def __init__(self, embed: nn.Module, layers: Sequence[nn.Module], head: Callable[[torch.Tensor], torch.Tensor]):
        self.embed, self.layers, self.head = embed, list(layers), head
        self.cache: list = []

    def start(self) -> None:
        self.cache = [None] * len(self.layers)

    def __call__(self, ids: torch.Tensor, start: int, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, s, V)`` of ``ids`` ``(B, s)`` at positions ``start..start + s - 1``, after the cached ones.
        ``keys``: which positions are attended (:func:`generate`); Loom's kinds have no padding token."""
        if keys is not None and not bool(keys.all()):
            raise ValueError("generate: a prompt mask with padding needs a pretrained causal LM; Loom's own llama "
                             "kind reads unpadded prompts.")
        positions = torch.arange(start, start + ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        x = self.embed(ids, positions=positions)
        for i, layer in enumerate(self.layers):
            x, self.cache[i] = layer.decode(x, self.cache[i])
        return self.head(x)


class PretrainedDecoder:
    """A pretrained Llama-family causal LM with transformers' ``DynamicCache``: ``embed``
    (runtime.pretrained.PretrainedInput), ``layers`` (runtime.pretrained.PretrainedLayer: the model's decoder layer and
    rotary embedding; layer i of the model keeps its ``layer_idx`` i in the cache) and ``head``."""

    def __init__(self, embed: nn.Module, layers: Sequence[nn.Module], head: Callable[[torch.Tensor], torch.Tensor]):
        self.embed, self.layers, self.head = embed, list(layers), head
        self.cache = None

    def start(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()

    def __call__(self, ids: torch.Tensor, start: int, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Logits as :meth:`LoomDecoder.__call__`; ``keys`` ``(B, start + s)`` bool: the positions attended (None:
        all, causal over a prompt through transformers' SDPA path, every cached position for one new token)."""
        if keys is None:
            positions, mask = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0), None
        else:
            positions, mask = masked_positions(keys)[:, start:], query_mask(keys, start, ids.shape[1])
        x = self.embed(ids)
        for layer in self.layers:
            x = layer.layer(x, attention_mask=mask, position_ids=positions, cache=self.cache, use_cache=True,
                            position_embeddings=layer.rotary(x, positions))
        return self.head(x)


def decoder_for(embed: nn.Module, layers: Sequence[nn.Module], head: Callable[[torch.Tensor], torch.Tensor]):
    """The cached decoder of a component's modules: :class:`PretrainedDecoder` for a pretrained causal LM's layers,
    else :class:`LoomDecoder`."""
    from runtime.pretrained import PretrainedLayer

    if all(isinstance(layer, PretrainedLayer) for layer in layers):
        if any(layer.rotary is None for layer in layers):
            raise ValueError("generate needs a causal LM; these pretrained layers have no rotary embedding "
                             "(an encoder or a text tower).")
        return PretrainedDecoder(embed, layers, head)
    from runtime.megatron_backend import MegatronTransformerBlock

    if any(isinstance(layer, MegatronTransformerBlock) for layer in layers):  # a tensor-parallel decode
        from runtime.tp_decode import DecodingBlock, PretrainedTensorParallelDecoder

        variants = {getattr(layer, "variant", None) for layer in layers}
        if variants == {"pretrained"}:
            return PretrainedTensorParallelDecoder(embed, layers, head)
        if variants != {"llama"}:
            raise ValueError(f"generate at tensor_parallel > 1 runs llama blocks or a pretrained causal LM's, not "
                             f"{sorted(str(v) for v in variants)} (runtime.tp_decode).")

        layers = [DecodingBlock(layer) if isinstance(layer, MegatronTransformerBlock) else layer for layer in layers]
    if not all(hasattr(layer, "decode") for layer in layers):
        names = sorted({type(layer).__name__ for layer in layers if not hasattr(layer, "decode")})
        raise ValueError(f"generate runs llama layers or a pretrained causal LM's, not {', '.join(names)}.")
    return LoomDecoder(embed, layers, head)


def sample_seed(seed: int, step: int, task: str, prompt: int, sample: int) -> int:
    """The seed of one sample's draws: the same on every worker that generates it."""
    return stable_seed("generate", seed, step, task, prompt, sample)


def row_generators(seed: int, step: int, task: str, rows: Sequence[int], samples: int) -> list[torch.Generator]:
    """One generator per row of a task's batch (row r: prompt r // samples, sample r % samples)."""
    return [torch.Generator().manual_seed(sample_seed(seed, step, task, r // samples, r % samples)) for r in rows]


@torch.no_grad()
def generate(decoder, prompts: torch.Tensor, new_tokens: int, temperature: float,
             generators: Sequence[torch.Generator], eos_id: int | None = None, pad_id: int = 0,
             keep_logits: bool = False, prompt_mask: torch.Tensor | None = None,
             agree: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Rollout:
    """Prefill ``prompts`` ``(B, P)``, then decode ``new_tokens`` tokens per row with ``decoder``'s KV cache
    (:func:`decoder_for`); row ``i`` draws from ``generators[i]`` (:func:`row_generators`). Stops early once every
    row has emitted ``eos_id``. ``prompt_mask`` ``(B, P)`` bool: False on a prompt's padding, never attended (module
    docstring). ``agree``: the tokens every rank of a tensor-parallel group decodes next, from the drawn ones (the
    group's first rank's, broadcast: runtime.tp_decode.agree_on_first); None in one process. See :class:`Rollout`."""
    rows, length = prompts.shape
    if len(generators) != rows:
        raise ValueError(f"generate: {len(generators)} generators for {rows} prompt rows; one per row.")
    uniforms = torch.stack([torch.rand(new_tokens, generator=g, dtype=torch.float64) for g in generators], dim=1)
    uniforms = uniforms.to(prompts.device)  # (N, B): token j's draws are row j, contiguous
    keys = None if prompt_mask is None else prompt_mask.to(device=prompts.device, dtype=torch.bool)
    def run(ids: torch.Tensor, start: int) -> torch.Tensor:  # keys only when masked: any decoder reads unmasked rows
        return (decoder(ids, start) if keys is None else decoder(ids, start, keys))[:, -1].float()

    decoder.start()
    logits = run(prompts, 0)
    done = torch.zeros(rows, dtype=torch.bool, device=prompts.device)
    out, valid, logprobs, kept = [], [], [], []
    for j in range(new_tokens):
        if keep_logits:
            kept.append(logits)
        if temperature == 0:
            token = logits.argmax(dim=-1)
        else:
            cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(dim=-1)
            token = torch.searchsorted(cdf, uniforms[j][:, None], right=True).squeeze(1).clamp(max=cdf.shape[-1] - 1)
        if agree is not None:
            token = agree(token)
        live = ~done
        token = torch.where(live, token, torch.full_like(token, pad_id))
        logprobs.append(torch.where(live, F.log_softmax(logits, dim=-1).gather(1, token[:, None]).squeeze(1), 0.0))
        out.append(token)
        valid.append(live)
        if eos_id is not None:
            done = done | (token == eos_id)
        if j == new_tokens - 1:
            break
        if bool(done.all()):  # every row has finished: the rest is padding
            rest = new_tokens - j - 1
            out += [torch.full_like(token, pad_id)] * rest
            valid += [torch.zeros_like(live)] * rest
            logprobs += [torch.zeros_like(logprobs[-1])] * rest
            kept += [torch.zeros_like(logits)] * (rest if keep_logits else 0)
            break
        if keys is not None:
            keys = torch.cat([keys, torch.ones_like(keys[:, :1])], dim=1)
        logits = run(token[:, None], length + j)
    return Rollout(torch.cat([prompts, torch.stack(out, dim=1)], dim=1), torch.stack(valid, dim=1),
                   torch.stack(logprobs, dim=1), torch.stack(kept, dim=1) if keep_logits else None)
