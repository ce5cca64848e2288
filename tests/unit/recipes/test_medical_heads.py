"""recipes.medical.heads: loss heads built from the job, exact segmentation matching, predictions and metrics."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from planner.spec import parse_job
from recipes.medical import heads
from recipes.medical.data import task_layout
from recipes.medical.heads import (
    LOSS_FACTORIES, MAX_LESIONS, NUM_CLASSES, NUM_LESION_TYPES, PAD_ID, accuracy, best_box_iou, box_iou, dice_score,
    exact_match, match_queries, matched_dice, patchify, reconstruction_loss, segmentation_loss, token_accuracy,
    token_loss, union_dice, unpatchify, visible_mean,
)
from recipes.medical.evaluate import visible_mean_mse
from runtime.data import TaskBatch
from runtime.heads import build_head
from planner.usegraph import leaf_uses

H, PATCH, VOCAB = 16, 4, 64
SIDES = {"classification": 8, "detection": 12, "segmentation": 12, "report": 8, "unsupervised": 8}
STREAMS = {"classification": 4, "detection": 10, "segmentation": 6, "report": 7}


def make_job(**task_changes: dict) -> object:
    """The contract's five tasks at tiny sizes; ``task_changes[name]`` updates that task's dict."""
    def task(name: str, loss: str, decoder: str, **extra) -> dict:
        uses = [{"component": "image_encoder", "image_size": SIDES[name]}]
        if decoder == "reconstruction_head":
            uses.append({"component": decoder, "seq_len": 1 + (SIDES[name] // PATCH) ** 2})
        else:
            uses.append({"component": decoder, "seq_len": STREAMS[name]})
        spec = {"name": name, "batch_size": 4, "loss": loss, "components": uses, **extra}
        spec.update(task_changes.get(name, {}))
        return spec

    return parse_job({
        "name": "unimed-heads",
        "components": {
            "image_encoder": {"kind": "vit", "num_layers": 1, "hidden_size": H, "num_heads": 2, "patch_size": PATCH,
                              "in_channels": 1, "image_size": 8},
            "decomposed_decoder": {"kind": "decoder", "num_layers": 1, "hidden_size": H, "num_heads": 2, "seq_len": 6},
            "composed_decoder": {"kind": "decoder", "num_layers": 1, "hidden_size": H, "num_heads": 2,
                                 "vocab_size": VOCAB, "seq_len": 10},
            "reconstruction_head": {"kind": "transformer", "num_layers": 1, "hidden_size": H, "num_heads": 2},
            "small_vocab": {"kind": "decoder", "num_layers": 1, "hidden_size": H, "num_heads": 2, "vocab_size": 8},
            "text": {"kind": "transformer", "num_layers": 1, "hidden_size": H, "num_heads": 2, "seq_len": 5},
        },
        "tasks": [
            task("classification", "medical_classification", "decomposed_decoder"),
            task("detection", "medical_detection", "composed_decoder"),
            task("segmentation", "medical_segmentation", "decomposed_decoder"),
            task("report", "medical_report", "composed_decoder"),
            task("unsupervised", "medical_reconstruction", "reconstruction_head", loss_weight=0.5),
        ],
    })


def build(job, task_index: int, final_norm: bool = False) -> heads.MedicalHead:
    """The task's head; without ``final_norm`` its LayerNorm is replaced by the identity, so that hand-made leaf
    outputs reach the projections as written (the norm has its own test)."""
    task = job.tasks[task_index]
    head = LOSS_FACTORIES[task.loss](job, task_index, [task.components[-1].use_name])
    if not final_norm:
        head.norm = torch.nn.Identity()
    return head


def test_heads_normalise_the_leaf_output_first(job) -> None:
    for t, task in enumerate(job.tasks):
        head = build(job, t, final_norm=True)
        rows = torch.randn(2, leaf_rows(task.name), head.layout.hidden_size)
        with torch.no_grad():
            stream, pixels = head.split({head.layout.head_use: rows})
            rescaled = head.split({head.layout.head_use: 5.0 * rows + 1.0})  # LayerNorm: no change per row
        torch.testing.assert_close(stream, rescaled[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pixels, rescaled[1], atol=1e-4, rtol=1e-4)
        assert torch.cat([stream, pixels], dim=1).std(dim=-1).mean() == pytest.approx(1.0, rel=0.05)


def leaf_rows(name: str) -> int:
    patches = (SIDES[name] // PATCH) ** 2
    return 1 + patches + STREAMS.get(name, 0)


@pytest.fixture(scope="module")
def job():
    return make_job()


def batch(b: int, labels=None, **targets) -> TaskBatch:
    return TaskBatch(inputs={}, labels=labels if labels is not None else torch.zeros(b), num_samples=b, targets=targets)


# --------------------------------------------------------------------------- factories


def test_factories_derive_every_size_from_the_job(job) -> None:
    cls, det, seg, rep, rec = (build(job, t) for t in range(5))
    assert (cls.out.in_features, cls.out.out_features, cls.stream_len) == (H, NUM_CLASSES, 4)
    assert (det.out.out_features, det.stream_len, det.layout.side, det.layout.grid) == (VOCAB, 10, 12, 3)
    assert (rep.stream_len, rep.layout.num_patches) == (7, 4)
    assert (seg.classes.out_features, seg.stream_len, seg.layout.side) == (NUM_LESION_TYPES + 1, 6, 12)
    assert rec.out.out_features == 1 * PATCH * PATCH and rec.stream_len == 0
    assert set(LOSS_FACTORIES) == {"medical_classification", "medical_segmentation", "medical_detection",
                                   "medical_report", "medical_reconstruction"}


@pytest.mark.parametrize("changes, task_index, message", [
    ({"segmentation": {"components": [{"component": "image_encoder", "image_size": 12},
                                      {"component": "decomposed_decoder", "seq_len": 2}]}},
     2, r"\.components\[1\]\.seq_len \(2\) is not a valid number of queries; expected 3 to 32 .*\. "
        r"Set it in that range, e\.g\. 6\."),
    ({"segmentation": {"components": [{"component": "image_encoder", "image_size": 12},
                                      {"component": "composed_decoder", "seq_len": 6}]}},
     2, r"\.components\[1\]\.component \('composed_decoder'\) is a token decoder \(vocab_size 64\); loss "
        r"'medical_segmentation' reads a learned-query decoder\. Use a decoder component without vocab_size\."),
    ({"unsupervised": {"components": [{"component": "image_encoder", "image_size": 8},
                                      {"component": "reconstruction_head", "seq_len": 9}]}},
     4, r"\.components\[1\]\.seq_len \(9\) does not match .*; expected 5 \(.*\(8/4\)\^2\)\. Set seq_len: 5\."),
])
def test_factory_errors_name_the_task_and_the_fix(changes, task_index, message) -> None:
    """The head-only checks (the layout's own errors are pinned in test_medical_data)."""
    job = make_job(**changes)
    task = job.tasks[task_index]
    with pytest.raises(ValueError, match=rf"^tasks\[{task_index}\] \('{task.name}'\){message}$"):
        LOSS_FACTORIES[task.loss](job, task_index, [task.components[-1].use_name])


@pytest.mark.parametrize("changes, task_index, wrong", [
    ({"detection": {"components": [{"component": "image_encoder", "image_size": 12},
                                   {"component": "small_vocab", "seq_len": 10}]}}, 1, "has vocab_size 8;"),
    ({"segmentation": {"components": [{"component": "image_encoder", "image_size": 12},
                                      {"component": "reconstruction_head", "seq_len": 10}]}}, 2, "is a transformer;"),
    ({"classification": {"components": [{"component": "image_encoder", "image_size": 8},
                                        {"component": "decomposed_decoder", "seq_len": 4},
                                        {"component": "text", "after": []}]}}, 0, "is not one vit use"),
    ({"classification": {"components": [{"component": "image_encoder", "image_size": 8}, {"component": "text"},
                                        {"component": "decomposed_decoder", "seq_len": 4}]}}, 0, "is not one vit use"),
])
def test_factories_raise_the_layout_errors(changes, task_index, wrong) -> None:
    """A head is built only for a task the data accepts: the same ValueError as :func:`task_layout`."""
    job = make_job(**changes)
    task = job.tasks[task_index]
    with pytest.raises(ValueError) as from_data:
        task_layout(job, task_index)
    with pytest.raises(ValueError) as from_head:
        LOSS_FACTORIES[task.loss](job, task_index, leaf_uses(job, task_index))
    assert str(from_head.value) == str(from_data.value) and wrong in str(from_data.value)


# --------------------------------------------------------------------------- classification and tokens


def test_classification_is_near_zero_when_confident_and_right(job) -> None:
    head = build(job, 0)
    labels = torch.tensor([0, 3, 1, 2])
    with torch.no_grad():
        head.out.weight.copy_(torch.eye(NUM_CLASSES, H))
        head.out.bias.zero_()
    rows = torch.zeros(4, leaf_rows("classification"), H)
    for row, label in enumerate(labels):
        rows[row, :4, label] = 30.0  # the 4 stream rows point at the label
    rows[:, 4:, :] = torch.randn(4, rows.shape[1] - 4, H) * 50  # memory rows must not matter
    right = head({"decomposed_decoder": rows}, batch(4, labels))
    wrong = head({"decomposed_decoder": rows}, batch(4, (labels + 1) % NUM_CLASSES))
    assert right.shape == (4,) and right.max() < 1e-6 and wrong.min() > 10
    assert torch.equal(head.predict({"decomposed_decoder": rows}, batch(4)), labels)


def test_token_loss_ignores_pad_and_averages_real_tokens() -> None:
    targets = torch.tensor([[5, 6, 2, PAD_ID, PAD_ID], [7, 2, PAD_ID, PAD_ID, PAD_ID]])
    logits = torch.zeros(2, 5, 10, requires_grad=True)
    loss = token_loss(logits, targets)
    assert loss.shape == (2,) and torch.allclose(loss, torch.full((2,), math.log(10)))  # uniform: log V per token
    changed = logits.detach().clone()
    changed[targets == PAD_ID] = torch.randn(int((targets == PAD_ID).sum()), 10) * 10
    assert torch.equal(token_loss(changed, targets), loss)
    loss.sum().backward()
    assert logits.grad[targets == PAD_ID].abs().max() == 0 and logits.grad[targets != PAD_ID].abs().min() > 0
    perfect = torch.nn.functional.one_hot(targets, 10).float() * 40
    assert token_loss(perfect, targets).max() < 1e-6


def test_token_head_reads_the_stream_rows(job) -> None:
    head = build(job, 1)
    rows = torch.randn(3, leaf_rows("detection"), H, requires_grad=True)
    targets = torch.randint(1, VOCAB, (3, 10))
    loss = head({"composed_decoder": rows}, batch(3, tokens=targets))
    loss.sum().backward()
    assert loss.shape == (3,) and head.predict({"composed_decoder": rows}, batch(3)).shape == (3, 10, VOCAB)
    assert rows.grad[:, :10].abs().sum() > 0 and rows.grad[:, 10:].abs().sum() == 0


# --------------------------------------------------------------------------- segmentation


def seg_case(side: int = 8):
    """Two scans: scan 0 with lesions (types 2, 0) in slots 0-1, scan 1 with one lesion (type 1) in slot 0."""
    masks = torch.zeros(2, MAX_LESIONS, side, side)
    masks[0, 0, 1:4, 1:4] = 1
    masks[0, 1, 5:8, 4:7] = 1
    masks[1, 0, 2:6, 2:6] = 1
    classes = torch.tensor([[2, 0, -1], [1, -1, -1]])
    return masks, classes


def perfect_logits(masks, classes, order, q: int = 5, scale: float = 30.0):
    """Confident logits where query order[b][s] predicts slot s of scan b, other queries no-object."""
    b, _, side, _ = masks.shape
    cls = torch.full((b, q, NUM_LESION_TYPES + 1), -scale)
    cls[:, :, -1] = scale
    mask_logits = torch.full((b, q, side, side), -scale)
    for row in range(b):
        for slot, query in enumerate(order[row]):
            if classes[row, slot] >= 0:
                cls[row, query] = -scale
                cls[row, query, classes[row, slot]] = scale
                mask_logits[row, query] = scale * (2 * masks[row, slot] - 1)
    return cls, mask_logits


def test_segmentation_loss_is_near_zero_on_a_perfect_prediction_and_large_on_swapped_masks() -> None:
    masks, classes = seg_case()
    cls, mask_logits = perfect_logits(masks, classes, [[3, 0], [4]])
    loss = segmentation_loss(cls, mask_logits, classes, masks)
    assert loss.shape == (2,) and loss.max() < 1e-4
    swapped = mask_logits.clone()
    swapped[0, [3, 0]] = mask_logits[0, [0, 3]]  # right classes, masks exchanged between the two lesions
    bad = segmentation_loss(cls, swapped, classes, masks)
    assert bad[0] > 1.0 and bad[1] < 1e-4


def test_matching_follows_shuffled_queries_exactly() -> None:
    masks, classes = seg_case()
    for perm in itertools.permutations(range(5), 2):
        cls, mask_logits = perfect_logits(masks, classes, [list(perm), [perm[1]]], scale=3.0)
        assign = match_queries(cls, mask_logits, classes, masks)
        assert assign.tolist() == [[perm[0], perm[1], -1], [perm[1], -1, -1]]


def test_matching_is_the_brute_force_optimum_of_random_costs() -> None:
    gen = torch.Generator().manual_seed(3)
    masks = (torch.rand(6, 3, 6, 6, generator=gen) > 0.6).float()
    classes = torch.randint(0, 3, (6, 3), generator=gen)
    classes[1, 2] = classes[4, 1:] = -1
    cls, mask_logits = torch.randn(6, 4, 4, generator=gen), torch.randn(6, 4, 6, 6, generator=gen) * 2
    costs = heads.matching_costs(cls, mask_logits, classes, masks)
    assign = match_queries(cls, mask_logits, classes, masks)
    for row in range(6):
        slots = [s for s in range(3) if classes[row, s] >= 0]
        best = min(sum(costs[row, s, q].item() for s, q in zip(slots, qs))
                   for qs in itertools.permutations(range(4), len(slots)))
        got = sum(costs[row, s, assign[row, s]].item() for s in slots)
        assert got == pytest.approx(best, abs=1e-6)
        assert all(assign[row, s] == -1 for s in range(3) if classes[row, s] < 0)


def test_segmentation_loss_is_per_scan_and_differentiable() -> None:
    masks, classes = seg_case()
    cls = torch.randn(2, 5, NUM_LESION_TYPES + 1, requires_grad=True)
    mask_logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    loss = segmentation_loss(cls, mask_logits, classes, masks)
    loss[1].backward()
    assert cls.grad[0].abs().sum() == 0 and mask_logits.grad[0].abs().sum() == 0  # scan 1 alone
    assert cls.grad[1].abs().min() > 0 and mask_logits.grad[1].abs().sum() > 0
    with pytest.raises(AssertionError, match="no-object"):  # the transfer type has no class in the head
        segmentation_loss(cls, mask_logits, torch.tensor([[3, -1, -1]] * 2), masks)
    empty = segmentation_loss(cls, mask_logits, torch.full((2, 3), -1), torch.zeros_like(masks))
    target = torch.full((2, 5), NUM_LESION_TYPES)
    assert torch.allclose(empty, nn.functional.cross_entropy(cls.transpose(1, 2), target, reduction="none").mean(1))


def test_segmentation_loss_terms_by_hand() -> None:
    """One lesion matched to query 2 of 4: weighted CE (no-object weight 0.1) + BCE + Dice of that query's mask."""
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(1, 3, 4, 4)
    masks[0, 0, :2, :3] = 1
    classes = torch.tensor([[1, -1, -1]])
    cls = torch.randn(1, 4, 4, generator=gen)
    cls[0, 2, 1] = 4.0  # query 2 is the obvious match
    mask_logits = torch.randn(1, 4, 4, 4, generator=gen)
    mask_logits[0, 2] += 3 * (2 * masks[0, 0] - 1)
    ce = nn.functional.cross_entropy(cls[0], torch.tensor([3, 3, 1, 3]), reduction="none")
    class_term = (0.1 * (ce[0] + ce[1] + ce[3]) + ce[2]) / (0.1 * 3 + 1)
    x, t = mask_logits[0, 2].flatten(), masks[0, 0].flatten()
    bce = nn.functional.binary_cross_entropy_with_logits(x, t)
    dice = 1 - (2 * (x.sigmoid() * t).sum() + 1) / (x.sigmoid().sum() + t.sum() + 1)
    loss = segmentation_loss(cls, mask_logits, classes, masks)
    assert match_queries(cls, mask_logits, classes, masks).tolist() == [[2, -1, -1]]
    cost = heads.matching_costs(cls, mask_logits, classes, masks)[0, 0, 2]
    assert cost.item() == pytest.approx((bce + dice - cls[0, 2].softmax(-1)[1]).item(), rel=1e-5)
    assert loss.item() == pytest.approx((class_term + bce + dice).item(), rel=1e-5)


def test_segmentation_head_lays_the_patch_rows_out_row_major_and_predicts(job) -> None:
    head = build(job, 2)  # Q = 6, I = 12, grid 3
    head.mask_embed = nn.Identity()
    q, g = 6, 3
    rows = torch.zeros(1, leaf_rows("segmentation"), H)
    rows[0, 0, 0] = rows[0, 1, 1] = 60.0  # query 0 and 1 look at feature 0 and 1
    patch = rows[0, q + 1:].view(g, g, H)  # after the stream and [cls]
    patch[..., :2] = -1.0
    patch[0, 2, 0] = patch[2, 0, 1] = 1.0  # feature 0: top-right patch, feature 1: bottom-left
    with torch.no_grad():
        head.classes.weight.zero_()
        head.classes.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
        head.classes.weight[1, 0] = head.classes.weight[2, 1] = 1.0  # query 0 -> type 1, query 1 -> type 2
    cls, mask_logits = head.logits({"decomposed_decoder": rows})
    assert cls.shape == (1, q, 4) and mask_logits.shape == (1, q, 12, 12)
    expected = torch.zeros(2, 12, 12, dtype=torch.bool)
    expected[0, :4, 8:] = expected[1, 8:, :4] = True
    pred = head.predict({"decomposed_decoder": rows}, batch(1))[0]
    assert [c for c, _ in pred] == [1, 2]
    for (_, mask), want in zip(pred, expected):  # bilinear upsampling only rounds off the patch's inner corner
        assert not (mask & ~want).any() and (mask & want).sum() == want.sum() - 1
    masks = torch.cat([expected[[1, 0]], expected[:1] & False])[None].float()  # slots: query 1's lesion, query 0's
    loss = head({"decomposed_decoder": rows}, batch(1, classes=torch.tensor([[2, 1, -1]]), masks=masks))
    assert loss.shape == (1,) and loss.item() < 0.2


# --------------------------------------------------------------------------- reconstruction


def test_patchify_follows_the_vit_grid_and_round_trips() -> None:
    images = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 16)
    assert torch.equal(patches[1, 1], images[1, 0, :4, 4:].flatten())  # patch (row 0, col 1)
    assert torch.equal(patches[0, 2], images[0, 0, 4:, :4].flatten())
    assert torch.equal(unpatchify(patches, 4, 1), images)


