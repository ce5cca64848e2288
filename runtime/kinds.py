"""Component kinds, runtime side: one :class:`RuntimeKind` entry per kind (:data:`RUNTIME_KINDS`, keyed by the names
of planner.kinds.KINDS; a test checks both registries name the same kinds) holding the torch builders of the kind:
its layers, its input module (embedding), the keyword arguments its layers take and how its input module reads a
batch. Everything else the runtime asks of a kind (what a root use reads, bridge, tensor-parallel variant, MLP width)
is a property of its planner entry. Callers go through runtime.modules (build_layer, layer_kwargs) and
runtime.embeddings (build_embed, use_input), which compare no kind names.

Imports no runtime module at import time (runtime.modules and runtime.embeddings import this one); each builder
imports the classes it builds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from planner.kinds import kind_of
from planner.spec import ComponentSpec, JobSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from planner.metagraph import MetaOp  # planner MetaOps and the plan's alike

Factory = Callable[[], "nn.Module"]


# --------------------------------------------------------------------------- layers


def _transformer_layer(job: JobSpec, op: MetaOp, index: int) -> Factory:
    from runtime.modules import TransformerBlock

    comp = job.components[op.component]
    return lambda: TransformerBlock(comp.hidden_size, comp.num_heads, kind_of(comp).ffn_size(comp))


def _llama_layer(job: JobSpec, op: MetaOp, index: int) -> Factory:
    from runtime.modules import LlamaBlock

    comp = job.components[op.component]
    kv = comp.num_kv_heads or comp.num_heads
    return lambda: LlamaBlock(comp.hidden_size, comp.num_heads, kv, kind_of(comp).ffn_size(comp), job.training.kernels)


def _mlp_layer(job: JobSpec, op: MetaOp, index: int) -> Factory:
    from runtime.modules import MlpBlock

    comp = job.components[op.component]
    return lambda: MlpBlock(comp.hidden_size)


def _decoder_layer(job: JobSpec, op: MetaOp, index: int) -> Factory:
    from runtime.modules import DecoderBlock

    comp = job.components[op.component]
    return lambda: DecoderBlock(comp.hidden_size, comp.num_heads, kind_of(comp).ffn_size(comp), is_token_decoder(comp))


def _unet_layer(job: JobSpec, op: MetaOp, index: int) -> Factory:
    from runtime.modules import context_width, use_shape_of
    from runtime.unet import build_unet_layer

    comp = job.components[op.component]
    side = use_shape_of(job, op).image_size
    return lambda: build_unet_layer(comp, op.component, op.segment, index, side, context_width(job, op.component))


# --------------------------------------------------------------------------- input modules


def _token_embed(job: JobSpec, component: str, max_len: int) -> Factory:
    from runtime.embeddings import TokenEmbedding
    from runtime.modules import DEFAULT_VOCAB

    comp = job.components[component]
    return lambda: TokenEmbedding(comp.vocab_size or DEFAULT_VOCAB, comp.hidden_size, max_len)


def _patch_embed(job: JobSpec, component: str, max_len: int) -> Factory:
    from runtime.embeddings import PatchEmbedding

    comp = job.components[component]
    return lambda: PatchEmbedding(image_channels(comp), comp.hidden_size, comp.patch_size, max_len)


def _feature_embed(job: JobSpec, component: str, max_len: int) -> Factory:
    from runtime.embeddings import FeatureEmbedding

    comp = job.components[component]
    return lambda: FeatureEmbedding(comp.hidden_size)


def _decoder_bridge(job: JobSpec, component: str, max_len: int) -> Factory:
    from runtime.embeddings import DecoderBridge
    from runtime.modules import memory_width

    comp = job.components[component]
    width = memory_width(job, component)
    return lambda: DecoderBridge(width, comp.hidden_size, max_len, comp.vocab_size)


def _unet_input(job: JobSpec, component: str, max_len: int) -> Factory:
    from runtime.modules import context_width
    from runtime.unet import UNetInput

    comp = job.components[component]
    context_width(job, component)  # every use cross-attends or none does
    return lambda: UNetInput(comp, image_channels(comp))


# --------------------------------------------------------------------------- layer arguments and inputs


def _no_kwargs(job: JobSpec, op: MetaOp) -> dict[str, int]:
    return {}


def _decoder_kwargs(job: JobSpec, op: MetaOp) -> dict[str, int]:
    from runtime.modules import use_shape_of

    return {"stream_len": use_shape_of(job, op).seq_len}


def _unet_kwargs(job: JobSpec, op: MetaOp) -> dict[str, int]:
    from runtime.modules import use_shape_of

    shape = use_shape_of(job, op)
    return {"side": shape.image_size, "context_len": shape.cross_len or 0}


def _raw_input(job: JobSpec, op: MetaOp, embed: nn.Module, upstream: torch.Tensor | None, batch) -> torch.Tensor:
    assert upstream is None, f"{op.name} reads no input module"
    return embed(batch.inputs[op.use])


def _image_input(job: JobSpec, op: MetaOp, embed: nn.Module, upstream: torch.Tensor | None, batch) -> torch.Tensor:
    """A root use's images from the batch; a use reading a sample use's samples embeds them as its images
    (runtime.sampleop.sample_pixels)."""
    if upstream is None:
        return embed(batch.inputs[op.use])
    from runtime.sampleop import sample_pixels

    return embed(sample_pixels(job, op, upstream))


def _token_input(job: JobSpec, op: MetaOp, embed: nn.Module, upstream: torch.Tensor | None, batch) -> torch.Tensor:
    """Token ids, with a packed row's per-document position ids when the batch has them (runtime.sources)."""
    from runtime.tokenizer import positions_key

    positions = batch.targets.get(positions_key(op.use))
    if positions is None:
        return _raw_input(job, op, embed, upstream, batch)
    return embed(batch.inputs[op.use], positions=positions)


