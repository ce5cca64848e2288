"""Component kinds, planner side: one :class:`KindSpec` entry per kind (:data:`KINDS`) carrying all the planner and
the runtime ask of a kind: the fields its layers require, how a use of it resolves to a shape, how it expands into
layer segments with their costs, and its properties (what a root use reads, whether its input module bridges an
upstream output, whether it adds its own text tokens, which megatron variant runs it tensor parallel, ...).

Code elsewhere asks the entry (``kind_of(comp).bridge``), never compares kind names. The runtime keeps the torch
builders of every kind in runtime.kinds, keyed by the same names (a test checks both registries name the same
kinds). Adding a kind: an entry here, one in runtime.kinds, and their tests.

A *segment* is a run of identical layers (same type, same input shape). Each carries the per-sample forward FLOPs,
parameters, saved-activation bytes (planner.memory: what the runtime's layer keeps for backward at the job's precision
and kernels) and boundary bytes of one layer, which is all the cost model needs.

Modelling choices (written down so benchmarks can be read): embeddings, patch projections and
final norms are folded away (under 2% of a layer stack's FLOPs for every workload in bench/);
attention FLOPs count the full s x s score matrix (causal kernels do about half).

Pure Python (no torch): ``loom plan`` and ``loom validate`` read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from planner.errors import SpecError, did_you_mean
from planner.memory import (LOOM_LLAMA, LOOM_TRANSFORMER, Block, SavedMode, decoder_bytes, mlp_bytes, pretrained_block,
                            transformer_bytes)
from planner.spec import ComponentSpec, TaskComponentSpec
from planner.unet import Context, block_cost, channel_mults, output_numel, state_numel, unet_blocks

BYTES_PER_ACT = 2  # bf16 activations crossing a wave boundary (planner.components scales them to the precision)


@dataclass(frozen=True)
class LayerSegment:
    """A run of ``count`` identical layers; every number is per layer and per sample unless named otherwise."""

    key: str  # layer type and input shape; equal keys mean identical workloads
    count: int
    flops_fwd: float  # forward FLOPs per sample
    params: float  # parameters per layer
    act_bytes: float  # activation bytes saved for backward, per sample
    out_bytes: float  # bytes of the layer's output (what crosses a wave boundary), per sample
    tp_comm_bytes: float  # bytes all-reduced per sample in forward under tensor parallelism
    num_kernels: int  # kernel launches in forward (a latency term)


@dataclass(frozen=True)
class UseShape:
    """The shape one task use resolves to."""

    seq_len: int
    image_size: int | None
    cross_len: int | None = None  # decoder, unet2d: length of the upstream output it cross-attends to
    cross_width: int | None = None  # unet2d: width of that output

    @property
    def context(self) -> Context | None:
        """What a unet2d use cross-attends to; None for a root use."""
        return Context(self.cross_len, self.cross_width) if self.cross_width else None


def need(comp: ComponentSpec, name: str, *fields: str) -> None:
    """Raise SpecError for the first of ``fields`` that component ``name`` leaves unset."""
    for field in fields:
        if getattr(comp, field) is None:
            raise SpecError(
                f"components.{name}.{field}: required for kind '{comp.kind}'. Add `{field}:` to the component."
            )


# --------------------------------------------------------------------------- MLP widths


def default_ffn_size(comp: ComponentSpec) -> int:
    """MLP width of a transformer-style layer: ffn_hidden_size, else 4 h."""
    return comp.ffn_hidden_size or 4 * comp.hidden_size


def llama_ffn_size(comp: ComponentSpec) -> int:
    """Llama MLP width: ffn_hidden_size, else 8/3 h rounded up to a multiple of 256."""
    return comp.ffn_hidden_size or 256 * ((8 * comp.hidden_size // 3 + 255) // 256)


# --------------------------------------------------------------------------- shapes


def _sequence_shape(comp: ComponentSpec, comp_name: str, use: TaskComponentSpec, where: str) -> UseShape:
    seq = use.seq_len or comp.seq_len
    if seq is None:
        raise SpecError(f"{where}.seq_len: required for a {comp.kind} use. Set it on the use or on components.{comp_name}.")
    return UseShape(seq, use.image_size or comp.image_size)


def _features_shape(comp: ComponentSpec, comp_name: str, use: TaskComponentSpec, where: str) -> UseShape:
    """A features use without a seq_len reads one vector per sample."""
    seq = use.seq_len or comp.seq_len
    return UseShape(seq, use.image_size or comp.image_size) if seq is not None else UseShape(1, None)


def _patches_shape(comp: ComponentSpec, comp_name: str, use: TaskComponentSpec, where: str) -> UseShape:
    image = use.image_size or comp.image_size
    need(comp, comp_name, "patch_size")  # before the divisibility check below uses it
    if image is None:
        raise SpecError(f"{where}.image_size: required for a vit use. Set it on the use or on components.{comp_name}.")
    if image % comp.patch_size:
        raise SpecError(
            f"{where}.image_size ({image}) is not a multiple of components.{comp_name}.patch_size "
            f"({comp.patch_size}). Use a multiple, e.g. {image // comp.patch_size * comp.patch_size or comp.patch_size}."
        )
    return UseShape((image // comp.patch_size) ** 2 + _class_tokens(comp), image)


def _class_tokens(comp: ComponentSpec) -> int:
    """Tokens a vit use has before its patches: Loom's own vit and CLIP have a class token, SigLIP has none (the
    pretrained model's architecture says)."""
    if comp.pretrained is None:
        return 1
    from planner.pretrained import class_tokens  # local: only pretrained components read a folder

    return class_tokens(comp.pretrained)


