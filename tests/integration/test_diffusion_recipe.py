"""The diffusion recipe's reward models end to end at test size: a distributed run equals single-process training
(two uses of the frozen CLIP image tower per task, a fusion of image and prompt tokens, the recipe's head), a short
run lowers the held-out pairwise loss, `loom eval` scores a model file, and a task that is not a pair is refused in
one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import recipes.diffusion  # noqa: F401  (registers the recipe here, as orchestrator.recipes.load_recipe does for a run)
from orchestrator.cli import app
from planner.api import plan_job
from planner.spec import parse_job
from recipes.diffusion.data import heldout_rows, job_batch, pair_layout
from recipes.diffusion.evaluate import pair_metrics
from recipes.diffusion.models import save_towers
from runtime.reference import ReferenceTrainer, save_model

from _equivalence import check_equivalence  # tests/integration/_equivalence.py

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "diffusion" / "itercomp-tiny.yaml"


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> tuple[Path, Path]:
    return save_towers(tmp_path_factory.mktemp("towers"))


def small_job(towers: tuple[Path, Path], batch: int = 4, lr: float = 1e-3, devices: int = 2) -> dict:
    """itercomp-tiny with one-layer scoring transformers, small batches and the towers in ``towers``."""
    data = yaml.safe_load(TINY.read_text())
    data["cluster"]["devices_per_node"] = devices
    data["components"]["vision"]["pretrained"], data["components"]["text"]["pretrained"] = map(str, towers)
    for name in ("attribute_rm", "spatial_rm", "nonspatial_rm"):
        data["components"][name]["num_layers"] = 1
    for task in data["tasks"]:
        task["batch_size"] = batch
    data["training"].update(lr=lr, checkpoint_every=0)
    return data


def test_distributed_reward_model_steps_equal_single_process(towers, tmp_path):
    job = parse_job(small_job(towers))
    plan = plan_job(job, with_baselines=False).plan
    # Losses and parameters within 1e-5. Half the rows are minimal pairs (one image edited), so a reward model's
    # gradient is the difference of two nearly equal branches: fp32 rounding of the ranks' differently ordered sums
    # shows at ~1e-5 of it (1.1e-5 measured), far below what a gradient summed twice or dropped would give.
    check_equivalence(job, plan, tmp_path, steps=2, grad_rtol=3e-5)


def test_batches_hold_a_ranked_pair_per_row(towers):
    job = parse_job(small_job(towers))
    layout = pair_layout(job, 1)
    assert (layout.category, layout.better, layout.worse, layout.prompt) == ("spatial", "better", "worse", "prompt")
    assert (layout.better_leaf, layout.worse_leaf, layout.side, layout.seq_len) == ("score_better", "score_worse", 32,
                                                                                    10)
    full = job_batch(job, 1, 3, 0, 4)
    half = job_batch(job, 1, 3, 2, 4)
    assert full.inputs["better"].shape == (4, 3, 32, 32) and full.inputs["prompt"].shape == (4, 10)
    for name in ("better", "worse", "prompt"):  # a shard equals the same rows of the whole batch
        assert (half.inputs[name] == full.inputs[name][2:]).all()
    assert not (full.inputs["better"] == full.inputs["worse"]).all(dim=(1, 2, 3)).any()


def test_short_training_lowers_the_held_out_pairwise_loss(towers):
    """The non-spatial reward model alone (the cheapest to show): 40 steps lower its loss on 64 held-out pairs."""
    data = small_job(towers, batch=16, lr=2e-3)
    data["tasks"] = data["tasks"][2:]
    job = parse_job(data)
    rows = heldout_rows(job.training.seed, "nonspatial", 64)
    trainer = ReferenceTrainer(job)
    with torch.no_grad():
        before = pair_metrics(job, trainer, 0, rows)
    for step in range(40):
        trainer.train_step(step)
    with torch.no_grad():
        after = pair_metrics(job, trainer, 0, rows)
    assert after["loss"] < before["loss"] - 0.02, (before, after)


def test_loom_eval_reports_pairwise_accuracy_per_category(towers, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(small_job(towers)))
    model = tmp_path / "model.pt"
    save_model(model, [ReferenceTrainer(parse_job(small_job(towers))).named_parameters()])
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(spec), "--model", str(model), "--samples", "12", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report["metrics"]) == ["attribute", "spatial", "nonspatial"]
    for task, metrics in report["metrics"].items():
        assert set(metrics) == {"accuracy", "loss", "margin", "pairs"} and metrics["pairs"] == 12
        assert 0 <= metrics["accuracy"] <= 1
        assert metrics == report["baselines"][task]  # the model file holds the initial weights


def test_a_task_that_is_not_a_pair_is_refused_in_one_line(towers):
    data = small_job(towers)
    data["tasks"][0]["components"] = [data["tasks"][0]["components"][i] for i in (0, 2, 3)]
    data["tasks"][0]["components"][2]["after"] = ["better", "prompt"]
    job = parse_job(data)
    needs = r"tasks\[0\] \('attribute'\).components: a reward-model task needs two"
    with pytest.raises(ValueError, match=needs) as err:
        pair_layout(job, 0)
    assert "\n" not in str(err.value)
