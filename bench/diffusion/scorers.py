"""``python -m bench.diffusion.scorers [--rows N] [--steps S] [--seeds 0,1] [--tower NAME=FOLDER] [--variants
fusion,cross] [--cache DIR] [--name NAME] [--append] [--no-write]``: which scoring layers on which frozen vision tower
learn the reward models' pairs, measured single-process over seeds.

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

Training: AdamW (lr ``--lr``, ``--schedule``, weight decay 0.01), ``--batch`` pairs per step drawn with replacement from the rows,
the pairwise loss ``-log sigmoid(r_better - r_worse)``. Reported per category and variant: held-out pairwise accuracy
every fifth of the steps, split into pairs whose better image has more objects (the oracle's blobs) and the rest.
Writes bench/results/diffusion-scorers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.common import RESULTS_DIR, write_results
from recipes.diffusion import oracle
from recipes.diffusion.data import heldout_rows, pixels, train_row
from recipes.diffusion.heads import PairwiseRewardHead, pairwise_loss
from recipes.diffusion.shapes import CATEGORIES, SIDE, tokenize
from runtime.modules import DecoderBlock, TransformerBlock

MODELS = Path(__file__).resolve().parents[2] / "recipes" / "diffusion" / "models"
WIDTH, HEADS, LAYERS, PROMPT_LEN = 64, 4, 2, 10


def pair_arrays(rows, counted: bool = True) -> dict[str, np.ndarray]:
    """The pairs of ``rows`` (ranking, better, worse) as arrays: ``better``/``worse`` ``(N, 3, S, S)`` float16 in
    [0, 1], ``ids`` ``(N, 10)`` the prompt's tokens, ``counted`` whether the better image has more objects than the
    worse one (the oracle's blobs; all False when not ``counted``: training rows need no split, and the oracle's
    blobs are most of their cost), ``prompt`` the prompt texts."""
    return {"better": np.stack([r.images[b] for r, b, _ in rows]).astype(np.float16),
            "worse": np.stack([r.images[w] for r, _, w in rows]).astype(np.float16),
            "ids": np.stack([tokenize(r.prompt.text, PROMPT_LEN) for r, _, _ in rows]),
            "counted": np.array([counted and len(oracle.blobs(r.images[b])) > len(oracle.blobs(r.images[w]))
                                 for r, b, w in rows]),
            "prompt": np.array([r.prompt.text for r, _, _ in rows])}


def cached_pairs(cache: Path | None, category: str, seed: int, count: int, split: str) -> dict[str, np.ndarray]:
    """:func:`pair_arrays` of ``count`` training rows (recipes.diffusion.data.train_row, ``seed``) or held-out pairs
    (heldout_rows, seed 0), read from ``cache`` when a previous run wrote them there."""
    path = cache / f"{split}-{category}-{seed}-{count}.npz" if cache is not None else None
    if path is not None and path.is_file():
        with np.load(path) as data:
            return dict(data)
    rows = [train_row(seed, category, i) for i in range(count)] if split == "train" else \
        heldout_rows(0, category, count)
    arrays = pair_arrays(rows, counted=split != "train")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
    return arrays


def tower_features(arrays: dict[str, np.ndarray], vision_folder: Path,
                   models: Path = MODELS) -> dict[str, torch.Tensor]:
    """The frozen towers' outputs of the pairs ``arrays`` (:func:`pair_arrays`): ``better`` and ``worse``
    ``(N, 65, 64)`` (the vision tower's last hidden state, as Loom's clip_vision layout runs it) and ``prompt``
    ``(N, 10, 64)``, float16; plus ``counted``."""
    from transformers import CLIPTextModel, CLIPVisionModel

    vision = CLIPVisionModel.from_pretrained(vision_folder).eval()
    text = CLIPTextModel.from_pretrained(models / "text").eval()
    out: dict[str, list[torch.Tensor]] = {"better": [], "worse": [], "prompt": []}
    with torch.no_grad():
        for i in range(0, len(arrays["ids"]), 256):
            for key in ("better", "worse"):
                x = pixels(list(arrays[key][i:i + 256].astype(np.float32)), SIDE, 3)
                out[key].append(vision(pixel_values=x).last_hidden_state.half())
            ids = torch.from_numpy(arrays["ids"][i:i + 256])
            out["prompt"].append(text(input_ids=ids).last_hidden_state.half())
    feats = {k: torch.cat(v) for k, v in out.items()}
    feats["counted"] = torch.from_numpy(arrays["counted"])
    return feats


class Scorer(nn.Module):
    """Scoring layers and a reward head over tower features (see the module doc for the two variants)."""

    def __init__(self, variant: str, layers: int = LAYERS):
        super().__init__()
        self.variant = variant
        if variant == "fusion":
            self.layers = nn.ModuleList(TransformerBlock(WIDTH, HEADS, 4 * WIDTH) for _ in range(layers))
        elif variant == "cross":
            self.layers = nn.ModuleList(DecoderBlock(WIDTH, HEADS, 4 * WIDTH, causal=False) for _ in range(layers))
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


def train(job: tuple) -> list[dict]:
    return fit(job[:-2], schedule=job[-2], layers=job[-1])[1]


def fit(job: tuple, init: dict | None = None, schedule: str = "constant",
        layers: int = LAYERS) -> tuple[Scorer, list[dict]]:
    """The trained scorer (``layers`` scoring layers) of one (category, variant, tower, seed, features, held-out
    features, steps, batch, lr) and its held-out accuracy every fifth of the steps; from the weights ``init`` (a
    state dict) when given.
    ``schedule``: ``constant`` lr, or ``cosine`` (decayed to 0 over the steps after a warm-up of 5% of them: at a
    constant 3e-3 the held-out accuracy swings by up to 0.12 between checkpoints, the optimiser's noise)."""
    category, variant, tower, seed, train_feats, held, steps, batch, lr = job
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    scorer = Scorer(variant, layers)
    if init is not None:
        scorer.load_state_dict(init)
    opt = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=0.01)
    warm = max(steps // 20, 1)
    factor = {"constant": lambda s: 1.0,
              "cosine": lambda s: min((s + 1) / warm, 0.5 * (1 + np.cos(np.pi * min(s / steps, 1.0))))}[schedule]
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(seed)
    n, records, start = len(train_feats["prompt"]), [], time.time()
    held = {k: v.float() if v.is_floating_point() else v for k, v in held.items()}
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (batch,), generator=gen)
        prompt = train_feats["prompt"][idx].float()
        loss = pairwise_loss(scorer(train_feats["better"][idx].float(), prompt),
                             scorer(train_feats["worse"][idx].float(), prompt))
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        lr_schedule.step()
        if step % max(steps // 5, 1) == 0 or step == steps:
            rec = {"category": category, "variant": variant, "tower": tower, "seed": seed, "step": step,
                   "wall_s": round(time.time() - start, 1), **accuracy(scorer, held)}
            print(rec, flush=True)
            records.append(rec)
    return scorer.eval(), records


def features(job: tuple) -> tuple[tuple[str, str, int], dict]:
    """Tower features of one (category, tower, seed, split)."""
    category, tower, folder, seed, split, count, cache = job
    torch.set_num_threads(1)
    arrays = cached_pairs(cache, category, seed, count, split)
    return (category, tower, seed if split == "train" else -1), tower_features(arrays, Path(folder))


def markdown(records: list[dict], args) -> str:
    lines = ["# Recipe diffusion: scoring layers of the reward models (measured)", "",
             f"`python -m bench.diffusion.scorers --rows {args.rows} --steps {args.steps} --batch {args.batch} "
             f"--lr {args.lr} --schedule {args.schedule} --layers {args.layers} --seeds {args.seeds}`: single process per (category, variant, tower, seed), the "
             f"frozen towers' outputs of {args.rows} training rows per category and seed computed once (gallery and "
             "minimal pairs alternating; rows drawn from the training stream with that seed), scoring layers and "
             f"head trained on them (initialised and batched by the seed); accuracy on the {args.heldout} held-out "
             "gallery pairs per category (the held-out stream's scenes, seed 0: scenes never trained on; prompt texts "
             "come from the same small space), split into pairs whose better image has more objects and the others "
             "(colour, shape or relation). This 2-core machine was shared with other sessions (load average "
             f"{os.getloadavg()[0]:.0f} at the end), so wall times are only indicative.", "",
             "| Category | Variant | Tower | Seed | Step | Held-out acc. | more-objects pairs | other pairs (n) "
             "| wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['category']} | {r['variant']} | {r['tower']} | {r['seed']} | {r['step']} | {r['acc']:.3f} "
                     f"| {r['acc_counted']:.3f} | {r['acc_other']:.3f} ({r['pairs_other']}) | {r['wall_s']:.0f} s |")
    last = {}
    for r in records:  # the last record of each run
        key = (r["category"], r["variant"], r["tower"], r["seed"])
        last[key] = r if key not in last or r["step"] > last[key]["step"] else last[key]
    final = list(last.values())
    lines += ["", "Final step, mean over seeds (min - max):", "",
              "| Category | Variant | Tower | Held-out acc. | other pairs |", "|---|---|---|---|---|"]
    for key in sorted({(r["category"], r["variant"], r["tower"]) for r in final}, key=lambda k: (k[2], k[0], k[1])):
        accs = [r["acc"] for r in final if (r["category"], r["variant"], r["tower"]) == key]
        other = [r["acc_other"] for r in final if (r["category"], r["variant"], r["tower"]) == key]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {np.mean(accs):.3f} ({min(accs):.3f} - {max(accs):.3f}) "
                     f"| {np.mean(other):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--heldout", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="cosine",
                        help="the lr over the steps (fit)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="scoring layers (the spec's <category>_rm)")
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--variants", default="fusion")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--tower", action="append", default=None,
                        help="NAME=FOLDER of the vision tower (repeatable; default: pretrained=the recipe's "
                        "models/vision)")
    parser.add_argument("--cache", type=Path, default=None, help="folder keeping the rendered pairs between runs")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--name", default="diffusion-scorers", help="results file name under bench/results")
    parser.add_argument("--append", action="store_true",
                        help="keep the records of bench/results/diffusion-scorers.json of other (tower, seed)s")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    categories, variants = args.categories.split(","), args.variants.split(",")
    seeds = [int(x) for x in args.seeds.split(",")]
    towers = dict(t.split("=", 1) for t in args.tower) if args.tower else {"pretrained": str(MODELS / "vision")}
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(args.workers) as pool:  # rows first (cached), so towers of one category reuse them
        if args.cache is not None:
            pool.starmap(cached_pairs, [(args.cache, c, s, args.rows, "train") for c in categories for s in seeds]
                         + [(args.cache, c, 0, args.heldout, "heldout") for c in categories])
        jobs = [(c, t, f, s, "train", args.rows, args.cache) for c in categories for t, f in towers.items()
                for s in seeds] + [(c, t, f, 0, "heldout", args.heldout, args.cache) for c in categories
                                   for t, f in towers.items()]
        feats = dict(pool.map(features, jobs))
    train_jobs = [(c, v, t, s, feats[c, t, s], feats[c, t, -1], args.steps, args.batch, args.lr, args.schedule,
                   args.layers) for c in categories for v in variants for t in towers for s in seeds]
    with ctx.Pool(min(len(train_jobs), args.workers * 2)) as pool:
        records = [r for rs in pool.map(train, train_jobs) for r in rs]
    if not args.no_write:
        config = {k: getattr(args, k) for k in ("rows", "heldout", "steps", "batch", "lr", "schedule", "layers",
                                                  "categories", "variants", "seeds")}
        runs = [{**config, "towers": towers}]
        if args.append:
            old = json.loads((RESULTS_DIR / f"{args.name}.json").read_text())
            ran = {(r["category"], r["variant"], r["tower"], r["seed"]) for r in records}
            # records of the bench before towers and seeds (no "tower") are dropped
            records = [r for r in old["records"] if "tower" in r
                       and (r["category"], r["variant"], r["tower"], r["seed"]) not in ran] + records
            runs = old["config"].get("runs", []) + runs if any("tower" in r for r in old["records"]) else runs
        write_results(args.name, records, markdown(records, args), {"runs": runs})


if __name__ == "__main__":
    main()
