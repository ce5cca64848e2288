"""Batches of the medical recipe: every task's inputs and targets, drawn from one scan generator.

Entry point: :func:`batch` (a ``runtime.data`` dataset source). Each task reads images through one
vit use (its root) feeding one head use (a decoder, or a transformer for reconstruction; see
:func:`task_layout`, which the loss heads share); what it gets depends on its loss name (see
:data:`LOSSES` and ``recipes/medical`` contract):

* every task: ``inputs[encoder use]`` the image ``(B, C, I, I)`` float32 (grey, repeated over the
  encoder's ``in_channels``), ``labels`` ``(B,)`` long (:func:`classification_label`; in split
  "transfer": 1 if the scan holds a cross, else 0), ``targets["boxes"]`` ``(B, 3, 4)`` float pixels
  and ``targets["classes"]`` ``(B, 3)`` long type index (both -1 padded, lesions sorted by (y0, x0));
* medical_detection / medical_report: ``inputs[head use]`` ids ``(B, S)`` = ``full[:S]`` and
  ``targets["tokens"]`` ``(B, S)`` = ``full[1:S+1]`` (see :func:`token_sequence`);
* medical_segmentation: ``targets["masks"]`` ``(B, 3, I, I)`` float32 {0, 1};
* medical_reconstruction: the encoder input has a random half of its p x p patches zeroed;
  ``targets["image"]`` the original ``(B, C, I, I)``, ``targets["patch_mask"]`` ``(B, P)`` bool.

Rows are deterministic per (job seed, split, task name, step, row) -- in splits "heldout" and
"transfer" without the task name, so every task evaluates the same scans at its own resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from planner.components import resolve_shape
from planner.spec import JobSpec
from recipes.medical.scans import (
    ALL_TYPES, BOS, EOS, FIRST_BIN, FIRST_CLASS, MAX_LESIONS, NUM_BINS, PAD, TOKEN_NAMES, TRANSFER_TYPE, TYPES,
    VOCAB_SIZE, Scan, dequantise, describe_scan, encode, quantise, render_scans,
)
from runtime.data import SPLITS, TaskBatch
from planner.usegraph import leaf_uses, root_uses, upstream_uses, use_component
from runtime.kinds import image_channels
from runtime.modules import stable_seed

LOSSES = (
    "medical_classification", "medical_detection", "medical_segmentation", "medical_report",
    "medical_reconstruction",
)
TOKEN_LOSSES = ("medical_detection", "medical_report")
HEAD_KINDS = {loss: "transformer" if loss == "medical_reconstruction" else "decoder" for loss in LOSSES}
NUM_CLASSES = 1 + len(TYPES)  # classification: 0 = no lesion, 1 + type index of the largest lesion
MASK_RATIO = 0.5  # fraction of patches zeroed for reconstruction


# --------------------------------------------------------------------------- where the data comes from


@dataclass(frozen=True)
class RowKey:
    """Identity of one example: ``seed`` (drives the synthetic scan and the patch mask), ``index``
    (a stable example number: ``step * batch_size + row`` in training, the row otherwise) and split."""

    seed: int
    index: int
    split: str


class ScanSource(Protocol):
    """Where scans come from: ``scans(keys, side)`` -> one :class:`Scan` per key, rendered at ``side``."""

    def scans(self, keys: Sequence[RowKey], side: int) -> list[Scan]: ...


class SyntheticScans:
    """The generator: the scan of ``key.seed`` (:func:`describe_scan`; transfer lesions in split "transfer")."""

    def scans(self, keys: Sequence[RowKey], side: int) -> list[Scan]:
        return render_scans([describe_scan(key.seed, transfer=key.split == "transfer") for key in keys], side)


def row_keys(job: JobSpec, task_index: int, split: str, step: int, start: int, stop: int) -> list[RowKey]:
    """Keys of rows ``[start, stop)``; held-out and transfer keys ignore the task (and hash the split,
    so the three splits are independent streams)."""
    task = job.tasks[task_index]
    if split == "train":
        return [RowKey(stable_seed("medical", job.training.seed, split, task.name, step, row),
                       step * task.batch_size + row, split) for row in range(start, stop)]
    return [RowKey(stable_seed("medical", job.training.seed, split, step, row), row, split)
            for row in range(start, stop)]


# --------------------------------------------------------------------------- the task's shape


@dataclass(frozen=True)
class TaskLayout:
    """What a medical task's data and loss head depend on, all read from the job: the vit use reading the
    images (the encoder use) and the one use it feeds (the head use)."""

    task: str
    loss: str
    encoder_use: str
    side: int  # image side I of the encoder use
    patch_size: int  # p of the encoder
    channels: int  # C of the encoder's images
    head_use: str  # the task's one leaf: the use the loss head reads
    hidden_size: int  # H of the head use
    seq_len: int  # the head use's seq_len: S stream rows of a decoder, 1 + P rows of a transformer
    vocab_size: int | None  # the head component's vocab_size (token decoders only)

    @property
    def grid(self) -> int:
        """Patches per image side, I / p."""
        return self.side // self.patch_size

    @property
    def num_patches(self) -> int:
        """P = (I / p)^2."""
        return self.grid**2


def use_path(job: JobSpec, task_index: int, use_name: str | None = None) -> str:
    """``tasks[i] ('name')``, or ``tasks[i] ('name').components[j]`` for the use ``use_name``: the path errors name."""
    task = job.tasks[task_index]
    path = f"tasks[{task_index}] ('{task.name}')"
    if use_name is None:
        return path
    return path + f".components[{[use.use_name for use in task.components].index(use_name)}]"


def _uses(job: JobSpec, task_index: int) -> tuple[str, str]:
    """(encoder use, head use); a ValueError unless the task is one vit use feeding exactly one use of the
    kind its loss reads (:data:`HEAD_KINDS`)."""
    task = job.tasks[task_index]
    head_kind = HEAD_KINDS[task.loss]
    roots = root_uses(job, task_index)
    leaves = [leaf for leaf in leaf_uses(job, task_index) if leaf not in roots]
    kinds = {use.use_name: job.components[use.component].kind for use in task.components}
    if len(roots) != 1 or kinds[roots[0]] != "vit" or len(leaves) != 1 or upstream_uses(task)[leaves[0]] != roots:
        raise ValueError(
            f"{use_path(job, task_index)}.components ({kinds}) is not one vit use feeding one head use; loss "
            f"'{task.loss}' expects [vit, {head_kind}]. Chain exactly these two uses, the {head_kind} right after "
            "the vit."
        )
    head_name, head_comp = use_component(job, task_index, leaves[0])
    if head_comp.kind != head_kind:
        raise ValueError(
            f"{use_path(job, task_index, leaves[0])}.component ('{head_name}') is a {head_comp.kind}; loss "
            f"'{task.loss}' reads a {head_kind} use fed by the vit. Use a {head_kind} component there."
        )
    return roots[0], leaves[0]


def task_layout(job: JobSpec, task_index: int) -> TaskLayout:
    """The :class:`TaskLayout` of a medical task. ValueError naming the task for a loss that is not a medical
    one, a task that is not a vit use feeding one head use of the loss's kind, or a token task whose decoder
    lacks a large enough vocab_size; SpecError (planner.components) when a shape is missing."""
    task = job.tasks[task_index]
    if task.loss not in LOSSES:
        raise ValueError(
            f"{use_path(job, task_index)}.loss ('{task.loss}') is not a medical loss; expected one of "
            f"{', '.join(LOSSES)}. Use one of them for this task."
        )
    encoder, head = _uses(job, task_index)
    shapes = {}
    for u, use in enumerate(task.components):
        if use.use_name in (encoder, head):
            comp = job.components[use.component]
            shapes[use.use_name] = resolve_shape(comp, use.component, use, f"tasks[{task_index}].components[{u}]")
    enc = use_component(job, task_index, encoder)[1]
    head_name, head_comp = use_component(job, task_index, head)
    vocab = head_comp.vocab_size
    if task.loss in TOKEN_LOSSES and (vocab is None or vocab < VOCAB_SIZE):
        raise ValueError(
            f"{use_path(job, task_index, head)}.component ('{head_name}') has vocab_size {vocab}; loss "
            f"'{task.loss}' needs a token decoder with vocab_size >= {VOCAB_SIZE} (the recipe's vocabulary). "
            f"Set components.{head_name}.vocab_size to {VOCAB_SIZE} or more."
        )
    return TaskLayout(
        task.name, task.loss, encoder, shapes[encoder].image_size, enc.patch_size, image_channels(enc),
        head, head_comp.hidden_size, shapes[head].seq_len, vocab,
    )


# --------------------------------------------------------------------------- per-scan targets


def classification_label(scan: Scan) -> int:
    """0 if the scan has no training-type lesion, else 1 + the type index of the largest one (by
    box area in pixels, ties broken by the described extent); a cross is ignored."""
    best, best_key = 0, None
    for lesion, box in zip(scan.lesions, scan.boxes.tolist()):
        if lesion.type not in TYPES:
            continue
        key = ((box[2] - box[0]) * (box[3] - box[1]), lesion.extent)
        if best_key is None or key > best_key:
            best, best_key = 1 + TYPES.index(lesion.type), key
    return best


def has_transfer_lesion(scan: Scan) -> bool:
    """Whether the scan holds a :data:`TRANSFER_TYPE` (cross) lesion: the transfer probe's target."""
    return any(lesion.type == TRANSFER_TYPE for lesion in scan.lesions)


