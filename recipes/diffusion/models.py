"""The reward models' image and text towers: tiny CLIP towers with random weights, saved locally.

Nothing is downloaded: a CLIPVisionModel (32 px images in 4 px patches, 64 wide, 2 layers) and a CLIPTextModel over
the recipe's words (recipes.diffusion.shapes.WORDS; 64 wide, 2 layers, 16 positions) are built from their config
classes with seeded random weights and ``save_pretrained``-ed, as ``itercomp-tiny.yaml``'s ``pretrained:`` folders.
One thing a pretrained tower knows is given to the vision tower by hand: where each patch is. CLIP initialises its
position embeddings at a twentieth of its patch embeddings' scale, which a frozen random tower would keep, so its
patch positions are a fixed 2-D sine-cosine grid (MAE's) at the patch embeddings' scale instead (:func:`sincos_grid`).
``main`` then trains the vision tower :data:`PRETRAIN_STEPS` steps on the renderer's images
(recipes.diffusion.backbone: the stand-in for a pretrained backbone; about 2 CPU minutes), as the reward models'
frozen trunk; tests build random towers (``pretrain_steps=0``).
``main`` also writes the random-weight UNet the iteration pipeline starts from (recipes.diffusion.generator). Run
``python -m recipes.diffusion.models [FOLDER]`` (default ``recipes/diffusion/models``) before ``loom run``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from recipes.diffusion.shapes import BOS, EOS, PAD, SIDE, WORDS

PATCH = 4
WIDTH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


PRETRAIN_STEPS = 600  # of 64 rendered scenes: the vision tower's training before it is frozen (backbone.py)
POSITION_SCALE = 0.1  # about the standard deviation of CLIP's initial patch embeddings of [-1, 1] pixels


def sincos_grid(grid: int, width: int):
    """``(grid * grid, width)`` float32: per patch (row-major) sines and cosines of its column (first half of the
    width) and row (second half) at geometrically spaced frequencies, MAE's fixed 2-D position embedding."""
    import torch

    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")
    parts = [f(pos.reshape(-1, 1) * omega) for pos in (cols, rows) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)


def save_towers(folder: str | Path, seed: int = 0, patch: int = PATCH, pretrain_steps: int = 0,
                log=None) -> tuple[Path, Path]:
    """Write ``folder/vision`` (CLIPVisionModel, ``patch`` px patches; trained ``pretrain_steps`` steps on the
    renderer's images first, recipes.diffusion.backbone) and ``folder/text`` (CLIPTextModel); returns both paths."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    vision = CLIPVisionModel(CLIPVisionConfig(image_size=SIDE, patch_size=patch, num_channels=3, **WIDTH))
    with torch.no_grad():  # [class token, patches]: the class token's position stays zero
        positions = vision.embeddings.position_embedding.weight
        positions.zero_()
        positions[1:] = POSITION_SCALE * sincos_grid(SIDE // patch, WIDTH["hidden_size"])
    after_vision = torch.get_rng_state()
    CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS), max_position_embeddings=16, bos_token_id=BOS,
                                 eos_token_id=EOS, pad_token_id=PAD, **WIDTH)).save_pretrained(folder / "text")
    if pretrain_steps:  # from the state after the vision tower's init: the text tower is the same either way
        from recipes.diffusion.backbone import pretrain_vision

        torch.set_rng_state(after_vision)
        losses = pretrain_vision(vision, pretrain_steps, seed=seed, log=log)
    vision.save_pretrained(folder / "vision")
    if pretrain_steps:  # what setup.sh looks for: towers written before the pretraining are written again
        record = {"steps": pretrain_steps, "seed": seed, "loss_first": losses[0], "loss_last": losses[-1]}
        (folder / "vision" / "pretrain.json").write_text(json.dumps(record) + "\n")
    return folder / "vision", folder / "text"


def main(argv: list[str]) -> None:
    folder = Path(argv[0]) if argv else Path(__file__).resolve().parent / "models"
    vision, text = save_towers(folder, pretrain_steps=PRETRAIN_STEPS, log=print)
    from recipes.diffusion.generator import save_unet

    unet = save_unet(folder / "unet")
    print(f"wrote {vision} (CLIP vision), {text} (CLIP text) and {unet} (UNet2DConditionModel over 16-px latents)")


if __name__ == "__main__":
    main(sys.argv[1:])