def test_reconstruction_counts_only_masked_patches(job) -> None:
    head = build(job, 4)  # I = 8, p = 4: P = 4
    images = torch.randn(2, 1, 8, 8)
    patch_mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    target = patchify(images, 4)
    pred = target.clone()
    pred[~patch_mask] += 5.0  # wrong only where visible
    assert reconstruction_loss(pred, target, patch_mask).abs().max() == 0
    pred[0, 0] += 2.0
    assert torch.allclose(reconstruction_loss(pred, target, patch_mask), torch.tensor([4.0 / 2, 0.0]))
    rows = torch.randn(2, leaf_rows("unsupervised"), H, requires_grad=True)
    loss = head({"reconstruction_head": rows}, batch(2, image=images, patch_mask=patch_mask))
    loss.sum().backward()
    assert loss.shape == (2,) and loss.min() > 0
    assert rows.grad[:, 0].abs().sum() == 0 and rows.grad[0, 1 + 1].abs().sum() == 0  # [cls], visible patch
    assert rows.grad[0, 1 + 0].abs().sum() > 0 and rows.grad[1, 1 + 3].abs().sum() > 0
    pred = head.predict({"reconstruction_head": rows}, batch(2, image=images, patch_mask=patch_mask))
    assert pred.shape == (2, 1, 8, 8)


