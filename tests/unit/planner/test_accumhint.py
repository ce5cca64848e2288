"""More micro-batches, suggested (planner.accumhint): a plan whose MetaOps run as pipeline stages in one micro-batch
gets the count that overlaps them, priced on its own placement; nothing where more micro-batches cannot help or
would change the loss."""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.accumhint import MIN_GAIN, micro_batch_hint
from planner.api import make_cost_model, plan_job
from planner.spec import load_job

SFT_70B = Path(__file__).resolve().parents[3] / "bench" / "pipeline" / "sft-70b-64.yaml"


def sft(**training):
    """bench/pipeline's 70B LLM on 64 H100s (it trains as pipeline stages) with ``training`` changed."""
    job = load_job(SFT_70B)
    return job.model_copy(update={"training": job.training.model_copy(update=training)})


def planned(job):
    cost_model = make_cost_model(job)
    outcome = plan_job(job, cost_model, with_baselines=False, progress=lambda msg: None)
    return outcome, micro_batch_hint(job, outcome.plan, outcome.placed, cost_model)


def test_stages_in_one_micro_batch_get_the_count_that_overlaps_them():
    job = sft(grad_accum_steps=1)
    outcome, hint = planned(job)
    assert hint is not None and hint.steps > 1 and job.micro_batches_refused(hint.steps) is None
    assert hint.current_s == outcome.plan.predicted.iteration_time_s
    assert hint.iteration_s * MIN_GAIN <= hint.current_s and hint.peak_bytes <= 80 * 2**30
    assert f"grad_accum_steps: {hint.steps} (micro-batches pipelined)" in hint.line()
    # planned at that count, the plan is at least as fast as the hint's price of the old placement
    again, _ = planned(sft(grad_accum_steps=hint.steps))
    assert again.plan.predicted.iteration_time_s <= hint.iteration_s * (1 + 1e-9)


@pytest.mark.parametrize("training", [{"grad_accum_steps": 1, "pipeline_micro_batches": False},
                                      {"grad_accum_steps": 16}])
def test_no_hint_where_more_micro_batches_do_not_pay(training):
    """In order, more micro-batches never overlap anything; at 16 the stages overlap already."""
    assert planned(sft(**training))[1] is None


def test_no_hint_for_a_loss_that_contrasts_its_micro_batch():
    job = sft(grad_accum_steps=1)
    job = job.model_copy(update={"tasks": [job.tasks[0].model_copy(update={"loss": "infonce"})]})
    assert planned(job)[1] is None
