"""A pretrained diffusers UNet2DConditionModel as Loom's unet2d layers, each built from the model's own modules.

A unet2d component with ``pretrained:`` a diffusers folder (planner.unet_config has read its config) runs the model's
own blocks: Loom layer ``index`` of planner segment ``segment`` (a :class:`planner.unet.UNetBlock`) is a
:class:`runtime.unet.UNetLayer` over ``down_blocks[l].resnets[j]`` / ``attentions[j]`` / ``downsamplers[0]``, the
mid block's ``resnets[0]``, ``attentions[0]``, ``resnets[1]``, or ``up_blocks[i].resnets[j]`` / ``attentions[j]`` /
``upsamplers[0]`` (:func:`block_modules`); the input module is ``conv_in``, ``time_proj`` and ``time_embedding``
(a :class:`runtime.unet.UNetInput`), and the denoising head predicts through ``conv_norm_out`` and ``conv_out``.
Each module is built on the meta device from the model's class (``from_config``; no weights) and filled from
safetensors with only its own tensors (runtime.pretrained.read_tensors). So Loom's composed forward is
UNet2DConditionModel's forward, and :func:`export_name` maps the trained parameters back to the checkpoint's names
(runtime.export writes them as a diffusers folder).

Imports diffusers only when a module is built.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from planner.spec import ComponentSpec
from planner.unet import UNetBlock, channel_mults, check_context, time_width, unet_blocks
from runtime.unet import BlockParts, UNetInput, UNetLayer

INPUT_MODULES = ("conv_in", "time_proj", "time_embedding")
HEAD_MODULES = {"norm_out": "conv_norm_out", "conv_out": "conv_out"}  # runtime.heads.DenoisingHead -> the model's


@lru_cache(maxsize=4)
def _skeleton(path: str) -> nn.Module:
    """The UNet2DConditionModel at ``path`` built on the meta device from its config (no memory, no weights read),
    without dropout (Loom's layers are deterministic: exact equivalence, exact resume)."""
    from diffusers import UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(path)) | {"dropout": 0.0}
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _loaded(path: str, attr: str) -> nn.Module:
    """A copy of the model's module at ``attr`` holding its tensors from ``path`` (float32; only these are read)."""
    from runtime.pretrained import load_part  # local: runtime.pretrained dispatches to this module

    return load_part(_skeleton(path), path, attr)


def block_modules(comp: ComponentSpec, block: UNetBlock, index: int) -> dict[str, str]:
    """The model's module path of each :class:`runtime.unet.BlockParts` field of ``block``, Loom layer ``index``
    of its planner segment (the block's index within its level)."""
    levels = len(channel_mults(comp))
    if block.mid:
        return {"resnet": "mid_block.resnets.0", "attention": "mid_block.attentions.0", "resnet2": "mid_block.resnets.1"}
    prefix = f"up_blocks.{levels - 1 - block.level}" if block.up else f"down_blocks.{block.level}"
    paths = {"resnet": f"{prefix}.resnets.{index}"}
    if block.attention:
        paths["attention"] = f"{prefix}.attentions.{index}"
    if block.resample is not None:
        paths["resample"] = f"{prefix}.{block.resample}samplers.0"
    return paths


def build_layer(comp: ComponentSpec, name: str, segment: int, index: int, image_size: int,
                context_width: int | None) -> UNetLayer:
    """Block ``index`` of planner segment ``segment`` of pretrained unet2d ``comp`` (named ``name``), from the model's
    own modules and only their tensors, laid out for uses at ``image_size``."""
    check_context(comp, name, context_width)  # the planner's check, again where the width is known for sure
    block = [b for b in unet_blocks(comp, image_size) if b.segment == segment][index]
    parts = {field: _loaded(comp.pretrained, path) for field, path in block_modules(comp, block, index).items()}
    return UNetLayer(block, image_size, time_width(comp), context_width, BlockParts(**parts))


def build_embed(comp: ComponentSpec) -> UNetInput:
    """The input module of pretrained unet2d ``comp``: the model's conv_in, time_proj and time_embedding."""
    return UNetInput.of(*(_loaded(comp.pretrained, attr) for attr in INPUT_MODULES))


def load_head(comp: ComponentSpec, head: nn.Module) -> nn.Module:
    """``head`` (a runtime.heads.DenoisingHead) predicting through pretrained unet2d ``comp``'s conv_norm_out and
    conv_out."""
    for ours, theirs in HEAD_MODULES.items():
        setattr(head, ours, _loaded(comp.pretrained, theirs))
    return head


def export_name(comp: ComponentSpec, component: str, group: str, layer: int, param: str) -> str | None:
    """The checkpoint tensor name of Loom parameter ``<group>/<layer>/<param>`` as part of pretrained unet2d ``comp``
    (named ``component``); None for a parameter that is not part of the model."""
    if group == f"embed:{component}":
        return param
    base, _, segment = group.partition("#")
    if base != component or not segment:
        return None
    side = comp.image_size or 8 * 2 ** len(channel_mults(comp))  # any side: the module paths do not depend on it
    block = [b for b in unet_blocks(comp, side) if b.segment == int(segment)][layer]
    field, rest = param.split(".", 1)
    return f"{block_modules(comp, block, layer)[field]}.{rest}"


def head_export_name(param: str) -> str | None:
    """The checkpoint name of a pretrained denoising head's parameter (``norm_out.*``, ``conv_out.*``)."""
    field, _, rest = param.partition(".")
    return f"{HEAD_MODULES[field]}.{rest}" if field in HEAD_MODULES else None
