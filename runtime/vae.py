"""A frozen diffusers AutoencoderKL: its encoder, run in a rank's data loader (images -> the latents a UNet trains on),
and its decoder (latents -> images; IterComp's feedback step decodes the predicted x0 through it, :class:`VaeDecoder`).

:func:`vae_encoder` builds the model's own ``encoder`` and ``quant_conv`` on the meta device from its config
(``AutoencoderKL.from_config``, no weights) and fills them from safetensors with only their tensors
(runtime.pretrained.load_part): the decoder's tensors are never read. :class:`VaeEncoder` gives, for images in
[-1, 1] ``(B, C, I, I)``, ``(mean - shift_factor) * scaling_factor`` of the latent distribution
``AutoencoderKL.encode(images).latent_dist`` (its mean: deterministic, so any shard equals the same rows of the whole
batch and a resumed run reads what an uninterrupted one would). planner.vae_config has checked the folder.

Imports diffusers only when an encoder is built.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from planner.vae_config import VaeInfo, resolve_vae


class VaeEncoder(nn.Module):
    """The encoder path of an AutoencoderKL, frozen: ``(B, C, I, I)`` images in [-1, 1] -> ``(B, L, I/f, I/f)``
    scaled latents (the latent distribution's mean)."""

    def __init__(self, encoder: nn.Module, quant_conv: nn.Module | None, info: VaeInfo):
        super().__init__()
        self.encoder, self.quant_conv = encoder, quant_conv
        self.scaling, self.shift = info.scaling_factor, info.shift_factor
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean = moments.chunk(2, dim=1)[0]
        return (mean - self.shift) * self.scaling


@lru_cache(maxsize=2)
def vae_encoder(path: str) -> VaeEncoder:
    """The frozen encoder of the AutoencoderKL at ``path``, holding only its encoder-side tensors (float32)."""
    from diffusers import AutoencoderKL

    from runtime.pretrained import load_part

    info = resolve_vae(path, "vae")
    with torch.device("meta"):
        skeleton = AutoencoderKL.from_config(dict(AutoencoderKL.load_config(path)))
    quant = load_part(skeleton, path, "quant_conv") if skeleton.quant_conv is not None else None
    return VaeEncoder(load_part(skeleton, path, "encoder"), quant, info)


def encode_image(path: str, image: torch.Tensor) -> torch.Tensor:
    """The scaled latents ``(L, I/f, I/f)`` of one image ``(C, I, I)`` in [-1, 1] by the VAE at ``path``. One image at a
    time: a row's latents do not depend on which rows share its batch."""
    return vae_encoder(path)(image.unsqueeze(0))[0]


class VaeDecoder(nn.Module):
    """The decoder path of an AutoencoderKL, frozen but differentiable: ``(B, L, h, h)`` scaled latents (as a UNet
    denoises them) -> ``(B, C, h*f, h*f)`` images in about [-1, 1], ``AutoencoderKL.decode(latents / scaling_factor
    + shift_factor).sample``. Its parameters take no gradient, but the gradient of a loss on the images passes through
    it to the latents (IterComp's reward feedback reaches the UNet this way)."""

    def __init__(self, post_quant_conv: nn.Module | None, decoder: nn.Module, info: VaeInfo):
        super().__init__()
        self.post_quant_conv, self.decoder = post_quant_conv, decoder
        self.scaling, self.shift = info.scaling_factor, info.shift_factor
        self.requires_grad_(False)
        self.eval()

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling + self.shift
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def vae_decoder(path: str) -> VaeDecoder:
    """The frozen decoder of the AutoencoderKL at ``path``, holding only its decoder-side tensors (float32). Not cached:
    each caller owns its copy (a test may check its parameters stay unchanged)."""
    from diffusers import AutoencoderKL

    from runtime.pretrained import load_part

    info = resolve_vae(path, "vae")
    with torch.device("meta"):
        skeleton = AutoencoderKL.from_config(dict(AutoencoderKL.load_config(path)))
    post = load_part(skeleton, path, "post_quant_conv") if skeleton.post_quant_conv is not None else None
    return VaeDecoder(post, load_part(skeleton, path, "decoder"), info)