def _pixels_shape(comp: ComponentSpec, comp_name: str, use: TaskComponentSpec, where: str) -> UseShape:
    image = use.image_size or comp.image_size
    if image is None:
        raise SpecError(f"{where}.image_size: required for a unet2d use. Set it on the use or on components.{comp_name}.")
    levels = len(channel_mults(comp))
    if image % (2 ** (levels - 1)):
        raise SpecError(
            f"{where}.image_size ({image}) must be divisible by 2^{levels - 1} for {levels} resolution levels. "
            "Change the image size or channel_mults."
        )
    return UseShape(image * image, image)


# --------------------------------------------------------------------------- layer segments and costs


def _transformer_layer(
    tag: str, h: int, f: int, s: int, heads: int, act: float, *, gated: bool = False, kv_dim: int | None = None,
    cross_len: int | None = None,
) -> tuple[str, float, float, float, float, float, int]:
    """Key, FLOPs, parameters, saved bytes (``act``, per sample: planner.memory), output and tensor-parallel bytes and
    kernel launches of one transformer-family layer."""
    kv = kv_dim if kv_dim is not None else h
    attn_proj = 2 * s * h * (h + 2 * kv) + 2 * s * h * h  # q, k, v and output projections
    attn_core = 4 * s * s * h  # scores and weighted sum
    mlp = (6 if gated else 4) * s * h * f
    params = 2 * h * h + 2 * h * kv + (3 if gated else 2) * h * f
    flops = attn_proj + attn_core + mlp
    kernels = 16  # LN x2, QKV, attention (3-4 with softmax), output proj, 2 residual adds, MLP (3), dropouts
    if cross_len is not None:
        flops += 2 * s * h * h * 2 + 4 * cross_len * h * h + 4 * s * cross_len * h
        params += 4 * h * h
        kernels += 6
    key = f"{tag}[h={h},f={f},s={s},a={heads}" + (f",c={cross_len}" if cross_len else "") + "]"
    return key, float(flops), float(params), float(act), float(s * h * BYTES_PER_ACT), float(2 * s * h * BYTES_PER_ACT), kernels


def _block(comp: ComponentSpec, own: Block) -> Block:
    """The block the runtime builds for ``comp``: a pretrained model's own (planner.memory.pretrained_block), else
    Loom's ``own``."""
    if comp.pretrained is None:
        return own
    from planner.pretrained import resolve_pretrained  # local: only pretrained components read a folder

    info = resolve_pretrained(comp.pretrained)
    return pretrained_block(info.model_type, info.config)


