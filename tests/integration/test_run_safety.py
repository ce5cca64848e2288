"""What `loom run` guarantees about its output folder, its paths and stop signals (docs/reliability.md), end to end.

Checked: a run refused for any reason (an earlier run's checkpoints without --resume, a busy metrics port, a plan of
another job, a folder another run holds, no intact checkpoint to resume, an output path leading outside --out)
leaves an existing --out byte-identical; a job name that would escape its folder is refused; --keep-last deletes
only older complete checkpoints; a damaged latest checkpoint makes --resume fall back to the previous one, with the
losses of the original run; --overwrite moves the earlier run aside and deletes it only once the new run has a
checkpoint; a second run into a folder in use is refused naming the holder's pid; SIGTERM (a real `loom run`
process) and SIGINT stop after the step in flight with a final checkpoint, exit 143 and 130, one line, the lock
released and no Ray process left.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import ray
import yaml
from typer.testing import CliRunner

from orchestrator.actors import EmbeddedRay
from orchestrator.checkpoint import (
    complete_checkpoints, damage, find_resume_point, mark_complete, rank_file, step_dir, step_dirs,
)
from orchestrator.cli import app
from orchestrator.metrics import LogReporter, StepRecord, read_step_log
from orchestrator.outdir import LOCK_FILE, OutDirLock
from orchestrator.run import RunOptions, run_job
from orchestrator.run_inputs import RunInputError
from orchestrator.signals import RunStopped
from planner.api import plan_job
from planner.spec import parse_job

from _jobs import two_task_job  # tests/integration/_jobs.py
from test_cli_subprocess import ROOT, loom_command
from test_run import assert_no_new_descendants, assert_one_error_line, descendants

JOB = two_task_job(2, steps=4)


@pytest.fixture(scope="module")
def job():
    return parse_job(JOB)


@pytest.fixture(scope="module")
def plan(job):
    return plan_job(job, with_baselines=False).plan


@pytest.fixture(scope="module")
def plan_file(plan, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    plan.save(path)
    return path


@pytest.fixture(scope="module")
def ray_session():
    """One embedded cluster for this module's library-level runs; every process it started is gone at the end."""
    before = descendants(os.getpid())
    cluster = EmbeddedRay(num_cpus=2).start()
    try:
        yield cluster
    finally:
        cluster.stop()
    assert_no_new_descendants(before)