def test_visible_mean_by_hand() -> None:
    images = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    patch_mask = torch.tensor([[True, False, True, False], [True, True, True, True]])  # scan 1: nothing visible
    right_half = images[0, 0, :, 4:]  # patches 1 and 3 (row-major 2 x 2 grid)
    torch.testing.assert_close(visible_mean(images, patch_mask, 4), torch.tensor([[right_half.mean().item()], [0.0]]))
    two = torch.cat([images[:1], -images[:1]], dim=1)  # (1, 2, 8, 8): one mean per channel
    torch.testing.assert_close(visible_mean(two, patch_mask[:1], 4), torch.tensor([[right_half.mean().item(),
                                                                                   -right_half.mean().item()]]))


def test_reconstruction_head_starts_at_the_visible_mean_baseline(job) -> None:
    """Built as the runtime builds it, the head predicts every pixel as its scan's visible mean, whatever the encoder
    says, so its loss is the eval's trivial baseline on the same pixels; training moves it from there."""
    head = build_head(job, 4)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(3, 1, 8, 8, generator=gen) + torch.tensor([-0.5, 0.1, 2.0]).view(3, 1, 1, 1)
    patch_mask = torch.tensor([[True, False, True, False], [False, True, True, False], [False, False, False, True]])
    rows = torch.randn(3, leaf_rows("unsupervised"), H, generator=gen)
    b = batch(3, image=images, patch_mask=patch_mask)
    pred = head.predict({"reconstruction_head": rows}, b)
    for row in range(3):
        visible = ~patch_mask[row].view(2, 2).repeat_interleave(4, 0).repeat_interleave(4, 1)
        torch.testing.assert_close(pred[row], torch.full((1, 8, 8), images[row, 0][visible].mean().item()))
    loss = head({"reconstruction_head": rows}, b)
    torch.testing.assert_close(loss, visible_mean_mse(images, patch_mask, 4))
    loss.sum().backward()
    assert head.out.weight.grad.abs().sum() > 0  # the residual learns from the first step


