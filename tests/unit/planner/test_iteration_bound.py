"""The full-iteration lower bound: below the predicted iteration of every candidate schedule Loom considers and of
every baseline, on the examples and on random jobs; and each of its terms where it must be positive."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
from conftest import make_curve, make_problem, random_schedule
from random_jobs import random_job
from test_placement import hardware

from orchestrator.recipes import load_job
from planner.api import make_cost_model
from planner.baselines import run_baselines
from planner.bound import dag_bound, iteration_bound, iteration_terms, timeline_compute_bound
from planner.costmodel import AnalyticCostModel
from planner.errors import PlanningError
from planner.metagraph import build_metagraph
from planner.placement import place_schedule
from planner.schedule import Problem, Schedule, Slice, Wave, reverse_runs
from planner.simulator import simulate
from planner.solver import SolverSettings, solve
from planner.spindle import spindle_schedule

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted(path.stem for path in (ROOT / "examples").glob("*.yaml"))


def _predicted(problem: Problem, cost_model, schedule) -> float:
    placed = place_schedule(problem, schedule, cost_model, check_memory_limit=False)
    return simulate(problem, placed, cost_model).iteration_time_s


def _assert_below_everything(problem: Problem, cost_model, schedules, what: str) -> float:
    bound = iteration_bound(problem, cost_model)
    times = {f"schedule {i}{order}": _predicted(problem, cost_model, s)
             for i, sched in enumerate(schedules) for order, s in (("", sched), (" reversed", reverse_runs(problem, sched)))}
    times.update(run_baselines(problem, cost_model))
    for name, seconds in times.items():
        assert bound <= seconds * (1 + 1e-9), (what, name, bound, seconds)
    return bound


@pytest.mark.parametrize("example", EXAMPLES)
def test_iteration_bound_below_every_candidate_of_the_examples(example):
    job = load_job(ROOT / "examples" / f"{example}.yaml")
    cost_model = make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cost_model)
    solved = solve(problem, SolverSettings(time_limit_s=0.5, max_nodes=50), warm=spindle_schedule(problem),
                   lower_bound=dag_bound(problem))
    bound = _assert_below_everything(problem, cost_model, [c.schedule for c in solved.candidates], example)
    # every example trains something: the optimizer step is unavoidable
    compute = timeline_compute_bound(problem)
    assert bound > compute
    # the timeline's passes start earlier than whole MetaOps do (a MetaOp's forward does not wait for its inputs'
    # backward), so with one micro-batch its compute bound is at most the wave sums' DAG bound
    assert compute <= dag_bound(problem) * (1 + 1e-9)


def test_iteration_bound_below_random_schedules_of_random_jobs():
    checked, syncs = 0, 0
    for seed in range(40):
        try:
            problem, cost_model = random_job(seed)
        except PlanningError:
            continue  # a drawn layer fits no device count
        rng = random.Random(seed)
        schedules = [spindle_schedule(problem)] + [random_schedule(problem, rng) for _ in range(3)]
        _assert_below_everything(problem, cost_model, schedules, seed)
        checked += 1
        syncs += iteration_terms(problem, cost_model)["last_bucket"] > 0
    # the sync term is exercised, not always 0: it is rare (seed 26 of 0-119), since it needs a MetaOp that cannot run
    # on one data-parallel rank, and 18 bytes per bf16 AdamW parameter make the smallest counts tensor-parallel
    assert checked >= 30 and syncs >= 1, (checked, syncs)


def test_a_count_and_its_sync_go_together():
    # one trainable MetaOp of one layer (1e6 parameters) on 8 devices of one node: 4 s on one device (nothing to
    # sync), 1 s on 8 (data parallel). The old bound took the compute at 8 and the sync at 1 (none); no schedule
    # has both: the bound is the cheaper of 4 s unsynced and 1 s plus the all-reduce over 8
    cost_model = AnalyticCostModel(hardware(num_nodes=1, devices_per_node=8))
    problem = make_problem([1], [[]], [make_curve([1, 8], [4.0, 1.0])], 8)
    terms = iteration_terms(problem, cost_model)
    sync = cost_model.allreduce_time(2e6, 8, False)  # bf16 gradients
    optimizer = cost_model.optimizer_time(1e6 / 8)
    assert terms["compute"] == pytest.approx(1.0) and terms["last_bucket"] == pytest.approx(sync) and sync > optimizer
    assert iteration_bound(problem, cost_model) == pytest.approx(1.0 + sync)
    for count in (1, 8):
        schedule = Schedule((Wave((Slice(0, 1, count),)),))
        assert iteration_bound(problem, cost_model) <= _predicted(problem, cost_model, schedule)


def test_the_chain_through_the_last_slice_counts_at_its_count():
    # a frozen MetaOp (2 layers, 0.5 s a layer at its fastest) feeds a trainable one of one layer: 3 s on 2 devices,
    # whose all-reduce may stay in a node, 1 s on 8, whose all-reduce spans both nodes. The chain at 2 devices is
    # 1 + 3 s, above the compute bound (2 s), so the cheap sync comes with it, not with the 8-device count
    cost_model = AnalyticCostModel(hardware(num_nodes=2, devices_per_node=4))
    problem = make_problem([2, 1], [[], [0]], [make_curve([1, 8], [4.0, 0.5]), make_curve([2, 8], [3.0, 1.0])], 8)
    problem = dataclasses.replace(problem, graph=dataclasses.replace(problem.graph, metaops=(
        dataclasses.replace(problem.graph.metaops[0], frozen=True, backward_factor=0.0), problem.graph.metaops[1])))
    at = {2: min(cost_model.allreduce_time(2e6, 2, cross) for cross in (False, True)),
          8: cost_model.allreduce_time(2e6, 8, True)}
    optimizer = cost_model.optimizer_time(1e6 / 8)
    terms = iteration_terms(problem, cost_model)
    assert terms["compute"] == pytest.approx(2.0) and optimizer < at[2] < at[8] < 1.0
    assert terms["last_path"] == pytest.approx(2.0) and terms["last_bucket"] == pytest.approx(at[8])
    bound = iteration_bound(problem, cost_model)
    assert bound == pytest.approx(2.0 + at[8]) and bound > 2.0 + at[2]  # the count-free bound's sum
    for count in (2, 8):
        schedule = Schedule((Wave((Slice(0, 2, 8),)), Wave((Slice(1, 1, count),))))
        assert bound <= _predicted(problem, cost_model, schedule)


def test_terms_by_hand_on_one_metaop_that_needs_two_ranks(monkeypatch):
    # one trainable MetaOp of 4 layers (1e6 parameters each) whose valid counts are 2 and 4 (data parallel) on 8 devices
    cost_model = AnalyticCostModel(hardware(num_nodes=2, devices_per_node=4))
    problem = make_problem([4], [[]], [make_curve([2, 4], [1.0, 0.6])], 8)
    shard = 1e6  # the last slice's every layer is a bucket of at least one layer over at least its ranks
    # gradients reduced in bf16, parameters gathered as the fp32 values the runtime's ZeRO-1 moves (planner/sync.py);
    # where the gathers end the iteration (a job with a weight hand-off or a rollout) they count, ...
    with monkeypatch.context() as patch:
        patch.setattr("planner.bound.gathers_overlap", lambda graph, cm: False)
        gathered = iteration_terms(problem, cost_model)["last_bucket"]
    assert gathered == pytest.approx(min(cost_model.allreduce_time(2 * shard, dp, False)
                                         + cost_model.allgather_time(4 * shard, dp, False) for dp in (2, 4)))
    # ... where they overlap the next iteration's forward (every use trains) only the all-reduce does
    terms = iteration_terms(problem, cost_model)
    expected = min(cost_model.allreduce_time(2 * shard, dp, False) for dp in (2, 4))
    assert terms["last_bucket"] == pytest.approx(expected) and 0 < expected < gathered
    assert terms["optimizer"] == pytest.approx(cost_model.optimizer_time(4e6 / 8))
    assert terms["compute"] == pytest.approx(4 * 0.6)
    bound = iteration_bound(problem, cost_model)
    assert bound == pytest.approx(4 * 0.6 + max(terms["optimizer"], terms["last_bucket"]))
    for count in (2, 4):
        seconds = _predicted(problem, cost_model, Schedule((Wave((Slice(0, 4, count),)),)))
        assert bound <= seconds


def test_pipelined_micro_batches_are_bounded_by_their_work_not_k_critical_paths():
    # two MetaOps in a chain, each 2 s a micro-batch on one device (a third of it forward), 4 micro-batches on 2
    # devices. Pipelined, one device per MetaOp, op 1 runs its 4 x 2 s after op 0's first forward (2/3 s) and before
    # op 0's last backward (4/3 s): 10 s, under 4 x the one-micro-batch DAG bound (the 4 s chain), which holds only
    # for micro-batches one after another. The timeline bound is that 10 s
    problem = make_problem([1, 1], [[], [0]], [make_curve([1], [2.0]), make_curve([1], [2.0])], 2)
    problem = dataclasses.replace(problem, graph=dataclasses.replace(problem.graph, num_micro_batches=4))
    assert dag_bound(problem) == pytest.approx(4.0)
    assert timeline_compute_bound(problem) == pytest.approx(2 / 3 + 4 * 2.0 + 4 / 3)
