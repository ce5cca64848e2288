"""Automatic recovery on an embedded Ray cluster of 2 CPU workers: workers killed (SIGKILL) or frozen (SIGSTOP) at
random steps during one run with ``checkpoint_every: 1`` and ``max_restarts: 3``; the run finishes, each restart
logged in one line (the frozen one named by the step watchdog with the wave it stopped in), with exactly the losses
and final parameters of an uninterrupted run. One more loss than max_restarts ends the run with one line."""

from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path

import pytest
import torch

from orchestrator.actors import EmbeddedRay
from orchestrator.metrics import LogReporter, StepRecord
from orchestrator.remote import RunFailed
from orchestrator.run import RunOptions, run_job
from planner.api import plan_job
from planner.spec import parse_job

from _jobs import two_task_job  # tests/integration/_jobs.py

STEPS = 6


def worker_pids() -> list[int]:
    """The pids of this test's WaveActor processes (descendants of this process: other runs on the machine are not
    ours to kill)."""
    parent, title = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                title[int(entry)] = Path(f"/proc/{entry}/cmdline").read_text()
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [os.getpid()]
    while frontier:
        here = frontier.pop()
        children = [pid for pid, ppid in parent.items() if ppid == here]
        found += children
        frontier += children
    return sorted(pid for pid in found if title.get(pid, "").startswith("ray::WaveActor"))


class ChaosReporter(LogReporter):
    """After each step in ``plan`` (step -> signal) is reported the first time, sends that signal to a random worker
    (between the step and its checkpoint, so the checkpoint fails too and the run falls back one step)."""

    def __init__(self, plan: dict[int, int], seed: int):
        super().__init__()
        self.plan, self.random = dict(plan), random.Random(seed)
        self.sent: list[tuple[int, int, int]] = []  # (step, signal, pid)

    def step(self, record: StepRecord) -> None:
        super().step(record)
        signum = self.plan.pop(record.step, None)
        if signum is not None:
            pid = self.random.choice(worker_pids())
            os.kill(pid, signum)
            self.sent.append((record.step, signum, pid))


@pytest.fixture(scope="module")
def ray_session():
    cluster = EmbeddedRay(num_cpus=2).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def job_plan():
    doc = two_task_job(2, steps=STEPS)
    doc["training"].update(checkpoint_every=1, max_restarts=3, step_timeout_s=10)
    job = parse_job(doc)
    return job, plan_job(job, with_baselines=False).plan


def test_run_survives_three_lost_workers_with_the_uninterrupted_result(ray_session, job_plan, tmp_path, caplog):
    job, plan = job_plan
    whole = run_job(job, plan, options=RunOptions(out_dir=tmp_path / "whole", checkpoint_every=0,
                                                  collect_parameters=True))
    rng = random.Random(12)
    kill_steps = sorted(rng.sample(range(STEPS - 1), 3))
    chaos = ChaosReporter({kill_steps[0]: signal.SIGKILL, kill_steps[1]: signal.SIGSTOP,
                           kill_steps[2]: signal.SIGKILL}, seed=12)
    try:
        with caplog.at_level(logging.INFO):
            result = run_job(job, plan, options=RunOptions(out_dir=tmp_path / "chaos", collect_parameters=True),
                             reporter=chaos)
    finally:
        for _, signum, pid in chaos.sent:  # a frozen worker Ray could not reach: ours to end
            if signum == signal.SIGSTOP:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert [step for step, _, _ in chaos.sent] == kill_steps
    restarts = [r.getMessage() for r in caplog.records if "; restart " in r.getMessage()]
    assert len(restarts) == 3, restarts
    assert all("restart %d of 3" % (i + 1) in line for i, line in enumerate(restarts)), restarts
    hung = [line for line in restarts if "step_timeout_s (10 s)" in line]
    assert len(hung) == 1 and "does not answer" in hung[0] and "stopped in wave" in hung[0], restarts
    # every step once in the result, each with the uninterrupted run's losses; the same final parameters
    assert [r.step for r in result.records] == list(range(STEPS))
    assert [r.loss for r in result.records] == [r.loss for r in whole.records]
    for rank, params in whole.parameters.items():
        for name, tensor in params.items():
            assert torch.equal(tensor, result.parameters[rank][name]), (rank, name)


def test_a_loss_past_max_restarts_ends_the_run_with_one_line(ray_session, job_plan, tmp_path):
    job, plan = job_plan
    job = job.model_copy(update={"training": job.training.model_copy(update={"max_restarts": 0})})
    with pytest.raises(RunFailed) as failed:
        run_job(job, plan, options=RunOptions(steps=3, out_dir=tmp_path, checkpoint_every=0),
                reporter=ChaosReporter({0: signal.SIGKILL}, seed=1))
    message = str(failed.value)
    assert "\n" not in message and message.startswith("worker ") and "at step 1" in message, message
