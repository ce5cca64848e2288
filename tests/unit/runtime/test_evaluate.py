"""loom eval's library side for jobs without a recipe: each task's mean loss on unseen steps of the stream."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from planner.spec import parse_job
from runtime.data import task_batch
from runtime.evaluate import EvalError, evaluate_job
from runtime.reference import ReferenceTrainer

ROOT = Path(__file__).resolve().parents[3]


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


def data_job(tmp_path: Path) -> dict:
    """A next-token task on 6 lines of text (a tokenizer built from them) and a synthetic classification task."""
    spec = importlib.util.spec_from_file_location("make_tokenizer", ROOT / "examples" / "make_tokenizer.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    lines = ["the cat sat on the mat", "a dog ran far", "the dog sat", "a cat ran on the mat", "far far away",
             "the mat ran"]
    make.build_tokenizer(tmp_path / "tok", lines)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in lines))
    data = small_job()
    data["components"]["lm"] = {"kind": "llama", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "seq_len": 8,
                                "vocab_size": 32}
    data["tasks"].append({"name": "text", "batch_size": 4, "loss": "lm", "components": [{"component": "lm"}],
                          "data": {"format": "text", "path": str(tmp_path / "t.jsonl"),
                                   "tokenizer": str(tmp_path / "tok")}})
    return data


def test_a_task_with_data_is_evaluated_on_its_own_rows(tmp_path):
    """loom eval reads a task's data: its 6 rows once (at most one epoch, whatever --samples asks), the loss their
    mean; the synthetic task beside it keeps the synthetic stream."""
    job = parse_job(data_job(tmp_path))
    report = evaluate_job(job, None, num_samples=8)
    model = ReferenceTrainer(job)
    batch = task_batch(job, 1, 0, 0, 4), task_batch(job, 1, 1, 0, 2)  # rows 0..5 of the stream: the first epoch
    with torch.no_grad():
        want = sum(float(model.head(1)(model.forward(1, b), b).sum()) for b in batch) / 6
    assert report.metrics["text"]["loss"] == pytest.approx(want, rel=1e-6)
    assert "the first 6 of its 6 rows" in report.notes["data of text"] and "t.jsonl" in report.notes["data of text"]
    assert report.notes["data"].startswith("unseen steps of the synthetic stream")
    synthetic = job.model_copy(update={"tasks": [job.tasks[0], job.tasks[1].model_copy(update={"data": None})]})
    assert evaluate_job(synthetic, None, num_samples=6).metrics["text"] != report.metrics["text"]
    assert evaluate_job(job, None, num_samples=3).notes["data of text"].count("the first 3 of its 6 rows") == 1
    trainer = ReferenceTrainer(job)
    for step in range(20):
        trainer.train_step(step)
    after = evaluate_job(job, trainer.named_parameters(), num_samples=8)
    assert after.metrics["text"]["loss"] < 0.7 * report.metrics["text"]["loss"]
    assert after.baselines["text"] == report.metrics["text"]
