"""Evaluation of the medical recipe: per-task metrics on held-out scans, trivial baselines, the transfer probe.

:func:`evaluate` is the recipe's ``loom eval`` evaluator. On split "heldout" every task is scored on
the same held-out scans (rendered at its own resolution), next to a trivial baseline of the same
metric on the same scans:

* classification: accuracy; baseline: always the majority class of the training stream;
* detection: greedy autoregressive decoding of the box tokens; mean best-IoU per lesion over scans
  with lesions, and recall at IoU 0.5; baseline: one centred box of the mean training box size;
* segmentation: Dice of the union of predicted masks (all scans; an empty scan predicted empty counts
  1) and instance-matched Dice; baselines: the better of an empty prediction and a centred square;
* report: greedy decoding; exact match of the whole finding and token accuracy; baseline: always the
  most common training report;
* reconstruction: MSE on the hidden patches; baseline: every pixel the mean of the visible ones.

On split "transfer" it runs :func:`transfer_probe`: with the encoder frozen (at the finest
resolution any task uses), a linear probe on 100 labelled scans of the held-out lesion type (is a
cross present?) on the trained encoder vs the same probe on the encoder's initial (random) weights.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch
import torch.nn.functional as F

from planner.spec import JobSpec
from recipes.medical.data import job_batch as medical_batch
from recipes.medical.data import decode_detection, task_layout
from recipes.medical.heads import best_box_iou, box_iou, matched_dice, token_accuracy, union_dice
from recipes.medical.scans import BOS, EOS, PAD
from runtime.data import TaskBatch
from runtime.evaluate import EvalReport
from runtime.reference import ReferenceTrainer

CHUNK = 64  # scans per forward pass
BASELINE_SAMPLES = 512  # training scans that set the majority class, mean box and commonest report
PROBE_TRAIN, PROBE_TEST = 100, 400  # labelled transfer scans for the probe, and scans it is tested on
PROBE_STEPS = 300


def evaluate(job: JobSpec, model: ReferenceTrainer, split: str, num_samples: int) -> EvalReport:
    """The recipe's evaluator (see the module docstring); ``split`` "heldout" or "transfer"."""
    if split == "transfer":
        return transfer_probe(job, model)
    metrics, baselines = {}, {}
    for t, task in enumerate(job.tasks):
        score = _SCORERS[task.loss]
        metrics[task.name], baselines[task.name] = score(job, model, t, split, num_samples)
    return EvalReport(job.name, split, num_samples, metrics, baselines)


def _chunks(job: JobSpec, t: int, split: str, num_samples: int, step: int = 0):
    for start in range(0, num_samples, CHUNK):
        yield medical_batch(job, t, step, start, min(start + CHUNK, num_samples), split)


