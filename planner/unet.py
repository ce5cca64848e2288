"""The unet2d layout, shared by the planner's cost model and the runtime's modules (pure Python).

A unet2d component follows diffusers' UNet2DConditionModel. Its input embedding (``conv_in``:
in_channels -> c0 at full resolution, plus the time embedding) runs once per use; then, per level
``l`` (``channel_mults[l] * c0`` channels at ``image_size / 2^l``), ``num_layers`` down blocks followed
by a 2x downsample except at the deepest level; the mid block at the deepest level (diffusers'
``UNetMidBlock2DCrossAttn``: ResNet, transformer, ResNet); then the up path, deepest level first,
``num_layers + 1`` blocks per level followed by a 2x upsample except at level 0. A block is a ResNet
block (two 3x3 convolutions, the time embedding added in between) followed, below full resolution,
by a transformer block (self-attention, cross-attention to the use's context when it has an upstream
use, GEGLU MLP); a pretrained UNet2DConditionModel has one where its config's block types say
(:class:`UNetArch`, planner.unet_config). ``conv_in``, every down block and every downsample push their output on the skip
stack; every up block pops the top one and concatenates it to its input on channels; the mid block
neither pushes nor pops.

One planner segment is one level of one path (``num_layers`` or ``num_layers + 1`` blocks) or the mid
block (segment ``len(channel_mults)``; the up levels follow it), so a segment's blocks differ a little
(the first changes channels, the last resamples); the planner prices a segment layer at the mean of
its blocks. What crosses a wave boundary is the whole state: h, the time embedding, the context and
every skip still on the stack (:func:`state_numel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from planner.errors import SpecError
from planner.spec import ComponentSpec

DEFAULT_CHANNEL_MULTS = (1, 2, 4, 4)
HEAD_DIM = 64  # attention head width when the component sets no num_heads (as Stable Diffusion 2)
GEGLU_MULT = 4  # the transformer block's MLP width as a multiple of its channels

Plane = tuple[int, int]  # (channels, side) of one feature map


@dataclass(frozen=True)
class Context:
    """What a conditioned use cross-attends to: its upstream output, ``length`` tokens x ``width``."""

    length: int
    width: int


@dataclass(frozen=True)
class UNetBlock:
    """One block (one runtime layer) of a unet2d use, with the state entering and leaving it."""

    segment: int  # index of the planner segment (down levels, the mid block, then up levels deepest first)
    level: int
    up: bool
    h_in: Plane  # h entering the block
    skip: int  # channels of the skip an up block concatenates (0 on the way down)
    out_channels: int
    attention: bool
    resample: str | None  # "down" or "up" after the block, else None
    skips_in: tuple[Plane, ...]  # the skip stack entering the block, bottom first
    mid: bool = False  # the mid block: ResNet, transformer, ResNet; no skip pushed or popped

    @property
    def side(self) -> int:
        """Side of the feature maps the block computes on (before its resample)."""
        return self.h_in[1]

    @property
    def h_out(self) -> Plane:
        side = {"down": self.side // 2, "up": self.side * 2}.get(self.resample, self.side)
        return self.out_channels, side

    @property
    def skips_out(self) -> tuple[Plane, ...]:
        if self.mid:
            return self.skips_in
        if self.up:
            return self.skips_in[:-1]
        pushed = ((self.out_channels, self.side),) + ((self.h_out,) if self.resample == "down" else ())
        return self.skips_in + pushed


@dataclass(frozen=True)
class UNetArch:
    """The choices a unet2d makes beyond its shape that its layout and cost follow: which blocks attend, heads per
    level, the context width. Loom's own unet2d attends below full resolution only, with ``num_heads`` (or channels /
    64) heads, to its uses' context; a pretrained one (``pretrained:`` a diffusers UNet2DConditionModel folder)
    follows its config (planner.unet_config). What only changes the math inside a block (a pretrained model's
    GroupNorm groups and eps, linear projections, ...) is not here: the runtime runs that model's own modules."""

    down_attention: tuple[bool, ...]  # per level: its down blocks have a transformer (CrossAttnDownBlock2D)
    up_attention: tuple[bool, ...]  # per level (level 0 = full resolution): its up blocks have one
    mid_attention: bool
    heads: tuple[int, ...] | None = None  # per level; None: num_heads or channels / 64
    context_width: int | None = None  # the context width its cross-attention reads; None: its uses' (Loom's own)


def channel_mults(comp: ComponentSpec) -> list[int]:
    return list(comp.channel_mults or DEFAULT_CHANNEL_MULTS)


def unet_arch(comp: ComponentSpec) -> UNetArch:
    """The :class:`UNetArch` of unet2d ``comp``: its pretrained config's, else Loom's defaults."""
    if comp.pretrained:
        from planner.unet_config import config_arch  # local: planner.unet_config imports this module

        return config_arch(comp.pretrained)
    return _default_arch(len(channel_mults(comp)))


@lru_cache(maxsize=16)
def _default_arch(levels: int) -> UNetArch:
    below_full = tuple(level > 0 for level in range(levels))
    return UNetArch(below_full, below_full, levels > 1)


def time_width(comp: ComponentSpec) -> int:
    """Width of the time embedding every ResNet block reads (4 x c0, as diffusers)."""
    return 4 * comp.hidden_size


def check_context(comp: ComponentSpec, name: str, width: int | None) -> None:
    """A SpecError when a use of ``comp`` reads a context of ``width`` (None: a root use, no context) that its
    cross-attention cannot: a pretrained UNet's keys and values read its config's cross_attention_dim."""
    want = unet_arch(comp).context_width
    if want is not None and width != want:
        got = "no context (a root use)" if width is None else f"a context {width} wide"
        raise SpecError(f"components.{name}: a use reads {got} but {comp.pretrained}/config.json has "
                        f"cross_attention_dim {want}. Feed every use from an upstream use of hidden_size {want} "
                        "(e.g. a text encoder).")


