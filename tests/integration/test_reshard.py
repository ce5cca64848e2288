"""Checkpoints reshard: a run checkpointed under a plan for 2 workers resumes under a plan for 3 workers, whose checkpoint
then resumes under a plan for 1, and the losses and final parameters stay within 1e-5 of an uninterrupted run
(runtime.portable's layout: parameters and AdamW state, ZeRO-1 shares included, under global names)."""

from __future__ import annotations

import logging
import re
import shutil

import pytest

from orchestrator.actors import EmbeddedRay
from orchestrator.checkpoint import MANIFEST, complete_checkpoints, step_dir
from orchestrator.run import RunOptions, run_job
from planner.api import plan_job
from planner.spec import parse_job
from runtime.reference import merge_parameters

from _jobs import two_task_job  # tests/integration/_jobs.py

STEPS = 6


@pytest.fixture(scope="module")
def ray_session():
    cluster = EmbeddedRay(num_cpus=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def job_and_plan(num_workers: int):
    job = parse_job(two_task_job(num_workers, steps=STEPS))
    return job, plan_job(job, with_baselines=False).plan


def assert_close(got: dict[str, float], want: dict[str, float], what: str) -> None:
    for task, value in want.items():
        assert got[task] == pytest.approx(value, rel=1e-5, abs=1e-7), (what, task)


def test_checkpoint_resumes_under_plans_for_other_device_counts(ray_session, tmp_path, caplog):
    jobs = {n: job_and_plan(n) for n in (1, 2, 3)}
    assert len({plan.hash for _, plan in jobs.values()}) == 3
    whole = run_job(*jobs[2], options=RunOptions(steps=STEPS, out_dir=tmp_path / "whole", checkpoint_every=2,
                                                 collect_parameters=True))
    assert whole.records[-1].loss != whole.records[0].loss  # training moved the parameters
    # the 2-worker checkpoint after step 2, alone in a new folder, resumed under the plan for 3 workers up to step 4
    split = tmp_path / "split"
    shutil.copytree(step_dir(tmp_path / "whole", 2), step_dir(split, 2))
    with caplog.at_level(logging.INFO, logger="orchestrator.run"):
        three = run_job(*jobs[3], options=RunOptions(steps=4, out_dir=split, resume=True, checkpoint_every=2))
    lines = [r.getMessage() for r in caplog.records if "resharding" in r.getMessage()]
    assert len(lines) == 1 and "on 2 workers: resharding onto plan" in lines[0] and "on 3 workers" in lines[0], lines
    assert three.first_step == 2 and [r.step for r in three.records] == [2, 3]
    manifest = (step_dir(split, 4) / MANIFEST).read_text()
    assert '"o:exp_avg@' in manifest and '"s:step:' in manifest  # AdamW state travels with the parameters
    assert re.search(r'"o:exp_avg@[1-9]', manifest)  # ZeRO-1 over 3 holders: a share starts inside a parameter
    # the 3-worker checkpoint after step 4 (its ZeRO-1 slices reassembled), resumed under the plan for 1 worker
    assert [c.num_ranks for c in complete_checkpoints(split)] == [3, 2]  # step_4 (3 ranks), step_2 (2 ranks)
    one = run_job(*jobs[1], options=RunOptions(steps=STEPS, out_dir=split, resume=True, collect_parameters=True))
    assert one.first_step == 4 and [r.step for r in one.records] == [4, 5]
    for record in three.records + one.records:
        assert_close(record.loss, whole.records[record.step].loss, f"step {record.step}")
    want, got = merge_parameters(list(whole.parameters.values())), merge_parameters(list(one.parameters.values()))
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        err = float((got[name] - tensor).norm() / tensor.norm().clamp_min(1e-12))
        assert err <= 1e-5, (name, err)
