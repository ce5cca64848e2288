"""A pretrained diffusers UNet2DConditionModel, fed by a text encoder, trained by a gloo world of 2 workers under a plan
that re-splits a level across waves, equals single-process training and the diffusers model trained by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

from planner.spec import load_job
from runtime.data import synthetic_batch
from runtime.reference import ReferenceTrainer
from runtime.unet import noise_key

from _equivalence import RTOL, STEPS, check_equivalence, plan_from_waves  # tests/integration/_equivalence.py

sys.path.insert(0, str(Path(__file__).parents[1] / "unit" / "runtime"))
sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
from make_models import save_unet  # noqa: E402  (examples/make_models.py)
from test_pretrained_unet import _diffusers_side, write_job  # noqa: E402  (the unit tests' job and diffusers model)


def test_pretrained_unet_across_resplit_waves_equals_the_diffusers_model(tmp_path):
    save_unet(tmp_path / "unet")
    path = write_job(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["tasks"][0]["batch_size"] = 4
    path.write_text(yaml.safe_dump(doc))
    job = load_job(path)
    # the text encoder and the down path data parallel on both workers, the mid block and the deepest up level on one,
    # the full-resolution up level's two blocks split: the first on one worker, the second on both
    plan = plan_from_waves(job, [[("gen.text", 1, 2)], [("gen.unet#0", 1, 2)], [("gen.unet#1", 1, 2)],
                                 [("gen.unet#2", 1, 1)], [("gen.unet#3", 2, 1)], [("gen.unet#4", 1, 1)],
                                 [("gen.unet#4", 1, 2)]])
    world = check_equivalence(job, plan, tmp_path / "world")
    # ... and the diffusers model (with copies of Loom's seeded text encoder) trained by hand on the same batches
    _, model, predict = _diffusers_side(job, ReferenceTrainer(job), tmp_path / "unet")
    train = job.training
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, eps=train.adam_eps)
    for step in range(STEPS):
        batch = synthetic_batch(job, 0, step, 0, 4)
        loss = torch.nn.functional.mse_loss(predict(batch), batch.targets[noise_key("unet")])
        loss.backward()
        opt.step()
        opt.zero_grad()
        got, want = world.losses[step]["gen"], float(loss.detach())
        assert abs(got - want) <= RTOL * want, (step, got, want)
