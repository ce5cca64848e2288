"""A sample use's x0 read as images by a frozen vision tower on another worker, planned on 2 gloo workers: the UNet
samples data parallel on both, worker 1 alone embeds every row's x0 and runs the tower, the loss reads its output, and
the gradient of x0 goes back to both sampling workers (runtime.transfers): losses, parameters and gradients equal one
process's."""

from __future__ import annotations

import torch

from planner.spec import parse_job

from _equivalence import check_equivalence, placed_plan  # tests/integration/_equivalence.py


def reader_job():
    """unet2d (pixel space, 8 px) sampled 4 DDPM steps with the last with gradient -> a frozen vit at 16 px (so the
    samples are resized) in mode forward -> mse."""
    return parse_job({
        "name": "sample-reader", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {
            "unet": {"kind": "unet2d", "num_layers": 1, "hidden_size": 16, "channel_mults": [1, 2], "in_channels": 3,
                     "image_size": 8},
            "vision": {"kind": "vit", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "patch_size": 4,
                       "image_size": 16, "frozen": True},
        },
        "tasks": [{"name": "score", "batch_size": 4, "loss": "mse", "components": [
            {"component": "unet", "mode": "sample", "denoise_steps": 4, "stop_steps": [2, 3], "grad_last_step": True},
            {"component": "vision", "mode": "forward"}]}],
        "training": {"steps": 2, "lr": 1.0e-3, "precision": "fp32"},
    })


def test_a_vision_tower_reading_samples_on_another_worker_equals_one_process(tmp_path):
    job = reader_job()
    plan = placed_plan(job, [[("unet", [0, 1])], [("vision", [1])]])
    world = check_equivalence(job, plan, tmp_path, steps=2)
    for rank in (0, 1):  # both sampling workers got x0's gradient back through the tower and trained the UNet
        grads = world.first_gradients[rank]
        unet = [g for name, g in grads.items() if name.startswith("unet")]
        assert unet and sum(float(g.abs().sum()) for g in unet) > 0, rank
    assert not any(name.startswith("vision") for name in world.first_gradients[1])  # frozen: no weight gradient
    assert all(torch.isfinite(torch.tensor(list(step.values()))).all() for step in world.losses)
