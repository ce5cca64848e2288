"""The one "this plan belongs to this job" check (runtime.checks.check_plan_matches_job), which loom run, loom submit
and every worker call: same MetaOps (name, layer key, layers, batch size), runnable tensor parallelism."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

from planner.api import plan_job
from planner.errors import SpecError
from planner.metagraph import build_metagraph
from planner.spec import parse_job
from runtime.checks import check_plan_matches_job

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))
from _jobs import rollout_job  # noqa: E402  (tests/integration/_jobs.py: a tiny GRPO job)

JOB = {
    "name": "owner",
    "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
    "components": {
        "enc": {"kind": "transformer", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "seq_len": 8},
        "head": {"kind": "mlp", "num_layers": 1, "hidden_size": 32},
    },
    "tasks": [{"name": "t", "batch_size": 4, "components": [{"component": "enc"}, {"component": "head"}]}],
    "training": {"precision": "fp32"},
    "planner": {"time_limit_s": 1},
}


@pytest.fixture(scope="module")
def plan():
    return plan_job(parse_job(JOB), with_baselines=False).plan


def _job(**changes):
    doc = copy.deepcopy(JOB)
    for path, value in changes.items():
        target = doc
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[last] = value
    return parse_job(doc)


def test_the_plan_of_this_job_passes(plan) -> None:
    check_plan_matches_job(plan, build_metagraph(parse_job(JOB)), "p.json", "owner")


def test_name_and_training_settings_are_not_part_of_the_plan(plan) -> None:
    job = _job(**{"name": "renamed", "training": {"precision": "fp32", "steps": 7, "lr": 0.5}})
    check_plan_matches_job(plan, build_metagraph(job), "p.json", job.name)


@pytest.mark.parametrize("path, value, diff", [
    ("components.enc.num_layers", 3, "t.enc vs t.enc"),  # same name, other layer count
    ("tasks.0.batch_size", 8, "t.enc vs t.enc"),
    ("components.enc.seq_len", 16, "t.enc vs t.enc"),  # other layer key
    ("tasks.0.name", "u", "t.enc vs u.enc"),
])
def test_other_metaops_are_refused_with_the_first_difference(plan, path, value, diff) -> None:
    job = _job(**{path: value})
    with pytest.raises(SpecError) as err:
        check_plan_matches_job(plan, build_metagraph(job), "p.json", job.name)
    text = str(err.value)
    assert text.startswith("p.json: the plan was made for job 'owner'")
    assert "other MetaOps than job 'owner'" in text and f"first difference: {diff}" in text
    assert "loom plan" in text and "\n" not in text


def test_tensor_parallel_on_a_kind_the_runtime_cannot_split_is_refused(plan) -> None:
    s = next(s for w in plan.waves for s in w.slices if plan.metaops[s.metaop].component == "head")
    # one data-parallel rank: all the slice's rows (whatever data-parallel degree the planner chose)
    rows = [sum(s.rows)] if s.rows else []
    split = s.model_copy(update={"tp_degree": 2, "dp_degree": 1, "devices": [0, 1], "rows": rows})
    waves = [w.model_copy(update={"slices": [split if x is s else x for x in w.slices]}) for w in plan.waves]
    with pytest.raises(SpecError, match=r"^plan: MetaOp t\.head has tensor_parallel 2; the runtime runs"):
        check_plan_matches_job(plan.model_copy(update={"waves": waves}), build_metagraph(parse_job(JOB)))


def test_a_decode_the_runtime_cannot_place_is_refused_before_any_worker_starts() -> None:
    """A TP-2 decode on devices that train the policy data parallel (each in a TP group of its own) would need a
    second, sharded copy of the layers: refused in one line (planner.generation.decode_refused)."""
    doc = rollout_job()
    doc["components"]["policy"]["tensor_parallel"] = [1, 2]
    job = parse_job(doc)
    plan = plan_job(job, with_baselines=False).plan
    check_plan_matches_job(plan, build_metagraph(job))  # as planned
    s = next(s for w in plan.waves for s in w.slices if plan.metaops[s.metaop].name.endswith("rollout"))
    split = s.model_copy(update={"tp_degree": 2, "dp_degree": 1, "devices": [0, 1],
                                 "rows": [sum(s.rows)] if s.rows else []})
    waves = [w.model_copy(update={"slices": [split if x is s else x for x in w.slices]}) for w in plan.waves]
    with pytest.raises(SpecError, match=r"^plan: grpo\.rollout decodes on device \d in TP group \[0, 1\], which "
                                         r"runs layer 0 of policy in TP group \[\d\], which the runtime does not "
                                         r"run .*without --plan plans what it runs"):
        check_plan_matches_job(plan.model_copy(update={"waves": waves}), build_metagraph(job))


def test_loom_run_and_loom_submit_use_this_check(plan, tmp_path) -> None:
    """Both callers refuse with the check's own text (their own wording used to differ, and submit compared spec
    hashes, refusing plans loom run accepts)."""
    from orchestrator.run_inputs import RunInputError, check_plan_for_job
    from orchestrator.submit import _check_plan

    job = _job(**{"components.enc.num_layers": 3})
    with pytest.raises(SpecError) as want:
        check_plan_matches_job(plan, build_metagraph(job), "p.json", job.name)
    with pytest.raises(RunInputError) as got:
        check_plan_for_job(plan, job, "p.json")
    assert str(got.value) == str(want.value)
    path = tmp_path / "p.json"
    plan.save(path)
    with pytest.raises(SpecError) as got:
        _check_plan(path, job)
    assert str(got.value) == str(want.value).replace("p.json", f"--plan {path}", 1)
    _check_plan(path, _job(name="renamed"))  # what loom run accepts, loom submit sends
