"""Steps sent ahead (orchestrator.run, orchestrator.actors): an actor runs its steps one at a time in the order the
driver names, and the driver sends a step ahead only where nothing must happen between two steps. Threads, no Ray
processes."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from orchestrator.actors import WaveActor
from orchestrator.remote import failed_step
from orchestrator.run import MAX_STEPS_PER_CALL, Driver, RunOptions, call_shares
from planner.spec import parse_job


class SlowWorker:
    """A WaveWorker stand-in whose steps take ``seconds`` and log when they start and end; ``fail_at``: a step that
    raises."""

    last_timing = None

    def __init__(self, seconds: float = 0.05, fail_at: int | None = None):
        self.seconds, self.fail_at = seconds, fail_at
        self.log: list[tuple[str, int]] = []
        self.threads: list[int] = []  # the thread each step ran on
        self.running = 0

    def train_step(self, step: int) -> dict[str, float]:
        self.running += 1
        assert self.running == 1, "two steps ran at once"
        self.log.append(("start", step))
        self.threads.append(threading.get_ident())
        time.sleep(self.seconds)
        self.running -= 1
        if step == self.fail_at:
            raise ValueError(f"bad row at step {step}")
        self.log.append(("end", step))
        return {"task": float(step)}


def actor_with(worker: SlowWorker) -> WaveActor:
    actor = WaveActor("{}", rank=0, world_size=1)
    actor.worker = worker
    return actor


def in_thread(call) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["value"] = call()
        except Exception as exc:  # noqa: BLE001 - the test reads it
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_every_step_runs_on_the_actors_one_compute_thread():
    """Ray hands a threaded actor's calls to pool threads; the steps still all run on one thread of the actor's own
    (WaveActor's docstring: a thread's first step paid its own warm-up)."""
    worker = SlowWorker(seconds=0.01)
    actor = actor_with(worker)
    callers = [in_thread(lambda step=step: actor.train_steps(step, 1, after=step - 1 if step else None))
               for step in range(4)]
    for thread, out in callers:
        thread.join(5)
        assert "error" not in out
    assert [entry for entry in worker.log if entry[0] == "start"] == [("start", step) for step in range(4)]
    assert len(set(worker.threads)) == 1 and worker.threads[0] not in {t.ident for t, _ in callers}


def test_a_step_that_arrives_before_the_one_it_follows_waits_for_it():
    worker = SlowWorker()
    actor = actor_with(worker)
    # Ray may start the later call first: step 2 (after 1) and step 1 (after 0) arrive before step 0
    later, later_out = in_thread(lambda: actor.train_steps(2, 1, after=1))
    second, second_out = in_thread(lambda: actor.train_steps(1, 1, after=0))
    time.sleep(0.5)
    assert worker.log == []  # both wait
    [first] = actor.train_steps(0)
    second.join(5)
    later.join(5)
    assert worker.log == [("start", 0), ("end", 0), ("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert first["losses"] == {"task": 0.0} and second_out["value"][0]["losses"] == {"task": 1.0}
    assert later_out["value"][0]["losses"] == {"task": 2.0}
    # a step's time is its own (0.05 s), not its wait for the one before (over 0.5 s)
    assert 0.04 < second_out["value"][0]["seconds"] < 0.4


def test_a_step_behind_a_failed_one_fails_without_running():
    worker = SlowWorker(fail_at=0)
    actor = actor_with(worker)
    waiting, out = in_thread(lambda: actor.train_steps(1, 1, after=0))
    with pytest.raises(ValueError, match="bad row at step 0"):
        actor.train_steps(0)
    waiting.join(5)
    assert isinstance(out["error"], RuntimeError) and str(out["error"]) == \
        "step 1 not run: step 0 failed on this worker"
    assert worker.log == [("start", 0)]


JOB = {"name": "ahead", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
       "components": {"enc": {"kind": "mlp", "num_layers": 1, "hidden_size": 8}},
       "tasks": [{"name": "t", "batch_size": 2, "loss": "mse", "components": [{"component": "enc"}]}],
       "training": {"steps": 7}}


@pytest.mark.parametrize("every, sent", [(0, [0, 1, 2, 3, 4, 5]), (3, [0, 1, 3, 4]), (1, [])])
def test_the_driver_sends_ahead_unless_a_checkpoint_or_the_end_comes_next(tmp_path, every, sent):
    driver = Driver(parse_job(JOB), None, RunOptions(out_dir=tmp_path, checkpoint_every=every), reporter=None)
    assert [step for step in range(7) if driver.may_send_ahead(step)] == sent
    driver.stop.requested = 2  # SIGINT came: the run stops after the step in flight, nothing more is sent
    assert not any(driver.may_send_ahead(step) for step in range(7))
    off = Driver(parse_job(JOB), None, RunOptions(out_dir=tmp_path, send_ahead=False), reporter=None)
    assert not any(off.may_send_ahead(step) for step in range(7))


def test_a_call_of_several_steps_runs_them_in_order_and_names_the_one_that_fails():
    worker = SlowWorker(seconds=0.01, fail_at=5)
    actor = actor_with(worker)
    results = actor.train_steps(0, 3)
    assert [r["losses"] for r in results] == [{"task": 0.0}, {"task": 1.0}, {"task": 2.0}]
    assert all(0.005 < r["seconds"] < 0.5 for r in results) and len(set(worker.threads)) == 1
    behind, out = in_thread(lambda: actor.train_steps(6, 2, after=5))
    with pytest.raises(ValueError, match="bad row at step 5") as failed:
        actor.train_steps(3, 3, after=2)
    behind.join(5)
    # the driver's line names the failing step of the call, not the call's range
    assert failed_step(failed.value, "at steps 3-5") == "at step 5"
    assert failed_step(ValueError("x"), "at steps 3-5") == "at steps 3-5"
    assert str(out["error"]) == "step 6 not run: step 5 failed on this worker"
    assert [e for e in worker.log if e[0] == "start"] == [("start", s) for s in range(6)]


def with_plan(tmp_path, predicted_s: float, every: int = 0, steps: int = 100, **options) -> Driver:
    plan = SimpleNamespace(predicted=SimpleNamespace(iteration_time_s=predicted_s))
    return Driver(parse_job(JOB), plan, RunOptions(out_dir=tmp_path, checkpoint_every=every, steps=steps, **options),
                  reporter=None)


def test_short_steps_go_to_the_actors_several_per_call(tmp_path):
    driver = with_plan(tmp_path, 0.01)
    assert driver.call_size(0, fresh=True) == 1  # the first step after the workers start: its warm-up alone
    assert driver.call_size(1, fresh=False) == 20  # CALL_SECONDS (0.2 s) of predicted steps
    assert driver.call_size(90, fresh=False) == 10  # never past the run's end
    assert with_plan(tmp_path, 0.01, every=25).call_size(10, fresh=False) == 15  # nor past a checkpoint
    assert with_plan(tmp_path, 1e-5).call_size(1, fresh=False) == MAX_STEPS_PER_CALL
    assert with_plan(tmp_path, 0.5).call_size(1, fresh=False) == 1  # a long step: one per call, as before
    assert with_plan(tmp_path, 0.01, call_seconds=0).call_size(1, fresh=False) == 1


def test_each_step_of_a_call_gets_the_share_its_slowest_rank_spent():
    ranks = [[{"seconds": 0.01}, {"seconds": 0.03}], [{"seconds": 0.02}, {"seconds": 0.02}]]
    assert call_shares(0.1, ranks) == pytest.approx([0.04, 0.06])  # slowest 0.02 and 0.03 of 0.05: the call's 0.1 s
    assert call_shares(0.1, [[{"seconds": 0.0}, {"seconds": 0.0}]]) == [0.05, 0.05]
