"""The text-to-image model IterComp fine-tunes, tiny: a diffusers UNet2DConditionModel over 16 x 16 RGB latents.

IterComp fine-tunes SDXL's UNet (latent diffusion, two CLIP text encoders, a frozen VAE). Here the latent of a 32 x 32
image is the image averaged over 2 x 2 pixels (:func:`encode`, [-1, 1]) and the frozen "VAE decoder" is a bilinear 2x
upsampling (:class:`Decoder`: no weights, differentiable); a 16-px UNet costs a quarter of a 32-px one, which is what
lets it learn to draw the shapes in CPU minutes. The round trip keeps what the oracle judges: renders encoded and
decoded score 1.00 (attribute), 1.00 (spatial) and 0.89 (non-spatial: the 3 px inner object blurs) under the oracle
(:func:`decoder_ceiling`). The UNet is conditioned on the recipe's frozen CLIP text tower (recipes.diffusion.models;
the prompt's 10 token states are the UNet's ``encoder_hidden_states``). :func:`save_unet` writes it with random
weights; :func:`pretrain` teaches it the gallery's exact images (the ordinary denoising loss,
runtime.feedback.denoising_loss, on DDPM's training schedule) as SDXL's pretraining stands behind IterComp;
:func:`sample_images` draws images with DDIM (runtime.sample) seeded per (seed, prompt index, sample), so before/after
comparisons start from the same noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recipes.diffusion.shapes import SIDE, Prompt, layout, random_prompt, render, tokenize
from runtime.modules import stable_seed
from runtime.sample import SampleConfig, build_scheduler, diffusers_denoiser, sample_without_grad

TEXT_LEN = 10  # the prompt's token positions (itercomp-tiny.yaml's text use)
LATENT = SIDE // 2  # the UNet's side: 2 x 2 pixels per latent pixel
UNET = dict(sample_size=LATENT, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)
TRAIN_SCHEDULE = dict(num_train_timesteps=1000, clip_sample=True)  # DDPM's linear betas; pixels stay in [-1, 1]


def encode(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, SIDE, SIDE)`` images in [-1, 1] -> ``(B, 3, LATENT, LATENT)`` latents: the mean of each 2 x 2 block."""
    return F.avg_pool2d(images, 2)


