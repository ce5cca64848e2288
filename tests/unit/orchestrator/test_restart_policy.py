"""The restart policy and the watchdog's words (orchestrator.recovery): pure, no Ray."""

from __future__ import annotations

import pytest

from orchestrator import recovery
from orchestrator.recovery import StepsAdvance, decide, describe


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


def test_a_cluster_that_lost_a_node_is_re_planned_for_the_nodes_left():
    from orchestrator.placement import ClusterNode, RankPlacement
    from orchestrator.recovery import shrunk_cluster
    from orchestrator.remote import RunFailed
    from planner.spec import ClusterSpec

    job_cluster = ClusterSpec(num_nodes=3, devices_per_node=2, device="cpu")
    placement = RankPlacement(3, 2)
    nodes = [ClusterNode(node_id=f"n{i}", address="10.0.0.%d" % i, cpus=2.0, gpus=0.0) for i in range(3)]
    assert shrunk_cluster(job_cluster, placement, nodes) is None  # all there
    smaller = shrunk_cluster(job_cluster, placement, nodes[:2] + [ClusterNode("n9", "10.0.0.9", 1.0, 0.0)])
    assert smaller == ClusterSpec(num_nodes=2, devices_per_node=2, device="cpu")  # a 1-CPU node holds no plan node
    with pytest.raises(RunFailed, match="no node of the cluster can hold 2 workers any more"):
        shrunk_cluster(job_cluster, placement, [])


def test_a_step_watchdog_names_where_the_ranks_that_finished_it_wait(monkeypatch):
    """A rank that froze after the step's last collective is the only one pending; the others finished the step and
    wait in the one sent behind it: the line says where (a checkpoint's watchdog asks only the pending ranks)."""
    import ray

    from orchestrator.recovery import watchdog_failure

    where = {0: None, 1: {"step": 2, "micro": 0, "wave": 0, "phase": "forward"}}

    class Actor:
        def __init__(self, rank: int):
            self.progress = type("Method", (), {"remote": staticmethod(lambda: ("ref", rank))})

    asked = []
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns, timeout: (asked.extend(refs) or
                                                                      [r for r in refs if r[1] == 1], []))
    monkeypatch.setattr(ray, "get", lambda ref: where[ref[1]])
    actors = [Actor(0), Actor(1)]
    message = str(watchdog_failure(actors, "step 1", 8.0, [0], step=1))
    assert message == ("step 1 ran past training.step_timeout_s (8 s): rank 0 does not answer; "
                       "rank 1 finished it and stopped in wave 0 (forward) of step 2")
    asked.clear()
    message = str(watchdog_failure(actors, "checkpoint 2", 8.0, [0]))
    assert asked == [("ref", 0)] and message.endswith("rank 0 does not answer")



def test_a_call_of_several_steps_goes_on_past_the_timeout_while_every_waited_rank_finishes_steps(monkeypatch):
    """The step watchdog of a call of steps 4-9 (StepsAdvance): each time it runs past step_timeout_s it goes on only
    if every rank still running has finished a step since the last look."""
    answers = iter([{0: {"step": 5}, 1: {"step": 6}},  # both moved past step 4
                    {0: {"step": 7}, 1: {"step": 6}},  # rank 1 is still in step 6: hung there
                    ])
    monkeypatch.setattr(recovery, "ask_progress", lambda actors, ranks: next(answers))
    advance = StepsAdvance(actors=[None, None], first=4)
    assert advance([0, 1])
    assert not advance([0, 1])
    monkeypatch.setattr(recovery, "ask_progress", lambda actors, ranks: {0: "does not answer"})
    assert not StepsAdvance(actors=[None], first=4)([0])  # a rank that cannot say where it is has not moved
