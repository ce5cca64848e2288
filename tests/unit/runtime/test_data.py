"""runtime.data: synthetic batches are per-sample deterministic, shardable, well-typed and carry their labels."""

from __future__ import annotations

import pytest
import torch

from planner.spec import parse_job
from runtime.data import synthetic_batch, task_loss_sum
from runtime.embeddings import build_embed
from runtime.heads import build_head

H, SEQ, BATCH = 32, 8, 6


def make_job(cls_loss: str = "cross_entropy", seq: int = SEQ) -> object:
    return parse_job({
        "name": "data",
        "training": {"seed": 5},
        "components": {
            "text": {"kind": "transformer", "num_layers": 1, "hidden_size": H, "num_heads": 4, "seq_len": seq,
                     "vocab_size": 50},
            "image": {"kind": "vit", "num_layers": 1, "hidden_size": H, "num_heads": 4, "patch_size": 4,
                      "image_size": 8, "in_channels": 2},
            "feats": {"kind": "mlp", "num_layers": 1, "hidden_size": H},
            "lm": {"kind": "llama", "num_layers": 1, "hidden_size": H, "num_heads": 4, "seq_len": seq},
        },
        "tasks": [
            {"name": "cls", "batch_size": BATCH, "loss": cls_loss,
             "components": [{"component": "text"}, {"component": "feats", "seq_len": seq}]},
            {"name": "clip", "batch_size": BATCH, "loss": "contrastive",
             "components": [{"component": "image"}, {"component": "text", "after": []}]},
            {"name": "gen", "batch_size": BATCH, "loss": "lm", "components": [{"component": "lm"}]},
            {"name": "reg", "batch_size": BATCH, "loss": "mse", "components": [{"component": "feats", "seq_len": 3}]},
        ],
    })


@pytest.fixture(scope="module")
def job():
    return make_job()


def test_shard_equals_the_slice_of_the_full_batch(job) -> None:
    for t in range(len(job.tasks)):
        full = synthetic_batch(job, t, step=3, start=0, stop=BATCH)
        shard = synthetic_batch(job, t, step=3, start=2, stop=5)
        assert shard.num_samples == 3 and full.num_samples == BATCH
        assert set(shard.inputs) == set(full.inputs)
        for use, tensor in shard.inputs.items():
            assert torch.equal(tensor, full.inputs[use][2:5]), (t, use)
        assert torch.equal(shard.labels, full.labels[2:5])


def test_batches_differ_by_step_and_task_and_repeat_exactly(job) -> None:
    a, b = synthetic_batch(job, 0, 0, 0, BATCH), synthetic_batch(job, 0, 1, 0, BATCH)
    assert not torch.equal(a.inputs["text"], b.inputs["text"])
    assert torch.equal(a.inputs["text"], synthetic_batch(job, 0, 0, 0, BATCH).inputs["text"])
    clip_text = synthetic_batch(job, 1, 0, 0, BATCH).inputs["text"]
    assert not torch.equal(a.inputs["text"], clip_text)  # another task's samples, same component
    rows = a.inputs["text"]
    assert not torch.equal(rows[0], rows[1])


def test_shapes_dtypes_and_ranges_per_kind(job) -> None:
    cls = synthetic_batch(job, 0, 0, 0, BATCH)
    assert list(cls.inputs) == ["text"]  # feats is fed by text, not by data
    assert cls.inputs["text"].shape == (BATCH, SEQ) and cls.inputs["text"].dtype == torch.long
    assert cls.labels.dtype == torch.long and cls.labels.shape == (BATCH,)
    assert 0 <= cls.labels.min() and cls.labels.max() < 10

    clip = synthetic_batch(job, 1, 0, 0, BATCH)
    assert clip.inputs["image"].shape == (BATCH, 2, 8, 8) and clip.inputs["image"].dtype == torch.float32
    assert torch.equal(clip.labels, torch.zeros(BATCH))
    ids = torch.cat([clip.inputs["text"], cls.inputs["text"]])
    assert 0 <= ids.min() and ids.max() < 50

    gen = synthetic_batch(job, 2, 0, 0, BATCH)
    assert gen.inputs["lm"].shape == (BATCH, SEQ) and 0 <= gen.inputs["lm"].min() and gen.inputs["lm"].max() < 256

    reg = synthetic_batch(job, 3, 0, 0, BATCH)
    assert reg.inputs["feats"].shape == (BATCH, 3, H) and reg.inputs["feats"].dtype == torch.float32
    assert reg.labels.dtype == torch.float32 and reg.labels.std() > 0


