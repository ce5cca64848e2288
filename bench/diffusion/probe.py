"""``python -m bench.diffusion.probe [--tower FOLDER ...] [--scenes N] [--no-write]``: does a vision tower's output
keep what the reward models must read? Linear probes on its last hidden state against the same probes on raw pixels.

The reward models read a frozen CLIP vision tower's tokens (recipes/diffusion/itercomp-tiny.yaml). A scoring head can
only rank a colour swap or a mirrored relation if those tokens still tell which colour is where and which shape it
has. Scenes are the renderer's exact layouts of random prompts of all three categories; probes (linear, trained by
full-batch L-BFGS on ``--scenes`` scenes, scored on 1000 others):

* ``colour``: per patch token, the colour at the patch's centre (4 palette colours or background; 5 classes);
* ``shape``: per patch token, the shape of the object at the patch's centre (circle, square, triangle, background);
* ``red_x``, ``red_y``: in scenes with a red object, its centre from all patch tokens flattened (R^2);
* ``red_shape``: in scenes with a red object, its shape from all patch tokens flattened (3 classes).

The same probes on raw pixels (``pixels``: the patch's 48 values, or all 3072 flattened) say what is there to keep.
Writes bench/results/diffusion-probe.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench.common import write_results
from recipes.diffusion.data import pixels
from recipes.diffusion.shapes import CATEGORIES, COLOURS, SHAPES, SIDE, layout, random_prompt, render, shape_mask
from runtime.modules import stable_seed

MODELS = Path(__file__).resolve().parents[2] / "recipes" / "diffusion" / "models"
PATCH = 4
TEST_SCENES = 1000
FLAT_L2 = 1e-2  # the flattened probes read 4,096 features from ~1,000 scenes


def scenes(count: int, seed: int):
    """``count`` exact scenes of random prompts (categories in turn) and their images ``(count, 3, S, S)``."""
    out, images = [], []
    for i in range(count):
        rng = np.random.default_rng(stable_seed("diffusion-probe", seed, i))
        scene = layout(random_prompt(CATEGORIES[i % 3], rng), rng)
        out.append(scene)
        images.append(render(scene, rng))
    return out, np.stack(images)


def patch_labels(scene) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (row-major) the colour index and shape index at its centre pixel (background: the last index)."""
    colour = np.full((SIDE, SIDE), len(COLOURS))
    shape = np.full((SIDE, SIDE), len(SHAPES))
    for obj in scene.objects:
        mask = shape_mask(obj)
        colour[mask] = list(COLOURS).index(obj.colour)
        shape[mask] = SHAPES.index(obj.shape)
    centre = PATCH // 2
    return colour[centre::PATCH, centre::PATCH].reshape(-1), shape[centre::PATCH, centre::PATCH].reshape(-1)


def tower_tokens(folder: Path, images: np.ndarray) -> torch.Tensor:
    """``(N, 64, H)``: the tower's last hidden state at the patch tokens (class token dropped)."""
    from transformers import CLIPVisionModel

    vision = CLIPVisionModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return torch.cat([vision(pixel_values=pixels(list(images[i:i + 256]), SIDE, 3)).last_hidden_state[:, 1:]
                          for i in range(0, len(images), 256)])


