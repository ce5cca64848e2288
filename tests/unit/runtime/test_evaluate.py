"""loom eval's library side for jobs without a recipe: each task's mean loss on unseen steps of the stream."""

from __future__ import annotations

import pytest

from planner.spec import parse_job
from runtime.evaluate import EvalError, evaluate_job
from runtime.reference import ReferenceTrainer


def small_job() -> dict:
    return {
        "name": "eval",
        "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
        "components": {"txt": {"kind": "transformer", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "seq_len": 6}},
        "tasks": [{"name": "cls", "batch_size": 8, "loss": "cross_entropy", "components": [{"component": "txt"}]}],
        "training": {"lr": 1e-2, "seed": 1},
    }


def test_training_lowers_the_held_out_loss_of_the_synthetic_stream():
    job = parse_job(small_job())
    before = evaluate_job(job, None, num_samples=64)
    trainer = ReferenceTrainer(job)
    for step in range(40):
        trainer.train_step(step)
    after = evaluate_job(job, trainer.named_parameters(), num_samples=64)
    assert before.split == after.split == "train" and before.num_samples == 64
    assert after.metrics["cls"]["loss"] < 0.8 * before.metrics["cls"]["loss"], (before.metrics, after.metrics)
    # a trained model is reported beside its initial weights on the same samples; the initial weights alone are not
    assert after.baselines == before.metrics and before.baselines == {}


def test_bad_requests_are_one_line_errors():
    job = parse_job(small_job())
    with pytest.raises(EvalError, match=r"--split \('heldout'\): jobs without a recipe"):
        evaluate_job(job, None, split="heldout")
    with pytest.raises(EvalError, match=r"--split \('test'\) is not a data split"):
        evaluate_job(job, None, split="test")
    with pytest.raises(EvalError, match=r"--samples \(0\)"):
        evaluate_job(job, None, num_samples=0)
