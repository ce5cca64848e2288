"""Real images for the medical recipe: a folder of PNGs described by ``manifest.json``.

Format::

    {"images": [{"file": "a.png",
                 "lesions": [{"type": "disc", "box": [x0, y0, x1, y1],   # native pixels, x1/y1 exclusive
                              "mask": "a_mask0.png",                    # optional; default: the box
                              "size": "small", "brightness": "faint"}]}]}  # optional; default: measured

:class:`ManifestSource` turns entry ``i`` into the same :class:`~recipes.medical.scans.Scan` the
generator renders: grey-scale, resized to the task's side with ``torch.nn.functional.interpolate``
(bilinear, antialiased; non-square images are stretched), 8-bit values mapped linearly onto
:data:`~recipes.medical.scans.PIXEL_RANGE`; masks resized the same way and thresholded at 0.5, boxes
recomputed as their tight bounds. Missing size/brightness are measured on the native image: size
"large" when the box spans >= :data:`LARGE_EXTENT` of the side, brightness "bright" when the mask is
>= :data:`BRIGHT_CONTRAST` above the lesion-free pixels. :func:`write_manifest` writes such a folder
from synthetic scans (the tests' fixtures).
"""

from __future__ import annotations

import json
from functools import lru_cache
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from recipes.medical.data import RowKey
from recipes.medical.scans import (
    ALL_TYPES, BRIGHTNESSES, MAX_LESIONS, PIXEL_RANGE, SIZES, Lesion, Scan, assemble_scan,
)

MANIFEST = "manifest.json"
LARGE_EXTENT = 0.2  # between the generator's small (<= 0.16) and large (>= 0.22) extents
BRIGHT_CONTRAST = 0.7  # between the generator's faint (<= 0.55) and bright (>= 0.9) contrasts
CACHE_SIZE = 4096  # decoded native images kept in memory


@dataclass
class _Native:
    """One manifest entry decoded at its native size: image (H, W) float32 in PIXEL_RANGE, masks (n, H, W) bool."""

    image: torch.Tensor
    masks: torch.Tensor
    lesions: tuple[Lesion, ...]


def _read_png(path: Path) -> torch.Tensor:
    """(H, W) float32 in [0, 1] from a PNG, converted to grey-scale."""
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)


