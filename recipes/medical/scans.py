"""Synthetic grey-scale scans with lesions, and the token vocabulary that describes them.

A scan is first *described* resolution-independently (:func:`describe_scan`, deterministic from
an int seed: lesion centres and extents are fractions of the image side) and then *rendered* at
any side ``I`` (:func:`render_scans`, vectorised over a list of descriptions). A lesion's mask is
the pixels whose centre ``((col + 0.5) / I, (row + 0.5) / I)`` lies inside its shape, and the
image adds its contrast anti-aliased over a one-pixel edge (:func:`lesion_coverage`), so the same
description gives the same picture at every resolution, up to pixel rounding and pixel noise.

Lesion shapes (all inside the square of half-side ``extent / 2`` around the centre, which is how
non-overlap is enforced): disc, axis-aligned square, ring (a disc with a hollow centre of half the
radius) and cross (a plus whose arms are a third of the half-side thick). The cross
(:data:`TRANSFER_TYPE`) only appears in the "transfer" split.

Vocabulary (:data:`TOKEN_NAMES`, ids in order): 0 PAD, 1 BOS, 2 EOS, one class token per type in
:data:`ALL_TYPES`, :data:`NUM_BINS` coordinate bins ``c00..c31``, then the finding words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

TYPES = ("disc", "square", "ring")  # lesion types seen in training
TRANSFER_TYPE = "cross"  # only in split "transfer"
ALL_TYPES = (*TYPES, TRANSFER_TYPE)
SIZES = ("small", "large")
BRIGHTNESSES = ("bright", "faint")
MAX_LESIONS = 3

# Description distribution. Extents are the full width of a lesion as a fraction of the side; small
# lesions are >= ~4 px at 32 px, where the anti-aliased edges still tell disc, square, ring and cross apart.
EXTENT_RANGE = {"small": (0.12, 0.16), "large": (0.22, 0.30)}
CONTRAST_RANGE = {"bright": (0.9, 1.3), "faint": (0.35, 0.55)}  # added to the background
COUNT_PROBS = (0.2, 0.4, 0.25, 0.15)  # P(0..3 lesions), splits "train" and "heldout"
TRANSFER_COUNT_PROBS = (0.3, 0.4, 0.3)  # P(0..2 training-type lesions), split "transfer"
TRANSFER_CROSS_PROB = 0.5
EDGE_MARGIN = 0.03  # lesions keep this far (fraction of side) from the image border
GAP = 0.04  # minimum gap between the bounding squares of two lesions
MAX_TRIES = 64  # placement attempts per lesion before it is dropped (never happens in practice)

# Background: a level, NUM_WAVES low-frequency sinusoids (<= 2 cycles per side) and pixel noise.
NUM_WAVES = 3
LEVEL_RANGE = (-0.1, 0.1)
WAVE_AMPLITUDE = (0.04, 0.1)
MAX_CYCLES = 2.0
NOISE_STD = 0.08
RING_INNER = 0.5  # inner radius / outer radius
CROSS_ARM = 1.0 / 3.0  # arm half-thickness / half-side
PIXEL_RANGE = (-1.0, 2.0)  # the range images are mapped from/to 8-bit PNGs (manifest)

# Report position words: thirds of the side.
VERTICAL_WORDS = ("upper", "centre", "lower")
HORIZONTAL_WORDS = ("left", "centre", "right")


@dataclass(frozen=True)
class Lesion:
    """One lesion, resolution independent: ``cx``, ``cy`` centre and ``extent`` full width as fractions
    of the side; ``contrast`` is the intensity added over the background."""

    type: str
    size: str
    brightness: str
    cx: float
    cy: float
    extent: float
    contrast: float

    @property
    def position(self) -> tuple[str, str]:
        """(vertical, horizontal) report words: upper/centre/lower, left/centre/right by thirds."""
        return VERTICAL_WORDS[min(int(self.cy * 3), 2)], HORIZONTAL_WORDS[min(int(self.cx * 3), 2)]


@dataclass(frozen=True)
class ScanSpec:
    """A scan described independently of resolution: lesions, background level and waves
    ``(amplitude, cycles_x, cycles_y, phase)``, and the seed of its pixel noise."""

    lesions: tuple[Lesion, ...]
    level: float
    waves: tuple[tuple[float, float, float, float], ...]
    noise_seed: int


@dataclass
class Scan:
    """A scan rendered at side ``I``: ``image`` (1, I, I) float32; per lesion (sorted by ``(y0, x0)``)
    ``masks`` (n, I, I) bool and ``boxes`` (n, 4) long ``(x0, y0, x1, y1)`` pixels, x1/y1 exclusive,
    each the tight bounds of its mask."""

    image: torch.Tensor
    lesions: tuple[Lesion, ...]
    masks: torch.Tensor
    boxes: torch.Tensor

    @property
    def side(self) -> int:
        return self.image.shape[-1]

    @property
    def classes(self) -> torch.Tensor:
        """(n,) long: index of each lesion's type in :data:`ALL_TYPES`."""
        return torch.tensor([ALL_TYPES.index(lesion.type) for lesion in self.lesions], dtype=torch.long)


