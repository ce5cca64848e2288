"""Automatic recovery. On a 2-node local Ray cluster that loses a node: the run re-plans for the node left. On an
embedded Ray cluster of 2 CPU workers: workers killed (SIGKILL) at 3 random steps of one run with
``checkpoint_every: 1`` and ``max_restarts: 3``; the run finishes, each restart logged in one line, with exactly the
losses and final parameters of an uninterrupted run. A frozen worker (SIGSTOP) is restarted by the step watchdog, whose
line names the ranks and where each stopped. One more loss than max_restarts ends the run with one line."""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import ray
import torch

from orchestrator.actors import EmbeddedRay
from orchestrator.remote import RunFailed
from orchestrator.run import Driver, RunOptions, run_job
from planner.api import plan_job
from planner.spec import parse_job
from runtime.reference import ReferenceTrainer

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


class Chaos:
    """Sends signals to a random worker of this test's run at planned steps, the first time each step runs (a restart
    redoes a step): ``plan`` maps a step to (signal, "before" the step starts or "after" it, i.e. while its
    checkpoint is being written). Installed by patching ``Driver.run_step``."""

    def __init__(self, monkeypatch, plan: dict[int, tuple[int, str]], seed: int):
        self.plan, self.random = dict(plan), random.Random(seed)
        self.sent: list[tuple[int, int, int]] = []  # (step, signal, pid)
        original = Driver.run_step

        def run_step(driver, step, *args):
            self.maybe_signal(step, "before")
            record = original(driver, step, *args)
            self.maybe_signal(step, "after")
            return record

        monkeypatch.setattr(Driver, "run_step", run_step)

    def maybe_signal(self, step: int, when: str) -> None:
        if self.plan.get(step, (None, None))[1] == when:
            signum, _ = self.plan.pop(step)
            pid = self.random.choice(worker_pids())
            os.kill(pid, signum)
            self.sent.append((step, signum, pid))

    def end_frozen(self) -> None:
        """SIGKILL the workers this test froze, if any is left (the driver ends them; this is the test's guard)."""
        for _, signum, pid in self.sent:
            if signum == signal.SIGSTOP:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_a_lost_node_is_re_planned_for_the_devices_left(tmp_path, caplog, monkeypatch):
    """A 2-node local Ray cluster (1 CPU each) loses its worker node during the run: the driver re-plans for the one
    node left and resumes the 2-worker checkpoint on 1 worker; every loss within 1e-5 of single-process training.
    First in the module: it joins a cluster of its own, before the module's embedded one starts."""
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="loom-nodes-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_TMPDIR", temp)
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=1, include_dashboard=False)
        gone = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        doc = two_task_job(1, steps=4)
        doc["cluster"]["num_nodes"] = 2
        doc["training"].update(checkpoint_every=1, max_restarts=1)
        job = parse_job(doc)
        original = Driver.run_step

        def run_step(driver, step, *args):
            if step == 2 and gone in cluster.list_all_nodes():
                cluster.remove_node(gone)
            return original(driver, step, *args)

        monkeypatch.setattr(Driver, "run_step", run_step)
        with caplog.at_level(logging.INFO):
            result = run_job(job, options=RunOptions(address=cluster.address, out_dir=tmp_path / "out"))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    lines = [r.getMessage() for r in caplog.records]
    assert any("re-planned for 1 devices instead of 2" in line for line in lines), lines
    assert any("resharding onto plan" in line or "restart 1 of 1" in line for line in lines), lines
    assert result.plan.cluster.num_nodes == 1 and [r.step for r in result.records] == [0, 1, 2, 3]
    reference = ReferenceTrainer(job)
    for record in result.records:
        for task, value in reference.train_step(record.step).items():
            assert record.loss[task] == pytest.approx(value, rel=1e-5), (record.step, task)


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
    doc["training"].update(checkpoint_every=1, max_restarts=3)
    job = parse_job(doc)
    return job, plan_job(job, with_baselines=False).plan


@pytest.fixture(scope="module")
def whole(ray_session, job_plan, tmp_path_factory):
    """The uninterrupted run (no checkpoints), every rank's final parameters collected."""
    return run_job(*job_plan, options=RunOptions(out_dir=tmp_path_factory.mktemp("whole"), checkpoint_every=0,
                                                 collect_parameters=True))


