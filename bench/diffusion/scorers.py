"""``python -m bench.diffusion.scorers [--rows N] [--steps S] [--variants fusion,cross] [--no-write]``: which scoring
layers on the frozen towers learn the reward models' pairs, measured single-process.

A reward model (recipes/diffusion/itercomp-tiny.yaml) is frozen towers, a trained scoring component and the head
(recipes.diffusion.heads.PairwiseRewardHead). The towers are frozen, so their outputs for a fixed set of training
pairs are computed once here (``--rows`` training rows per category from recipes.diffusion.data.train_row: gallery
and minimal pairs alternating, as the runtime's data; the 256 held-out pairs of heldout_rows) and only the scoring
layers and the head train, many steps on CPU in minutes where a ``loom run`` recomputes the towers and renders every
row each step. Variants, both built from Loom's own layers (runtime.modules), 2 layers, 64 wide, 4 heads:

* ``fusion``: TransformerBlocks over the image's 65 tokens followed by the prompt's 10 (the spec's ``transformer``
  use ``after: [image, prompt]``); the head reads the prompt's positions;
* ``cross``: DecoderBlocks whose stream is the prompt's 10 tokens (not causal) cross-attending to the image's tokens
  (ImageReward's and IterComp's BLIP text encoder cross-attends to the image); the head reads the stream.

Training: AdamW (lr ``--lr``, weight decay 0.01), ``--batch`` pairs per step drawn with replacement from the rows,
the pairwise loss ``-log sigmoid(r_better - r_worse)``. Reported per category and variant: held-out pairwise accuracy
every fifth of the steps, split into pairs whose better image has more objects (the oracle's blobs) and the rest.
Writes bench/results/diffusion-scorers.{json,md}.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.common import write_results
from recipes.diffusion import oracle
from recipes.diffusion.data import heldout_rows, pixels, train_row
from recipes.diffusion.heads import PairwiseRewardHead, pairwise_loss
from recipes.diffusion.shapes import CATEGORIES, SIDE, tokenize
from runtime.modules import DecoderBlock, TransformerBlock

MODELS = Path(__file__).resolve().parents[2] / "recipes" / "diffusion" / "models"
WIDTH, HEADS, LAYERS, PROMPT_LEN = 64, 4, 2, 10


def tower_features(rows, models: Path = MODELS) -> dict[str, torch.Tensor]:
    """The frozen towers' outputs of ``rows`` (ranking, better, worse): ``better`` and ``worse`` ``(N, 65, 64)`` (the
    vision tower's last hidden state, as Loom's clip_vision layout runs it) and ``prompt`` ``(N, 10, 64)``; plus
    ``counted``: whether the better image has more objects than the worse one (the oracle's blobs)."""
    from transformers import CLIPTextModel, CLIPVisionModel

    vision = CLIPVisionModel.from_pretrained(models / "vision").eval()
    text = CLIPTextModel.from_pretrained(models / "text").eval()
    out: dict[str, list[torch.Tensor]] = {"better": [], "worse": [], "prompt": []}
    with torch.no_grad():
        for i in range(0, len(rows), 256):
            chunk = rows[i:i + 256]
            for key, k in (("better", 1), ("worse", 2)):
                x = pixels([row[0].images[row[k]] for row in chunk], SIDE, 3)
                out[key].append(vision(pixel_values=x).last_hidden_state)
            ids = torch.from_numpy(np.stack([tokenize(row[0].prompt.text, PROMPT_LEN) for row in chunk]))
            out["prompt"].append(text(input_ids=ids).last_hidden_state)
    feats = {k: torch.cat(v) for k, v in out.items()}
    feats["counted"] = torch.tensor([len(oracle.blobs(r.images[b])) > len(oracle.blobs(r.images[w]))
                                     for r, b, w in rows])
    return feats


class Scorer(nn.Module):
    """Scoring layers and a reward head over tower features (see the module doc for the two variants)."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        if variant == "fusion":
            self.layers = nn.ModuleList(TransformerBlock(WIDTH, HEADS, 4 * WIDTH) for _ in range(LAYERS))
        elif variant == "cross":
            self.layers = nn.ModuleList(DecoderBlock(WIDTH, HEADS, 4 * WIDTH, causal=False) for _ in range(LAYERS))
        else:
            raise ValueError(f"variant '{variant}': use fusion or cross.")
        self.head = PairwiseRewardHead("bench", "better", "worse", WIDTH, PROMPT_LEN)

    def forward(self, image: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        if self.variant == "fusion":
            h = torch.cat([image, prompt], dim=1)
            for layer in self.layers:
                h = layer(h)
        else:
            h = torch.cat([prompt, image], dim=1)
            for layer in self.layers:
                h = layer(h, PROMPT_LEN)
            h = h[:, :PROMPT_LEN]
        return self.head.reward(h)


def accuracy(scorer: Scorer, feats: dict[str, torch.Tensor]) -> dict[str, float]:
    scorer.eval()
    with torch.no_grad():
        right = scorer(feats["better"], feats["prompt"]) > scorer(feats["worse"], feats["prompt"])
    scorer.train()
    counted = feats["counted"]
    return {"acc": right.float().mean().item(), "acc_counted": right[counted].float().mean().item(),
            "acc_other": right[~counted].float().mean().item(), "pairs_other": int((~counted).sum())}


def train(job: tuple[str, str, dict, dict, int, int, float]) -> list[dict]:
    category, variant, train_feats, held, steps, batch, lr = job
    torch.set_num_threads(1)
    torch.manual_seed(0)
    scorer = Scorer(variant)
    opt = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    n, records, start = len(train_feats["prompt"]), [], time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (batch,), generator=gen)
        prompt = train_feats["prompt"][idx]
        loss = pairwise_loss(scorer(train_feats["better"][idx], prompt), scorer(train_feats["worse"][idx], prompt))
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        if step % max(steps // 5, 1) == 0 or step == steps:
            rec = {"category": category, "variant": variant, "step": step, "wall_s": round(time.time() - start, 1),
                   **accuracy(scorer, held)}
            print(rec, flush=True)
            records.append(rec)
    return records


def features(job: tuple[str, int]) -> tuple[str, dict, dict]:
    category, rows = job
    torch.set_num_threads(1)
    return category, tower_features([train_row(0, category, i) for i in range(rows)]), \
        tower_features(heldout_rows(0, category, 256))


def markdown(records: list[dict], args) -> str:
    lines = ["# Recipe diffusion: scoring layers of the reward models (measured)", "",
             f"`python -m bench.diffusion.scorers --rows {args.rows} --steps {args.steps} --batch {args.batch} "
             f"--lr {args.lr}`: single process per (category, variant), the frozen towers' outputs of {args.rows} "
             "training rows per category computed once (gallery and minimal pairs alternating), scoring layers and "
             "head trained on them; accuracy on the 256 held-out gallery pairs per category (seed 0), split into "
             "pairs whose better image has more objects and the others (colour, shape or relation). This 2-core "
             "machine was shared with other sessions (load average 20-50), so wall times are only indicative.", "",
             "| Category | Variant | Step | Held-out acc. | more-objects pairs | other pairs (n) | wall |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['category']} | {r['variant']} | {r['step']} | {r['acc']:.3f} | {r['acc_counted']:.3f} | "
                     f"{r['acc_other']:.3f} ({r['pairs_other']}) | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--variants", default="fusion,cross")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    categories, variants = args.categories.split(","), args.variants.split(",")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(len(categories)) as pool:
        feats = {c: (tr, ho) for c, tr, ho in pool.map(features, [(c, args.rows) for c in categories])}
    jobs = [(c, v, *feats[c], args.steps, args.batch, args.lr) for c in categories for v in variants]
    with ctx.Pool(len(jobs)) as pool:
        records = [r for rs in pool.map(train, jobs) for r in rs]
    if not args.no_write:
        config = {k: getattr(args, k) for k in ("rows", "steps", "batch", "lr", "categories", "variants")}
        write_results("diffusion-scorers", records, markdown(records, args), config)


if __name__ == "__main__":
    main()
