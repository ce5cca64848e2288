"""The gallery: several generators draw each prompt, the oracle ranks their images, rankings become pairs.

IterComp's gallery is six text-to-image models whose images of each prompt humans rank. Here a generator is the
renderer with a controlled error rate (:data:`GENERATORS`): it draws a prompt after each of its errors has struck
independently with its rate (:func:`draw`):

* colour swap: the two objects' colours exchanged ("a blue circle and a red square" drawn for the red circle);
* wrong relation: the opposite relation (left of for right of, above for below, next to for inside); not in
  attribute binding, which has no relation;
* wrong shape: one object drawn as another shape;
* missing object: one object left out.

Every prompt is drawn once by each generator; the oracle (recipes.diffusion.oracle) scores each image for the
prompt's category, and the images are ranked by score (:class:`Ranking`: ties share a place). Every ordered pair of
images in different places is a (better, worse) pair (:func:`pairs`), as IterComp expands its rankings.

Synthetic galleries are deterministic per (seed, split, category, prompt index) (:func:`synthetic_entry`); a real
gallery is a folder (recipes.diffusion.folder).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from recipes.diffusion import oracle
from recipes.diffusion.shapes import OPPOSITE, SHAPES, Prompt, Scene, layout, random_prompt, render
from runtime.modules import stable_seed

ERRORS = ("colour swap", "wrong relation", "wrong shape", "missing object")
# (name, error rate): each error strikes independently at the rate
GENERATORS = (("exact", 0.0), ("careful", 0.15), ("fair", 0.3), ("sloppy", 0.5), ("poor", 0.7))


@dataclass(frozen=True)
class Ranking:
    """A prompt's images ranked: ``places[k]`` lists the indices of the images in place ``k`` (best first; images in
    one place are tied)."""

    prompt: Prompt
    images: list[np.ndarray]  # (3, I, I) float32 in [0, 1] each
    places: list[list[int]]


def draw(prompt: Prompt, rate: float, rng: np.random.Generator) -> tuple[Scene, list[str]]:
    """The scene a generator of error ``rate`` draws for ``prompt``, and the errors that struck."""
    struck = [e for e in ERRORS if rng.random() < rate and not (e == "wrong relation" and prompt.relation is None)]
    return draw_with(prompt, struck, rng), struck


def draw_with(prompt: Prompt, struck: list[str], rng: np.random.Generator) -> Scene:
    """The scene drawn for ``prompt`` after the errors ``struck`` (names of :data:`ERRORS`)."""
    (c1, s1), (c2, s2) = prompt.objects
    asked = prompt
    if "colour swap" in struck:
        asked = replace(asked, objects=((c2, s1), (c1, s2)))
    if "wrong relation" in struck:
        asked = replace(asked, relation=OPPOSITE[prompt.relation])
    if "wrong shape" in struck:
        which = int(rng.integers(2))
        colour, shape = asked.objects[which]
        other = str(rng.choice([s for s in SHAPES if s != shape]))
        objects = list(asked.objects)
        objects[which] = (colour, other)
        asked = replace(asked, objects=tuple(objects))
    scene = layout(asked, rng)
    if "missing object" in struck:
        dropped = asked.objects[int(rng.integers(2))][0]
        scene = Scene(tuple(o for o in scene.objects if o.colour != dropped))
    return scene


def rank(prompt: Prompt, images: list[np.ndarray], scores: list[float] | None = None) -> Ranking:
    """``images`` of ``prompt`` ranked by ``scores`` (default: the oracle's), best first; equal scores tie."""
    scores = [oracle.score(image, prompt) for image in images] if scores is None else scores
    places = [[i for i, s in enumerate(scores) if s == value] for value in sorted(set(scores), reverse=True)]
    return Ranking(prompt, images, places)


def pairs(places: list[list[int]]) -> list[tuple[int, int]]:
    """Every (better, worse) pair of image indices of a ranking's places (images in different places)."""
    return [(b, w) for k, better in enumerate(places) for worse in places[k + 1:] for b in better for w in worse]


def synthetic_entry(seed: int, split: str, category: str, index: int) -> Ranking:
    """Prompt ``index`` of ``category`` in ``split``: the prompt, each generator's image of it, the oracle's
    ranking."""
    rng = np.random.default_rng(stable_seed("diffusion-gallery", seed, split, category, index))
    prompt = random_prompt(category, rng)
    images = [render(draw(prompt, rate, rng)[0], rng) for _, rate in GENERATORS]
    return rank(prompt, images)


def minimal_pair(seed: int, split: str, category: str, index: int) -> Ranking:
    """A prompt drawn exactly and once with a single error that keeps both objects (colour swap, wrong shape or, outside
    attribute binding, wrong relation), ranked by the oracle: a pair that differs in what the prompt binds, not in how
    many objects there are (the hard negatives a gallery's rankings hold few of)."""
    rng = np.random.default_rng(stable_seed("diffusion-minimal", seed, split, category, index))
    prompt = random_prompt(category, rng)
    kinds = [e for e in ERRORS[:3] if not (e == "wrong relation" and prompt.relation is None)]
    error = kinds[int(rng.integers(len(kinds)))]
    images = [render(draw_with(prompt, [], rng), rng), render(draw_with(prompt, [error], rng), rng)]
    return rank(prompt, images)