def attention_heads(comp: ComponentSpec, name: str, channels: int, level: int | None = None) -> int:
    """Heads of the transformer block at ``channels`` (on ``level``): a pretrained config's heads of that level,
    else num_heads, else channels / 64 (at least 1); a SpecError when they do not divide the channels."""
    per_level = unet_arch(comp).heads if level is not None else None
    heads = per_level[level] if per_level else comp.num_heads or max(1, channels // HEAD_DIM)
    if channels % heads:
        raise SpecError(
            f"components.{name}.num_heads ({heads}) does not divide the {channels} channels of a unet2d level; "
            "pick a head count that divides hidden_size x every channel_mults entry."
        )
    return heads


def unet_blocks(comp: ComponentSpec, image_size: int) -> list[UNetBlock]:
    """Every block of a use of ``comp`` at ``image_size``, in execution order."""
    mults, n, c0, arch = channel_mults(comp), comp.num_layers, comp.hidden_size, unet_arch(comp)
    blocks: list[UNetBlock] = []
    h: Plane = (c0, image_size)
    skips: tuple[Plane, ...] = (h,)  # conv_in's output
    for level, mult in enumerate(mults):
        for j in range(n):
            last = j == n - 1 and level < len(mults) - 1
            block = UNetBlock(level, level, False, h, 0, c0 * mult, arch.down_attention[level], "down" if last else None,
                              skips)
            blocks.append(block)
            h, skips = block.h_out, block.skips_out
    deepest = len(mults) - 1
    blocks.append(UNetBlock(len(mults), deepest, False, h, 0, h[0], arch.mid_attention, None, skips, mid=True))
    for i, level in enumerate(reversed(range(len(mults)))):
        for j in range(n + 1):
            last = j == n and level > 0
            block = UNetBlock(len(mults) + 1 + i, level, True, h, skips[-1][0], c0 * mults[level],
                              arch.up_attention[level], "up" if last else None, skips)
            assert skips[-1][1] == h[1], f"skip {skips[-1]} does not match h {h}"
            blocks.append(block)
            h, skips = block.h_out, block.skips_out
    assert not skips, "every skip is popped"
    return blocks


def state_numel(comp: ComponentSpec, h: Plane, skips: tuple[Plane, ...], context: Context | None) -> int:
    """Elements per sample of the state between two blocks: h, the time embedding, the context, the skips."""
    planes = sum(c * side * side for c, side in (h, *skips))
    return planes + time_width(comp) + (context.length * context.width if context else 0)


def output_numel(comp: ComponentSpec, image_size: int) -> int:
    """Elements per sample of a use's output: h of the last up block (c0 channels at full resolution)."""
    return comp.hidden_size * image_size * image_size


def unet_state_numel(comp: ComponentSpec, image_size: int, context: Context | None, segment: int, boundary: int) -> int:
    """Elements per sample of the state after ``boundary`` blocks of planner segment ``segment`` (0: entering its
    first block); after a use's last block, its output."""
    blocks = [b for b in unet_blocks(comp, image_size) if b.segment == segment]
    if boundary == 0:
        return state_numel(comp, blocks[0].h_in, blocks[0].skips_in, context)
    last = blocks[boundary - 1]
    if not last.skips_out:
        return output_numel(comp, image_size)
    return state_numel(comp, last.h_out, last.skips_out, context)


@dataclass(frozen=True)
class BlockCost:
    """Per sample, forward: FLOPs, parameters, activation elements saved for backward, kernel launches."""

    flops: float
    params: float
    act: float
    kernels: int


def block_cost(comp: ComponentSpec, name: str, block: UNetBlock, context: Context | None) -> BlockCost:
    """The cost of one block: its ResNet block (two for the mid block), its transformer block and its resample."""
    check_context(comp, name, context.width if context else None)
    c_in, c, t = block.h_in[0] + block.skip, block.out_channels, block.side**2
    shortcut = c_in * c if c_in != c else 0  # a 1x1 convolution when the channels change
    resnets = 2 if block.mid else 1  # the mid block's ResNets keep the channels (no shortcut)
    params = resnets * (9 * c_in * c + 9 * c * c + time_width(comp) * c) + shortcut
    flops = resnets * (2 * t * (9 * c_in * c + 9 * c * c) + 2 * time_width(comp) * c) + 2 * t * shortcut
    act, kernels = resnets * t * (3 * c_in + 6 * c), 10 * resnets
    if block.attention:
        heads = attention_heads(comp, name, c, block.level)
        mlp = 3 * GEGLU_MULT * c * c  # c -> 2 x 4c (gate and value), 4c -> c
        params += 2 * c * c + 4 * c * c + mlp  # proj_in/out, self-attention, MLP
        flops += 2 * t * (2 * c * c + 4 * c * c + mlp) + 4 * t * t * c
        act += 20 * t * c + 2 * heads * t * t
        kernels += 20
        if context is not None:
            params += 2 * c * c + 2 * context.width * c
            flops += 2 * t * 2 * c * c + 4 * context.length * context.width * c + 4 * t * context.length * c
            act += 4 * t * c + 2 * heads * t * context.length
            kernels += 8
    if block.resample is not None:
        resampled = t // 4 if block.resample == "down" else 4 * t
        params += 9 * c * c
        flops += 2 * 9 * c * c * resampled
        act += c * max(t, resampled)
        kernels += 2
    return BlockCost(float(flops), float(params), float(act), kernels)
