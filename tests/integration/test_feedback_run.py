"""`loom run` of examples/feedback-cpu.yaml (IterComp-style reward feedback on CPU, planned by the planner): it trains
6 steps end to end, and the trained UNet's samples score higher than the initial one's on the same held-out noise
(the mean reward of both frozen scorers rises)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.metrics import read_step_log
from planner.metagraph import build_metagraph
from planner.spec import load_job
from runtime.feedback import FeedbackBatch, feedback_losses, sample_batch
from runtime.reference import MODEL_FILE
from runtime.sample import build_scheduler
from runtime.sampleop import build_modules, denoiser_of, latent_shape, sample_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
from make_models import save_vae  # noqa: E402  (examples/make_models.py)

HELD_OUT_STEP = 10_000  # noise no training step draws


def mean_reward(job, parameters: dict[str, torch.Tensor] | None) -> float:
    """Mean reward over both scorers of 8 held-out samples of the job's sample use, with ``parameters`` (a run's
    model.pt, worker names) loaded, or the initial weights."""
    op = next(op for op in build_metagraph(job).metaops if op.mode == "sample")
    modules = build_modules(job, op)
    if parameters is not None:
        with torch.no_grad():
            for (name, layer), module in modules.items():
                for pname, p in module.named_parameters():
                    p.copy_(parameters[f"{name}/{layer}/{pname}"])
    head = modules[("head:" + op.task, 0)]
    config = sample_config(job, op)
    with torch.no_grad():
        sample = sample_batch(denoiser_of(job, op, lambda n, i: modules[(n, i)]), build_scheduler(config),
                              FeedbackBatch(None, [None, None], 8, samples=2), config, latent_shape(job, op),
                              HELD_OUT_STEP, op.task)
        _, rewards, _ = feedback_losses(sample.x0, head.objective(), [None, None])
    return float(rewards.mean())


def test_loom_run_of_the_feedback_example_raises_the_reward(tmp_path):
    """... and checkpoints it every 3 steps: the UNet, which only the sample use runs (no slice of the plan holds its
    layers), is written with its optimizer state, and a run resumed from step 3 ends with the same parameters."""
    save_vae(tmp_path / "models" / "vae")
    text = (EXAMPLES / "feedback-cpu.yaml").read_text().replace("training: {", "training: {checkpoint_every: 3, ")
    (tmp_path / "job.yaml").write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(tmp_path / "job.yaml"), "--steps", "6", "--out", str(out)])
    assert result.exit_code == 0, (result.stderr, result.exception)
    records = read_step_log(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(6))
    tensors = json.loads((out / "ckpt" / "step_3" / "MANIFEST.json").read_text())["tensors"]
    assert any(k.startswith("p:unet#") for k in tensors) and any(k.startswith("o:exp_avg@0:unet#") for k in tensors)
    trained = torch.load(out / MODEL_FILE)["parameters"]
    shutil.rmtree(out / "ckpt" / "step_6")
    (out / MODEL_FILE).unlink()
    resumed = CliRunner().invoke(app, ["run", str(tmp_path / "job.yaml"), "--steps", "6", "--out", str(out),
                                       "--resume"])
    assert resumed.exit_code == 0, (resumed.stderr, resumed.exception)
    again = torch.load(out / MODEL_FILE)["parameters"]
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in trained)
    assert all(math.isfinite(r["loss"]["feedback"]) and r["loss"]["feedback"] > 0 for r in records)

    job = load_job(tmp_path / "job.yaml")
    before = mean_reward(job, None)
    after = mean_reward(job, torch.load(out / MODEL_FILE)["parameters"])
    assert after > before + 0.1, (before, after)
