"""Loss heads of the medical (UniMed-style) recipe, their predictions, and the metrics the eval computes.

Owns one :class:`runtime.heads.TaskHead` per loss name of the recipe and its factory
``(job, task_index, leaves) -> head`` (:data:`LOSS_FACTORIES`, which recipes/medical/__init__.py
registers with ``runtime.heads.register_loss``), the exact query matching of segmentation, and pure
metric functions. Every size comes from the job (:func:`recipes.medical.data.task_layout`): the head use's
seq_len and hidden size, the head component's vocab_size, the encoder's patch size and in_channels, the
task's image size. Imports torch, runtime and planner; never ray.

Output layouts read here (the runtime's contract): a vit use gives ``(B, 1 + P, H)``, [cls] then the
``P = (I/p)^2`` patch tokens in row-major grid order; a decoder use fed by it gives ``(B, S + 1 + P, H)``,
its S stream rows then the projected encoder rows in the same order; a transformer use fed by it
gives ``(B, 1 + P, H)``.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from planner.spec import JobSpec
from recipes.medical.data import MAX_LESIONS, NUM_CLASSES, PAD, TYPES, TaskLayout, task_layout, use_path
from runtime.data import TaskBatch
from runtime.heads import TaskHead
from planner.usegraph import use_component

NUM_LESION_TYPES = len(TYPES)  # K: lesion types seen in training; the segmentation classes are K + no-object
PAD_ID = PAD  # token id ignored by the token losses
NO_OBJECT_WEIGHT = 0.1  # weight of the no-object class in the segmentation CE (most queries are empty)
MAX_QUERIES = 32  # exact matching enumerates Q!/(Q-3)! assignments: 29,760 at 32

Instances = list[tuple[int, torch.Tensor]]  # one scan's predicted lesions: (type index, bool mask (I, I))


# --------------------------------------------------------------------------- job layout


def _layout(job: JobSpec, task_index: int, leaves: list[str]) -> TaskLayout:
    """The task's :class:`TaskLayout` (ValueError from :func:`task_layout` when the task does not fit)."""
    layout = task_layout(job, task_index)
    assert leaves == [layout.head_use], f"leaf uses {leaves} are not the task's head use '{layout.head_use}'"
    return layout


def _require_queries(job: JobSpec, task_index: int, layout: TaskLayout) -> None:
    """A learned-query decoder: no vocab_size (its stream is not token ids)."""
    if layout.vocab_size is not None:
        comp = use_component(job, task_index, layout.head_use)[0]
        raise ValueError(
            f"{use_path(job, task_index, layout.head_use)}.component ('{comp}') is a token decoder (vocab_size "
            f"{layout.vocab_size}); loss '{layout.loss}' reads a learned-query decoder. Use a decoder component "
            "without vocab_size."
        )


# --------------------------------------------------------------------------- heads


