"""The medical recipe end to end at test size: distributed training equals single-process training,
a short run lowers every task's loss, and `loom eval` scores a model file (and refuses a wrong one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import recipes.medical  # noqa: F401  (registers the recipe here, as orchestrator.recipes.load_recipe does for a run)
from orchestrator.cli import app
from planner.api import plan_job
from planner.spec import parse_job
from recipes.medical.data import job_batch, task_layout
from recipes.medical.evaluate import visible_mean_mse
from runtime.evaluate import evaluate_job
from runtime.reference import ReferenceTrainer, save_model

from _equivalence import check_equivalence  # tests/integration/_equivalence.py

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "medical" / "unimed-tiny.yaml"


def small_medical_job(num_devices: int = 2, batch: int = 4, lr: float = 1e-3) -> dict:
    """unimed-tiny with a 2-layer encoder, 1-layer decoders and small batches (every task and component kept)."""
    data = yaml.safe_load(TINY.read_text())
    data["cluster"]["devices_per_node"] = num_devices
    data["components"]["image_encoder"]["num_layers"] = 2
    for name in ("decomposed_decoder", "composed_decoder"):
        data["components"][name]["num_layers"] = 1
    for task in data["tasks"]:
        task["batch_size"] = batch
    data["training"].update(lr=lr, checkpoint_every=0)
    return data


def test_distributed_medical_steps_equal_single_process(tmp_path):
    job = parse_job(small_medical_job(num_devices=2))
    plan = plan_job(job, with_baselines=False).plan
    assert any(len(s.devices) == 2 for w in plan.waves for s in w.slices) or len(plan.waves) > 1
    check_equivalence(job, plan, tmp_path, steps=2)


def test_short_training_lowers_every_tasks_loss():
    """Reconstruction starts at its trivial answer (the visible mean), so its loss is taken above that baseline on the
    same batch: raw, which scans a window draws moves it more (0.035 to 0.048) than 80 steps of training."""
    torch.manual_seed(0)
    job = parse_job(small_medical_job(batch=8, lr=2e-3))
    trainer = ReferenceTrainer(job)
    steps, window = 80, 16
    history = [trainer.train_step(step) for step in range(steps)]
    for t, task in enumerate(job.tasks):
        losses = [h[task.name] for h in history]
        if task.loss == "medical_reconstruction":
            assert losses[0] == pytest.approx(_visible_mean_mse(job, t, 0))  # the head's starting point
            losses = [loss - _visible_mean_mse(job, t, step) for step, loss in enumerate(losses)]
        first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
        assert last < first, f"{task.name}: mean loss {first:.4f} over the first {window} steps, {last:.4f} over the last"


def _visible_mean_mse(job, t: int, step: int) -> float:
    """The trivial reconstruction loss (every hidden pixel the visible mean) on task t's training batch at ``step``."""
    b = job_batch(job, t, step, 0, job.tasks[t].batch_size, "train")
    return float(visible_mean_mse(b.targets["image"], b.targets["patch_mask"], task_layout(job, t).patch_size).mean())


def test_loom_eval_scores_a_model_file_and_refuses_another_jobs(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(small_medical_job()))
    model = tmp_path / "model.pt"
    save_model(model, [ReferenceTrainer(parse_job(small_medical_job())).named_parameters()])
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(spec), "--model", str(model), "--samples", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    names = [t["name"] for t in small_medical_job()["tasks"]]
    assert list(report["metrics"]) == names and list(report["baselines"]) == names
    assert set(report["metrics"]["detection"]) == {"box_iou", "recall@0.5"}
    for task in names:
        for metric, value in report["metrics"][task].items():
            assert value >= 0 and (metric == "masked_mse" or value <= 1), (task, metric, value)
            assert metric in result.output
    # initial weights: the reconstruction head's residual is zero, so it scores exactly the visible-mean baseline
    initial, baseline = (report[key]["unsupervised"]["masked_mse"] for key in ("metrics", "baselines"))
    assert initial == pytest.approx(baseline)
    other = small_medical_job()
    other["components"]["image_encoder"]["num_layers"] = 3
    spec.write_text(yaml.safe_dump(other))
    result = CliRunner().invoke(app, ["eval", str(spec), "--model", str(model), "--samples", "8"])
    assert result.exit_code == 2
    assert "does not match job" in result.output and "Traceback" not in result.output


def test_transfer_probe_compares_trained_and_initial_encoders():
    job = parse_job(small_medical_job())
    report = evaluate_job(job, None, split="transfer")
    (trained,), (initial,) = report.metrics["transfer_probe"].values(), report.baselines["transfer_probe"].values()
    assert 0.0 <= trained <= 1.0 and trained == pytest.approx(initial)  # both encoders at their initial weights
    assert "majority class" in report.notes["probe"]
