"""recipes.medical data: scans carry consistent labels, batches are deterministic and shardable,
splits are disjoint, every loss gets its tensors, and a manifest folder round-trips the scans."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from planner.spec import load_job, parse_job
from recipes.medical.data import (
    LOSSES, MASK_RATIO, NUM_CLASSES, RowKey, SyntheticScans, batch, classification_label, decode_detection, decode_report,
    row_keys, task_layout, token_sequence,
)
from recipes.medical.manifest import ManifestSource, write_manifest
from recipes.medical.scans import (
    ALL_TYPES, BOS, COUNT_PROBS, EOS, EXTENT_RANGE, MAX_LESIONS, NUM_BINS, PAD, TOKEN_NAMES, TRANSFER_TYPE, TYPES,
    VOCAB_SIZE, Lesion, decode, describe_scan, dequantise, encode, lesion_coverage, quantise, render_scans,
)

SPEC = Path(__file__).resolve().parents[3] / "recipes" / "medical" / "unimed-tiny.yaml"
SIDES = {"classification": 16, "detection": 24, "segmentation": 24, "report": 16, "unsupervised": 16}


def make_job(vocab: int = 64, channels: int = 1, loss: str | None = None, encoder_only: bool = False) -> object:
    """A small medical job whose sizes differ from unimed-tiny (everything must come from the job)."""
    enc = {"component": "enc"}
    tasks = [
        {"name": "classification", "batch_size": 8, "loss": "medical_classification",
         "components": [{**enc, "image_size": 16}, {"component": "queries", "seq_len": 3}][: 1 if encoder_only else 2]},
        {"name": "detection", "batch_size": 6, "loss": "medical_detection",
         "components": [{**enc, "image_size": 24}, {"component": "tokens", "seq_len": 16}]},
        {"name": "segmentation", "batch_size": 6, "loss": "medical_segmentation",
         "components": [{**enc, "image_size": 24}, {"component": "queries", "seq_len": 5}]},
        {"name": "report", "batch_size": 6, "loss": loss or "medical_report",
         "components": [{**enc, "image_size": 16}, {"component": "tokens", "seq_len": 19, "name": "writer"}]},
        {"name": "unsupervised", "batch_size": 8, "loss": "medical_reconstruction",
         "components": [{**enc, "image_size": 16}, {"component": "recon", "seq_len": 17}]},
    ]
    return parse_job({
        "name": "medical-data", "training": {"seed": 3},
        "components": {
            "enc": {"kind": "vit", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "patch_size": 4,
                    "in_channels": channels, "image_size": 16},
            "queries": {"kind": "decoder", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "seq_len": 4},
            "tokens": {"kind": "decoder", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "seq_len": 16,
                       "vocab_size": vocab},
            "recon": {"kind": "transformer", "num_layers": 1, "hidden_size": 16, "num_heads": 2},
        },
        "tasks": tasks,
    })


@pytest.fixture(scope="module")
def job():
    return make_job()


@pytest.fixture(scope="module")
def scans48():
    return render_scans([describe_scan(seed) for seed in range(120)], 48)


def max_abs(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def tight_bounds(mask: torch.Tensor) -> list[int]:
    rows, cols = mask.nonzero(as_tuple=True)
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


# --------------------------------------------------------------------------- scans


def test_masks_boxes_and_images_agree(scans48) -> None:
    for scan in scans48 + render_scans([describe_scan(seed) for seed in range(40)], 32):
        n = len(scan.lesions)
        assert scan.image.shape == (1, scan.side, scan.side) and scan.image.dtype == torch.float32
        assert scan.masks.shape == (n, scan.side, scan.side) and n <= MAX_LESIONS
        assert int(scan.masks.sum(dim=0).max()) <= 1  # never overlapping
        free = ~scan.masks.any(dim=0)
        for lesion, mask, box in zip(scan.lesions, scan.masks, scan.boxes.tolist()):
            assert box == tight_bounds(mask)
            near = torch.zeros_like(mask)
            near[max(0, box[1] - 3) : box[3] + 3, max(0, box[0] - 3) : box[2] + 3] = True
            background = scan.image[0][near & free].mean()  # local: the background pattern varies
            # mask pixels carry >= half the contrast (anti-aliased rims), faint contrast >= 0.35
            assert scan.image[0][mask].mean() > background + 0.4 * lesion.contrast > background + 0.14, lesion
        assert [tuple(b[1::-1]) for b in scan.boxes.tolist()] == sorted(tuple(b[1::-1]) for b in scan.boxes.tolist())


def test_description_distribution_and_sizes(scans48) -> None:
    specs = [describe_scan(seed) for seed in range(1000)]
    counts = torch.bincount(torch.tensor([len(s.lesions) for s in specs]), minlength=4).float() / len(specs)
    assert torch.allclose(counts, torch.tensor(COUNT_PROBS), atol=0.05), counts
    lesions = [lesion for s in specs for lesion in s.lesions]
    assert {lesion.type for lesion in lesions} == set(TYPES)
    for size, (low, high) in EXTENT_RANGE.items():
        extents = [lesion.extent for lesion in lesions if lesion.size == size]
        assert len(extents) > 200 and low <= min(extents) and max(extents) <= high
    for scan in scans48:  # rendered extents follow the words
        for lesion, box in zip(scan.lesions, scan.boxes.tolist()):
            width = max(box[2] - box[0], box[3] - box[1]) / 48
            assert (width >= 0.2) == (lesion.size == "large"), (lesion, box)
    assert describe_scan(7) == describe_scan(7) and describe_scan(7) != describe_scan(8)


def test_types_are_distinguishable_at_32_pixels() -> None:
    """At the smallest extent, every pair of types differs by a large intensity step somewhere."""
    gen = torch.Generator().manual_seed(0)
    small = EXTENT_RANGE["small"][0]
    for _ in range(50):
        cx, cy = (0.3 + 0.4 * torch.rand(2, generator=gen)).tolist()
        coverage, masks = lesion_coverage([Lesion(t, "small", "bright", cx, cy, small, 1.0) for t in ALL_TYPES], 32)
        for a, b in itertools.combinations(range(len(ALL_TYPES)), 2):
            assert (coverage[a] - coverage[b]).abs().max() > 0.3, (ALL_TYPES[a], ALL_TYPES[b], cx, cy)
        centre = min(int(cy * 32), 31), min(int(cx * 32), 31)
        assert not masks[ALL_TYPES.index("ring"), centre[0], centre[1]]  # the ring's hollow shows
        assert masks[ALL_TYPES.index("cross"), centre[0], centre[1]]


def test_classification_label_is_the_largest_training_lesion(scans48) -> None:
    seen = set()
    for scan in scans48:
        label = classification_label(scan)
        seen.add(label)
        if not scan.lesions:
            assert label == 0
            continue
        areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in scan.boxes.tolist()]
        winners = {scan.lesions[i].type for i, area in enumerate(areas) if area == max(areas)}
        assert TYPES[label - 1] in winners
    assert seen == set(range(NUM_CLASSES))


# --------------------------------------------------------------------------- vocabulary and sequences


def test_vocabulary_and_quantisation() -> None:
    assert len(set(TOKEN_NAMES)) == VOCAB_SIZE and (PAD, BOS, EOS) == (0, 1, 2)
    names = ["<bos>", "disc", "c00", "c31", "small", "faint", "and", "<eos>"]
    assert decode(encode(names)) == names
    with pytest.raises(ValueError, match="not in the medical vocabulary"):
        encode(["tumour"])
    with pytest.raises(ValueError, match="outside the medical vocabulary"):
        decode([VOCAB_SIZE])
    for side in (16, 24, 48, 100):
        starts, ends = torch.arange(side), torch.arange(1, side + 1)
        for coords, end in ((starts, False), (ends, True)):
            bins = quantise(coords, side, end=end)
            assert int(bins.min()) == 0 and int(bins.max()) <= NUM_BINS - 1 and (bins.diff() >= 0).all()
            assert side < NUM_BINS or len(bins.unique()) == NUM_BINS  # every bin is used once pixels are finer
            assert (dequantise(bins, side, end=end) - coords).abs().max() <= side / (2 * NUM_BINS) + 1e-5


def test_truncation_keeps_whole_lesions_and_the_eos() -> None:
    groups = [[3, 7, 8, 9, 10], [4, 11, 12, 13, 14], [5, 15, 16, 17, 18]]
    assert token_sequence(groups, 16) == [BOS, *groups[0], *groups[1], *groups[2], EOS]  # S + 1 = 17 tokens
    assert token_sequence(groups, 17) == [BOS, *groups[0], *groups[1], *groups[2], EOS, PAD]
    assert token_sequence(groups, 12) == [BOS, *groups[0], *groups[1], EOS, PAD]
    assert token_sequence(groups, 6) == [BOS, *groups[0], EOS]
    assert token_sequence(groups, 3) == [BOS, EOS, PAD, PAD]


def test_detection_tokens_decode_to_the_boxes(job) -> None:
    side = SIDES["detection"]
    for step in range(4):
        b = batch(job, 1, step, 0, 6)
        ids, targets = b.inputs["tokens"], b.targets["tokens"]
        assert torch.equal(ids[:, 1:], targets[:, :-1]) and (ids[:, 0] == BOS).all()
        for row in range(6):
            found = decode_detection(targets[row].tolist(), side)  # targets start after BOS
            classes = b.targets["classes"][row]
            real = classes >= 0
            assert [t for t, _ in found] == [ALL_TYPES[c] for c in classes[real].tolist()]
            boxes = torch.tensor([box for _, box in found]).view(-1, 4)
            assert max_abs(boxes - b.targets["boxes"][row][real]) <= side / NUM_BINS
            assert EOS in targets[row].tolist()


def test_report_words_match_the_lesions(job) -> None:
    side, layout = SIDES["report"], task_layout(job, 3)
    keys = row_keys(job, 3, "train", 2, 0, 6)
    scans = SyntheticScans().scans(keys, side)
    b = batch(job, 3, 2, 0, 6)
    assert layout.head_use == "writer" and b.inputs["writer"].shape == (6, 19)
    for row, scan in enumerate(scans):
        words = decode_report(b.inputs["writer"][row].tolist() + [int(b.targets["tokens"][row, -1])])
        if not scan.lesions:
            assert words == ["no", "finding"]
            continue
        phrases = [p.split() for p in " ".join(words).split(" and ")]
        assert len(phrases) == len(scan.lesions)
        for phrase, lesion, box in zip(phrases, scan.lesions, scan.boxes.tolist()):
            assert phrase[:3] == [lesion.size, lesion.brightness, lesion.type]
            centre_y, centre_x = (box[1] + box[3]) / 2 / side, (box[0] + box[2]) / 2 / side
            thirds = [("upper", "centre", "lower"), ("left", "centre", "right")]
            for word, centre, names in zip(phrase[3:], (centre_y, centre_x), thirds):
                allowed = {names[min(int((centre + d) * 3), 2)] for d in (-1 / side, 0, 1 / side)}
                assert word in allowed, (phrase, box)


# --------------------------------------------------------------------------- batches


def test_shards_equal_the_rows_of_the_full_batch(job) -> None:
    for t, task in enumerate(job.tasks):
        for split in ("train", "heldout"):
            size = task.batch_size
            full = batch(job, t, 5, 0, size, split)
            parts = [batch(job, t, 5, a, b, split) for a, b in ((0, 2), (2, 2), (2, size))]
            assert [p.num_samples for p in parts] == [2, 0, size - 2]
            for name in full.inputs:
                assert torch.equal(torch.cat([p.inputs[name] for p in parts]), full.inputs[name]), (task.name, name)
            for name in full.targets:
                assert torch.equal(torch.cat([p.targets[name] for p in parts]), full.targets[name]), (task.name, name)
            assert torch.equal(torch.cat([p.labels for p in parts]), full.labels)


def test_batches_repeat_exactly_and_differ_by_step_task_and_seed(job) -> None:
    first = batch(job, 0, 5, 0, 6).inputs["enc"]
    assert torch.equal(first, batch(job, 0, 5, 0, 6).inputs["enc"])
    assert not torch.equal(first, batch(job, 0, 6, 0, 6).inputs["enc"])
    assert not torch.equal(first, batch(job, 3, 5, 0, 6).inputs["enc"])  # report: also 16 px, its own scans
    reseeded = job.model_copy(update={"training": job.training.model_copy(update={"seed": 4})})
    assert not torch.equal(first, batch(reseeded, 0, 5, 0, 6).inputs["enc"])


def test_splits_are_disjoint_and_eval_scans_are_shared_by_tasks(job) -> None:
    train = {k.seed for t in range(len(job.tasks)) for s in range(5) for k in row_keys(job, t, "train", s, 0, 6)}
    heldout = {k.seed for k in row_keys(job, 0, "heldout", 0, 0, 200)}
    transfer = {k.seed for k in row_keys(job, 0, "transfer", 0, 0, 200)}
    assert len(train) == 5 * 6 * 5 and not train & heldout and not train & transfer and not heldout & transfer
    assert row_keys(job, 0, "heldout", 0, 0, 50) == row_keys(job, 4, "heldout", 0, 0, 50)
    cls, det = batch(job, 0, 0, 0, 40, "heldout"), batch(job, 1, 0, 0, 40, "heldout")
    rec = batch(job, 4, 0, 0, 40, "heldout")
    assert torch.equal(cls.inputs["enc"], rec.targets["image"])  # same scans at the same side
    assert torch.equal((cls.targets["classes"] >= 0).sum(1), (det.targets["classes"] >= 0).sum(1))
    assert torch.equal(cls.targets["classes"].sort(1).values, det.targets["classes"].sort(1).values)
    assert not torch.equal(batch(job, 0, 0, 0, 8).inputs["enc"], cls.inputs["enc"][:8])


def test_cross_only_in_transfer(job) -> None:
    cross = ALL_TYPES.index(TRANSFER_TYPE)
    for split in ("train", "heldout"):
        for t in range(len(job.tasks)):
            assert not (batch(job, t, 1, 0, job.tasks[t].batch_size, split).targets["classes"] == cross).any()
    b = batch(job, 2, 0, 0, 200, "transfer")
    has_cross = (b.targets["classes"] == cross).any(dim=1).long()
    assert torch.equal(b.labels, has_cross) and 0.4 < has_cross.float().mean() < 0.6
    training_kinds = ((b.targets["classes"] >= 0) & (b.targets["classes"] != cross)).sum(dim=1)
    assert int(training_kinds.max()) == 2 and int(training_kinds.min()) == 0


def test_reconstruction_masks_half_the_patches(job) -> None:
    b = batch(job, 4, 0, 0, 8)
    image, masked, patch_mask = b.targets["image"], b.inputs["enc"], b.targets["patch_mask"]
    grid, patch = 4, 4  # 16 px / patch 4
    assert patch_mask.shape == (8, grid * grid) and patch_mask.dtype == torch.bool
    assert (patch_mask.sum(dim=1) == round(grid * grid * MASK_RATIO)).all()
    assert not torch.equal(patch_mask[0], patch_mask[1])
    patches = lambda x: x.unfold(2, patch, patch).unfold(3, patch, patch).reshape(8, grid * grid, -1)  # noqa: E731
    assert (patches(masked)[patch_mask] == 0).all()
    assert torch.equal(patches(masked)[~patch_mask], patches(image)[~patch_mask])
    keys = row_keys(job, 4, "train", 0, 0, 8)
    assert torch.equal(image, torch.stack([s.image for s in SyntheticScans().scans(keys, 16)]))


def test_every_loss_gets_its_tensors() -> None:
    spec = load_job(SPEC)
    for t, task in enumerate(spec.tasks):
        layout = task_layout(spec, t)
        size, side = min(task.batch_size, 4), layout.side
        b = batch(spec, t, 0, 0, size)
        grid = side // layout.patch_size
        assert b.num_samples == size and b.labels.shape == (size,) and b.labels.dtype == torch.long
        assert b.targets["boxes"].shape == (size, MAX_LESIONS, 4) and b.targets["boxes"].dtype == torch.float32
        assert b.targets["classes"].shape == (size, MAX_LESIONS) and b.targets["classes"].dtype == torch.long
        image = b.inputs[layout.encoder_use]
        assert image.shape == (size, layout.channels, side, side) and image.dtype == torch.float32
        if task.loss in ("medical_detection", "medical_report"):
            for ids in (b.inputs[layout.head_use], b.targets["tokens"]):
                assert ids.shape == (size, layout.seq_len) and ids.dtype == torch.long and int(ids.max()) < VOCAB_SIZE
        if task.loss == "medical_segmentation":
            masks = b.targets["masks"]
            assert masks.shape == (size, MAX_LESIONS, side, side) and masks.dtype == torch.float32
            assert torch.equal((masks.flatten(2).sum(2) > 0), b.targets["classes"] >= 0)
        if task.loss == "medical_reconstruction":
            assert b.targets["patch_mask"].shape == (size, grid * grid)
            assert b.targets["image"].shape == image.shape
    three = batch(make_job(channels=3), 0, 0, 0, 2).inputs["enc"]
    assert three.shape == (2, 3, 16, 16) and torch.equal(three[:, 0], three[:, 2])


def test_bad_requests_fail_with_clear_errors(job) -> None:
    with pytest.raises(ValueError, match=r"^tasks\[3\] \('report'\)\.loss \('cross_entropy'\) is not a medical "
                                         r"loss; expected one of medical_classification, .*\. Use one of them "
                                         r"for this task\.$"):
        batch(make_job(loss="cross_entropy"), 3, 0, 0, 2)
    with pytest.raises(ValueError, match=r"^tasks\[1\] \('detection'\)\.components\[1\]\.component \('tokens'\) has "
                                         rf"vocab_size 40; loss 'medical_detection' needs a token decoder with "
                                         rf"vocab_size >= {VOCAB_SIZE} .*\. Set components\.tokens\.vocab_size to "
                                         rf"{VOCAB_SIZE} or more\.$"):
        batch(make_job(vocab=40), 1, 0, 0, 2)
    with pytest.raises(ValueError, match=r"^tasks\[3\] \('report'\)\.components\[1\]\.component \('tokens'\) is a "
                                         r"decoder; loss 'medical_reconstruction' reads a transformer use fed by the "
                                         r"vit\. Use a transformer component there\.$"):
        batch(make_job(loss="medical_reconstruction"), 3, 0, 0, 2)
    with pytest.raises(ValueError, match="split \\('test'\\)"):
        batch(job, 0, 0, 0, 2, "test")
    with pytest.raises(ValueError, match=r"sample range \[0, 9\)"):
        batch(job, 0, 0, 0, 9)
    assert batch(job, 0, 0, 100, 103, "heldout").num_samples == 3  # eval splits are not limited by batch_size
    with pytest.raises(ValueError, match=r"^tasks\[0\] \('classification'\)\.components \(\{'enc': 'vit'\}\) is not "
                                         r"one vit use feeding one head use; loss 'medical_classification' expects "
                                         r"\[vit, decoder\]\. Chain exactly these two uses, the decoder right after "
                                         r"the vit\.$"):
        batch(make_job(encoder_only=True), 0, 0, 0, 2)
    assert set(LOSSES) == {task.loss for task in job.tasks}


# --------------------------------------------------------------------------- manifest


def test_manifest_round_trip(tmp_path, scans48) -> None:
    scans = scans48[:10]
    source = ManifestSource(write_manifest(tmp_path / "full", scans))
    assert len(source) == 10
    for i, scan in enumerate(scans):
        back = source.scan(i, 48)
        assert (back.image - scan.image).abs().max() <= 3.0 / 255  # 8-bit PNG over a 3-wide range
        assert torch.equal(back.masks, scan.masks) and torch.equal(back.boxes, scan.boxes)
        assert [(o.type, o.size, o.brightness) for o in back.lesions] == \
            [(o.type, o.size, o.brightness) for o in scan.lesions]
        small = source.scan(i, 32)  # resized: boxes scale, and stay the tight bounds of the masks
        assert small.image.shape == (1, 32, 32) and len(small.lesions) == len(scan.lesions)
        scaled = scan.boxes.float() * 32 / 48
        for mask, box in zip(small.masks, small.boxes.tolist()):
            assert box == tight_bounds(mask)
            assert float((scaled - torch.tensor(box)).abs().max(dim=1).values.min()) <= 1.0  # its original


def test_manifest_measures_missing_attributes(tmp_path, scans48) -> None:
    scans = scans48[:60]
    source = ManifestSource(write_manifest(tmp_path / "bare", scans, masks=False, attributes=False))
    pairs = [(a, b) for i, scan in enumerate(scans) for a, b in zip(source.scan(i, 48).lesions, scan.lesions)]
    agree = sum((a.size, a.brightness) == (b.size, b.brightness) for a, b in pairs)
    assert len(pairs) > 50 and agree >= 0.95 * len(pairs)
    assert all(abs(a.cx - b.cx) <= 1 / 48 and abs(a.cy - b.cy) <= 1 / 48 for a, b in pairs)


def test_manifest_feeds_batches(tmp_path, job, scans48) -> None:
    source = ManifestSource(write_manifest(tmp_path / "feed", scans48[:5]))
    b = batch(job, 1, 0, 0, 6, "heldout", scans=source)  # rows 0..5 -> entries 0..4, 0
    assert torch.equal(b.inputs["enc"][0], b.inputs["enc"][5])
    assert torch.equal(b.inputs["enc"][1], source.scan(1, 24).image)
    for row, scan in enumerate(scans48[:5]):
        real = b.targets["classes"][row] >= 0
        scaled = scan.boxes.float() * 24 / 48
        assert int(real.sum()) == len(scan.lesions)
        for box in b.targets["boxes"][row][real]:
            assert float((scaled - box).abs().max(dim=1).values.min()) <= 1.0


def test_manifest_errors_name_the_entry(tmp_path, scans48) -> None:
    folder = write_manifest(tmp_path / "bad", scans48[:3])
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = next(i for i, e in enumerate(manifest["images"]) if e["lesions"])
    manifest["images"][entry]["lesions"][0]["type"] = "blob"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    expected = rf"images\[{entry}\]\.lesions\[0\]\.type \('blob'\) of scan000{entry}.png.*disc, square, ring, cross"
    with pytest.raises(ValueError, match=expected):
        ManifestSource(folder)
    manifest["images"][entry]["lesions"][0].update(type="disc", box=[5, 5, 3, 9])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"\.box \(\[5, 5, 3, 9\]\)"):
        ManifestSource(folder)
    manifest["images"][entry]["file"] = "missing.png"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"file \('missing.png'\) does not exist"):
        ManifestSource(folder)
    manifest["images"][entry]["file"] = f"scan000{entry}.png"
    manifest["images"][entry]["lesions"] = [{"type": "disc", "box": [1, 1, 4, 4]}] * (MAX_LESIONS + 1)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"images\[{entry}\]\.lesions .* at most {MAX_LESIONS} lesions"):
        ManifestSource(folder)
    with pytest.raises(ValueError, match="no manifest"):
        ManifestSource(tmp_path / "nowhere")


def test_a_jobs_data_dir_feeds_the_runtime_from_manifests(tmp_path, job, scans48) -> None:
    from runtime.data import synthetic_batch

    for split, first in (("train", 0), ("heldout", 3)):
        write_manifest(tmp_path / split, scans48[first:first + 3])
    real = parse_job({**job.model_dump(), "recipe": "medical", "data_dir": str(tmp_path)})
    t = next(i for i, task in enumerate(real.tasks) if task.loss == "medical_segmentation")
    got = synthetic_batch(real, t, 0, 0, 2, "heldout")  # the runtime's entry point, recipe-aware
    want = ManifestSource(tmp_path / "heldout").scans(
        [RowKey(0, row, "heldout") for row in range(2)], got.inputs[task_layout(real, t).encoder_use].shape[-1])
    torch.testing.assert_close(got.targets["masks"][0, :len(want[0].lesions)], want[0].masks.float())
    with pytest.raises(ValueError, match=r"no transfer/manifest.json"):
        synthetic_batch(real, t, 0, 0, 2, "transfer")


def test_a_data_dir_that_cannot_be_read_is_one_error_before_the_run(tmp_path, job, scans48) -> None:
    from runtime.source_files import DataError
    from runtime.sources import check_data

    real = parse_job({**job.model_dump(), "recipe": "medical", "data_dir": str(tmp_path / "scans")})
    with pytest.raises(DataError, match=r"^data_dir \(.*scans\): no such folder"):
        check_data(real)
    (tmp_path / "scans").mkdir()
    with pytest.raises(DataError, match=r"^data_dir \(.*\): tasks\[0\] \('.*'\) cannot read its first row: .*no "
                                        r"train/manifest.json"):
        check_data(real)
    write_manifest(tmp_path / "scans" / "train", scans48[:3])
    check_data(real)  # readable: no error