def _decoder_input(job: JobSpec, op: MetaOp, embed: nn.Module, upstream: torch.Tensor | None, batch) -> torch.Tensor:
    if upstream is None:
        return embed(batch.inputs[op.use])
    return embed(upstream, batch.inputs.get(op.use), **_decoder_kwargs(job, op))


def _unet_input_of(job: JobSpec, op: MetaOp, embed: nn.Module, upstream: torch.Tensor | None, batch) -> torch.Tensor:
    from runtime.unet import timesteps_key

    return embed(batch.inputs[op.use], batch.targets[timesteps_key(op.use)], upstream)


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class RuntimeKind:
    """The torch builders of one component kind."""

    name: str
    layer: Callable[[JobSpec, MetaOp, int], Factory]  # (job, op, layer index) -> factory of that layer
    embed: Callable[[JobSpec, str, int], Factory]  # (job, component, longest use) -> factory of its input module
    layer_kwargs: Callable[[JobSpec, MetaOp], dict[str, int]] = _no_kwargs  # keyword arguments of its layers
    # (job, op, input module, upstream output or None, batch) -> what the op's first layer reads
    use_input: Callable[..., torch.Tensor] = _raw_input


RUNTIME_KINDS: dict[str, RuntimeKind] = {k.name: k for k in (
    RuntimeKind("transformer", _transformer_layer, _token_embed, use_input=_token_input),
    RuntimeKind("vit", _transformer_layer, _patch_embed, use_input=_image_input),
    RuntimeKind("llama", _llama_layer, _token_embed, use_input=_token_input),
    RuntimeKind("decoder", _decoder_layer, _decoder_bridge, _decoder_kwargs, _decoder_input),
    RuntimeKind("mlp", _mlp_layer, _feature_embed),
    RuntimeKind("unet2d", _unet_layer, _unet_input, _unet_kwargs, _unet_input_of),
)}


def runtime_kind(comp: ComponentSpec, name: str) -> RuntimeKind:
    """The runtime entry of component ``name``'s kind; NotImplementedError for a kind the planner knows but the runtime
    does not build, SpecError for a kind neither knows."""
    kind_of(comp, name)
    entry = RUNTIME_KINDS.get(comp.kind)
    if entry is None:
        raise NotImplementedError(
            f"components.{name}: kind '{comp.kind}' is planned but the runtime does not run it yet; "
            f"supported kinds: {', '.join(RUNTIME_KINDS)}."
        )
    return entry


# --------------------------------------------------------------------------- properties read from the planner entry


def image_channels(comp: ComponentSpec) -> int:
    """Input channels of a vit component's images (3, RGB, when unset) or a unet2d's latents (4 when unset): the
    kind's ``in_channels`` default."""
    return comp.in_channels or kind_of(comp).in_channels


def is_token_decoder(comp: ComponentSpec) -> bool:
    """A decoder with a vocabulary reads token ids (causal, teacher-forced); without one it runs learned queries."""
    return kind_of(comp).queries and comp.vocab_size is not None

