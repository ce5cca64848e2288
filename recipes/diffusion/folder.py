"""Real galleries: a folder of images and their rankings, which the reward models train and evaluate on.

A job's ``data_dir`` holds one folder per split (``train``, ``heldout``), each with ``rankings.json`` and the images
it names (PNG or anything PIL reads; converted to RGB and resized to the image use's side)::

    {"rankings": [
      {"category": "spatial",                                    # attribute, spatial or nonspatial
       "prompt": "a red circle left of a blue square",           # words of the recipe's vocabulary
       "images": ["0/sdxl.png", "0/flux.png", "0/sd15.png"],     # relative to the split folder
       "rank": [1, [0, 2]]}                                      # best first; a list = tied images
    ]}

``rank`` names every image index exactly once (IterComp's ``rank`` lists models best first; ties are an
extension). Every pair of images in different places is a (better, worse) pair. Training rows take the split's pairs
of the task's category in an order shuffled per epoch by the job's seed. Problems are one-line ValueErrors naming the
file and the entry. :func:`write_gallery` writes a synthetic gallery in this format; ``python -m
recipes.diffusion.folder OUT [PROMPTS]`` writes PROMPTS prompts per category and split.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from recipes.diffusion.gallery import Ranking, pairs, synthetic_entry
from recipes.diffusion.shapes import CATEGORIES, parse_prompt
from runtime.modules import stable_seed

RANKINGS = "rankings.json"


def _places(rank: object, count: int, where: str) -> list[list[int]]:
    """``rank`` as places of image indices; a ValueError unless it names each of ``count`` images once."""
    if not isinstance(rank, list):
        raise ValueError(f"{where}.rank ({rank!r}) is not a list; list the image indices best first, e.g. [1, [0, 2]].")
    places = [p if isinstance(p, list) else [p] for p in rank]
    flat = [i for p in places for i in p]
    if sorted(flat) != list(range(count)) or not all(isinstance(i, int) for i in flat):
        raise ValueError(f"{where}.rank ({rank}) must name each image index 0..{count - 1} exactly once (a list "
                         "inside groups tied images).")
    return places


def _image(path: Path, where: str) -> np.ndarray:
    """``(3, H, W)`` float32 in [0, 1]; a ValueError naming ``where`` when missing or unreadable."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    except FileNotFoundError:
        raise ValueError(f"{where}: no such image {path}; images are named relative to the split folder.") from None
    except OSError as err:
        raise ValueError(f"{where}: {path} is not an image PIL reads ({err}).") from None


@lru_cache(maxsize=8)
def _load(split_dir: str) -> tuple[Ranking, ...]:
    folder = Path(split_dir)
    file = folder / RANKINGS
    if not file.is_file():
        raise ValueError(f"data_dir: no {file}; a gallery folder holds train/ and heldout/, each with {RANKINGS} "
                         "(docs/recipes/diffusion.md).")
    try:
        entries = json.loads(file.read_text())["rankings"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{file}: not a rankings file ({type(err).__name__}: {err}); expected "
                         '{"rankings": [{"category", "prompt", "images", "rank"}, ...]}.') from None
    out = []
    for i, entry in enumerate(entries):
        where = f"{file}: rankings[{i}]"
        missing = [k for k in ("category", "prompt", "images", "rank") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f"{where} lacks {missing}; each ranking has category, prompt, images and rank.")
        try:
            prompt = parse_prompt(str(entry["prompt"]), str(entry["category"]))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        images = [_image(folder / name, f"{where}.images[{j}]") for j, name in enumerate(entry["images"])]
        out.append(Ranking(prompt, images, _places(entry["rank"], len(images), where)))
    return tuple(out)


def load_split(data_dir: str | Path, split: str, category: str) -> list[Ranking]:
    """The rankings of ``category`` in ``data_dir/split``."""
    return [r for r in _load(str(Path(data_dir) / split)) if r.prompt.category == category]


def folder_rows(data_dir: str | Path, split: str, category: str, seed: int, step: int, batch_size: int, start: int,
                stop: int) -> list[tuple[Ranking, int, int]]:
    """Rows ``[start, stop)`` of the batch at ``step``: the split's pairs of ``category``, shuffled per epoch."""
    everything = [(r, b, w) for r in load_split(data_dir, split, category) for b, w in pairs(r.places)]
    if not everything:
        raise ValueError(f"data_dir ({data_dir}): {split}/{RANKINGS} holds no pair of category '{category}' (a "
                         "ranking with images in at least two places).")
    rows = []
    for row in range(start, stop):
        index = step * batch_size + row
        epoch, offset = divmod(index, len(everything))
        order = np.random.default_rng(stable_seed("diffusion-folder", seed, split, category, epoch))
        rows.append(everything[order.permutation(len(everything))[offset]])
    return rows


def write_gallery(folder: str | Path, seed: int, prompts: int, splits: tuple[str, ...] = ("train", "heldout")) -> Path:
    """A synthetic gallery (recipes.diffusion.gallery) of ``prompts`` prompts per category and split in the folder
    format: PNG images, ``rankings.json`` with the oracle's ranking."""
    for split in splits:
        save_split(folder, split, [synthetic_entry(seed, split, category, i) for category in CATEGORIES
                                   for i in range(prompts)])
    return Path(folder)


def save_split(folder: str | Path, split: str, rankings: list[Ranking]) -> Path:
    """``rankings`` as split ``split`` of a gallery folder: ``<category>/<entry>_<image>.png`` and
    ``rankings.json``."""
    folder = Path(folder)
    entries = []
    for i, ranking in enumerate(rankings):
        category = ranking.prompt.category
        (folder / split / category).mkdir(parents=True, exist_ok=True)
        names = []
        for j, image in enumerate(ranking.images):
            name = f"{category}/{i}_{j}.png"
            Image.fromarray(np.round(image.transpose(1, 2, 0) * 255).astype(np.uint8)).save(folder / split / name)
            names.append(name)
        rank = [p if len(p) > 1 else p[0] for p in ranking.places]
        entries.append({"category": category, "prompt": ranking.prompt.text, "images": names, "rank": rank})
    (folder / split).mkdir(parents=True, exist_ok=True)
    (folder / split / RANKINGS).write_text(json.dumps({"rankings": entries}, indent=1))
    return folder / split


if __name__ == "__main__":
    out = write_gallery(sys.argv[1], 0, int(sys.argv[2]) if len(sys.argv) > 2 else 20)
    print(f"wrote a synthetic gallery to {out}")