def _transformer(comp: ComponentSpec, name: str, shape: UseShape, mode: SavedMode,
                 tag: str = "transformer") -> list[LayerSegment]:
    h, f, s = comp.hidden_size, default_ffn_size(comp), shape.seq_len
    act = s * transformer_bytes(_block(comp, LOOM_TRANSFORMER), mode, h, f, h, comp.num_heads)
    key, *rest = _transformer_layer(tag, h, f, s, comp.num_heads, act)
    return [LayerSegment(key, comp.num_layers, *rest)]


def _vit(comp: ComponentSpec, name: str, shape: UseShape, mode: SavedMode) -> list[LayerSegment]:
    return _transformer(comp, name, shape, mode, tag="vit")


def _llama(comp: ComponentSpec, name: str, shape: UseShape, mode: SavedMode) -> list[LayerSegment]:
    h, f, s = comp.hidden_size, llama_ffn_size(comp), shape.seq_len
    kv_dim = h * (comp.num_kv_heads or comp.num_heads) // comp.num_heads
    act = s * transformer_bytes(_block(comp, LOOM_LLAMA), mode, h, f, kv_dim, comp.num_heads)
    key, *rest = _transformer_layer("llama", h, f, s, comp.num_heads, act, gated=True, kv_dim=kv_dim)
    return [LayerSegment(key, comp.num_layers, *rest)]


def _decoder(comp: ComponentSpec, name: str, shape: UseShape, mode: SavedMode) -> list[LayerSegment]:
    """Self-attention over the use's stream, cross-attention to the memory, MLP. The memory travels with
    the stream through the layers (the runtime carries both in one tensor), so it counts in the boundary."""
    cross = shape.cross_len or comp.cross_seq_len
    if cross is None:
        raise SpecError(
            f"components.{name}.cross_seq_len: required for a decoder use with no upstream use to attend to. "
            "Add `cross_seq_len:` or feed the use from another use."
        )
    h, f = comp.hidden_size, default_ffn_size(comp)
    act = decoder_bytes(mode, h, f, comp.num_heads, shape.seq_len, cross)
    key, flops, params, act, _, tp_bytes, kernels = _transformer_layer(
        "decoder", h, f, shape.seq_len, comp.num_heads, act, cross_len=cross
    )
    out = float((shape.seq_len + cross) * comp.hidden_size * BYTES_PER_ACT)
    return [LayerSegment(key, comp.num_layers, flops, params, act, out, tp_bytes, kernels)]


def _mlp(comp: ComponentSpec, name: str, shape: UseShape, mode: SavedMode) -> list[LayerSegment]:
    h, s = comp.hidden_size, shape.seq_len
    flops = 2.0 * h * h * s
    return [LayerSegment(f"mlp[h={h},s={s}]", comp.num_layers, flops, float(h * h), s * mlp_bytes(mode, h),
                         float(s * h * BYTES_PER_ACT), float(s * h * BYTES_PER_ACT), 3)]


