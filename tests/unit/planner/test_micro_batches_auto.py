"""``training.grad_accum_steps: auto`` (planner.api._plan_micro_batches): the planner plans several counts of
micro-batches and keeps the fastest; the plan records the count, and every reader of the job beside the plan
(planner.plan.job_for_plan) builds it at that count."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.render import plan_header
from orchestrator.run_inputs import RunInputError, check_plan_for_job
from planner.accumhint import micro_batch_hint
from planner.api import _plan_orders, make_cost_model, plan_job
from planner.errors import SpecError
from planner.metagraph import build_metagraph
from planner.plan import Plan, job_for_plan
from planner.rlbaselines import RoleBudget, rl_budget
from planner.shapes import parse_shapes
from planner.spec import MICRO_BATCH_COUNTS, load_job, micro_batch_counts, parse_job

GRPO_7B = Path(__file__).resolve().parents[3] / "bench" / "rl" / "grpo-7b-16.yaml"


def grpo(count):
    """bench/rl's GRPO iteration, 7B on 16 H100s, its steps in ``count`` micro-batches."""
    job = load_job(GRPO_7B)
    return job.model_copy(update={"training": job.training.model_copy(update={"grad_accum_steps": count})})


@pytest.fixture(scope="module")
def auto():
    """The 7B GRPO job with grad_accum_steps: auto, planned; the messages its planning said."""
    job, said = grpo("auto"), []
    return job, plan_job(job, make_cost_model(job), progress=said.append), said


def test_auto_keeps_the_fastest_count_it_planned(auto):
    job, outcome, said = auto
    k = outcome.plan.grad_accum_steps
    tried = [n for n in MICRO_BATCH_COUNTS if f"grad_accum_steps auto: planning {n} micro-batch" in " ".join(said)]
    assert k in tried and tried == micro_batch_counts(job) == [1, 2, 4, 8, 16, 32, 64]  # 512 rows, groups of 8
    assert said[-1].startswith(f"grad_accum_steps auto: {k} micro-batch")
    # each count planned as auto plans it (its share of the time limit, the job's role-search budget; the limit's end,
    # a safety cap, not reached: 9-12 s of 60 here): the kept one is the fastest
    share = job.planner.time_limit_s / len(tried)
    times = {}
    for n in tried:
        at = job.with_micro_batches(n)
        times[n] = _plan_orders(at, make_cost_model(at), share, True, lambda msg: None,
                                RoleBudget(rl_budget(job.planner.time_limit_s))).plan.predicted.iteration_time_s
    assert outcome.plan.predicted.iteration_time_s == pytest.approx(min(times.values()), rel=1e-9)
    assert times[k] == min(times.values())
    # on this job more micro-batches pay: the update's activations shrink, so the roles fit on pools of their own
    assert k > 1 and times[k] < times[1] * 0.97


def test_the_plan_records_the_count_and_the_job_is_built_at_it(auto, tmp_path):
    job, outcome, _ = auto
    k = outcome.plan.grad_accum_steps
    path = tmp_path / "plan.json"
    outcome.plan.save(path)
    again = Plan.model_validate_json(path.read_text())
    assert again == outcome.plan and again.hash == again.content_hash()
    assert job_for_plan(job, again).training.grad_accum_steps == k
    check_plan_for_job(again, job)  # the auto job, at the plan's count
    with pytest.raises(RunInputError):  # a job of another count is not this plan's
        check_plan_for_job(again, job.with_micro_batches(1))
    assert build_metagraph(job).metaops[0].batch_size == job.tasks[0].batch_size  # unresolved: one micro-batch
    header = plan_header(again)
    assert f"{k}, " in " ".join(str(c) for col in header.columns for c in col._cells)


def test_auto_gives_no_hint_and_a_set_count_keeps_its_plan(auto):
    job, outcome, _ = auto
    assert micro_batch_hint(job, outcome.plan, outcome.placed, make_cost_model(job)) is None
    fixed = grpo(2)
    plan = plan_job(fixed, make_cost_model(fixed), with_baselines=False, progress=lambda msg: None).plan
    assert plan.grad_accum_steps is None and job_for_plan(fixed, plan) is fixed


def minimal(**training):
    return {"name": "t", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
            "components": {"enc": {"kind": "mlp", "num_layers": 2, "hidden_size": 8}},
            "tasks": [{"name": "a", "batch_size": 4, "components": [{"component": "enc"}]}],
            "training": training}


@pytest.mark.parametrize("value", [0, -2, "fast", True, 1.5])
def test_a_count_that_is_neither_a_number_nor_auto_is_one_error(value):
    with pytest.raises(SpecError, match="grad_accum_steps") as caught:
        parse_job(minimal(grad_accum_steps=value))
    assert "expected a whole number >= 1 or auto" in str(caught.value) and "\n" not in str(caught.value)


def test_auto_parses_and_plans_one_micro_batch_before_planning():
    job = parse_job(minimal(grad_accum_steps="auto"))
    assert job.micro_batches_auto and job.training.micro_batches == 1
    assert build_metagraph(job).num_micro_batches == 1


def test_shapes_refuse_an_auto_count():
    job = parse_job(minimal(grad_accum_steps="auto"))
    with pytest.raises(SpecError, match="grad_accum_steps is auto"):
        parse_shapes({"distribution": {"a": {"batch_size": {2: 1, 4: 1}}}}, job, "shapes.yaml")