def detection_groups(scan: Scan) -> list[list[int]]:
    """Per lesion (in scan order, i.e. by (y0, x0)): ``[class, bin(x0), bin(y0), bin(x1 - 1), bin(y1 - 1)]``."""
    groups = []
    for lesion, box in zip(scan.lesions, scan.boxes):
        starts = quantise(box[:2], scan.side) + FIRST_BIN
        ends = quantise(box[2:], scan.side, end=True) + FIRST_BIN
        groups.append([FIRST_CLASS + ALL_TYPES.index(lesion.type), *starts.tolist(), *ends.tolist()])
    return groups


def report_words(scan: Scan) -> list[list[str]]:
    """Per lesion ``[size, brightness, type, upper|centre|lower, left|centre|right]``, later ones
    prefixed by "and"; ``[["no", "finding"]]`` for a scan without lesions."""
    if not scan.lesions:
        return [["no", "finding"]]
    groups = []
    for i, lesion in enumerate(scan.lesions):
        words = [lesion.size, lesion.brightness, lesion.type, *lesion.position]
        groups.append((["and"] if i else []) + words)
    return groups


def token_sequence(groups: Sequence[Sequence[int]], seq_len: int) -> list[int]:
    """``full`` of length ``seq_len + 1``: ``[BOS, *groups, EOS, PAD...]`` (inputs ``full[:S]``,
    targets ``full[1:S+1]``). Truncation keeps whole groups: only the leading groups that fit with
    their EOS are kept, so a too-short stream still ends in EOS (and describes fewer lesions)."""
    full = [BOS]
    for group in groups:
        if len(full) + len(group) + 1 > seq_len + 1:
            break
        full += list(group)
    full = (full + [EOS])[: seq_len + 1]
    return full + [PAD] * (seq_len + 1 - len(full))


