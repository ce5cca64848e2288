"""Coloured shapes: the prompts of IterComp's three categories, their words, and a numpy renderer.

A :class:`Prompt` is what a text-to-image model is asked for: two objects (a colour and a shape each; the two colours
differ) and, except in attribute binding, a relation between them:

* ``attribute``   "a red circle and a blue square" (binding: each colour on its own shape);
* ``spatial``     "a red circle left of a blue square" (left of, right of, above, below);
* ``nonspatial``  "a red circle inside a blue square" / "a red circle next to a blue square". IterComp's
  non-spatial prompts are actions ("a man holding a cup"); containment is the relation a renderer of flat shapes can
  show and an oracle can check from pixels without reading positions alone, so it stands in for them.

A :class:`Scene` is what is drawn: objects with a colour, a shape, a centre and a half-size, in order (a later object
is painted over an earlier one). :func:`layout` places a prompt's objects as the prompt says; a gallery generator
(recipes.diffusion.gallery) may alter the scene first (its errors). :func:`render` paints it: a light, slightly noisy
background and flat axis-aligned shapes (a triangle points up), as float32 ``(3, I, I)`` in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

CATEGORIES = ("attribute", "spatial", "nonspatial")
COLOURS = {"red": (0.86, 0.16, 0.16), "green": (0.16, 0.70, 0.24), "blue": (0.20, 0.31, 0.86),
           "yellow": (0.90, 0.82, 0.16)}
SHAPES = ("circle", "square", "triangle")
SPATIAL = ("left of", "right of", "above", "below")
NONSPATIAL = ("inside", "next to")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above",
            "inside": "next to", "next to": "inside"}
SIDE = 32  # image side in pixels
BACKGROUND = 0.92  # grey level of the background
NOISE_STD = 0.03  # background pixel noise
HALF_SIZES = (4, 6)  # half-sizes (pixels) of a free object: small, big
INNER_HALF, OUTER_HALF = 3, 7  # non-spatial: the first object is small, the second big (it can hold the first)

# Words: 0 pad, 1 begin, 2 end, then the prompt vocabulary.
PAD, BOS, EOS = 0, 1, 2
WORDS = ("<pad>", "<bos>", "<eos>", "a", "and", "of", "to", *COLOURS, *SHAPES, "left", "right", "above", "below",
         "inside", "next")
WORD_IDS = {w: i for i, w in enumerate(WORDS)}
MAX_WORDS = 8  # "a red circle left of a blue square"


@dataclass(frozen=True)
class Prompt:
    """Two objects (colour, shape) and the relation of the first to the second (None: attribute binding)."""

    category: str
    objects: tuple[tuple[str, str], tuple[str, str]]
    relation: str | None = None

    @property
    def text(self) -> str:
        (c1, s1), (c2, s2) = self.objects
        return f"a {c1} {s1} {self.relation or 'and'} a {c2} {s2}"


@dataclass(frozen=True)
class Shape:
    """One drawn object: colour and shape names, centre (x, y) in pixels, half-size in pixels."""

    colour: str
    shape: str
    x: float
    y: float
    half: int


@dataclass(frozen=True)
class Scene:
    """What is drawn: objects in painting order (a later one covers an earlier one)."""

    objects: tuple[Shape, ...]


def random_prompt(category: str, rng: np.random.Generator) -> Prompt:
    """A prompt of ``category``: two distinct colours, any two shapes, a relation of the category."""
    if category not in CATEGORIES:
        raise ValueError(f"category ('{category}') is not one of {', '.join(CATEGORIES)}.")
    c1, c2 = rng.choice(list(COLOURS), size=2, replace=False)
    s1, s2 = rng.choice(SHAPES, size=2)
    relation = {"attribute": None, "spatial": SPATIAL, "nonspatial": NONSPATIAL}[category]
    if relation is not None:
        relation = str(rng.choice(relation))
    return Prompt(category, ((str(c1), str(s1)), (str(c2), str(s2))), relation)


def parse_prompt(text: str, category: str) -> Prompt:
    """The :class:`Prompt` a text says (the inverse of :attr:`Prompt.text`); a ValueError saying what is expected."""
    words = text.lower().split()
    relations = {"attribute": ("and",), "spatial": SPATIAL, "nonspatial": NONSPATIAL}.get(category)
    if relations is None:
        raise ValueError(f"category ('{category}') is not one of {', '.join(CATEGORIES)}.")
    for relation in relations:
        rel = relation.split()
        if (len(words) == 6 + len(rel) and words[0] == "a" and words[3:3 + len(rel)] == rel
                and words[3 + len(rel)] == "a" and words[1] in COLOURS and words[-2] in COLOURS
                and words[1] != words[-2] and words[2] in SHAPES and words[-1] in SHAPES):
            return Prompt(category, ((words[1], words[2]), (words[-2], words[-1])),
                          None if category == "attribute" else relation)
    example = {"attribute": "a red circle and a blue square", "spatial": "a red circle left of a blue square",
               "nonspatial": "a red circle inside a blue square"}[category]
    raise ValueError(f"prompt ('{text}') is not a {category} prompt of this recipe; expected e.g. '{example}' "
                     f"(colours {', '.join(COLOURS)}, two different; shapes {', '.join(SHAPES)}; relations "
                     f"{', '.join(relations)}).")


def tokenize(text: str, length: int) -> np.ndarray:
    """``[BOS, words..., EOS, PAD...]`` ids, ``length`` long (int64); a ValueError for an unknown word or a prompt
    that does not fit."""
    words = text.lower().split()
    unknown = [w for w in words if w not in WORD_IDS or WORD_IDS[w] <= EOS]
    if unknown:
        raise ValueError(f"prompt ('{text}'): words {unknown} are not in the recipe's vocabulary "
                         f"({' '.join(WORDS[EOS + 1:])}).")
    if len(words) + 2 > length:
        raise ValueError(f"prompt ('{text}') has {len(words)} words; the text use's seq_len {length} holds "
                         f"{length - 2}. Raise the text use's seq_len to {len(words) + 2} or more.")
    ids = [BOS, *(WORD_IDS[w] for w in words), EOS]
    return np.array(ids + [PAD] * (length - len(ids)), dtype=np.int64)


def _free_position(half: int, rng: np.random.Generator) -> tuple[float, float]:
    lo, hi = half + 1, SIDE - half - 2
    return float(rng.integers(lo, hi + 1)), float(rng.integers(lo, hi + 1))


def layout(prompt: Prompt, rng: np.random.Generator) -> Scene:
    """A scene that shows ``prompt`` exactly (positions and sizes drawn by ``rng``)."""
    (c1, s1), (c2, s2) = prompt.objects
    if prompt.relation in NONSPATIAL:
        return place_nonspatial(Shape(c1, s1, 0, 0, INNER_HALF), Shape(c2, s2, 0, 0, OUTER_HALF), prompt.relation, rng)
    halves = rng.choice(HALF_SIZES, size=2)
    a, b = Shape(c1, s1, 0, 0, int(halves[0])), Shape(c2, s2, 0, 0, int(halves[1]))
    if prompt.relation is None:
        return place_apart(a, b, rng)
    return place_spatial(a, b, prompt.relation, rng)


def place_apart(a: Shape, b: Shape, rng: np.random.Generator) -> Scene:
    """``a`` and ``b`` anywhere, their bounding squares at least 2 px apart."""
    while True:
        (xa, ya), (xb, yb) = _free_position(a.half, rng), _free_position(b.half, rng)
        if max(abs(xa - xb), abs(ya - yb)) >= a.half + b.half + 3:
            return Scene((replace(a, x=xa, y=ya), replace(b, x=xb, y=yb)))


def place_spatial(a: Shape, b: Shape, relation: str, rng: np.random.Generator) -> Scene:
    """``a`` ``relation`` (left of, right of, above, below) ``b``: apart along the relation's axis by more than their
    sizes, and by more along that axis than across it."""
    while True:
        (xa, ya), (xb, yb) = _free_position(a.half, rng), _free_position(b.half, rng)
        along, across = (xb - xa, ya - yb) if relation in ("left of", "right of") else (yb - ya, xa - xb)
        if relation in ("right of", "below"):
            along = -along
        if along >= a.half + b.half + 3 and abs(across) <= along - 4:
            return Scene((replace(a, x=xa, y=ya), replace(b, x=xb, y=yb)))


def place_nonspatial(inner: Shape, outer: Shape, relation: str, rng: np.random.Generator) -> Scene:
    """``inner`` inside ``outer`` (painted over it, at its centre; inside a triangle lower, where it is wide enough)
    or next to it (apart)."""
    if relation == "next to":
        return place_apart(inner, outer, rng)
    x, y = _free_position(outer.half, rng)
    dy = outer.half // 2 if outer.shape == "triangle" else 0
    return Scene((replace(outer, x=x, y=y), replace(inner, x=x, y=y + dy)))


def shape_mask(shape: Shape, side: int = SIDE) -> np.ndarray:
    """``(side, side)`` bool: the pixels whose centre lies in ``shape`` (a circle of radius half + 0.5, a square of
    side 2 half + 1, a triangle pointing up with base and height 2 half + 1)."""
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32)
    dx, dy, r = xs - shape.x, ys - shape.y, shape.half + 0.5
    if shape.shape == "circle":
        return dx**2 + dy**2 <= r**2
    inside_box = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape.shape == "square":
        return inside_box
    # triangle: apex at (x, y - r), base from (x - r, y + r) to (x + r, y + r)
    return inside_box & (np.abs(dx) <= (dy + r) / 2)


def render(scene: Scene, rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """``scene`` painted in order over the background: float32 ``(3, side, side)`` in [0, 1]."""
    image = BACKGROUND + NOISE_STD * rng.standard_normal((3, side, side))
    for shape in scene.objects:
        mask = shape_mask(shape, side)
        image[:, mask] = np.asarray(COLOURS[shape.colour])[:, None]
    return np.clip(image, 0.0, 1.0).astype(np.float32)
