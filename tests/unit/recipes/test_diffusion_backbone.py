"""The vision tower's pretraining on the renderer's images (recipes.diffusion.backbone): its targets say what the
image shows, and its steps lower the objective."""

from __future__ import annotations

import numpy as np
import torch

from recipes.diffusion.backbone import NUM_COLOURS, NUM_SHAPES, SLOT, backbone_loss, pretrain_vision, scene_batch
from recipes.diffusion.models import PATCH, WIDTH
from recipes.diffusion.shapes import COLOURS, SIDE


def test_patch_targets_are_the_colours_at_the_patch_centres():
    images, targets = scene_batch(0, 0, 6, PATCH)
    assert images.shape == (6, 3, SIDE, SIDE) and targets["colour"].shape == (6, (SIDE // PATCH) ** 2)
    palette = torch.tensor(list(COLOURS.values()))
    centres = (images[:, :, PATCH // 2::PATCH, PATCH // 2::PATCH].flatten(2).transpose(1, 2) + 1) / 2  # (B, P, 3)
    drawn = targets["colour"] < NUM_COLOURS
    assert drawn.any() and (~drawn).any()
    expected = palette[targets["colour"][drawn]]
    assert torch.allclose(centres[drawn], expected, atol=1e-5)
    assert ((centres[~drawn] - 0.92).abs() < 0.2).all()  # background grey with its pixel noise
    assert (targets["present"].sum(1) >= 1).all() and ((targets["shape"] < NUM_SHAPES) == drawn).all()


def test_pretraining_steps_lower_the_objective():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(image_size=SIDE, patch_size=PATCH, num_channels=3,
                                              **{**WIDTH, "num_hidden_layers": 1}))
    losses = pretrain_vision(vision, steps=12, batch=8, lr=3e-3)
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert SLOT == 1 + NUM_SHAPES + 3 and callable(backbone_loss)
