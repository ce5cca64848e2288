"""CLIP's two towers, each pooled by its own model (the image's class token through post_layernorm, the text's
end-of-text token), trained with InfoNCE data parallel over 2 gloo workers equal single-process training: the
poolers' gradients are synchronised like every other head parameter's.

SGD, not AdamW: CLIP's attention key bias has an exactly zero gradient (softmax ignores a shift shared by every key),
so its computed gradient is float noise whose sign depends on the summation order, and AdamW's first steps move each
such element by about lr in that sign (2 ranks vs one process: 1e-5..5e-5 relative on the vision layer at lr 1e-4..1e-3,
with either pooling). SGD keeps the comparison about the gradients themselves."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from planner.spec import load_job

from _equivalence import check_equivalence, placed_plan  # tests/integration/_equivalence.py

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
from make_models import save_clip_vision, save_text_tower  # noqa: E402  (examples/make_models.py)


def test_clip_towers_pooled_by_their_models_train_data_parallel_as_in_one_process(tmp_path):
    save_clip_vision(tmp_path / "clip")
    save_text_tower(tmp_path / "clip_text", "clip")
    spec = {
        "name": "clip-pool", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"image": {"pretrained": "clip"}, "text": {"pretrained": "clip_text", "seq_len": 12}},
        "tasks": [{"name": "match", "batch_size": 8, "loss": "infonce", "pooling": "model",
                   "components": [{"component": "image"}, {"component": "text", "after": []}]}],
        "training": {"steps": 2, "lr": 1e-2, "optimizer": "sgd", "precision": "fp32"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    job = load_job(tmp_path / "job.yaml")
    # each tower data parallel over both workers, one after the other: the head's rows are split over 2 ranks
    plan = placed_plan(job, [[("image", [0, 1])], [("text", [0, 1])]])
    world = check_equivalence(job, plan, tmp_path / "world", steps=2)
    pooler_grads = [name for grads in world.gradients.values() for name in grads if "/poolers." in name]
    assert any("post_layernorm" in name for name in pooler_grads), sorted(pooler_grads)
