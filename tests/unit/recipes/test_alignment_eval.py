"""recipes.alignment.evaluate through runtime.evaluate.evaluate_job, on the tiny job's tasks over a 1-layer Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.recipes import load_recipe
from planner.spec import parse_job
from recipes.alignment import make
from recipes.alignment.evaluate import token_utilisation
from runtime.evaluate import evaluate_job
from runtime.reference import ReferenceTrainer

SPEC = Path(make.__file__).resolve().parent / "alignment-tiny.yaml"


def tiny_job(tmp_path: Path):
    """alignment-tiny.yaml with a 1-layer model and absolute paths."""
    spec = yaml.safe_load(SPEC.read_text())
    model = str(make.write_model(tmp_path / "base", num_hidden_layers=1))
    for comp in spec["components"].values():
        comp["pretrained"] = model
    spec["tasks"][0]["data"]["path"] = str(SPEC.parent / spec["tasks"][0]["data"]["path"])
    spec["training"]["steps"] = 3
    job = parse_job(spec)
    load_recipe(job)
    return job


def test_eval_reports_every_task_and_the_initial_weights_are_the_baselines(tmp_path):
    job = tiny_job(tmp_path)
    initial = evaluate_job(job, None, "heldout", 16)
    assert set(initial.metrics) == {"sft", "reward", "dpo"}
    assert initial.metrics["dpo"] == {"reward_margin": 0.0, "margin_positive": 0.0}  # the policy is the reference
    reward = initial.metrics["reward"]
    assert {"pairwise_accuracy", "pairwise_accuracy_arithmetic", "pairwise_accuracy_constraints",
            "pairwise_accuracy_wrong", "reward_margin", "score_mse"} <= set(reward)
    assert 0.0 <= reward["pairwise_accuracy"] <= 1.0
    trainer = ReferenceTrainer(job)
    for step in range(3):
        trainer.train_step(step)
    params = {f"{name}/{layer}/{p}": t.detach() for (name, layer), m in trainer.modules.items()
              for p, t in m.named_parameters()}
    trained = evaluate_job(job, params, "heldout", 16)
    assert trained.metrics["dpo"]["reward_margin"] != 0.0  # three DPO steps moved the policy off the reference
    assert trained.metrics["sft"]["loss"] < initial.metrics["sft"]["loss"]


def test_packing_fills_the_rows_that_padding_leaves_empty(tmp_path):
    job = tiny_job(tmp_path)
    packed, padded = token_utilisation(job, 0)
    assert packed > 0.95 > 0.5 > padded
    assert evaluate_job(job, None, "heldout", 8).metrics["sft"]["token_utilisation"] == pytest.approx(packed)
