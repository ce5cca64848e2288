"""A diffusers UNet2DConditionModel config read as a unet2d component (pure Python, no torch or diffusers).

A diffusers model folder holds ``config.json`` with ``"_class_name": "UNet2DConditionModel"`` and
``diffusion_pytorch_model.safetensors``. planner.pretrained finds this module's entry by that class name;
:func:`config_fields` gives the spec fields the config fixes (hidden_size = block_out_channels[0], channel_mults,
num_layers = layers_per_block, in_channels, image_size = sample_size, num_heads when every level has the same),
:func:`config_arch` the choices planner.unet's layout follows (which levels attend, heads per level, the
context width), :func:`config_refusal` the first config key Loom cannot run exactly and
:func:`config_tensors` the tensors (and shapes) the config implies, which planner.pretrained checks against the
safetensors header.

Loom runs the model's own blocks (runtime.unet_pretrained), so what the config chooses inside a block (linear or
convolutional projections, upcast attention, the time-embedding norm of the ResNets, kernel sizes) runs as diffusers
runs it; what changes the state between blocks or the inputs (more transformer layers per block, class or addition
embeddings, an encoder projection, dual cross-attention, another time embedding) is refused.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from planner.spec import MAX_IMAGE_SIZE, MAX_LAYERS_PER_COMPONENT, MAX_WIDTH
from planner.unet import UNetArch

CLASS_NAME = "UNet2DConditionModel"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has a transformer
UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
MID_TYPE = "UNetMidBlock2DCrossAttn"

# config key -> the limit of its number, or of each of its numbers per level (planner.pretrained checks them before
# anything here reads them): the spec's limit of what it fills (planner.spec, docs/job-spec.md "Limits"); a kernel
# side is bounded as an image side is
SIZE_LIMITS = {"block_out_channels": MAX_WIDTH, "layers_per_block": MAX_LAYERS_PER_COMPONENT, "in_channels": MAX_WIDTH,
               "out_channels": MAX_WIDTH, "sample_size": MAX_IMAGE_SIZE, "attention_head_dim": MAX_WIDTH,
               "cross_attention_dim": MAX_WIDTH, "transformer_layers_per_block": MAX_LAYERS_PER_COMPONENT,
               "norm_num_groups": MAX_WIDTH, "conv_in_kernel": MAX_IMAGE_SIZE, "conv_out_kernel": MAX_IMAGE_SIZE}

# config key -> (the value Loom runs, what it would change): anything else is refused naming the key
_EXACT: dict[str, tuple[Any, str]] = {
    "class_embed_type": (None, "a class embedding added to the time embedding"),
    "num_class_embeds": (None, "a class embedding added to the time embedding"),
    "addition_embed_type": (None, "an addition embedding (text or image time ids)"),
    "encoder_hid_dim": (None, "a projection of the context before cross-attention"),
    "encoder_hid_dim_type": (None, "a projection of the context before cross-attention"),
    "dual_cross_attention": (False, "a second cross-attention per block"),
    "time_embedding_type": ("positional", "another time embedding than the sinusoidal one"),
    "time_embedding_dim": (None, "a time embedding width other than 4 x block_out_channels[0]"),
    "time_embedding_act_fn": (None, "an activation after the time embedding"),
    "timestep_post_act": (None, "an activation inside the time embedding"),
    "time_cond_proj_dim": (None, "a timestep condition input"),
    "center_input_sample": (False, "a rescaled input"),
    "act_fn": ("silu", "another activation before conv_out than Loom's head runs"),
    "attention_type": ("default", "gated attention with grounding inputs"),
    "num_attention_heads": (None, "num_attention_heads (diffusers itself refuses it for this class)"),
    "reverse_transformer_layers_per_block": (None, "more than one transformer layer per block"),
    "class_embeddings_concat": (False, "a class embedding"),
}


def _levels(cfg: dict[str, Any], key: str) -> list[Any]:
    value = cfg.get(key)
    n = len(cfg["block_out_channels"])
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def config_refusal(cfg: dict[str, Any]) -> str | None:
    """Why Loom cannot run this UNet2DConditionModel config exactly, naming the config key and its value; None when
    it can."""
    boc = cfg.get("block_out_channels")
    if not isinstance(boc, (list, tuple)) or not boc or any(not isinstance(c, int) or c % boc[0] for c in boc):
        return f"'block_out_channels' ({boc}) is not a list of multiples of its first entry (Loom's channel_mults)"
    for key, (want, what) in _EXACT.items():
        if cfg.get(key, want) != want:
            return f"'{key}' ({cfg[key]!r}) means {what}, which Loom's unet2d does not run"
    checks = [
        ("transformer_layers_per_block", any(v != 1 for v in _levels(cfg, "transformer_layers_per_block")),
         "more than one transformer layer per block"),
        ("layers_per_block", len(set(_levels(cfg, "layers_per_block"))) != 1, "a block count per level (Loom has one "
         "num_layers)"),
        ("cross_attention_dim", isinstance(cfg.get("cross_attention_dim"), (list, tuple)), "a context width per level"),
        ("sample_size", not isinstance(cfg.get("sample_size", 64), int), "non-square latents (Loom's image_size is a "
         "side)"),
        ("down_block_types", len(cfg.get("down_block_types") or []) != len(boc)
         or any(t not in DOWN_TYPES for t in cfg["down_block_types"]), f"blocks other than {', '.join(DOWN_TYPES)}"),
        ("up_block_types", len(cfg.get("up_block_types") or []) != len(boc)
         or any(t not in UP_TYPES for t in cfg["up_block_types"]), f"blocks other than {', '.join(UP_TYPES)}"),
        ("mid_block_type", cfg.get("mid_block_type", MID_TYPE) != MID_TYPE, f"a mid block other than {MID_TYPE}"),
        ("norm_num_groups", cfg.get("norm_num_groups", 32) is None, "no output norm (Loom's head has one)"),
        ("out_channels", cfg.get("out_channels", 4) != cfg.get("in_channels", 4), "a prediction of another width than "
         "the latents (Loom's head predicts the noise)"),
        ("mid_block_only_cross_attention", cfg.get("mid_block_only_cross_attention") not in (None, False),
         "a mid block without self-attention"),
    ]
    for key, bad, what in checks:
        if bad:
            return f"'{key}' ({cfg.get(key)!r}) means {what}, which Loom's unet2d does not run"
    return None


def config_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The unet2d spec fields the config fixes (call after :func:`config_refusal` returned None)."""
    boc = list(cfg["block_out_channels"])
    heads = set(_levels(cfg, "attention_head_dim"))
    fields = {"hidden_size": boc[0], "channel_mults": [c // boc[0] for c in boc],
              "num_layers": _levels(cfg, "layers_per_block")[0], "in_channels": cfg.get("in_channels", 4),
              "image_size": cfg.get("sample_size")}
    if len(heads) == 1:
        fields["num_heads"] = heads.pop()
    return {k: v for k, v in fields.items() if v is not None}


@lru_cache(maxsize=16)
def config_arch(path: str) -> UNetArch:
    """The :class:`planner.unet.UNetArch` of the diffusers folder at ``path`` (read through planner.pretrained)."""
    from planner.pretrained import resolve_pretrained  # local: planner.pretrained imports this module

    cfg = resolve_pretrained(path).config
    return UNetArch(tuple(DOWN_TYPES[t] for t in cfg["down_block_types"]),
                    tuple(UP_TYPES[t] for t in reversed(cfg["up_block_types"])), True,
                    tuple(_levels(cfg, "attention_head_dim")), cfg.get("cross_attention_dim", 1280))


def config_tensors(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensors every checkpoint of this config holds (the convolutions and cross-attention keys of every block, the
    time embedding, conv_in and conv_out), with the shapes it implies; diffusers' own construction order."""
    boc, n = list(cfg["block_out_channels"]), _levels(cfg, "layers_per_block")[0]
    c0, cin, ctx = boc[0], cfg.get("in_channels", 4), cfg.get("cross_attention_dim", 1280)
    k_in, k_out = cfg.get("conv_in_kernel", 3), cfg.get("conv_out_kernel", 3)
    shapes = {"conv_in.weight": (c0, cin, k_in, k_in), "time_embedding.linear_1.weight": (4 * c0, c0),
              "time_embedding.linear_2.weight": (4 * c0, 4 * c0), "conv_norm_out.weight": (c0,),
              "conv_out.weight": (cfg.get("out_channels", 4), c0, k_out, k_out)}

    def block(prefix: str, j: int, c_in: int, c: int, attention: bool) -> None:
        shapes[f"{prefix}.resnets.{j}.conv1.weight"] = (c, c_in, 3, 3)
        shapes[f"{prefix}.resnets.{j}.conv2.weight"] = (c, c, 3, 3)
        if attention:
            shapes[f"{prefix}.attentions.{j}.transformer_blocks.0.attn2.to_k.weight"] = (c, ctx)

    c_out = c0
    for level, kind in enumerate(cfg["down_block_types"]):
        c_prev, c_out = c_out, boc[level]
        for j in range(n):
            block(f"down_blocks.{level}", j, c_prev if j == 0 else c_out, c_out, DOWN_TYPES[kind])
        if level < len(boc) - 1:
            shapes[f"down_blocks.{level}.downsamplers.0.conv.weight"] = (c_out, c_out, 3, 3)
    for j in range(2):
        shapes[f"mid_block.resnets.{j}.conv1.weight"] = (boc[-1], boc[-1], 3, 3)
    shapes["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"] = (boc[-1], ctx)
    rev, c_out = boc[::-1], boc[-1]
    for i, kind in enumerate(cfg["up_block_types"]):
        c_prev, c_out, c_skip = c_out, rev[i], rev[min(i + 1, len(boc) - 1)]
        for j in range(n + 1):
            skip = c_skip if j == n else c_out
            block(f"up_blocks.{i}", j, (c_prev if j == 0 else c_out) + skip, c_out, UP_TYPES[kind])
        if i < len(boc) - 1:
            shapes[f"up_blocks.{i}.upsamplers.0.conv.weight"] = (c_out, c_out, 3, 3)
    return shapes