class _Uniforms:
    """Uniform [0, 1) floats from a seeded torch generator, drawn in blocks (one call per 64 draws)."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.block: list[float] = []

    def __call__(self, low: float = 0.0, high: float = 1.0) -> float:
        if not self.block:
            self.block = torch.rand(64, generator=self.gen, dtype=torch.float64).tolist()[::-1]
        return low + (high - low) * self.block.pop()

    def choice(self, probs: Sequence[float]) -> int:
        u, total = self(), 0.0
        for index, p in enumerate(probs):
            total += p
            if u < total:
                return index
        return len(probs) - 1


def _draw_lesion(draw: _Uniforms, kind: str, placed: list[Lesion]) -> Lesion | None:
    """A lesion of type ``kind`` (random size/brightness) whose bounding square keeps GAP from ``placed``."""
    size = SIZES[draw.choice((0.5, 0.5))]
    brightness = BRIGHTNESSES[draw.choice((0.5, 0.5))]
    extent = draw(*EXTENT_RANGE[size])
    contrast = draw(*CONTRAST_RANGE[brightness])
    low, high = EDGE_MARGIN + extent / 2, 1.0 - EDGE_MARGIN - extent / 2
    for _ in range(MAX_TRIES):
        cx, cy = draw(low, high), draw(low, high)
        # Chebyshev test: the bounding squares (plus GAP) must not intersect, so masks never touch.
        if all(max(abs(cx - o.cx), abs(cy - o.cy)) >= (extent + o.extent) / 2 + GAP for o in placed):
            return Lesion(kind, size, brightness, cx, cy, extent, contrast)
    return None


def describe_scan(seed: int, transfer: bool = False) -> ScanSpec:
    """The scan of ``seed``: 0-3 lesions (:data:`COUNT_PROBS`) of the training types or, with
    ``transfer``, 0-2 of them plus a cross with probability :data:`TRANSFER_CROSS_PROB`."""
    draw = _Uniforms(seed)
    noise_seed = int(draw() * 2**53)
    level = draw(*LEVEL_RANGE)
    waves = tuple(
        (draw(*WAVE_AMPLITUDE), draw(-MAX_CYCLES, MAX_CYCLES), draw(-MAX_CYCLES, MAX_CYCLES), draw(0, 2 * math.pi))
        for _ in range(NUM_WAVES)
    )
    kinds = []
    if transfer:
        if draw() < TRANSFER_CROSS_PROB:
            kinds.append(TRANSFER_TYPE)  # placed first so it always fits
        count = draw.choice(TRANSFER_COUNT_PROBS)
    else:
        count = draw.choice(COUNT_PROBS)
    kinds += [TYPES[draw.choice([1 / len(TYPES)] * len(TYPES))] for _ in range(count)]
    placed: list[Lesion] = []
    for kind in kinds:
        lesion = _draw_lesion(draw, kind, placed)
        if lesion is not None:
            placed.append(lesion)
    return ScanSpec(tuple(placed), level, waves, noise_seed)


def _backgrounds(specs: Sequence[ScanSpec], side: int, grid: torch.Tensor) -> torch.Tensor:
    """(B, I, I) float32: level + waves + pixel noise (noise from each spec's seed and the side)."""
    waves = torch.tensor([spec.waves for spec in specs], dtype=torch.float32).view(len(specs), NUM_WAVES, 4)
    amp, fx, fy, phase = (w[..., None, None] for w in waves.unbind(-1))  # (B, K, 1, 1)
    angle = 2 * math.pi * (fx * grid[None, None, None, :] + fy * grid[None, None, :, None]) + phase
    levels = torch.tensor([spec.level for spec in specs], dtype=torch.float32)
    noise = torch.stack([
        torch.randn(side, side, generator=torch.Generator().manual_seed(spec.noise_seed + side))
        for spec in specs
    ])
    return levels[:, None, None] + (amp * torch.sin(angle)).sum(dim=1) + NOISE_STD * noise


def lesion_coverage(lesions: Sequence[Lesion], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(coverage, masks), each (n, I, I): coverage in [0, 1] is the anti-aliased footprint that
    the image adds ``contrast *`` of; masks (bool) are the pixels whose centre lies inside the shape
    (coverage >= 0.5). A lesion too small to cover any pixel centre gets the pixel holding its centre.

    Coverage is ``clamp(0.5 - signed distance in pixels, 0, 1)``: a one-pixel ramp across the
    edge, so at small sizes a disc still shows dimmer corners than a square of the same mask."""
    if not lesions:
        empty = torch.zeros(0, side, side)
        return empty, empty.bool()
    grid = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    params = torch.tensor([(o.cx, o.cy, o.extent / 2) for o in lesions], dtype=torch.float32)
    cx, cy, half = (p[:, None, None] for p in params.unbind(1))
    ax, ay = (grid[None, None, :] - cx).abs(), (grid[None, :, None] - cy).abs()  # (n, 1, I), (n, I, 1)
    radius = torch.sqrt(ax * ax + ay * ay)
    arm = CROSS_ARM * half
    distance = torch.stack([  # signed distance to each shape's edge, fraction of the side
        radius - half,
        torch.maximum(ax, ay) - half,
        torch.maximum(radius - half, RING_INNER * half - radius),
        torch.minimum(torch.maximum(ax - half, ay - arm), torch.maximum(ax - arm, ay - half)),
    ])  # (4, n, I, I)
    kinds = torch.tensor([ALL_TYPES.index(o.type) for o in lesions])
    distance = distance[kinds, torch.arange(len(lesions))]
    masks = distance <= 0
    coverage = (0.5 - distance * side).clamp(0.0, 1.0)
    for index in (~masks.flatten(1).any(dim=1)).nonzero().flatten().tolist():
        o = lesions[index]
        row, col = min(int(o.cy * side), side - 1), min(int(o.cx * side), side - 1)
        masks[index, row, col] = True
        coverage[index, row, col] = coverage[index, row, col].clamp(min=0.5)
    return coverage, masks


def lesion_masks(lesions: Sequence[Lesion], side: int) -> torch.Tensor:
    """(n, I, I) bool masks of :func:`lesion_coverage`."""
    return lesion_coverage(lesions, side)[1]


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(n, 4) long ``(x0, y0, x1, y1)``: tight bounds of non-empty (n, I, I) masks, x1/y1 exclusive."""
    side = masks.shape[-1]
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (n, I) each
    y0, x0 = rows.int().argmax(dim=1), cols.int().argmax(dim=1)
    y1, x1 = side - rows.flip(1).int().argmax(dim=1), side - cols.flip(1).int().argmax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).long()


def assemble_scan(image: torch.Tensor, lesions: Sequence[Lesion], masks: torch.Tensor) -> Scan:
    """A :class:`Scan` from an image (1, I, I), its lesions and masks (n, I, I) bool; computes the
    boxes and sorts the lesions by ``(y0, x0)`` of their boxes."""
    boxes = mask_boxes(masks)
    order = sorted(range(len(lesions)), key=lambda i: (int(boxes[i, 1]), int(boxes[i, 0])))
    return Scan(image, tuple(lesions[i] for i in order), masks[order], boxes[order])


def render_scans(specs: Sequence[ScanSpec], side: int) -> list[Scan]:
    """Render every description at side ``side`` (one vectorised pass for the whole list)."""
    if not specs:
        return []
    grid = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    images = _backgrounds(specs, side, grid)
    flat = [lesion for spec in specs for lesion in spec.lesions]
    coverage, masks = lesion_coverage(flat, side)
    owner = torch.tensor([i for i, spec in enumerate(specs) for _ in spec.lesions], dtype=torch.long)
    contrast = torch.tensor([lesion.contrast for lesion in flat], dtype=torch.float32)
    images.index_add_(0, owner, coverage * contrast[:, None, None])
    scans, first = [], 0
    for i, spec in enumerate(specs):
        count = len(spec.lesions)
        scans.append(assemble_scan(images[i : i + 1], spec.lesions, masks[first : first + count]))
        first += count
    return scans


# --------------------------------------------------------------------------- vocabulary

NUM_BINS = 32
WORDS = ("no", "finding", *SIZES, *BRIGHTNESSES, "upper", "lower", "left", "right", "centre", "and")
PAD, BOS, EOS = 0, 1, 2
FIRST_CLASS = 3
FIRST_BIN = FIRST_CLASS + len(ALL_TYPES)
FIRST_WORD = FIRST_BIN + NUM_BINS
TOKEN_NAMES = ("<pad>", "<bos>", "<eos>", *ALL_TYPES, *(f"c{b:02d}" for b in range(NUM_BINS)), *WORDS)
VOCAB_SIZE = len(TOKEN_NAMES)
_IDS = {name: index for index, name in enumerate(TOKEN_NAMES)}


def encode(names: Sequence[str]) -> list[int]:
    """Token ids of token names (e.g. ``["<bos>", "disc", "c03", "large"]``); a ValueError for an unknown name."""
    unknown = [name for name in names if name not in _IDS]
    if unknown:
        raise ValueError(f"tokens ({unknown}) are not in the medical vocabulary; expected names from TOKEN_NAMES.")
    return [_IDS[name] for name in names]


def decode(ids: Sequence[int]) -> list[str]:
    """Token names of ids, PAD dropped; a ValueError for an id outside ``[0, VOCAB_SIZE)``."""
    bad = [i for i in ids if not 0 <= int(i) < VOCAB_SIZE]
    if bad:
        raise ValueError(f"token ids ({bad}) are outside the medical vocabulary [0, {VOCAB_SIZE}).")
    return [TOKEN_NAMES[int(i)] for i in ids if int(i) != PAD]


def quantise(coords: torch.Tensor, side: int, end: bool = False) -> torch.Tensor:
    """Coordinate bins (long, [0, NUM_BINS)) of pixel coordinates: ``floor(c / side * NUM_BINS)``
    clipped; for exclusive ends (``end``: x1, y1) the last pixel inside, ``c - 1``, is binned."""
    coords = coords.to(torch.float64) - (1 if end else 0)
    return torch.floor(coords / side * NUM_BINS).clamp(0, NUM_BINS - 1).long()


def dequantise(bins: torch.Tensor, side: int, end: bool = False) -> torch.Tensor:
    """Inverse of :func:`quantise` to float pixels: the bin centre ``(b + 0.5) * side / NUM_BINS``
    (plus 1 for exclusive ends). Within half a bin (``side / 64`` px) of any quantised coordinate."""
    centre = (bins.to(torch.float32) + 0.5) * side / NUM_BINS
    return centre + 1 if end else centre
