"""What `loom run` refuses of a feedback task, in one line before anything runs: feedback: without loss feedback (and
the reverse), no sample leaf with grad_last_step, a conditioned sample use, a VAE whose latents are not the UNet's,
a missing VAE folder."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from planner.errors import SpecError
from planner.spec import parse_job
from runtime.checks import check_trainable

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
from make_models import save_vae  # noqa: E402  (examples/make_models.py)

UNET = {"kind": "unet2d", "num_layers": 1, "hidden_size": 8, "channel_mults": [1, 2], "in_channels": 4,
        "image_size": 8}
TEXT = {"kind": "transformer", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "vocab_size": 32, "seq_len": 4,
        "frozen": True}


def job(vae, use=None, loss="feedback", feedback=True, unet=None, uses=None, scorers=None):
    task = {"name": "fb", "batch_size": 4, "loss": loss, "components": uses or [
        {"component": "unet", "mode": "sample", "denoise_steps": 4, "grad_last_step": True, **(use or {})}]}
    if feedback:
        task["feedback"] = {"vae": vae and str(vae), "scorers": scorers or [{"seed": 1}]}
    return parse_job({"name": "j", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
                      "components": {"unet": {**UNET, **(unet or {})}, "text": TEXT}, "tasks": [task]})


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return save_vae(tmp_path_factory.mktemp("m") / "vae")


def test_a_feedback_task_checks(vae):
    check_trainable(job(vae))  # the valid one
    with pytest.raises(SpecError, match="goes with loss 'feedback' and only with it; the loss is 'mse'"):
        job(vae, loss="mse")  # feedback: given
    with pytest.raises(SpecError, match="goes with loss 'feedback'"):
        job(vae, feedback=False)
    with pytest.raises(SpecError, match=re.escape("a linear scorer takes seed and gain, not args. Remove them.")):
        job(vae, scorers=[{"kind": "linear", "args": {"seed": 2}}])
    check_trainable(job(None, unet={"in_channels": 3}))  # pixel space: x0 is the image
    cases = [
        (job(vae, use={"grad_last_step": False}), "scores one leaf use of mode sample with grad_last_step: true"),
        (job(vae, uses=[{"component": "text", "mode": "forward"},
                        {"component": "unet", "mode": "sample", "denoise_steps": 4, "grad_last_step": True,
                         "samples": 2}]),
         "that reads ['text'] (its context) draws one sample per row (sample r is conditioned on its upstream's row "
         "r); it has samples: 2"),
        (job(vae, unet={"in_channels": 3}), "has 4 latent channels; component 'unet' denoises 3"),
        (job(vae.parent / "missing"), "no such folder"),
        (job(None), "tasks[0].feedback.vae is null (x0 is the image), but component 'unet' denoises 4 channels"),
        (job(vae, scorers=[{"seed": 1}, {"kind": "clip"}]), "tasks[0].feedback.scorers[1].kind ('clip') is not a "
         "scorer kind; known: linear"),
        (job(vae, loss="mse", feedback=False), "sample use 'unet' is a leaf and loss 'mse' does not read samples"),
    ]
    for spec, needle in cases:
        with pytest.raises(ValueError, match=re.escape(needle)) as err:
            check_trainable(spec)
        assert "\n" not in str(err.value)