def write_job(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` by relative path: a file's SHA-256, a link's target, or 'dir'."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = "link:" + os.readlink(path)
        elif path.is_dir():
            found[name] = "dir"
        else:
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def lock_is_free(out: Path) -> bool:
    """Whether a run could take ``out``'s lock now (taken and given back at once)."""
    lock = OutDirLock(out)
    try:
        return lock.acquire(create=False)
    except RunInputError:
        return False
    finally:
        lock.release()


def earlier_run(out: Path, plan) -> None:
    """A folder as an earlier run of ``plan`` leaves it: plan, step log, model, logs, a complete and an unfinished
    checkpoint."""
    (out / "logs").mkdir(parents=True)
    plan.save(out / "plan.json")
    (out / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n')
    (out / "model.pt").write_bytes(os.urandom(256))
    (out / "logs" / "worker-1.err").write_text("a worker's output\n")
    for step, complete in ((2, True), (3, False)):
        directory = step_dir(out, step)
        directory.mkdir(parents=True)
        for rank in range(2):
            rank_file(directory, rank).write_bytes(os.urandom(512))
        if complete:
            mark_complete(directory, step, plan.hash, 2, plan.job)


# --------------------------------------------------------------------------- refusals touch nothing


HELD: list = []  # what a refusal cause holds (a socket, a lock) until its test ends


def _no_resume(out, plan_file, tmp_path):
    return [], ("holds checkpoints of an earlier run (ckpt/step_2, ckpt/step_3)", "--resume", "--overwrite")


def _busy_port(out, plan_file, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    HELD.append(busy)
    return ["--overwrite", "--metrics-port", str(busy.getsockname()[1])], ("--metrics-port", "Pick a free port")


def _other_plan(out, plan_file, tmp_path):
    doc = copy.deepcopy(JOB)
    doc["components"]["txt"]["num_layers"] = 3
    other = tmp_path / "other-plan.json"
    plan_job(parse_job(doc), with_baselines=False).plan.save(other)
    return ["--overwrite", "--plan", str(other)], ("--plan", "other MetaOps")


def _locked(out, plan_file, tmp_path):
    holder = OutDirLock(out)
    holder.acquire(create=True)
    holder.write_holder()
    HELD.append(holder)
    return ["--resume"], (f"is in use by another `loom run` (pid {os.getpid()} on", "pass another --out")


def _damaged(out, plan_file, tmp_path):
    path = rank_file(step_dir(out, 2), 1)
    path.write_bytes(path.read_bytes()[:100])
    return ["--resume"], ("no complete checkpoint to resume from (damaged: step_2)",)


def _escaping_link(out, plan_file, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.rename(out / "logs", tmp_path / "elsewhere" / "logs")
    (out / "logs").symlink_to(tmp_path / "elsewhere" / "logs")
    return ["--overwrite"], ("logs: resolves to", "outside --out")


def _both(out, plan_file, tmp_path):
    return ["--resume", "--overwrite"], ("--resume continues the run in --out, --overwrite replaces it",)


@pytest.mark.parametrize("cause", [_no_resume, _busy_port, _other_plan, _locked, _damaged, _escaping_link, _both],
                         ids=lambda f: f.__name__.strip("_"))
def test_refused_run_leaves_the_folder_byte_identical(plan, plan_file, tmp_path, cause):
    out = tmp_path / "out"
    earlier_run(out, plan)
    args, fragments = cause(out, plan_file, tmp_path)
    before = tree(out)
    command = ["run", str(write_job(tmp_path / "job.yaml", JOB)), "--out", str(out), *args]
    if "--plan" not in args and "--resume" not in args:
        command += ["--plan", str(plan_file)]
    try:
        assert_one_error_line(CliRunner().invoke(app, command), 2, *fragments)
    finally:
        while HELD:
            thing = HELD.pop()
            thing.release() if isinstance(thing, OutDirLock) else thing.close()
    assert tree(out) == before
    assert not ray.is_initialized()  # refused before any Ray process started


def test_job_name_that_would_escape_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out is out/<name>, relative to here
    for name in ("../../x", "/tmp/x", "a/b"):
        doc = {**JOB, "name": name}
        result = CliRunner().invoke(app, ["run", str(write_job(tmp_path / "job.yaml", doc))])
        assert_one_error_line(result, 2, f"name ('{name}') is not a safe job name", "A-Z a-z 0-9 . _ -")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


# --------------------------------------------------------------------------- retention, fall-back, SIGINT, overwrite


class WatchingReporter(LogReporter):
    """Keeps the records; after step ``at`` is reported (in the training loop, before that step's checkpoint) it
    calls ``then()``: a signal to this process, or a look at the folder."""

    def __init__(self, at: int, then):
        super().__init__()
        self.at, self.then, self.records = at, then, []

    def step(self, record: StepRecord) -> None:
        super().step(record)
        self.records.append(record)
        if record.step == self.at:
            self.then()


def test_keep_last_fallback_sigint_and_overwrite(ray_session, job, plan, tmp_path, caplog):
    out = tmp_path / "out"
    first = run_job(job, plan, options=RunOptions(steps=3, out_dir=out, checkpoint_every=1, keep_last=2))
    assert sorted(step_dirs(out)) == [2, 3]  # step_1 deleted once step_3 was complete
    assert all(damage(c) is None for c in complete_checkpoints(out))
    assert (out / LOCK_FILE).is_file() and lock_is_free(out)  # released at the end

    # a damaged latest checkpoint: --resume falls back to step_2; SIGINT after the first step stops the run after
    # the steps in flight (the first, and the second, sent before the first's results came back) with a final
    # checkpoint (step_4), exit code 130
    damaged = rank_file(step_dir(out, 3), 1)
    damaged.write_bytes(damaged.read_bytes()[:-10])
    interrupt = WatchingReporter(2, lambda: os.kill(os.getpid(), signal.SIGINT))
    with caplog.at_level(logging.WARNING, logger="orchestrator.checkpoint"), pytest.raises(RunStopped) as stopped:
        # one step per call (call_seconds 0), so that the steps in flight are the two named above
        run_job(job, plan, options=RunOptions(steps=6, out_dir=out, resume=True, checkpoint_every=100,
                                              call_seconds=0), reporter=interrupt)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "step_3 is damaged (rank_1.safetensors has" in warnings[0], warnings
    assert [r.step for r in interrupt.records] == [2, 3]
    assert interrupt.records[0].loss == first.records[2].loss  # the state after step 2, restored intact
    assert stopped.value.exit_code == 130 and str(stopped.value) == (
        f"stopped by SIGINT after step 4 of 6; continue from checkpoint {step_dir(out, 4)} (step 4) with --resume")
    assert find_resume_point(out, plan.hash).step == 4 and lock_is_free(out)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handler is gone

    with pytest.raises(RunInputError, match="holds checkpoints of an earlier run"):
        run_job(job, plan, options=RunOptions(steps=1, out_dir=out))
    kept = tree(out / "ckpt")

    def look() -> None:  # during the new run's first step, before its first checkpoint
        [previous] = [p for p in out.iterdir() if p.name.startswith("previous-")]
        assert tree(previous / "ckpt") == kept  # moved aside, nothing deleted yet
        look.seen = previous

    again = run_job(job, plan, options=RunOptions(steps=1, out_dir=out, checkpoint_every=1, overwrite=True),
                    reporter=WatchingReporter(0, look))
    assert [c.step for c in again.checkpoints] == [1] and not look.seen.exists()  # deleted after step_1
    assert sorted(step_dirs(out)) == [1] and [r["step"] for r in read_step_log(out / "metrics.jsonl")] == [0]


def test_sigterm_to_loom_run_stops_it_with_one_line_and_exit_143(plan, plan_file, tmp_path):
    doc = copy.deepcopy(JOB)
    doc["training"].update(steps=2000, checkpoint_every=1000)
    job_path, out, err = write_job(tmp_path / "job.yaml", doc), tmp_path / "out", tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(err, "w") as stderr:
        proc = subprocess.Popen([*loom_command(), "run", str(job_path), "--plan", str(plan_file), "--out", str(out)],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").is_file() or len(read_step_log(out / "metrics.jsonl")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.2)
        started = descendants(proc.pid)  # its Ray cluster: gcs, raylet, the workers
        assert any("raylet" in command for command in started.values()), started
        # a second run into the folder in use is refused, naming the first one's pid
        busy = CliRunner().invoke(app, ["run", str(job_path), "--plan", str(plan_file), "--out", str(out)])
        assert_one_error_line(busy, 2, f"is in use by another `loom run` (pid {proc.pid} on")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text()
    done = len(read_step_log(out / "metrics.jsonl"))
    lines = text.strip().splitlines()
    assert code == 143, text[-3000:]
    assert lines[-1] == (f"error: stopped by SIGTERM after step {done} of 2000; continue from checkpoint "
                         f"{step_dir(out, done)} (step {done}) with --resume"), text[-3000:]
    assert "Traceback" not in text and "*** " not in text and len([x for x in lines if "error:" in x]) == 1
    assert find_resume_point(out, plan.hash).step == done  # the final checkpoint, its manifest verified
    assert lock_is_free(out)  # the lock went with the process
    deadline = time.monotonic() + 15
    while (left := [c for pid, c in started.items() if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of its Ray cluster left behind: {left}"


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