def test_every_head_backpropagates_to_its_leaf_output(job) -> None:
    side = SIDES["segmentation"]
    masks = torch.zeros(2, 3, side, side)
    masks[0, 0, :5, :5] = 1
    targets = {
        0: dict(labels=torch.tensor([1, 3])),
        1: dict(tokens=torch.tensor([[4, 5, 6, 2] + [0] * 6] * 2)),
        2: dict(masks=masks, classes=torch.tensor([[0, -1, -1], [-1, -1, -1]])),
        3: dict(tokens=torch.randint(1, VOCAB, (2, 7))),
        4: dict(image=torch.randn(2, 1, 8, 8), patch_mask=torch.tensor([[True] * 2 + [False] * 2] * 2)),
    }
    for t, task in enumerate(job.tasks):
        head, leaf = build(job, t), task.components[-1].use_name
        rows = torch.randn(2, leaf_rows(task.name), H, requires_grad=True)
        extra = dict(targets[t])
        labels = extra.pop("labels", None)
        loss = head({leaf: rows}, batch(2, labels, **extra))
        loss.sum().backward()
        assert loss.shape == (2,) and torch.isfinite(loss).all() and rows.grad.abs().sum() > 0, task.name


# --------------------------------------------------------------------------- metrics


def test_box_iou_and_best_iou_on_hand_computed_boxes() -> None:
    a = torch.tensor([[0, 0, 4, 4]])
    b = torch.tensor([[2, 2, 6, 6], [4, 0, 8, 4], [0, 0, 4, 4]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[4 / 28, 0.0, 1.0]]))
    targets = torch.tensor([[[0, 0, 4, 4], [4, 0, 8, 4], [-1, -1, -1, -1]], [[-1] * 4] * 3, [[-1] * 4] * 3])
    preds = [torch.tensor([[2, 2, 6, 6], [4, 0, 8, 4]]), torch.zeros(0, 4), torch.tensor([[1, 1, 2, 2]])]
    assert torch.allclose(best_box_iou(preds, targets), torch.tensor([(4 / 28 + 1.0) / 2, 1.0, 0.0]))


