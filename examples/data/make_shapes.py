"""Write examples/data/shapes/: 64 small images of coloured shapes and their manifest, deterministic (seeded).

    python examples/data/make_shapes.py [OUT_DIR]

Each image is 16 x 16 RGB: one shape (square, disc, bar or cross) in one colour (red, green, blue or yellow) at a
seeded position and size on a black background. ``manifest.jsonl`` has one ``{"image": "<n>.png", "caption":
"a <colour> <shape> .", "label": <shape index>}`` per image (docs/data.md, format images): the label trains a
classifier, the caption a captioner (a llama reading the image tokens, then the caption). A few KB in all; the
captions' words are in examples/data/tokenizer (examples/make_tokenizer.py reads this manifest).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "disc", "bar", "cross")
SIDE = 16
OUT = Path(__file__).resolve().parent / "shapes"


def inside(shape: str, dx: int, dy: int, r: int) -> bool:
    """Whether the pixel at offset (dx, dy) from the shape's centre is in a ``shape`` of radius ``r``."""
    if shape == "square":
        return abs(dx) <= r and abs(dy) <= r
    if shape == "disc":
        return dx * dx + dy * dy <= r * r
    if shape == "bar":
        return abs(dx) <= r and abs(dy) <= max(r // 3, 1)
    return (abs(dx) <= r and abs(dy) <= 1) or (abs(dy) <= r and abs(dx) <= 1)  # cross


def main(argv: list[str]) -> int:
    from PIL import Image

    out = Path(argv[0]) if argv else OUT
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = []
    for n in range(64):
        colour, shape = list(COLOURS)[n % 4], SHAPES[(n // 4) % 4]
        r = rng.randint(3, 5)
        cx, cy = rng.randint(r, SIDE - 1 - r), rng.randint(r, SIDE - 1 - r)
        img = Image.new("RGB", (SIDE, SIDE))
        img.putdata([COLOURS[colour] if inside(shape, x - cx, y - cy, r) else (0, 0, 0)
                     for y in range(SIDE) for x in range(SIDE)])
        img.save(out / f"{n}.png", optimize=True)
        lines.append(json.dumps({"image": f"{n}.png", "caption": f"a {colour} {shape} .", "label": SHAPES.index(shape)}))
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out}: {len(lines)} images and manifest.jsonl, {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
