"""One IterComp feedback step split over three gloo processes (two sample, one decodes and scores) equals the same
step computed in one process: the loss and rewards within 1e-5, the UNet gradients within 1e-5 relative (issue 14's
CPU equivalence for the feedback step, on runtime.feedback's split at x0; the executor's plan-driven version wires
the same functions)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # pytest's default import mode already adds it; the spawned workers need it
    sys.path.insert(0, HERE)
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import _feedback_workers as fw  # noqa: E402
from _worlds import start_world  # noqa: E402  (tests/integration/_worlds.py)
from make_models import save_clip, save_text_tower, save_unet, save_vae  # noqa: E402

from runtime.local_world import free_port  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("itercomp")
    save_unet(root / "unet")
    save_vae(root / "vae")
    save_text_tower(root / "text")
    save_clip(root / "clip")
    return root


def test_a_feedback_step_split_over_three_processes_equals_one_process(folder, tmp_path):
    from runtime.feedback import feedback_step
    from runtime.sample import build_scheduler, diffusers_denoiser

    start_world(fw.worker, args=(3, free_port(), str(folder), str(tmp_path)), nprocs=3)
    sampler, scorer = torch.load(tmp_path / "sampler.pt"), torch.load(tmp_path / "scorer.pt")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unet = fw.unet(folder)
        whole = feedback_step(diffusers_denoiser(unet), build_scheduler(fw.CONFIG), fw.objective(folder),
                              fw.batch(folder), fw.CONFIG, fw.SHAPE, fw.STEP, fw.TASK)
        whole.loss.backward()
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(sampler["latents"], whole.sample.latents[:fw.SAMPLES], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scorer["loss"], whole.loss.detach(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(scorer["rewards"], whole.rewards.detach(), rtol=1e-5, atol=1e-5)
    worst = max(float((sampler["grads"][name] - p.grad).norm() / p.grad.norm().clamp_min(1e-30))
                for name, p in unet.named_parameters())
    assert worst < 1e-5, worst