def _unet2d(comp: ComponentSpec, name: str, shape: UseShape, mode: SavedMode) -> list[LayerSegment]:
    """One segment per level and path (planner.unet): down levels, the mid block, then up levels deepest first; each
    priced at the mean of its blocks, its boundary the whole state after its last block (h, time embedding,
    context, skips)."""
    context = shape.context
    blocks = unet_blocks(comp, shape.image_size)
    segments = []
    for segment in range(2 * len(channel_mults(comp)) + 1):
        mine = [b for b in blocks if b.segment == segment]
        costs = [block_cost(comp, name, b, context) for b in mine]
        last = mine[-1]
        out = state_numel(comp, last.h_out, last.skips_out, context) if last.skips_out else output_numel(
            comp, shape.image_size)
        tag = "unet_mid" if last.mid else "unet_block"
        key = f"{tag}[c={last.out_channels},r={last.side}" + (f",ctx={context.length}" if context else "") + "]"
        key += "" if last.mid else "/up" if last.up else "/down"
        segments.append(LayerSegment(
            key, len(mine), *(sum(getattr(c, f) for c in costs) / len(mine) for f in ("flops", "params")),
            mode.compute_bytes * sum(c.act for c in costs) / len(mine), float(out * BYTES_PER_ACT), 0.0,
            round(sum(c.kernels for c in costs) / len(mine)),
        ))
    return segments


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class KindSpec:
    """Everything the planner and the runtime ask of one component kind (the runtime's torch builders: runtime.kinds)."""

    name: str
    # (comp, comp name, shape, saved mode) -> layer segments with their costs, saved bytes as the runtime keeps them
    segments: Callable[[ComponentSpec, str, UseShape, SavedMode], list[LayerSegment]]
    shape: Callable[[ComponentSpec, str, TaskComponentSpec, str], UseShape]  # (comp, comp name, use, where) -> shape
    requires: tuple[str, ...] = ()  # ComponentSpec fields its layers need (checked before ``segments``)
    root_input: str = "tokens"  # what a use reads from the data: 'tokens', 'image', 'latents' or 'features'
    in_channels: int | None = None  # default input channels of an 'image' or 'latents' input
    ffn_size: Callable[[ComponentSpec], int] | None = None  # MLP width of its transformer-style layers
    bridge: bool = False  # its input module also reads the upstream output of a non-root use (no connector)
    text_tokens: bool = False  # a non-bridge kind whose connected use may add its own text tokens after its inputs
    memory: bool = False  # cross-attends to the upstream sequence, which travels after its stream (its output too)
    context: bool = False  # cross-attends to its first upstream use's output as a context, when it has one
    queries: bool = False  # without a vocab_size its input module runs learned queries instead of reading tokens
    causal_lm: bool = False  # its layers are causal over its own tokens: a next-token loss may read its leaf
    flat_state: bool = False  # its layers carry a flat per-sample state (planner.unet), not (positions, width)
    denoiser: bool = False  # its leaf predicts noise (mse against the drawn noise); its output feeds no other use
    tp_variant: str | None = None  # megatron-core block variant that runs it tensor parallel; None: no tensor parallel
    # parameters of one layer per unit of hidden size that every TP rank keeps whole: its norms and row-parallel biases
    # (runtime.megatron_backend.PARAM_MAPS entries without a split dim); a hand-off's gather moves the rest
    tp_whole_per_hidden: int = 0


KINDS: dict[str, KindSpec] = {k.name: k for k in (
    KindSpec("transformer", _transformer, _sequence_shape, requires=("num_heads",), ffn_size=default_ffn_size,
             text_tokens=True, tp_variant="transformer", tp_whole_per_hidden=6),
    KindSpec("vit", _vit, _patches_shape, requires=("num_heads", "patch_size"), root_input="image", in_channels=3,
             ffn_size=default_ffn_size, tp_variant="transformer", tp_whole_per_hidden=6),
    KindSpec("llama", _llama, _sequence_shape, requires=("num_heads",), ffn_size=llama_ffn_size, text_tokens=True,
             causal_lm=True, tp_variant="llama", tp_whole_per_hidden=2),
    KindSpec("decoder", _decoder, _sequence_shape, requires=("num_heads",), ffn_size=default_ffn_size, bridge=True,
             memory=True, queries=True, tp_variant="decoder", tp_whole_per_hidden=11),
    KindSpec("mlp", _mlp, _features_shape, root_input="features"),
    KindSpec("unet2d", _unet2d, _pixels_shape, root_input="latents", in_channels=4, bridge=True, context=True,
             flat_state=True, denoiser=True),
)}


def kind_of(comp: ComponentSpec, name: str | None = None) -> KindSpec:
    """The registry entry of ``comp``'s kind; SpecError (naming component ``name`` when given) for an unknown kind."""
    kind = KINDS.get(comp.kind)
    if kind is None:
        where = f"components.{name}.kind" if name else "kind"
        raise SpecError(f"{where} ('{comp.kind}') is not a registered component; {did_you_mean(comp.kind, KINDS)}")
    return kind


def tensor_parallel_kinds() -> list[str]:
    """Names of the kinds that run tensor parallel, in registry order."""
    return [name for name, kind in KINDS.items() if kind.tp_variant is not None]