def _train_batches(job: JobSpec, t: int) -> list[TaskBatch]:
    """Whole training batches (steps 0, 1, ...) holding at least BASELINE_SAMPLES scans, for the baselines' statistics."""
    size = job.tasks[t].batch_size
    return [medical_batch(job, t, step, 0, size, "train") for step in range(-(-BASELINE_SAMPLES // size))]


# --------------------------------------------------------------------------- per task


def _classification(job, model, t, split, num_samples):
    head = model.head(t)
    majority = Counter(label for b in _train_batches(job, t) for label in b.labels.tolist()).most_common(1)[0][0]
    correct = base = 0
    for b in _chunks(job, t, split, num_samples):
        correct += int((head.predict(model.forward(t, b), b) == b.labels).sum())
        base += int((b.labels == majority).sum())
    return {"accuracy": correct / num_samples}, {"accuracy": base / num_samples}


def _greedy(model: ReferenceTrainer, job: JobSpec, t: int, b: TaskBatch) -> torch.Tensor:
    """Greedy decoding of the task's token decoder: (B, S) predicted ids, aligned with ``targets["tokens"]``."""
    use = task_layout(job, t).head_use
    seq = b.inputs[use].shape[1]
    ids = torch.full_like(b.inputs[use], PAD)
    ids[:, 0] = BOS
    pred = torch.full_like(ids, PAD)
    head = model.head(t)
    for i in range(seq):  # causal: positions after i do not change position i's logits
        logits = head.predict(model.forward(t, replace(b, inputs={**b.inputs, use: ids})), b)
        pred[:, i] = logits[:, i].argmax(dim=-1)
        if i + 1 < seq:
            ids[:, i + 1] = pred[:, i]
    return pred


def _real_boxes(b: TaskBatch) -> list[torch.Tensor]:
    return [row[(row >= 0).all(dim=-1)] for row in b.targets["boxes"]]


def _detection(job, model, t, split, num_samples):
    side = task_layout(job, t).side
    train_boxes = torch.cat([box for b in _train_batches(job, t) for box in _real_boxes(b)])
    w, h = (train_boxes[:, 2:] - train_boxes[:, :2]).float().mean(dim=0).tolist()
    centred = torch.tensor([[side / 2 - w / 2, side / 2 - h / 2, side / 2 + w / 2, side / 2 + h / 2]])
    ious, base_ious, hits, base_hits, lesions = [], [], 0, 0, 0
    for b in _chunks(job, t, split, num_samples):
        pred = _greedy(model, job, t, b)
        boxes = [torch.tensor([box for _, box in decode_detection(row.tolist(), side)]).reshape(-1, 4) for row in pred]
        has = [len(r) > 0 for r in _real_boxes(b)]
        ious += [v for v, keep in zip(best_box_iou(boxes, b.targets["boxes"]).tolist(), has) if keep]
        base_ious += [v for v, keep in zip(best_box_iou([centred] * len(boxes), b.targets["boxes"]).tolist(), has) if keep]
        for row, real in enumerate(_real_boxes(b)):
            lesions += len(real)
            if len(real):
                hits += _hits(boxes[row], real)
                base_hits += _hits(centred, real)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return ({"box_iou": mean(ious), "recall@0.5": hits / max(lesions, 1)},
            {"box_iou": mean(base_ious), "recall@0.5": base_hits / max(lesions, 1)})


def _hits(pred: torch.Tensor, real: torch.Tensor) -> int:
    """Target boxes with a prediction of IoU >= 0.5."""
    return int((box_iou(real.float(), pred.float()).max(dim=1).values >= 0.5).sum()) if len(pred) else 0


def _segmentation(job, model, t, split, num_samples):
    head = model.head(t)
    side = task_layout(job, t).side
    areas = [b.targets["masks"].sum(dim=(-1, -2))[b.targets["classes"] >= 0] for b in _train_batches(job, t)]
    area = float(torch.cat(areas).float().mean())
    half = max(1, round(area ** 0.5 / 2))
    centred = torch.zeros(side, side, dtype=torch.bool)
    centred[side // 2 - half:side // 2 + half, side // 2 - half:side // 2 + half] = True
    sums = Counter()
    for b in _chunks(job, t, split, num_samples):
        pred = head.predict(model.forward(t, b), b)
        masks, classes = b.targets["masks"], b.targets["classes"]
        sums["dice"] += float(union_dice(pred, masks, classes).sum())
        sums["matched_dice"] += float(matched_dice(pred, masks, classes).sum())
        sums["empty"] += float(union_dice([[] for _ in pred], masks, classes).sum())
        sums["centred"] += float(union_dice([[(0, centred)] for _ in pred], masks, classes).sum())
        sums["centred_matched"] += float(matched_dice([[(0, centred)] for _ in pred], masks, classes).sum())
        sums["empty_matched"] += float(matched_dice([[] for _ in pred], masks, classes).sum())
    n = num_samples
    return ({"dice": sums["dice"] / n, "matched_dice": sums["matched_dice"] / n},
            {"dice": max(sums["empty"], sums["centred"]) / n,
             "matched_dice": max(sums["empty_matched"], sums["centred_matched"]) / n})


def _until_eos(row: list[int]) -> list[int]:
    return row[:row.index(EOS) + 1] if EOS in row else row


def _report(job, model, t, split, num_samples):
    rows = [row for b in _train_batches(job, t) for row in b.targets["tokens"].tolist()]
    common = Counter(tuple(_until_eos(row)) for row in rows).most_common(1)[0][0]
    exact = base_exact = 0
    acc = base_acc = 0.0
    for b in _chunks(job, t, split, num_samples):
        pred, targets = _greedy(model, job, t, b), b.targets["tokens"]
        guess = torch.full_like(targets, PAD)
        guess[:, :len(common)] = torch.tensor(common)
        for p, g, y in zip(pred.tolist(), guess.tolist(), targets.tolist()):
            exact += _until_eos(p) == _until_eos(y)
            base_exact += _until_eos(g) == _until_eos(y)
        acc += token_accuracy(pred, targets) * len(targets)
        base_acc += token_accuracy(guess, targets) * len(targets)
    n = num_samples
    return ({"exact_match": exact / n, "token_accuracy": acc / n},
            {"exact_match": base_exact / n, "token_accuracy": base_acc / n})


def visible_mean_mse(image: torch.Tensor, hidden: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The reconstruction baseline per scan (B,): MSE over the hidden pixels of ``image`` (B, C, I, I) when every
    pixel is the mean of the visible ones (all channels together). ``hidden`` (B, P) True = masked patch.

    Computed on pixels, independently of the head's patch layout, so that it checks the head's metric: both
    average over exactly the hidden pixels of each scan, then over scans."""
    grid = int(hidden.shape[1] ** 0.5)
    pixels = hidden.reshape(-1, 1, grid, grid).repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
    pixels = pixels.expand_as(image)
    mean = (image * ~pixels).sum(dim=(1, 2, 3)) / (~pixels).sum(dim=(1, 2, 3)).clamp(min=1)
    err = ((image - mean.view(-1, 1, 1, 1)) ** 2 * pixels).sum(dim=(1, 2, 3))
    return err / pixels.sum(dim=(1, 2, 3)).clamp(min=1)


def _reconstruction(job, model, t, split, num_samples):
    head = model.head(t)
    p = task_layout(job, t).patch_size
    loss = base = 0.0
    for b in _chunks(job, t, split, num_samples):
        loss += float(head(model.forward(t, b), b).sum())
        base += float(visible_mean_mse(b.targets["image"], b.targets["patch_mask"], p).sum())
    return {"masked_mse": loss / num_samples}, {"masked_mse": base / num_samples}


_SCORERS = {
    "medical_classification": _classification,
    "medical_detection": _detection,
    "medical_segmentation": _segmentation,
    "medical_report": _report,
    "medical_reconstruction": _reconstruction,
}


# --------------------------------------------------------------------------- transfer


def encoder_features(job: JobSpec, model: ReferenceTrainer, t: int, b: TaskBatch) -> torch.Tensor:
    """Frozen encoder features (B, 3H) of task ``t``'s images: the [cls] row, the mean and the maximum of the patch
    rows (a small lesion is a local pattern that a mean dilutes)."""
    layout = task_layout(job, t)
    op = next(op for op in model.graph.ops_of_task(job.tasks[t].name) if op.use == layout.encoder_use)
    x = model.modules[("embed:" + op.component, 0)](b.inputs[layout.encoder_use])
    for layer in range(op.num_layers):
        x = model.modules[(op.param_group, layer)](x)
    return torch.cat([x[:, 0], x[:, 1:].mean(dim=1), x[:, 1:].max(dim=1).values], dim=-1)


def _probe_accuracy(train_x, train_y, test_x, test_y, seed: int) -> float:
    """A logistic-regression probe on standardised features (full-batch AdamW); its test accuracy."""
    mean, std = train_x.mean(dim=0), train_x.std(dim=0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(train_x.shape[1], 2)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=gen)
        probe.bias.zero_()
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-2)
    with torch.enable_grad():
        for _ in range(PROBE_STEPS):
            opt.zero_grad()
            F.cross_entropy(probe(train_x), train_y).backward()
            opt.step()
    return float((probe(test_x).argmax(dim=-1) == test_y).float().mean())


def transfer_probe(job: JobSpec, model: ReferenceTrainer) -> EvalReport:
    """The cross-lesion probe on ``model``'s encoder vs the encoder's initial weights (see the module docstring)."""
    t = max(range(len(job.tasks)), key=lambda i: (task_layout(job, i).side, -i))  # the finest resolution
    initial = ReferenceTrainer(job)
    results = {}
    for name, encoder in (("trained", model), ("initial", initial)):
        train = medical_batch(job, t, 0, 0, PROBE_TRAIN, "transfer")
        test = medical_batch(job, t, 0, PROBE_TRAIN, PROBE_TRAIN + PROBE_TEST, "transfer")
        results[name] = _probe_accuracy(encoder_features(job, encoder, t, train), train.labels,
                                        encoder_features(job, encoder, t, test), test.labels, job.training.seed)
    test_labels = medical_batch(job, t, 0, PROBE_TRAIN, PROBE_TRAIN + PROBE_TEST, "transfer").labels
    majority = max(float(test_labels.float().mean()), 1 - float(test_labels.float().mean()))
    return EvalReport(
        job.name, "transfer", PROBE_TEST, {"transfer_probe": {"accuracy": results["trained"]}},
        {"transfer_probe": {"accuracy": results["initial"]}},
        notes={"probe": f"linear probe on {PROBE_TRAIN} labelled scans with a cross lesion present or not, frozen "
                        f"encoder; baseline = the same probe on the encoder's initial weights; majority class "
                        f"{majority:.3f}"},
    )