def decode_detection(ids: Sequence[int], side: int) -> list[tuple[str, tuple[float, float, float, float]]]:
    """(type, (x0, y0, x1, y1) float pixels) per well-formed ``class, 4 bins`` group before the first
    EOS; anything else (e.g. a model's malformed output) is skipped. Boxes are bin centres (:func:`dequantise`)."""
    ids = [int(i) for i in ids]
    found, i = [], 0
    while i < len(ids) and ids[i] != EOS:
        group = ids[i : i + 5]
        is_bin = [FIRST_BIN <= t < FIRST_BIN + NUM_BINS for t in group[1:]]
        if FIRST_CLASS <= group[0] < FIRST_BIN and len(group) == 5 and all(is_bin):
            bins = torch.tensor(group[1:]) - FIRST_BIN
            starts, ends = dequantise(bins[:2], side), dequantise(bins[2:], side, end=True)
            found.append((ALL_TYPES[group[0] - FIRST_CLASS], tuple(torch.cat([starts, ends]).tolist())))
            i += 5
        else:
            i += 1
    return found


def decode_report(ids: Sequence[int]) -> list[str]:
    """The words of a report sequence: names of the ids after a leading BOS, up to the first EOS, PAD dropped."""
    ids = [int(i) for i in ids]
    if ids and ids[0] == BOS:
        ids = ids[1:]
    if EOS in ids:
        ids = ids[: ids.index(EOS)]
    return [TOKEN_NAMES[i] for i in ids if i != PAD]


def patch_mask(seed: int, num_patches: int) -> torch.Tensor:
    """(P,) bool: exactly ``round(P * MASK_RATIO)`` patches masked, chosen by ``seed``."""
    gen = torch.Generator().manual_seed(stable_seed("patches", seed))
    chosen = torch.randperm(num_patches, generator=gen)[: round(num_patches * MASK_RATIO)]
    return torch.zeros(num_patches, dtype=torch.bool).index_fill_(0, chosen, True)