class MedicalHead(TaskHead):
    """Base of the medical heads: one leaf, the split of its output into stream, [cls] and patch rows.

    The leaf output goes through a final LayerNorm first (the pre-LN layers leave the residual stream
    unnormalised): without it a token decoder learned to read the image only slowly (memorising 16 scans
    plateaued at 0.45 nats per token instead of 0.02)."""

    def __init__(self, layout: TaskLayout, stream_len: int):
        super().__init__(layout.task, [layout.head_use], layout.hidden_size)
        self.layout, self.stream_len = layout, stream_len

    def split(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(stream rows (B, S, H), patch rows (B, P, H)) of the normalised leaf output; the [cls] row is dropped."""
        x = outputs[self.layout.head_use]
        s, p = self.stream_len, self.layout.num_patches
        assert x.shape[1] == s + 1 + p, f"task {self.task}: leaf output {tuple(x.shape)} is not (B, {s} + 1 + {p}, H)"
        x = self.normed(x)
        return x[:, :s], x[:, s + 1:]


class MedicalClassificationHead(MedicalHead):
    """medical_classification: mean of the S stream rows -> ``Linear(H, NUM_CLASSES)`` -> CE against labels."""

    def __init__(self, layout: TaskLayout):
        super().__init__(layout, layout.seq_len)
        self.out = nn.Linear(layout.hidden_size, NUM_CLASSES, bias=True)

    def logits(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits (B, NUM_CLASSES)."""
        return self.out(self.split(outputs)[0].mean(dim=1))

    def forward(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        return F.cross_entropy(self.logits(outputs), batch.labels, reduction="none")

    def predict(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        """Class ids (B,) long."""
        return self.logits(outputs).argmax(dim=-1)


class MedicalSegmentationHead(MedicalHead):
    """medical_segmentation: Q = S learned queries, each a class (K types + no-object) and a mask.

    Mask logits are ``einsum(mlp(query), patch row) / sqrt(H)`` on the (I/p) grid, bilinearly upsampled
    to I x I; the loss is :func:`segmentation_loss` on those upsampled logits.
    """

    def __init__(self, layout: TaskLayout):
        super().__init__(layout, layout.seq_len)
        h = layout.hidden_size
        self.classes = nn.Linear(h, NUM_LESION_TYPES + 1, bias=True)
        self.mask_embed = nn.Sequential(nn.Linear(h, h, bias=True), nn.GELU(), nn.Linear(h, h, bias=True))

    def logits(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits (B, Q, K + 1), mask logits (B, Q, I, I))."""
        stream, pixels = self.split(outputs)
        b, q, h = stream.shape
        g, side = self.layout.grid, self.layout.side
        grid = torch.einsum("bqh,bph->bqp", self.mask_embed(stream), pixels) / math.sqrt(h)
        masks = F.interpolate(grid.reshape(b, q, g, g), size=(side, side), mode="bilinear", align_corners=False)
        return self.classes(stream), masks

    def forward(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        class_logits, mask_logits = self.logits(outputs)
        return segmentation_loss(class_logits, mask_logits, batch.targets["classes"], batch.targets["masks"])

    def predict(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> list[Instances]:
        """Per scan, (type index, bool mask (I, I)) of each query whose best class is a lesion with prob > 0.5."""
        class_logits, mask_logits = self.logits(outputs)
        prob, cls = class_logits.softmax(dim=-1).max(dim=-1)
        keep = (cls < class_logits.shape[-1] - 1) & (prob > 0.5)
        masks = mask_logits > 0
        return [[(int(cls[b, q]), masks[b, q]) for q in keep[b].nonzero().flatten().tolist()]
                for b in range(keep.shape[0])]


class MedicalTokenHead(MedicalHead):
    """medical_detection / medical_report: stream rows -> ``Linear(H, V)`` -> :func:`token_loss` against
    ``targets["tokens"]``."""

    def __init__(self, layout: TaskLayout):
        super().__init__(layout, layout.seq_len)
        self.out = nn.Linear(layout.hidden_size, layout.vocab_size, bias=True)

    def logits(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token logits (B, S, V): row t predicts target token t (input id t + 1)."""
        return self.out(self.split(outputs)[0])

    def forward(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        return token_loss(self.logits(outputs), batch.targets["tokens"])

    def predict(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        """Logits (B, S, V)."""
        return self.logits(outputs)


class MedicalReconstructionHead(MedicalHead):
    """medical_reconstruction: every patch is the mean of the scan's visible pixels plus a residual,
    ``Linear(H, C p p)`` of its patch row -> :func:`reconstruction_loss`.

    The residual's projection starts at zero (:meth:`init_structure`), so the head starts exactly at the
    trivial "mean of the visible pixels" answer and training only has to learn what that misses. Predicting
    absolute pixels instead left the head to recover each scan's brightness level from the shared encoder's
    normalised tokens, which the other tasks do not need: in a joint run its per-scan level varied a third
    as much as the scans' do (std 0.027 vs 0.077), and it scored 0.0460 on held-out scans, next to 0.0461 for
    one global constant and 0.0437 for the visible mean. The visible mean is read from ``targets["image"]``
    outside the masked patches, the same pixels the encoder is given.
    """

    def __init__(self, layout: TaskLayout):
        super().__init__(layout, 0)
        p = layout.patch_size
        self.out = nn.Linear(layout.hidden_size, layout.channels * p * p, bias=True)

    def init_structure(self) -> None:
        """Zero residual (called by ``runtime.modules.build_initialised`` after the generic init)."""
        self.out.weight.zero_()
        self.out.bias.zero_()

    def patches(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        """Predicted patches (B, P, C p p), laid out as :func:`patchify`: the visible mean plus the residual."""
        residual = self.out(self.split(outputs)[1])
        mean = visible_mean(batch.targets["image"], batch.targets["patch_mask"], self.layout.patch_size)  # (B, C)
        return residual + mean.repeat_interleave(self.layout.patch_size ** 2, dim=1)[:, None, :]

    def forward(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        target = patchify(batch.targets["image"], self.layout.patch_size)
        return reconstruction_loss(self.patches(outputs, batch), target, batch.targets["patch_mask"])

    def predict(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        """The predicted image (B, C, I, I), every patch from the head (visible ones included)."""
        return unpatchify(self.patches(outputs, batch), self.layout.patch_size, self.layout.channels)


# --------------------------------------------------------------------------- factories


def build_classification_head(job: JobSpec, task_index: int, leaves: list[str]) -> MedicalClassificationHead:
    """Head of a medical_classification task: [vit, learned-query decoder]."""
    layout = _layout(job, task_index, leaves)
    _require_queries(job, task_index, layout)
    return MedicalClassificationHead(layout)


def build_segmentation_head(job: JobSpec, task_index: int, leaves: list[str]) -> MedicalSegmentationHead:
    """Head of a medical_segmentation task: [vit, learned-query decoder with MAX_LESIONS..MAX_QUERIES queries]."""
    layout = _layout(job, task_index, leaves)
    _require_queries(job, task_index, layout)
    if not MAX_LESIONS <= layout.seq_len <= MAX_QUERIES:
        raise ValueError(
            f"{use_path(job, task_index, layout.head_use)}.seq_len ({layout.seq_len}) is not a valid number of "
            f"queries; expected {MAX_LESIONS} to {MAX_QUERIES} (one per possible lesion, few enough to match "
            f"exactly). Set it in that range, e.g. {2 * MAX_LESIONS}."
        )
    return MedicalSegmentationHead(layout)


def build_token_head(job: JobSpec, task_index: int, leaves: list[str]) -> MedicalTokenHead:
    """Head of a medical_detection or medical_report task: [vit, token decoder with vocab_size >= VOCAB_SIZE]
    (:func:`task_layout` checks the vocab_size)."""
    return MedicalTokenHead(_layout(job, task_index, leaves))


def build_reconstruction_head(job: JobSpec, task_index: int, leaves: list[str]) -> MedicalReconstructionHead:
    """Head of a medical_reconstruction task: [vit, transformer with seq_len 1 + P]."""
    layout = _layout(job, task_index, leaves)
    rows = 1 + layout.num_patches
    if layout.seq_len != rows:
        raise ValueError(
            f"{use_path(job, task_index, layout.head_use)}.seq_len ({layout.seq_len}) does not match the rows the "
            f"transformer reads; expected {rows} (the vit's 1 + ({layout.side}/{layout.patch_size})^2). "
            f"Set seq_len: {rows}."
        )
    return MedicalReconstructionHead(layout)


LOSS_FACTORIES = {
    "medical_classification": build_classification_head,
    "medical_segmentation": build_segmentation_head,
    "medical_detection": build_token_head,
    "medical_report": build_token_head,
    "medical_reconstruction": build_reconstruction_head,
}


# --------------------------------------------------------------------------- losses


@lru_cache(maxsize=64)
def injective_maps(num_items: int, num_slots: int) -> torch.Tensor:
    """Every assignment of ``num_items`` items to distinct slots: ``(slots! / (slots - items)!, items)`` long."""
    assert num_items <= num_slots, f"{num_items} items do not fit {num_slots} slots"
    maps = list(itertools.permutations(range(num_slots), num_items))
    return torch.tensor(maps, dtype=torch.long).reshape(len(maps), num_items)


def _dice_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` over the last dim (soft Dice with add-one smoothing)."""
    return 1.0 - (2.0 * (probs * targets).sum(-1) + 1.0) / (probs.sum(-1) + targets.sum(-1) + 1.0)


def matching_costs(class_logits: torch.Tensor, mask_logits: torch.Tensor, target_classes: torch.Tensor,
                   target_masks: torch.Tensor) -> torch.Tensor:
    """Cost (B, T, Q) of giving target slot t to query q: ``-p_q(class_t) + BCE(mask_q, t) + Dice(mask_q, t)``.

    BCE is the mean over the I x I pixels of the upsampled mask logits; padded slots (class -1) get
    the cost of class 0 (callers ignore them).
    """
    q = class_logits.shape[1]
    probs = class_logits.softmax(dim=-1)  # (B, Q, K + 1)
    wanted = target_classes.clamp(min=0)[:, None, :].expand(-1, q, -1)  # (B, Q, T)
    class_cost = -probs.gather(2, wanted).transpose(1, 2)  # (B, T, Q)
    x, t = mask_logits.flatten(2), target_masks.flatten(2).to(mask_logits.dtype)  # (B, Q, N), (B, T, N)
    n = x.shape[-1]
    # BCE-with-logits(x, t) = softplus(x) - x t: the pixel sum of x t for all pairs is one einsum
    bce = F.softplus(x).mean(-1)[:, None, :] - torch.einsum("bqn,btn->btq", x, t) / n
    sig = x.sigmoid()
    inter = torch.einsum("bqn,btn->btq", sig, t)
    dice = 1.0 - (2.0 * inter + 1.0) / (sig.sum(-1)[:, None, :] + t.sum(-1)[:, :, None] + 1.0)
    return class_cost + bce + dice


@torch.no_grad()
def match_queries(class_logits: torch.Tensor, mask_logits: torch.Tensor, target_classes: torch.Tensor,
                  target_masks: torch.Tensor) -> torch.Tensor:
    """Query index (B, T) long given to each target slot, -1 for padded slots; exact minimum total cost.

    Enumerates every injective map of the T slots to the Q queries (Q!/(Q-T)!), batched. Padded slots
    cost 0 and still take a distinct query, which leaves the optimum of the real slots unchanged
    because Q >= T.
    """
    cost = matching_costs(class_logits, mask_logits, target_classes, target_masks)
    valid = target_classes >= 0
    cost = cost.masked_fill(~valid[:, :, None], 0.0)
    b, t, q = cost.shape
    maps = injective_maps(t, q).to(cost.device)  # (N, T)
    total = cost[:, torch.arange(t, device=cost.device)[None, :], maps].sum(dim=-1)  # (B, N)
    return maps[total.argmin(dim=1)].masked_fill(~valid, -1)


def segmentation_loss(class_logits: torch.Tensor, mask_logits: torch.Tensor, target_classes: torch.Tensor,
                      target_masks: torch.Tensor) -> torch.Tensor:
    """Per-scan loss (B,): class CE over all queries + mean over matched pairs of (BCE + Dice).

    ``class_logits`` (B, Q, K + 1), last = no object; ``mask_logits`` (B, Q, I, I); ``target_classes``
    (B, T) long in [0, K) or -1; ``target_masks`` (B, T, I, I) {0, 1}. Targets are matched to queries
    by :func:`match_queries`; unmatched queries learn no-object, whose CE weight is NO_OBJECT_WEIGHT (the
    CE is the weighted mean over queries). A scan without lesions has no mask term.
    """
    b, q, classes = class_logits.shape
    assert target_classes.numel() == 0 or int(target_classes.max()) < classes - 1, (
        f"target types {target_classes.unique().tolist()} reach the no-object class {classes - 1}: the loss knows "
        "only the training types (the transfer split's type has no class here)")
    assign = match_queries(class_logits, mask_logits, target_classes, target_masks)
    rows, slots = (assign >= 0).nonzero(as_tuple=True)
    queries = assign[rows, slots]
    query_class = torch.full((b, q), classes - 1, dtype=torch.long, device=class_logits.device)
    query_class[rows, queries] = target_classes[rows, slots]
    weight = torch.ones(classes, device=class_logits.device)
    weight[-1] = NO_OBJECT_WEIGHT
    ce = F.cross_entropy(class_logits.transpose(1, 2), query_class, weight=weight, reduction="none")  # (B, Q)
    class_loss = ce.sum(dim=1) / weight[query_class].sum(dim=1)
    x = mask_logits[rows, queries].flatten(1)  # (M, N) matched pairs
    t = target_masks[rows, slots].flatten(1).to(x.dtype)
    pair = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(dim=1) + _dice_loss(x.sigmoid(), t)
    mask_sum = torch.zeros(b, dtype=x.dtype, device=x.device).index_add(0, rows, pair)
    return class_loss + mask_sum / (assign >= 0).sum(dim=1).clamp(min=1)


def token_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int = PAD_ID) -> torch.Tensor:
    """Per-sample CE (B,) of logits (B, S, V) against ids (B, S), mean over the non-PAD positions (0 if none)."""
    ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=pad_id, reduction="none")  # 0 at PAD
    return ce.sum(dim=1) / (targets != pad_id).sum(dim=1).clamp(min=1)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images (B, C, I, I) -> patches (B, P, C p p) in the vit's row-major grid order, each (C, p, p) flattened."""
    b, c, side, _ = images.shape
    g, p = side // patch_size, patch_size
    return images.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, P, C p p) -> (B, C, I, I)."""
    b, n, _ = patches.shape
    g, p = math.isqrt(n), patch_size
    return patches.reshape(b, g, g, channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, channels, g * p, g * p)


def visible_mean(images: torch.Tensor, patch_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per scan and channel, the mean (B, C) of the pixels of ``images`` (B, C, I, I) outside the masked patches
    (``patch_mask`` (B, P) True = masked, row-major over the vit's grid): what the encoder sees of the scan.
    0 for a scan with every patch masked."""
    visible = (~patch_mask).to(images.dtype)[:, :, None, None]  # (B, P, 1, 1)
    b, c = images.shape[:2]
    patches = patchify(images, patch_size).reshape(b, -1, c, patch_size * patch_size)  # (B, P, C, p p)
    total = (patches * visible).sum(dim=(1, 3))
    return total / (visible.sum(dim=(1, 2, 3)) * patch_size * patch_size).clamp(min=1)[:, None]


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE (B,) over the masked patches only: patches (B, P, D), ``patch_mask`` (B, P) True = masked."""
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, P)
    masked = patch_mask.to(per_patch.dtype)
    return (per_patch * masked).sum(dim=1) / masked.sum(dim=1).clamp(min=1)


# --------------------------------------------------------------------------- metrics


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of equal entries of two (N,) id tensors."""
    return (pred == target).float().mean().item()


def dice_score(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice ``2 |a & b| / (|a| + |b|)`` of two bool masks; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _target_instances(target_masks: torch.Tensor, target_classes: torch.Tensor, row: int) -> list[torch.Tensor]:
    return [target_masks[row, s] > 0.5 for s in range(target_classes.shape[1]) if target_classes[row, s] >= 0]


def union_dice(pred: list[Instances], target_masks: torch.Tensor, target_classes: torch.Tensor) -> torch.Tensor:
    """Per-scan Dice (B,) of the union of the predicted masks vs the union of the target masks.

    ``pred``: per scan, (type, bool mask (I, I)) pairs (:meth:`MedicalSegmentationHead.predict`);
    targets (B, T, I, I) and (B, T) with class -1 for empty slots. Types are ignored; the mean is the metric.
    """
    side = target_masks.shape[-2:]
    out = []
    for row, instances in enumerate(pred):
        union_pred = torch.zeros(side, dtype=torch.bool)
        for _, mask in instances:
            union_pred |= mask.cpu()
        union_target = torch.zeros(side, dtype=torch.bool)
        for mask in _target_instances(target_masks, target_classes, row):
            union_target |= mask.cpu()
        out.append(dice_score(union_pred, union_target))
    return torch.tensor(out)


def _best_total(score: torch.Tensor) -> float:
    """Largest total of ``score`` (m, n) over one-to-one pairings of the smaller side into the larger."""
    if score.numel() == 0:
        return 0.0
    if score.shape[0] > score.shape[1]:
        score = score.T
    maps = injective_maps(score.shape[0], score.shape[1])
    return score[torch.arange(score.shape[0])[None, :], maps].sum(dim=1).max().item()


def matched_dice(pred: list[Instances], target_masks: torch.Tensor, target_classes: torch.Tensor,
                 class_aware: bool = False) -> torch.Tensor:
    """Per-scan instance Dice (B,): pair predictions and targets one-to-one for the largest total Dice, then
    total / max(#predicted, #targets), so missed and spurious lesions both count 0; 1.0 when both are empty.

    ``class_aware``: pairs of different types score 0 (leave False for the transfer split, whose type
    the model has never seen).
    """
    out = []
    for row, instances in enumerate(pred):
        targets = _target_instances(target_masks, target_classes, row)
        classes = [int(c) for c in target_classes[row] if c >= 0]
        if not instances and not targets:
            out.append(1.0)
            continue
        score = torch.tensor([[dice_score(mask.cpu(), t.cpu()) if not class_aware or cls == tc else 0.0
                               for t, tc in zip(targets, classes)] for cls, mask in instances])
        out.append(_best_total(score.reshape(len(instances), len(targets))) / max(len(instances), len(targets)))
    return torch.tensor(out)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU (N, M) of pixel boxes a (N, 4) and b (M, 4), each (x0, y0, x1, y1) with x1, y1 exclusive."""
    a, b = a.float(), b.float()
    lo = torch.maximum(a[:, None, :2], b[None, :, :2])
    hi = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (hi - lo).clamp(min=0).prod(dim=-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def best_box_iou(pred_boxes: list[torch.Tensor], target_boxes: torch.Tensor) -> torch.Tensor:
    """Per-scan mean over its target boxes of the best IoU with any predicted box (B,).

    ``pred_boxes``: per scan (n, 4); ``target_boxes`` (B, T, 4), rows of -1 are padding. A scan
    without lesions scores 1.0 if nothing is predicted, else 0.0. The mean is the metric.
    """
    out = []
    for row, boxes in enumerate(pred_boxes):
        targets = target_boxes[row][(target_boxes[row] >= 0).all(dim=-1)]
        if len(targets) == 0:
            out.append(1.0 if len(boxes) == 0 else 0.0)
        elif len(boxes) == 0:
            out.append(0.0)
        else:
            out.append(box_iou(targets, boxes.reshape(-1, 4)).max(dim=1).values.mean().item())
    return torch.tensor(out)


def token_accuracy(pred_ids: torch.Tensor, targets: torch.Tensor, pad_id: int = PAD_ID) -> float:
    """Fraction of the non-PAD target positions (B, S) where ``pred_ids`` (B, S) equals the target."""
    real = targets != pad_id
    return ((pred_ids == targets) & real).sum().item() / max(int(real.sum()), 1)


def exact_match(pred_ids: torch.Tensor, targets: torch.Tensor, pad_id: int = PAD_ID) -> float:
    """Fraction of samples whose every non-PAD target position is predicted exactly."""
    wrong = (pred_ids != targets) & (targets != pad_id)
    return (~wrong.any(dim=1)).float().mean().item()