def test_empty_shard_and_bad_ranges(job) -> None:
    empty = synthetic_batch(job, 1, 0, 4, 4)
    assert empty.num_samples == 0
    assert empty.inputs["image"].shape == (0, 2, 8, 8) and empty.inputs["text"].shape == (0, SEQ)
    assert empty.labels.shape == (0,)
    for start, stop in ((-1, 2), (3, 2), (0, BATCH + 1)):
        with pytest.raises(ValueError, match=r"tasks\[1\] \('clip'\): sample range"):
            synthetic_batch(job, 1, 0, start, stop)
    with pytest.raises(ValueError, match="'focal'"):
        synthetic_batch(make_job(cls_loss="focal"), 0, 0, 0, BATCH)


def test_inputs_carry_their_labels() -> None:
    """Learnable data: the class marker is the most frequent token; lm sequences follow a constant stride."""
    job = make_job(seq=64)
    cls = synthetic_batch(job, 0, step=0, start=0, stop=BATCH)
    modes = cls.inputs["text"].mode(dim=1).values
    assert torch.equal(modes, cls.labels)
    gen = synthetic_batch(job, 2, step=0, start=0, stop=BATCH).inputs["lm"]
    steps = (gen[:, 1:] - gen[:, :-1]) % 256
    assert ((steps == steps.mode(dim=1, keepdim=True).values).float().mean(dim=1) > 0.6).all()


def test_mse_features_correlate_with_labels() -> None:
    base = make_job().model_dump()
    base["tasks"][3]["batch_size"] = 200
    job = parse_job(base)
    batch = synthetic_batch(job, 3, step=0, start=0, stop=200)
    feats, labels = batch.inputs["feats"].mean(dim=1), batch.labels  # (200, H)
    corr = [torch.corrcoef(torch.stack([feats[:, j], labels]))[0, 1].abs() for j in range(H)]
    assert max(corr) > 0.5  # some hidden unit carries the label (its pattern entry is large)


def test_loss_sums_over_shards_equal_the_full_batch_mean(job) -> None:
    head, embed = build_head(job, 3), build_embed(job, "feats")
    full = synthetic_batch(job, 3, 1, 0, BATCH)
    expected = head({"feats": embed(full.inputs["feats"])}, full).mean()
    total = torch.zeros(())
    for start, stop in ((0, 2), (2, 3), (3, BATCH)):
        shard = synthetic_batch(job, 3, 1, start, stop)
        total = total + task_loss_sum(head, {"feats": embed(shard.inputs["feats"])}, shard, BATCH)
    torch.testing.assert_close(total, expected)


def test_task_batch_is_synthetic_data_unless_the_task_names_its_data(job, tmp_path) -> None:
    from runtime.data import task_batch

    for t in range(len(job.tasks)):
        a, b = task_batch(job, t, 2, 1, 4), synthetic_batch(job, t, 2, 1, 4)
        assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in b.inputs) and torch.equal(a.labels, b.labels)
    (tmp_path / "t.jsonl").write_text('{"text": "a b", "label": 3}\n')
    doc = make_job().model_dump()
    doc["tasks"][0]["data"] = {"format": "text", "path": str(tmp_path / "t.jsonl"), "tokenizer": str(tmp_path)}
    with pytest.raises(ValueError, match=r"tasks\[0\].data.tokenizer .* holds no tokenizer"):
        task_batch(parse_job(doc), 0, 0, 0, 2)  # the source is asked, not the synthetic data
