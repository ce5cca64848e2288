"""The oracle: how well an image shows a prompt, per category, read from the pixels alone.

It never sees a scene: it segments the image by colour (each pixel to the nearest palette colour within
:data:`COLOUR_TOLERANCE`, else background), takes each colour's pixels as one blob when its largest 4-connected region holds at least
:data:`COHERENT` of them (scattered pixels of a colour in a generated image are no object), fills it (so a blob with another
painted inside it, "a red circle inside a blue square", counts its hole) and reads the blob's shape from its filled
mask (a pixel is filled when set pixels of the blob lie on both its sides along its row or along its
column): a square fills its bounding box (fill ratio > :data:`SQUARE_FILL`); a triangle (pointing up) is
narrower a quarter of the way down than a quarter of the way up from its base; anything else is a circle. Blobs under
:data:`MIN_PIXELS` pixels are noise. So it can judge a diffusion model's samples as well as the renderer's images.

Scores in [0, 1] (:func:`score`): each of the prompt's two objects counts 1 when a blob of its colour has its shape;
the relation (spatial, non-spatial) counts 1 when blobs of both colours are found and stand in it: centroids
apart along the relation's axis, more than across it (spatial); the first blob's pixels all inside the second's
filled blob (inside) or their bounding boxes disjoint (next to). The score is the mean of the counts (2 for
attribute binding, 3 otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recipes.diffusion.shapes import COLOURS, Prompt

COLOUR_TOLERANCE = 0.3  # max Euclidean RGB distance of a pixel to its palette colour
MIN_PIXELS = 6
COHERENT = 0.4  # share of a colour's pixels its largest 4-connected region must hold to be an object
SQUARE_FILL = 0.9
TRIANGLE_SLOPE = 0.2  # width difference (of the bounding-box width) between the quarter rows that makes a triangle


@dataclass(frozen=True)
class Blob:
    """One colour's pixels: its shape, centroid (x, y), bounding box (x0, y0, x1, y1 inclusive), pixel count, and
    filled mask."""

    colour: str
    shape: str
    x: float
    y: float
    box: tuple[int, int, int, int]
    pixels: int
    filled: np.ndarray


def segment(image: np.ndarray) -> np.ndarray:
    """``(I, I)`` int: per pixel the palette index (order of :data:`COLOURS`) of its nearest colour, -1 when none is
    within :data:`COLOUR_TOLERANCE`. ``image`` is ``(3, I, I)`` in [0, 1]."""
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)  # (K, 3)
    dist = np.linalg.norm(image[None].astype(np.float32) - palette[:, :, None, None], axis=1)  # (K, I, I)
    nearest = dist.argmin(axis=0)
    return np.where(dist.min(axis=0) <= COLOUR_TOLERANCE, nearest, -1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask`` (of equal ones, the one whose first pixel in row-major order comes
    first). Labels spread as the minimum over 4-neighbours, with pointer jumping, until nothing changes: numpy
    passes instead of a Python flood fill (the oracle scores every gallery image)."""
    h, w = mask.shape
    if not mask.any():
        return np.zeros_like(mask)
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        spread = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        spread = np.where(mask, spread, big)
        flat = spread.reshape(-1)
        jumped = np.where(mask, flat[np.minimum(flat, big - 1)].reshape(h, w), big)
        spread = np.minimum(spread, jumped)
        if np.array_equal(spread, labels):
            break
        labels = spread
    roots, counts = np.unique(labels[mask], return_counts=True)
    return labels == roots[counts.argmax()]


def fill(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every row and every column filled between its first and last set pixel: a convex blob with a
    hole (another blob painted inside it, even one as wide as some of its rows) comes back whole."""
    return _fill_rows(mask) | _fill_rows(mask.T).T


def _fill_rows(mask: np.ndarray) -> np.ndarray:
    cols = np.arange(mask.shape[1])
    first = mask.argmax(axis=1)
    last = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
    return (cols >= first[:, None]) & (cols <= last[:, None]) & mask.any(axis=1)[:, None]


def classify(filled: np.ndarray) -> str:
    """``square``, ``triangle`` or ``circle`` from a filled blob mask (see the module docstring)."""
    rows, cols = np.flatnonzero(filled.any(axis=1)), np.flatnonzero(filled.any(axis=0))
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    if filled.sum() / (height * width) > SQUARE_FILL:
        return "square"
    widths = filled[rows[0]:rows[-1] + 1].sum(axis=1)
    upper, lower = widths[int(round((height - 1) * 0.25))], widths[int(round((height - 1) * 0.75))]
    return "triangle" if lower - upper > TRIANGLE_SLOPE * width else "circle"


def blobs(image: np.ndarray) -> dict[str, Blob]:
    """The blob of each colour present in ``image`` ``(3, I, I)``, by colour name."""
    labels = segment(image)
    out = {}
    for index, colour in enumerate(COLOURS):
        mask = labels == index
        if mask.sum() < MIN_PIXELS or largest_component(mask).sum() < COHERENT * mask.sum():
            continue
        ys, xs = np.nonzero(mask)
        filled = fill(mask)
        out[colour] = Blob(colour, classify(filled), float(xs.mean()), float(ys.mean()),
                           (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())), int(mask.sum()), filled)
    return out


def relation_holds(first: Blob, second: Blob, relation: str) -> bool:
    """Whether ``first`` stands in ``relation`` to ``second`` (see the module docstring)."""
    dx, dy = first.x - second.x, first.y - second.y
    if relation in ("left of", "right of"):
        return (dx < 0 if relation == "left of" else dx > 0) and abs(dx) > abs(dy)
    if relation in ("above", "below"):
        return (dy < 0 if relation == "above" else dy > 0) and abs(dy) > abs(dx)
    inside = bool(second.filled[first.filled].all())
    if relation == "inside":
        return inside
    if relation == "next to":
        a, b = first.box, second.box
        return a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]
    raise ValueError(f"relation ('{relation}') is not one the oracle checks.")


def score(image: np.ndarray, prompt: Prompt) -> float:
    """How well ``image`` ``(3, I, I)`` shows ``prompt``, in [0, 1] (see the module docstring)."""
    found = blobs(image)
    hits = [colour in found and found[colour].shape == shape for colour, shape in prompt.objects]
    counts = [float(h) for h in hits]
    if prompt.relation is not None:
        (c1, _), (c2, _) = prompt.objects
        counts.append(float(c1 in found and c2 in found and relation_holds(found[c1], found[c2], prompt.relation)))
    return sum(counts) / len(counts)
