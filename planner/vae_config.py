"""A diffusers AutoencoderKL folder read as a frozen latent encoder of a task's images (pure Python, no torch).

Latent diffusion trains its UNet on latents, not pixels: a unet2d task whose ``data:`` is an image folder names the
VAE that turns each image into the latents its UNet denoises (``tasks[].data.vae``, docs/data.md). The VAE is not a
component: it is frozen, runs in each rank's data loader (runtime.vae) and is never trained, planned or exported, so
naming one as a component's ``pretrained:`` is refused (planner.pretrained).

:func:`resolve_vae` reads the folder's ``config.json`` (``"_class_name": "AutoencoderKL"``) and checks the safetensors
header of the tensors the encoder path reads (``encoder.*`` and ``quant_conv``), as planner.pretrained does for a
component, so a folder whose weights do not match its config is refused by ``loom validate``. :func:`check_vae_use`
checks it fits a unet2d use: ``latent_channels`` equal to the UNet's ``in_channels``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from planner.pretrained import (
    CONFIG_FILE, CONFIG_JSON, PretrainedError, check_config_levels, check_config_sizes, check_tensors,
    read_folder_json,
)
from planner.spec import MAX_IMAGE_SIZE, MAX_LAYERS_PER_COMPONENT, MAX_WIDTH

CLASS_NAME = "AutoencoderKL"
VAE_CONFIG_JSON = replace(CONFIG_JSON, name="VAE config", shape="not a VAE config",
                          expected="the config.json AutoencoderKL.save_pretrained writes")
# config key -> the limit of its number (or of each per level), as a UNet's (planner.unet_config.SIZE_LIMITS)
SIZE_LIMITS = {"block_out_channels": MAX_WIDTH, "in_channels": MAX_WIDTH, "out_channels": MAX_WIDTH,
               "latent_channels": MAX_WIDTH, "layers_per_block": MAX_LAYERS_PER_COMPONENT, "norm_num_groups": MAX_WIDTH,
               "sample_size": MAX_IMAGE_SIZE}


@dataclass(frozen=True)
class VaeInfo:
    """What an AutoencoderKL folder fixes for the data side."""

    path: str
    config: dict[str, Any]

    @property
    def latent_channels(self) -> int:
        return int(self.config.get("latent_channels", 4))

    @property
    def image_channels(self) -> int:
        return int(self.config.get("in_channels", 3))

    @property
    def factor(self) -> int:
        """Pixels per latent along a side: 2^(levels - 1), diffusers' ``vae_scale_factor``."""
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.config.get("scaling_factor", 0.18215))

    @property
    def shift_factor(self) -> float:
        return float(self.config.get("shift_factor") or 0.0)


def encoder_tensors(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The encoder-side tensors the config implies (the decoder is never read): the first and last convolutions and
    the moments' projection ``quant_conv`` when the config uses one."""
    widths, latent = cfg["block_out_channels"], cfg.get("latent_channels", 4)
    shapes = {"encoder.conv_in.weight": (widths[0], cfg.get("in_channels", 3), 3, 3),
              "encoder.conv_out.weight": (2 * latent, widths[-1], 3, 3)}
    if cfg.get("use_quant_conv", True):
        shapes["quant_conv.weight"] = (2 * latent, 2 * latent, 1, 1)
    return shapes


def resolve_vae(path: str | Path, where: str) -> VaeInfo:
    """The AutoencoderKL at ``path`` (spec field ``where`` names it); a PretrainedError (one line naming the path and
    the fix) for a missing folder, another class, a config without ``block_out_channels`` or weights that do not
    match the config."""
    return _resolve(str(Path(path).resolve()), where)


@lru_cache(maxsize=8)
def _resolve(path: str, where: str) -> VaeInfo:
    folder = Path(path)
    if not folder.is_dir():
        raise PretrainedError(f"{where} ({folder}): no such folder. Point it at a folder AutoencoderKL.save_pretrained "
                              "wrote (config.json and diffusion_pytorch_model.safetensors).")
    cfg = read_folder_json(folder / CONFIG_FILE, VAE_CONFIG_JSON)
    if cfg.get("_class_name") != CLASS_NAME:
        found = cfg.get("_class_name") or cfg.get("model_type") or "no _class_name"
        raise PretrainedError(f"{where} ({folder}): config.json is a '{found}', not an {CLASS_NAME}. Name a diffusers "
                              f"{CLASS_NAME} folder (a latent-diffusion VAE).")
    if not isinstance(cfg.get("block_out_channels"), list) or not cfg["block_out_channels"]:
        raise PretrainedError(f"{where} ({folder / CONFIG_FILE}): 'block_out_channels' is missing; an {CLASS_NAME} "
                              "config has it. Re-save the model with save_pretrained.")
    try:
        check_config_sizes(folder / CONFIG_FILE, cfg, SIZE_LIMITS)
        check_config_levels(folder / CONFIG_FILE, cfg)
    except PretrainedError as exc:
        raise PretrainedError(f"{where}: {exc}") from None
    for key in ("scaling_factor", "shift_factor"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value)):
            raise PretrainedError(f"{where}: {folder / CONFIG_FILE}: {key} ({value!r}) is not a finite number. Fix "
                                  "config.json, or re-save the model with save_pretrained.")
    check_tensors(folder, encoder_tensors(cfg))
    return VaeInfo(path, cfg)


def check_vae_use(info: VaeInfo, where: str, comp_name: str, in_channels: int) -> None:
    """A PretrainedError when the VAE's latents do not fit unet2d component ``comp_name`` (``in_channels``)."""
    if info.latent_channels != in_channels:
        raise PretrainedError(f"{where} ({info.path}): the VAE encodes {info.latent_channels} latent channels but "
                              f"components.{comp_name} reads {in_channels} (in_channels). Use a VAE whose "
                              f"latent_channels is {in_channels}, or a UNet of in_channels {info.latent_channels}.")
