"""The restart policy and the watchdog's words (orchestrator.recovery): pure, no Ray."""

from __future__ import annotations

from orchestrator.recovery import decide, describe


def test_a_lost_worker_restarts_while_restarts_are_left():
    first = decide("worker 1 died at step 3: gone", {1: "died"}, 0, 3)
    assert first.restart and first.reason == "restart 1 of 3 (worker 1 died)"
    last = decide("worker 1 died at step 3: gone", {1: "died"}, 3, 3)
    assert not last.restart and last.reason.endswith("no restart left (training.max_restarts: 3)")
    assert decide("step 2 ran past training.step_timeout_s (5 s): rank 0 ...", {-1: "lost"}, 1, 3).reason == \
        "restart 2 of 3"  # the watchdog's line names the ranks already


def test_an_error_with_every_worker_alive_is_not_restarted():
    decision = decide("worker 0 failed at step 1: ValueError: bad row", {}, 0, 3)
    assert not decision.restart and "every worker is alive" in decision.reason


def test_where_a_rank_stopped_reads_as_one_phrase():
    assert describe({"step": 4, "micro": 0, "wave": 2, "phase": "backward"}) == "stopped in wave 2 (backward) of step 4"
    assert describe({"step": 4, "micro": 1, "wave": -1, "phase": "gradient sync"}) == \
        "stopped in the gradient sync of step 4, micro-batch 1"
    assert describe(None) == "stopped before its first wave"