def restart_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "; restart " in r.getMessage()]


def test_run_survives_three_killed_workers_with_the_uninterrupted_result(ray_session, job_plan, whole, tmp_path,
                                                                         caplog, monkeypatch):
    job, plan = job_plan
    steps = sorted(random.Random(12).sample(range(1, STEPS), 3))
    # killed while its checkpoint is written, then twice before a step (whichever rank reports first: the dead one,
    # or its peer's collective error, found lost by the probe)
    chaos = Chaos(monkeypatch, {steps[0]: (signal.SIGKILL, "after"), steps[1]: (signal.SIGKILL, "before"),
                                steps[2]: (signal.SIGKILL, "before")}, seed=12)
    with caplog.at_level(logging.INFO):
        result = run_job(job, plan, options=RunOptions(out_dir=tmp_path, collect_parameters=True))
    assert [step for step, _, _ in chaos.sent] == steps
    restarts = restart_lines(caplog)
    assert len(restarts) == 3, restarts
    assert all(f"restart {i + 1} of 3" in line for i, line in enumerate(restarts)), restarts
    assert f"while writing checkpoint {steps[0] + 1}" in restarts[0], restarts[0]
    assert f"at step {steps[1]}" in restarts[1] and f"resuming from {tmp_path / 'ckpt' / f'step_{steps[1]}'}" in \
        restarts[1], restarts[1]
    # every step once in the result, each with the uninterrupted run's losses; the same final parameters
    assert [r.step for r in result.records] == list(range(STEPS))
    assert [r.loss for r in result.records] == [r.loss for r in whole.records]
    for rank, params in whole.parameters.items():
        for name, tensor in params.items():
            assert torch.equal(tensor, result.parameters[rank][name]), (rank, name)


# checkpoint_every 1: step 1 is sent when step 0's results are in; 0: steps 1-2 were sent as one call with step 0
# (send-ahead) and may run already when the worker freezes, in step 1 or 2; the watchdog gives each step the timeout
@pytest.mark.parametrize("every", [1, 0])
def test_step_watchdog_restarts_a_frozen_worker_naming_where_each_rank_stopped(ray_session, job_plan, whole,
                                                                               tmp_path, caplog, monkeypatch, every):
    job, plan = job_plan
    job = job.model_copy(update={"training": job.training.model_copy(update={"step_timeout_s": 8.0})})
    chaos = Chaos(monkeypatch, {1: (signal.SIGSTOP, "before")}, seed=3)
    try:
        with caplog.at_level(logging.INFO):
            result = run_job(job, plan, options=RunOptions(steps=3, out_dir=tmp_path, checkpoint_every=every))
    finally:
        chaos.end_frozen()
    [hung] = restart_lines(caplog)
    step = "1" if every else "[12]"
    # without checkpoints steps 1-2 went to the workers as one call (orchestrator.run.Driver.call_size)
    calls = "step 1" if every else "steps 1-2"
    assert re.search(rf"{calls} ran past training\.step_timeout_s \(8 s\)", hung), hung
    assert "does not answer" in hung, hung
    # the other rank says where it waits for the frozen one (in a wave's exchange or in the gradient sync), in this
    # step or, when the frozen rank stopped after the step's last collective, in the step sent behind it
    assert re.search(rf"rank \d (finished it and )?stopped in (wave \d+ \(\w+\)|the gradient sync) of step {step}",
                     hung), hung
    assert [r.loss for r in result.records] == [r.loss for r in whole.records[:3]]


def test_a_loss_past_max_restarts_ends_the_run_with_one_line(ray_session, job_plan, tmp_path, monkeypatch):
    job, plan = job_plan
    job = job.model_copy(update={"training": job.training.model_copy(update={"max_restarts": 0})})
    Chaos(monkeypatch, {1: (signal.SIGKILL, "before")}, seed=1)
    with pytest.raises(RunFailed) as failed:
        run_job(job, plan, options=RunOptions(steps=3, out_dir=tmp_path, checkpoint_every=0))
    message = str(failed.value)
    # steps 1-2 went to the workers as one call with step 0 (send-ahead): a dead worker is reported for the call, the
    # collective that lost it for its step
    assert "\n" not in message and message.startswith("worker ") and \
        re.search(r"at (step [12]|steps 1-2):", message), message
