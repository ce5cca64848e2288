"""recipes.alignment.mixture: the confusion-corrected estimator, the domain classifier, the data and eval steps and
their args, the pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.recipes import import_recipe
from orchestrator.steps import STEPS, StepContext, check_step_args
from planner.errors import SpecError
from recipes.alignment import make, mixture, mixture_estimate as est

import_recipe("alignment")  # its phase steps (PHASE_STEPS), as loom registers them for a job naming the recipe


def test_the_correction_recovers_the_mixture_exactly_from_confused_counts():
    c = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.05, 0.15, 0.8]])
    p = np.array([0.7, 0.2, 0.1])
    observed = c.T @ p
    assert np.abs(observed - p).max() > 0.05  # counting alone is off
    np.testing.assert_allclose(est.correct(observed, c), p, atol=1e-12)
    labels = ["a"] * 40 + ["b"] * 35 + ["c"] * 25  # a sample whose counts are exactly C^T p for p = (.4, .3, .3)
    q = np.array([0.40, 0.35, 0.25])
    raw, corrected = est.estimate(labels, c, ["a", "b", "c"])
    np.testing.assert_allclose(raw, q)
    np.testing.assert_allclose(c.T @ corrected, q, atol=1e-12)
    # counts no mixture explains: the estimate stays a distribution
    clipped = est.correct(np.array([0.0, 0.0, 1.0]), c)
    assert (clipped >= 0).all() and clipped.sum() == pytest.approx(1.0) and clipped[2] == clipped.max()
    np.testing.assert_allclose(est.project_simplex(np.array([0.2, -0.1, 1.1])), [0.05, 0.0, 0.95])


def test_the_classifier_tells_the_domains_apart_and_the_estimate_follows_the_mixture(tmp_path):
    truth = mixture.write_data(tmp_path, documents=400, reference_documents=1000, seed=1)
    assert truth == mixture.MIXTURE  # the file holds the proportions exactly
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == 400 and all(json.loads(line)["text"].startswith(mixture.BOS + " ") for line in lines)
    # documents drawn from the true mixture, as a model that fits it would generate
    texts = [r["text"] for r in mixture.domain_texts(1, "generated", mixture.shares(truth, 2000))]
    result = mixture.evaluate(tmp_path, tmp_path / "reference.jsonl", truth, texts=texts)
    assert result["classifier_accuracy"] > 0.8 and result["samples"] == 2000
    assert result["mixture_mae"] < 0.02 and result["mixture_mae"] < result["raw_mae"]
    assert sum(result[f"estimate_{d}"] for d in mixture.DOMAINS) == pytest.approx(1.0)


def test_samples_are_generated_from_the_beginning_of_text_token(tmp_path):
    folder = make.write_model(tmp_path / "lm", num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    texts = mixture.sample(folder, 6, 5, seed=0, batch_size=4)  # two batches, the second of 2
    assert len(texts) == 6 and all(len(t.split()) <= 5 for t in texts) and len(set(texts)) > 1  # sampled, not greedy
    assert texts == mixture.sample(folder, 6, 5, seed=0, batch_size=4)  # seeded


def test_the_steps_check_their_args_and_report_declared_metrics(tmp_path):
    args = {"mixture": {"prose": 0.7, "lists": 0.3}, "documents": 50, "reference_documents": 10}
    check_step_args("mixture_data", args, "phases[0].args", tmp_path)
    reported = STEPS["mixture_data"].run(StepContext("data", args, tmp_path / "data", tmp_path))
    assert reported == {"true_lists": 0.3, "true_prose": 0.7}
    assert set(reported) <= set(STEPS["mixture_data"].metrics)
    assert set(STEPS["mixture_eval"].metrics) >= {"mixture_mae", "raw_mae", "estimate_prose"}
    for bad, match in [({"mixture": {"poetry": 1}}, r"phases\[0\]\.args\.mixture \(\{'poetry': 1\}\): expected"),
                       ({"mixture": {"prose": 0}}, r"args\.mixture .*weights > 0"),
                       ({"documents": 1}, r"args\.documents \(1\): expected a whole number >= 2"),
                       ({"size": 3}, r"args\.size: unknown argument of step 'mixture_data'")]:
        with pytest.raises(SpecError, match=match):
            check_step_args("mixture_data", args | bad, "phases[0].args", tmp_path)
    ev = {"model": "@lm/model/lm", "reference": "data/data/reference.jsonl", "truth": {"prose": 0.7, "lists": 0.3}}
    check_step_args("mixture_eval", ev, "phases[2].args", tmp_path)
    for bad, match in [({"model": "nowhere"}, r"phases\[2\]\.args\.model \('nowhere'\): required, a from_pretrained"),
                       ({"reference": "none.jsonl"}, r"args\.reference \('none.jsonl'\): required"),
                       ({"truth": 0.5}, r"args\.truth \(0.5\): expected a JSON file or a mapping"),
                       ({"samples": 0}, r"args\.samples \(0\): expected a whole number >= 1")]:
        with pytest.raises(SpecError, match=match):
            check_step_args("mixture_eval", ev | bad, "phases[2].args", tmp_path)


def test_the_pipeline_is_checked_whole_and_gated_on_the_error():
    from orchestrator.pipeline import read_pipeline

    pipeline = read_pipeline(make.HERE / "pipeline" / "mixture-tiny.yaml")
    assert [(p.name, p.spec.step) for p in pipeline.phases] == [
        ("data", "mixture_data"), ("lm", None), ("detect", "mixture_eval")]
    assert pipeline.phases[2].spec.gate["mixture_mae"].max == 0.05
