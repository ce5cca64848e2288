"""unet2d on diffusers: the blocks of :mod:`planner.unet` as layers over one flat state tensor per sample.

A UNet's up path reads the output of every down block (its skip connections), so its state is more
than one feature map: h, the time embedding, the context it cross-attends to and the skip stack.
The runtime moves one tensor between layers and across wave boundaries, so each layer takes the
state flattened per sample, ``(B, N)`` with the parts in the order ``[h, time, context, skips
bottom first]`` (:class:`StateLayout`), unpacks it, runs its diffusers blocks and packs its own state
out; the last block of a use hands on h alone, ``(B, c0 * I * I)``. ``N`` depends on the use's image
side and context length, so layers take them as keyword arguments (``runtime.modules.layer_kwargs``)
and one set of parameters serves uses of every resolution. Copying the skips at every layer costs
memory bandwidth, not FLOPs; it keeps wave boundaries and recompute the same as for every other kind.

diffusers is imported when a unet2d module is built (it takes seconds), never for other jobs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from planner.spec import ComponentSpec
from planner.unet import Plane, UNetBlock, attention_heads, time_width, unet_blocks

NORM_GROUPS = 32  # GroupNorm groups, as diffusers; fewer for narrow layers (see groups())
NORM_EPS = 1e-5  # GroupNorm eps of Loom's own ResNet blocks (a pretrained UNet's modules keep their config's)
NUM_TIMESTEPS = 1000  # DDPM: linear betas from 1e-4 to 0.02 over 1000 steps
BETA_START, BETA_END = 1e-4, 0.02


def groups(channels: int) -> int:
    """GroupNorm groups over ``channels``: 32 (diffusers') where they leave 2 or more channels per group, else the
    largest divisor that does. With one channel per group the norm removes any per-channel constant, so a conv bias
    before it has a true gradient of zero, which AdamW turns float noise into updates (and equal runs into
    different ones)."""
    return math.gcd(NORM_GROUPS, max(1, channels // 2))


@dataclass(frozen=True)
class StateLayout:
    """The parts of one flat state: h, the time embedding, the context (``(length, width)`` or None), the skips."""

    h: Plane
    time: int
    context: tuple[int, int] | None
    skips: tuple[Plane, ...]

    def sizes(self) -> list[int]:
        c, s = self.h
        context = self.context[0] * self.context[1] if self.context else 0
        return [c * s * s, self.time, context] + [ch * side * side for ch, side in self.skips]

    @property
    def numel(self) -> int:
        return sum(self.sizes())

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """``(B, N)`` -> h ``(B, C, S, S)``, time ``(B, T)``, context ``(B, L, W)`` or None, skips (bottom first)."""
        b = x.shape[0]
        h, time, context, *skips = x.split(self.sizes(), dim=1)
        planes = [t.reshape(b, c, s, s) for t, (c, s) in zip([h, *skips], [self.h, *self.skips])]
        ctx = context.reshape(b, *self.context) if self.context else None
        return planes[0], time, ctx, planes[1:]

    @staticmethod
    def pack(h: torch.Tensor, time: torch.Tensor, context: torch.Tensor | None, skips: list[torch.Tensor]) -> torch.Tensor:
        parts = [h, time] + ([context] if context is not None else []) + skips
        return torch.cat([t.flatten(1) for t in parts], dim=1)


def _scaled(planes: tuple[Plane, ...], scale: float) -> tuple[Plane, ...]:
    return tuple((c, round(s * scale)) for c, s in planes)


@dataclass
class BlockParts:
    """The diffusers modules of one block: its ResNet, the mid block's second ResNet, its transformer, its resample
    (None where the block has none). Loom's own are built by :func:`build_unet_layer`; a pretrained UNet2DConditionModel's
    are its own modules (runtime.unet_pretrained)."""

    resnet: nn.Module
    resnet2: nn.Module | None = None
    attention: nn.Module | None = None
    resample: nn.Module | None = None


class UNetLayer(nn.Module):
    """One :class:`planner.unet.UNetBlock`: [pop a skip and concatenate it] -> ResnetBlock2D -> [Transformer2DModel]
    -> [push] -> [Downsample2D / Upsample2D -> push after a downsample]; the mid block is ResnetBlock2D ->
    [Transformer2DModel] -> ResnetBlock2D, with no push. ``forward(state, side, context_len)``. ``time``: the width
    of the time embedding in the state."""

    def __init__(self, block: UNetBlock, ref_side: int, time: int, context_width: int | None, parts: BlockParts):
        super().__init__()
        self.block, self.ref_side, self.time = block, ref_side, time
        # registration order (resnet, resnet2, attention, resample) fixes the seeded initialisation of Loom's own
        self.resnet = parts.resnet
        self.resnet2 = parts.resnet2  # the mid block: ResNet, transformer, ResNet
        self.attention = parts.attention
        self.resample = parts.resample
        self.context_width = context_width

    def layouts(self, side: int, context_len: int) -> tuple[StateLayout, StateLayout | None]:
        """The state layouts entering and leaving this block in a use at image ``side`` (None: h alone leaves)."""
        scale, b = side / self.ref_side, self.block
        context = (context_len, self.context_width) if self.context_width else None
        into = StateLayout(_scaled((b.h_in,), scale)[0], self.time, context, _scaled(b.skips_in, scale))
        if not b.skips_out:
            return into, None
        return into, StateLayout(_scaled((b.h_out,), scale)[0], self.time, context, _scaled(b.skips_out, scale))

    def forward(self, state: torch.Tensor, side: int, context_len: int) -> torch.Tensor:
        into, out = self.layouts(side, context_len)
        h, time, context, skips = into.unpack(state)
        if self.block.up:
            h = torch.cat([h, skips.pop()], dim=1)
        h = self.resnet(h, time)
        if self.attention is not None:
            h = self.attention(h, encoder_hidden_states=context, return_dict=False)[0]
        if self.resnet2 is not None:
            h = self.resnet2(h, time)
        elif not self.block.up:
            skips.append(h)
        if self.resample is not None:
            h = self.resample(h)
            if self.block.resample == "down":
                skips.append(h)
        return h.flatten(1) if out is None else StateLayout.pack(h, time, context, skips)


class UNetInput(nn.Module):
    """The input of a unet2d use: noisy latents ``(B, C, I, I)``, timesteps ``(B,)`` and the context ``(B, L, W)``
    (its upstream output; None for a root use) -> the flat state entering its first block: h = conv_in(latents),
    the time embedding (sinusoidal, then an MLP), the context, and the skip stack [h]."""

    def __init__(self, comp: ComponentSpec, in_channels: int):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        c0 = comp.hidden_size
        self.conv_in = nn.Conv2d(in_channels, c0, kernel_size=3, padding=1)
        self.time_proj = Timesteps(c0, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(c0, time_width(comp))

    @classmethod
    def of(cls, conv_in: nn.Module, time_proj: nn.Module, time_embedding: nn.Module) -> UNetInput:
        """The input module over given modules (a pretrained UNet2DConditionModel's own, runtime.unet_pretrained)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.conv_in, module.time_proj, module.time_embedding = conv_in, time_proj, time_embedding
        return module

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        h = self.conv_in(latents)
        time = self.time_embedding(self.time_proj(timesteps).to(h.dtype))
        return StateLayout.pack(h, time, context, [h])


def build_unet_layer(comp: ComponentSpec, name: str, segment: int, index: int, image_size: int,
                     context_width: int | None) -> UNetLayer:
    """Block ``index`` of planner segment ``segment``, laid out for uses at ``image_size`` (any other side of the
    component's uses scales the same layout)."""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    block = [b for b in unet_blocks(comp, image_size) if b.segment == segment][index]
    c_in, c, time = block.h_in[0] + block.skip, block.out_channels, time_width(comp)

    def resnet(c_in: int) -> nn.Module:
        return ResnetBlock2D(in_channels=c_in, out_channels=c, temb_channels=time, groups=groups(c_in),
                             groups_out=groups(c), eps=NORM_EPS)

    parts = BlockParts(resnet(c_in), resnet(c) if block.mid else None)
    if block.attention:
        heads = attention_heads(comp, name, c, block.level)
        parts.attention = Transformer2DModel(num_attention_heads=heads, attention_head_dim=c // heads, in_channels=c,
                                             norm_num_groups=groups(c), cross_attention_dim=context_width)
    if block.resample == "down":
        parts.resample = Downsample2D(c, use_conv=True, out_channels=c, padding=1)
    elif block.resample == "up":
        parts.resample = Upsample2D(c, use_conv=True, out_channels=c)
    return UNetLayer(block, image_size, time, context_width, parts)


class NoiseSchedule:
    """DDPM's forward process: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``."""

    def __init__(self):
        betas = torch.linspace(BETA_START, BETA_END, NUM_TIMESTEPS, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1.0 - betas, dim=0)

    def noised(self, x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        a = float(self.alpha_bar[t])
        return math.sqrt(a) * x0 + math.sqrt(1.0 - a) * eps


def noise_key(use: str) -> str:
    """Key of the noise added to a unet2d use's latents in ``TaskBatch.targets``."""
    return use + ":noise"


def timesteps_key(use: str) -> str:
    """Key of a unet2d use's timesteps ``(B,)`` long in ``TaskBatch.targets``."""
    return use + ":timesteps"
