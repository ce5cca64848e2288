"""The reward models' vision tower trained on the renderer's images first: the stand-in for a pretrained backbone.

IterComp's reward models start from BLIP, whose image tower has seen millions of images (it knows colours, shapes and
where things are) and keeps its lower layers frozen. Nothing can be downloaded here, and the tiny tower with random
weights is a poor stand-in for that (bench/results/diffusion-probe.md measures what its tokens keep), so
:func:`pretrain_vision` trains the tiny CLIPVisionModel on scenes the renderer draws before the reward models use it
frozen. The objective is detection-style vision, not the reward models' task (no prompt, no ranking, no category):

* per patch token (a linear head): the colour (4 + background) and the shape (3 + background) at the patch's centre;
* from the class token (a linear head), per palette colour: whether an object of that colour is drawn, its shape,
  its centre (x, y) and half-size (in image sides).

Scenes: random prompts of all three categories, drawn by the gallery's generators at a random error rate (missing
objects, wrong shapes, swaps, opposite relations happen), seeded in their own stream (disjoint from the gallery's
training and held-out streams). The heads are dropped; only the tower is saved.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from recipes.diffusion.gallery import GENERATORS, draw
from recipes.diffusion.shapes import CATEGORIES, COLOURS, SHAPES, SIDE, random_prompt, render, shape_mask
from runtime.modules import stable_seed

NUM_COLOURS, NUM_SHAPES = len(COLOURS), len(SHAPES)
SLOT = 1 + NUM_SHAPES + 3  # per colour: present, shape logits, x, y, half


def scene_batch(seed: int, step: int, batch: int, patch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch ``step``'s images ``(B, 3, S, S)`` in [-1, 1] and targets: ``colour``/``shape`` ``(B, P)`` per patch,
    ``present`` ``(B, C)``, ``slot_shape`` ``(B, C)``, ``slot_xyh`` ``(B, C, 3)``."""
    images, colour, shape, present, slot_shape, slot_xyh = [], [], [], [], [], []
    centre = patch // 2
    for row in range(batch):
        rng = np.random.default_rng(stable_seed("diffusion-backbone", seed, step, row))
        prompt = random_prompt(CATEGORIES[row % len(CATEGORIES)], rng)
        scene, _ = draw(prompt, GENERATORS[int(rng.integers(len(GENERATORS)))][1], rng)
        images.append(render(scene, rng))
        c_map = np.full((SIDE, SIDE), NUM_COLOURS)
        s_map = np.full((SIDE, SIDE), NUM_SHAPES)
        pres, sh, xyh = np.zeros(NUM_COLOURS), np.zeros(NUM_COLOURS, dtype=np.int64), np.zeros((NUM_COLOURS, 3))
        for obj in scene.objects:
            mask = shape_mask(obj)
            k = list(COLOURS).index(obj.colour)
            c_map[mask], s_map[mask] = k, SHAPES.index(obj.shape)
            pres[k], sh[k], xyh[k] = 1.0, SHAPES.index(obj.shape), (obj.x / SIDE, obj.y / SIDE, obj.half / SIDE)
        colour.append(c_map[centre::patch, centre::patch].reshape(-1))
        shape.append(s_map[centre::patch, centre::patch].reshape(-1))
        present.append(pres)
        slot_shape.append(sh)
        slot_xyh.append(xyh)
    targets = {"colour": torch.from_numpy(np.stack(colour)), "shape": torch.from_numpy(np.stack(shape)),
               "present": torch.tensor(np.stack(present), dtype=torch.float32),
               "slot_shape": torch.from_numpy(np.stack(slot_shape)),
               "slot_xyh": torch.tensor(np.stack(slot_xyh), dtype=torch.float32)}
    return torch.from_numpy(np.stack(images)) * 2.0 - 1.0, targets


def backbone_loss(hidden: torch.Tensor, patch_head, slot_head, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """The objective (module doc) of the tower's last hidden state ``hidden`` ``(B, 1 + P, H)``."""
    dense = patch_head(hidden[:, 1:])  # (B, P, C + 1 + S + 1)
    loss = F.cross_entropy(dense[..., :NUM_COLOURS + 1].flatten(0, 1), targets["colour"].flatten()) + \
        F.cross_entropy(dense[..., NUM_COLOURS + 1:].flatten(0, 1), targets["shape"].flatten())
    slots = slot_head(hidden[:, 0]).reshape(-1, NUM_COLOURS, SLOT)
    present = targets["present"]
    loss = loss + F.binary_cross_entropy_with_logits(slots[..., 0], present)
    drawn = present.bool()
    if drawn.any():
        loss = loss + F.cross_entropy(slots[..., 1:1 + NUM_SHAPES][drawn], targets["slot_shape"][drawn]) + \
            10.0 * F.mse_loss(slots[..., 1 + NUM_SHAPES:][drawn], targets["slot_xyh"][drawn])
    return loss


def pretrain_vision(vision, steps: int, batch: int = 64, lr: float = 2e-3, seed: int = 0, log=None) -> list[float]:
    """Train ``vision`` (a CLIPVisionModel over ``SIDE`` px images) in place on the objective of the module doc
    (AdamW, cosine decay); the per-step losses. The heads are thrown away."""
    hidden = vision.config.hidden_size
    patch = vision.config.patch_size
    patch_head = torch.nn.Linear(hidden, NUM_COLOURS + 1 + NUM_SHAPES + 1)
    slot_head = torch.nn.Linear(hidden, NUM_COLOURS * SLOT)
    params = [*vision.parameters(), *patch_head.parameters(), *slot_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    vision.train()
    losses = []
    for step in range(steps):
        images, targets = scene_batch(seed, step, batch, patch)
        loss = backbone_loss(vision(pixel_values=images).last_hidden_state, patch_head, slot_head, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % max(steps // 10, 1) == 0:
            log(f"vision tower step {step + 1}/{steps}: loss {np.mean(losses[-max(steps // 10, 1):]):.4f}")
    vision.eval()
    return losses