def _resize(plane: torch.Tensor, side: int) -> torch.Tensor:
    """(..., H, W) float -> (..., side, side), bilinear and antialiased."""
    lead = plane.shape[:-2]
    flat = plane.reshape(-1, 1, *plane.shape[-2:])
    out = F.interpolate(flat, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(*lead, side, side)


class ManifestSource:
    """Scans from a manifest folder; entry ``key.index % len(self)`` serves row ``key`` (a
    :class:`~recipes.medical.data.ScanSource` for :func:`recipes.medical.data.batch`).

    The manifest is validated when constructed (ValueError naming the entry and field); images are
    decoded on first use and cached."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise ValueError(
                f"{path}: no manifest; expected {MANIFEST} next to the PNGs. Write one (see write_manifest)."
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix the file.") from None
        entries = data.get("images") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{path}: 'images' must be a non-empty list of {{file, lesions}} entries.")
        self.entries = [self._check_entry(entry, i) for i, entry in enumerate(entries)]
        self._cache: dict[int, _Native] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _check_entry(self, entry: object, i: int) -> dict:
        where = f"{self.folder / MANIFEST} images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise ValueError(f"{where} ({entry!r}) needs a 'file' (PNG name); got none.")
        if not (self.folder / entry["file"]).is_file():
            raise ValueError(f"{where}.file ('{entry['file']}') does not exist in {self.folder}; fix the name.")
        lesions = entry.get("lesions", [])
        if not isinstance(lesions, list) or len(lesions) > MAX_LESIONS:
            raise ValueError(f"{where}.lesions ({lesions!r}) must be a list of at most {MAX_LESIONS} lesions.")
        for j, lesion in enumerate(lesions):
            self._check_lesion(lesion, f"{where}.lesions[{j}]", entry["file"])
        return entry

    def _check_lesion(self, lesion: object, where: str, file: str) -> None:
        if not isinstance(lesion, dict):
            raise ValueError(f"{where} ({lesion!r}) must be a mapping with type and box.")
        if lesion.get("type") not in ALL_TYPES:
            raise ValueError(
                f"{where}.type ({lesion.get('type')!r}) of {file} is not a lesion type; expected one of "
                f"{', '.join(ALL_TYPES)}. Fix the manifest."
            )
        box = lesion.get("box")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                and box[0] < box[2] and box[1] < box[3] and min(box) >= 0):
            raise ValueError(f"{where}.box ({box!r}) of {file} must be [x0, y0, x1, y1] pixels with x0 < x1, y0 < y1.")
        for field, allowed in (("size", SIZES), ("brightness", BRIGHTNESSES)):
            if field in lesion and lesion[field] not in allowed:
                raise ValueError(f"{where}.{field} ({lesion[field]!r}) of {file} must be one of {', '.join(allowed)}.")
        if "mask" in lesion and not (self.folder / str(lesion["mask"])).is_file():
            raise ValueError(f"{where}.mask ('{lesion['mask']}') of {file} does not exist in {self.folder}.")

    def _native(self, index: int) -> _Native:
        if index in self._cache:
            return self._cache[index]
        entry = self.entries[index]
        raw = _read_png(self.folder / entry["file"])
        height, width = raw.shape
        low, high = PIXEL_RANGE
        image = low + raw * (high - low)
        masks = []
        for j, item in enumerate(entry.get("lesions", [])):
            x0, y0, x1, y1 = item["box"]
            if x1 > width or y1 > height:
                raise ValueError(
                    f"{self.folder / MANIFEST} images[{index}].lesions[{j}].box ({item['box']}) exceeds "
                    f"{entry['file']} ({width} x {height}); boxes are native pixels."
                )
            if "mask" in item:
                mask = _read_png(self.folder / item["mask"]) > 0.5
                if mask.shape != raw.shape:
                    raise ValueError(
                        f"{self.folder / MANIFEST} images[{index}].lesions[{j}].mask ('{item['mask']}') is "
                        f"{mask.shape[1]} x {mask.shape[0]}; the image is {width} x {height}. Use the same size."
                    )
            else:
                mask = torch.zeros(height, width, dtype=torch.bool)
                mask[round(y0) : round(y1), round(x0) : round(x1)] = True
            masks.append(mask)
        stacked = torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.bool)
        lesions = self._lesions(entry, image, stacked)
        native = _Native(image, stacked, lesions)
        if len(self._cache) < CACHE_SIZE:
            self._cache[index] = native
        return native

    @staticmethod
    def _lesions(entry: dict, image: torch.Tensor, masks: torch.Tensor) -> tuple[Lesion, ...]:
        """Lesion descriptions: centre and extent from the box, size/brightness given or measured.

        Contrast = lesion level - the median of the lesion-free pixels around the box (the box grown
        by half its size each side: the background varies across the image). The lesion level is the
        0.75 quantile of the mask: robust to anti-aliased rims and, for a box-only lesion, to the
        background its box also holds (e.g. a ring's hollow; lesion pixels fill over half of any box)."""
        height, width = image.shape
        free = ~masks.any(dim=0)
        out = []
        for item, mask in zip(entry.get("lesions", []), masks):
            x0, y0, x1, y1 = item["box"]
            extent = max((x1 - x0) / width, (y1 - y0) / height)
            grow_x, grow_y = (x1 - x0) / 2, (y1 - y0) / 2
            near = torch.zeros_like(free)
            rows = slice(max(0, round(y0 - grow_y)), round(y1 + grow_y))
            near[rows, max(0, round(x0 - grow_x)) : round(x1 + grow_x)] = True
            around = image[free & near] if (free & near).any() else image[free] if free.any() else image.flatten()
            inside = image[mask] if mask.any() else image.flatten()
            contrast = float(inside.quantile(0.75) - around.median())
            size = item.get("size", "large" if extent >= LARGE_EXTENT else "small")
            brightness = item.get("brightness", "bright" if contrast >= BRIGHT_CONTRAST else "faint")
            cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
            out.append(Lesion(item["type"], size, brightness, cx, cy, extent, contrast))
        return tuple(out)

    def scan(self, index: int, side: int) -> Scan:
        """Entry ``index`` as a :class:`Scan` at side ``side`` (see the module docstring)."""
        native = self._native(index)
        image = _resize(native.image, side)[None]
        masks = _resize(native.masks.float(), side) >= 0.5 if len(native.lesions) else \
            torch.zeros(0, side, side, dtype=torch.bool)
        for j, lesion in enumerate(native.lesions):
            if not masks[j].any():  # too small to survive the resize: keep the pixel at its centre
                masks[j, min(int(lesion.cy * side), side - 1), min(int(lesion.cx * side), side - 1)] = True
        return assemble_scan(image, native.lesions, masks)

    def scans(self, keys: Sequence[RowKey], side: int) -> list[Scan]:
        """One scan per key: entry ``key.index % len(self)``."""
        return [self.scan(key.index % len(self), side) for key in keys]


def _to_png(plane: torch.Tensor, path: Path) -> None:
    """Write an (H, W) float plane in [0, 1] as an 8-bit grey PNG."""
    pixels = (plane.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(pixels, mode="L").save(path)


def write_manifest(folder: str | Path, scans: Sequence[Scan], masks: bool = True, attributes: bool = True) -> Path:
    """Write ``scans`` as ``scanNNNN.png`` (+ ``scanNNNN_maskJ.png`` with ``masks``) and a manifest
    (with each lesion's size/brightness when ``attributes``) into ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    low, high = PIXEL_RANGE
    entries = []
    for i, scan in enumerate(scans):
        name = f"scan{i:04d}"
        _to_png((scan.image[0] - low) / (high - low), folder / f"{name}.png")
        lesions = []
        for j, (lesion, box) in enumerate(zip(scan.lesions, scan.boxes.tolist())):
            item = {"type": lesion.type, "box": box}
            if masks:
                item["mask"] = f"{name}_mask{j}.png"
                _to_png(scan.masks[j].float(), folder / item["mask"])
            if attributes:
                item["size"], item["brightness"] = lesion.size, lesion.brightness
            lesions.append(item)
        entries.append({"file": f"{name}.png", "lesions": lesions})
    (folder / MANIFEST).write_text(json.dumps({"images": entries}, indent=1))
    return folder


@lru_cache(maxsize=8)
def manifest_split(data_dir: str, split: str) -> ManifestSource:
    """The manifest folder of one split of a job's ``data_dir`` (``<data_dir>/<split>/manifest.json``); a ValueError
    naming the path when it is missing."""
    folder = Path(data_dir) / split
    if not (folder / MANIFEST).is_file():
        raise ValueError(
            f"data_dir ({data_dir}): no {split}/{MANIFEST}; a recipe data folder holds one manifest folder per split "
            "(train, heldout, transfer). See docs/recipes/medical.md."
        )
    return ManifestSource(folder)