def test_dice_metrics_on_known_masks() -> None:
    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:2, :2] = True  # 4 px
    b = torch.zeros(4, 4, dtype=torch.bool)
    b[:2, :] = True  # 8 px, 4 shared
    assert dice_score(a, b) == pytest.approx(8 / 12) and dice_score(a & False, b & False) == 1.0
    c = torch.zeros(4, 4, dtype=torch.bool)
    c[3, 3] = True
    target_masks = torch.stack([b, c, c & False]).float()[None].repeat(2, 1, 1, 1)
    target_classes = torch.tensor([[0, 2, -1], [0, 2, -1]])
    pred = [[(1, a), (2, c)], [(0, b), (2, c), (1, a)]]
    union_a_c = a | c
    assert torch.allclose(union_dice(pred, target_masks, target_classes),
                          torch.tensor([dice_score(union_a_c, b | c), dice_score(a | b | c, b | c)]))
    # scan 0: a<->b (8/12) + c<->c (1) over 2; scan 1: b, c exact, a spurious: 2 / 3
    assert torch.allclose(matched_dice(pred, target_masks, target_classes), torch.tensor([(8 / 12 + 1) / 2, 2 / 3]))
    assert torch.allclose(matched_dice(pred, target_masks, target_classes, class_aware=True),
                          torch.tensor([1 / 2, 2 / 3]))
    none = torch.full((1, 3), -1)
    assert matched_dice([[]], target_masks[:1] * 0, none).item() == 1.0
    assert matched_dice([[(0, a)]], target_masks[:1] * 0, none).item() == 0.0


def test_token_and_class_accuracy() -> None:
    targets = torch.tensor([[4, 5, 2, 0], [6, 2, 0, 0]])
    pred = torch.tensor([[4, 5, 2, 9], [6, 7, 0, 3]])
    assert token_accuracy(pred, targets) == pytest.approx(4 / 5)
    assert exact_match(pred, targets) == 0.5
    assert accuracy(torch.tensor([1, 2, 3, 0]), torch.tensor([1, 2, 0, 0])) == 0.75