def raw_patches(images: np.ndarray) -> torch.Tensor:
    """``(N, 64, 48)``: each patch's pixels (as the tower's patch embedding reads them)."""
    x = torch.from_numpy(images) * 2 - 1
    n, c, g = len(images), 3, SIDE // PATCH
    return x.reshape(n, c, g, PATCH, g, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * PATCH * PATCH)


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int | None, l2: float = 1e-4,
               iters: int = 200) -> torch.nn.Linear:
    """A linear probe (softmax regression for ``classes``, least squares otherwise; ``l2`` times the squared
    weights added), standardised inputs."""
    probe = torch.nn.Linear(x.shape[1], classes or y.shape[1])
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        out = probe(x)
        loss = torch.nn.functional.cross_entropy(out, y) if classes else ((out - y) ** 2).mean()
        loss = loss + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def score(probe, x, y, classes) -> float:
    with torch.no_grad():
        out = probe(x)
    if classes:
        return float((out.argmax(1) == y).float().mean())
    return float(1 - ((out - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def probes(train_feats, test_feats, train_scenes, test_scenes) -> dict[str, float]:
    """The four probes' held-out scores on ``(N, 64, H)`` token features."""
    out = {}
    mean, std = train_feats.mean((0, 1)), train_feats.std((0, 1)) + 1e-6
    tr, te = (train_feats - mean) / std, (test_feats - mean) / std
    for k, name in enumerate(("colour", "shape")):
        ytr = torch.from_numpy(np.concatenate([patch_labels(s)[k] for s in train_scenes]))
        yte = torch.from_numpy(np.concatenate([patch_labels(s)[k] for s in test_scenes]))
        classes = len(COLOURS) + 1 if k == 0 else len(SHAPES) + 1
        probe = fit_linear(tr.reshape(-1, tr.shape[-1]), ytr, classes)
        out[name] = score(probe, te.reshape(-1, te.shape[-1]), yte, classes)

    def red(scene_list, feats):
        idx = [i for i, s in enumerate(scene_list) if any(o.colour == "red" for o in s.objects)]
        objs = [next(o for o in scene_list[i].objects if o.colour == "red") for i in idx]
        xy = torch.tensor([[o.x / SIDE, o.y / SIDE] for o in objs])
        shape = torch.tensor([SHAPES.index(o.shape) for o in objs])
        return feats[idx].reshape(len(idx), -1), xy, shape

    xtr, xytr, shtr = red(train_scenes, tr)
    xte, xyte, shte = red(test_scenes, te)
    probe = fit_linear(xtr, xytr, None, l2=FLAT_L2)
    with torch.no_grad():
        pred = probe(xte)
    for k, name in enumerate(("red_x", "red_y")):
        out[name] = float(1 - ((pred[:, k] - xyte[:, k]) ** 2).sum() / ((xyte[:, k] - xyte[:, k].mean()) ** 2).sum())
    out["red_shape"] = score(fit_linear(xtr, shtr, len(SHAPES), l2=FLAT_L2), xte, shte, len(SHAPES))
    return out


def markdown(records, args) -> str:
    lines = ["# Recipe diffusion: what a vision tower's tokens keep (linear probes, measured)", "",
             f"`python -m bench.diffusion.probe --scenes {args.scenes}`: exact scenes of random prompts (all three "
             f"categories), linear probes fitted on {args.scenes} scenes, scored on {TEST_SCENES} others. Per patch "
             "token: the colour (5 classes) and the shape (4 classes) at the patch's centre (accuracy); from all "
             "patch tokens flattened, in scenes with a red object: its centre x and y (R^2) and its shape "
             "(accuracy, 3 classes). `pixels` is the same probe on the raw pixels.", "",
             "| Features | colour | shape | red x (R^2) | red y (R^2) | red shape |", "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['features']} | {r['colour']:.3f} | {r['shape']:.3f} | {r['red_x']:.3f} | "
                     f"{r['red_y']:.3f} | {r['red_shape']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tower", action="append", default=None,
                        help="NAME=FOLDER of a CLIPVisionModel (repeatable; default: the recipe's models/vision)")
    parser.add_argument("--scenes", type=int, default=3000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    towers = dict(t.split("=", 1) for t in args.tower) if args.tower else {"frozen random": str(MODELS / "vision")}
    train_scenes, train_images = scenes(args.scenes, 0)
    test_scenes, test_images = scenes(TEST_SCENES, 1)
    records = [{"features": "pixels", **probes(raw_patches(train_images), raw_patches(test_images), train_scenes,
                                                test_scenes)}]
    for name, folder in towers.items():
        feats = probes(tower_tokens(Path(folder), train_images), tower_tokens(Path(folder), test_images),
                       train_scenes, test_scenes)
        records.append({"features": name, "folder": folder, **feats})
    for r in records:
        print(r, flush=True)
    if not args.no_write:
        write_results("diffusion-probe", records, markdown(records, args), {"scenes": args.scenes})


if __name__ == "__main__":
    main()