class Decoder(nn.Module):
    """The frozen "VAE decoder": latents ``(B, 3, LATENT, LATENT)`` -> images ``(B, 3, SIDE, SIDE)``, bilinear 2x
    upsampling (no weights; the feedback gradient passes through it to the latents, as through SDXL's decoder)."""

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return F.interpolate(latents, scale_factor=SIDE // LATENT, mode="bilinear", align_corners=False)


def decode(latents: torch.Tensor) -> torch.Tensor:
    return Decoder()(latents)


def save_unet(folder: str | Path, seed: int = 0) -> Path:
    """Write a random-weight UNet2DConditionModel (:data:`UNET`) to ``folder`` (``save_pretrained``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    UNet2DConditionModel(**UNET).save_pretrained(folder)
    return Path(folder)


def load_unet(folder: str | Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder)


def load_text(folder: str | Path):
    """The frozen CLIP text tower (no gradient, eval mode)."""
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(folder).requires_grad_(False).eval()


def prompt_ids(prompts: list[Prompt]) -> torch.Tensor:
    """``(B, TEXT_LEN)`` token ids of ``prompts``."""
    return torch.from_numpy(np.stack([tokenize(p.text, TEXT_LEN) for p in prompts]))


def context(text, prompts: list[Prompt]) -> torch.Tensor:
    """The UNet's ``encoder_hidden_states`` ``(B, TEXT_LEN, 64)``: the frozen text tower's last hidden states."""
    with torch.no_grad():
        return text(input_ids=prompt_ids(prompts)).last_hidden_state


def exact_images(prompts: list[Prompt], rng: np.random.Generator) -> torch.Tensor:
    """``(B, 3, SIDE, SIDE)`` in [-1, 1]: each prompt drawn exactly by the renderer."""
    return torch.from_numpy(np.stack([render(layout(p, rng), rng) for p in prompts])) * 2.0 - 1.0


def exact_latents(prompts: list[Prompt], rng: np.random.Generator) -> torch.Tensor:
    """``(B, 3, LATENT, LATENT)``: the latents of :func:`exact_images` (what the UNet learns to draw)."""
    return encode(exact_images(prompts, rng))


def decoder_ceiling(count: int, seed: int = 0) -> dict[str, float]:
    """Per category the oracle's mean score of ``count`` exact renders after :func:`encode` and :func:`decode`: the
    most a UNet that draws the latents exactly can score."""
    from recipes.diffusion import oracle

    rng = np.random.default_rng(stable_seed("diffusion-decoder-ceiling", seed))
    out = {}
    for category in ("attribute", "spatial", "nonspatial"):
        prompts = [random_prompt(category, rng) for _ in range(count)]
        images = (decode(exact_latents(prompts, rng)) / 2 + 0.5).clamp(0, 1).numpy()
        out[category] = float(np.mean([oracle.score(im, p) for im, p in zip(images, prompts)]))
    return out


def training_prompt(seed: int, step: int, row: int, categories: tuple[str, ...]) -> Prompt:
    """Row ``row`` of batch ``step``'s prompts: category ``row`` in turn, the prompt seeded by (seed, step, row)."""
    return random_prompt(categories[row % len(categories)],
                         np.random.default_rng(stable_seed("diffusion-unet-prompt", seed, step, row)))


def training_prompts(seed: int, step: int, batch: int, categories: tuple[str, ...]) -> list[Prompt]:
    """Batch ``step``'s prompts (:func:`training_prompt` of each row)."""
    return [training_prompt(seed, step, row, categories) for row in range(batch)]


def pretrain(unet, text, steps: int, batch: int, lr: float, seed: int, categories: tuple[str, ...],
             log=None, cosine: bool = False) -> list[float]:
    """Train ``unet`` in place on the latents of the renderer's exact images of random prompts (AdamW, the denoising
    loss of epsilon prediction at uniform timesteps; ``lr`` constant, or ``cosine``: decayed to 0 over the steps); the
    per-step losses."""
    from runtime.feedback import denoising_loss

    scheduler = build_scheduler(SampleConfig(steps=10, stop=(0, 9), scheduler="ddpm", scheduler_config=TRAIN_SCHEDULE))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if cosine else None
    denoiser = diffusers_denoiser(unet.train())
    losses = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(stable_seed("diffusion-unet-noise", seed, step))
        prompts = training_prompts(seed, step, batch, categories)
        images = exact_latents(prompts, np.random.default_rng(stable_seed("diffusion-unet-images", seed, step)))
        noise = torch.randn(images.shape, generator=gen)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        loss = denoising_loss(denoiser, scheduler, images, noise, timesteps, context(text, prompts)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        if decay is not None:
            decay.step()
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % max(steps // 10, 1) == 0:
            log(f"denoise step {step + 1}/{steps}: loss {np.mean(losses[-max(steps // 10, 1):]):.4f}")
    unet.eval()
    return losses


def sample_config(steps: int, stop: tuple[int, int], seed: int) -> SampleConfig:
    """DDIM over ``steps`` inference steps of the training schedule (:data:`TRAIN_SCHEDULE`)."""
    return SampleConfig(steps=steps, stop=stop, seed=seed, scheduler="ddim", scheduler_config=TRAIN_SCHEDULE)


def sample_images(unet, text, prompts: list[Prompt], steps: int, seed: int, samples: int = 1,
                  batch: int = 32) -> np.ndarray:
    """``(len(prompts) * samples, 3, SIDE, SIDE)`` float32 in [0, 1]: each prompt's ``samples`` images (adjacent),
    DDIM over ``steps`` steps without gradient from noise seeded by (seed, i, k) for sample ``k`` of prompt ``i``,
    decoded (:class:`Decoder`)."""
    scheduler = build_scheduler(sample_config(steps, (0, steps - 1), seed))
    denoiser = diffusers_denoiser(unet.eval())
    rows = [(i, k) for i in range(len(prompts)) for k in range(samples)]
    out = []
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        gens = [torch.Generator().manual_seed(stable_seed("diffusion-unet-sample", seed, i, k)) for i, k in part]
        ctx = context(text, [prompts[i] for i, _ in part])
        x = decode(sample_without_grad(denoiser, scheduler, ctx, (3, LATENT, LATENT), gens))
        out.append(((x / 2 + 0.5).clamp(0, 1)).numpy().astype(np.float32))
    return np.concatenate(out)


def grid(images: np.ndarray, columns: int) -> np.ndarray:
    """``(H, W, 3)`` uint8: ``images`` ``(N, 3, S, S)`` in [0, 1] tiled in rows of ``columns`` with 2 px gaps."""
    n, _, s, _ = images.shape
    rows = -(-n // columns)
    canvas = np.ones((rows * (s + 2) + 2, columns * (s + 2) + 2, 3), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[2 + r * (s + 2):2 + r * (s + 2) + s, 2 + c * (s + 2):2 + c * (s + 2) + s] = image.transpose(1, 2, 0)
    return (canvas * 255).round().astype(np.uint8)