def mask_patches(images: torch.Tensor, masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``images`` (B, C, I, I) with the patches flagged in ``masks`` (B, P), row-major over the
    (I/p) x (I/p) grid, set to 0."""
    grid = images.shape[-1] // patch_size
    pixel_mask = masks.view(-1, 1, grid, grid).repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    return images.masked_fill(pixel_mask, 0.0)


# --------------------------------------------------------------------------- batches


def _slot_targets(scans: Sequence[Scan], side: int, with_masks: bool) -> dict[str, torch.Tensor]:
    """boxes (B, 3, 4) float, classes (B, 3) long (-1 padded) and optionally masks (B, 3, I, I) float."""
    count = len(scans)
    boxes = torch.full((count, MAX_LESIONS, 4), -1.0)
    classes = torch.full((count, MAX_LESIONS), -1, dtype=torch.long)
    masks = torch.zeros(count, MAX_LESIONS, side, side) if with_masks else None
    for row, scan in enumerate(scans):
        n = min(len(scan.lesions), MAX_LESIONS)
        boxes[row, :n] = scan.boxes[:n].float()
        classes[row, :n] = scan.classes[:n]
        if masks is not None:
            masks[row, :n] = scan.masks[:n].float()
    out = {"boxes": boxes, "classes": classes}
    if masks is not None:
        out["masks"] = masks
    return out


def _check_request(job: JobSpec, task_index: int, start: int, stop: int, split: str) -> None:
    task = job.tasks[task_index]
    if split not in SPLITS:
        raise ValueError(f"split ('{split}') is not a medical data split; expected one of {', '.join(SPLITS)}.")
    limit = task.batch_size if split == "train" else None
    if not (0 <= start <= stop and (limit is None or stop <= limit)):
        bound = f"<= {limit}" if limit is not None else "(any size for eval splits)"
        raise ValueError(
            f"tasks[{task_index}] ('{task.name}'): sample range [{start}, {stop}) is invalid for split '{split}'; "
            f"need 0 <= start <= stop {bound}."
        )


def batch(job: JobSpec, task_index: int, step: int, start: int, stop: int, split: str = "train",
          scans: ScanSource | None = None) -> TaskBatch:
    """Rows ``[start, stop)`` of task ``task_index``'s batch at ``step`` in ``split`` (see the module
    docstring for every tensor). ``scans`` replaces the synthetic generator (e.g. a
    ``recipes.medical.manifest.ManifestSource``). ValueError for an unknown loss or split, a range
    outside the batch (train) or a task that does not fit the recipe."""
    _check_request(job, task_index, start, stop, split)
    layout = task_layout(job, task_index)
    keys = row_keys(job, task_index, split, step, start, stop)
    rows = (scans or SyntheticScans()).scans(keys, layout.side)
    side, count = layout.side, len(rows)
    images = torch.stack([scan.image for scan in rows]) if rows else torch.zeros(0, 1, side, side)
    images = images.expand(count, layout.channels, side, side).contiguous()
    if split == "transfer":
        labels = torch.tensor([int(has_transfer_lesion(scan)) for scan in rows], dtype=torch.long)
    else:
        labels = torch.tensor([classification_label(scan) for scan in rows], dtype=torch.long)
    targets = _slot_targets(rows, side, with_masks=layout.loss == "medical_segmentation")
    inputs = {layout.encoder_use: images}
    if layout.loss in TOKEN_LOSSES:
        if layout.loss == "medical_detection":
            groups = [detection_groups(scan) for scan in rows]
        else:
            groups = [[encode(words) for words in report_words(scan)] for scan in rows]
        full = torch.tensor([token_sequence(g, layout.seq_len) for g in groups], dtype=torch.long)
        full = full.view(count, layout.seq_len + 1)
        inputs[layout.head_use], targets["tokens"] = full[:, :-1].contiguous(), full[:, 1:].contiguous()
    elif layout.loss == "medical_reconstruction":
        num_patches = layout.num_patches
        masks = torch.stack([patch_mask(key.seed, num_patches) for key in keys]) if keys else \
            torch.zeros(0, num_patches, dtype=torch.bool)
        inputs[layout.encoder_use] = mask_patches(images, masks, layout.patch_size)
        targets["image"], targets["patch_mask"] = images, masks
    return TaskBatch(inputs, labels, count, targets=targets, first_row=start)


def job_batch(job: JobSpec, task_index: int, step: int, start: int, stop: int, split: str = "train") -> TaskBatch:
    """The recipe's dataset (what the runtime calls): :func:`batch` on synthetic scans, or, when the job sets
    ``data_dir``, on the manifest folder ``<data_dir>/<split>`` (see recipes.medical.manifest)."""
    scans = None
    if job.data_dir is not None:
        from recipes.medical.manifest import manifest_split  # local: manifest imports this module

        scans = manifest_split(job.data_dir, split)
    return batch(job, task_index, step, start, stop, split, scans)
