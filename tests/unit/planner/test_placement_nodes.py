"""Tensor-parallel groups never span nodes: re-placement when kept devices fragment a wave, a PlanningError naming
the wave when no placement exists, and every placed candidate of examples, workloads and random multi-node jobs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import random_schedule
from random_jobs import random_job
from test_placement import LinearCost, hardware, op, problem_of, schedule

from bench.planner.cells import Cell, load_cell_job
from orchestrator.recipes import load_job
from planner.api import make_cost_model, repair_reason
from planner.bound import dag_bound
from planner.errors import PlanningError
from planner.metagraph import build_metagraph
from planner.placement import STRATEGIES, TensorParallelRoomError, place_schedule
from planner.schedule import Problem, reverse_runs
from planner.solver import SolverSettings, solve
from planner.spindle import spindle_schedule

ROOT = Path(__file__).resolve().parents[3]


def _assert_tp_inside_nodes(placed, dpn: int, what) -> int:
    """Asserts every TP group of ``placed`` lies in one node; returns how many groups have more than one device."""
    groups = 0
    for k, wave in enumerate(placed.waves):
        for s in wave.slices:
            tp = s.layout.tp_degree
            for i in range(0, len(s.devices), tp):
                assert len({d // dpn for d in s.devices[i:i + tp]}) == 1, (what, k, s)
                groups += tp > 1
    return groups


def test_kept_devices_that_fragment_a_wave_are_given_up():
    cm = LinearCost(hardware(num_nodes=2, devices_per_node=4))
    ops = [op(0, "a", layers=2), op(1, "b", layers=2), op(2, "f", layers=1, batch=12), op(3, "g", layers=1, batch=12),
           op(4, "d", layers=1, tp=(4,))]
    problem = problem_of(ops, cm)
    # wave 0 puts a and b on different nodes (f and g take 3 devices of each); in wave 1 a and b continuing on
    # their devices would leave 3 free devices per node: no room for d's 4-device TP group
    sched = schedule([(2, 1, 3), (3, 1, 3), (0, 1, 1), (1, 1, 1)], [(0, 1, 1), (1, 1, 1), (4, 1, 4)])
    placed = place_schedule(problem, sched, cm)
    first = {s.metaop: s.devices for s in placed.waves[0].slices}
    assert first[0][0] // 4 != first[1][0] // 4  # the fragmenting start this test is about
    assert _assert_tp_inside_nodes(placed, 4, "re-placed") == 1


def test_a_wave_without_room_for_its_tp_groups_is_refused_with_the_reason():
    cm = LinearCost(hardware(num_nodes=2, devices_per_node=4))
    ops = [op(0, "three", layers=2, tp=(3,), batch=6), op(1, "two", layers=2, tp=(2,), batch=6)]
    problem = problem_of(ops, cm)
    sched = schedule([(0, 2, 6), (1, 2, 2)])  # two groups of 3 leave one device per node: no room for a pair
    with pytest.raises(PlanningError, match=r"wave 0: MetaOp t1.two needs 1 tensor-parallel groups of 2 devices.*"
                                            r"t0.three 2x3, t1.two 1x2.*never spans nodes") as refused:
        place_schedule(problem, sched, cm)
    # the memory repair that follows says why the candidates were refused: TP groups, not device memory
    assert isinstance(refused.value, TensorParallelRoomError)
    assert repair_reason(refused.value) == "no candidate keeps its tensor-parallel groups inside nodes"
    assert repair_reason(PlanningError("device 0 needs 90 GiB")) == "no candidate fits in device memory"
    # a baseline's schedule is still priced as it is (a group across nodes)
    placed = place_schedule(problem, sched, cm, tp_within_nodes=False)
    assert sorted(d for s in placed.waves[0].slices for d in s.devices) == list(range(8))


def _candidates(problem: Problem, limit: float = 0.3):
    solved = solve(problem, SolverSettings(time_limit_s=limit, max_nodes=30), warm=spindle_schedule(problem),
                   lower_bound=dag_bound(problem))
    for cand in solved.candidates:
        yield cand.schedule
        yield reverse_runs(problem, cand.schedule)


def _check_all(problem: Problem, cost_model, schedules, what) -> int:
    groups = 0
    for i, sched in enumerate(schedules):
        for strategy in STRATEGIES:
            try:
                placed = place_schedule(problem, sched, cost_model, strategy=strategy, check_memory_limit=False)
            except PlanningError as exc:  # only a wave that truly has no room may be refused
                assert "never spans nodes" in str(exc), exc
                continue
            groups += _assert_tp_inside_nodes(placed, cost_model.hw.devices_per_node, (what, i, strategy))
    return groups


@pytest.mark.parametrize("job", ["examples/alignment-baichuan.yaml", "examples/medical-unimed.yaml", "qwen-val-3@32",
                                 "clip-7@16"])
def test_tp_groups_inside_nodes_on_every_candidate(job):
    if "@" in job:
        workload, devices = job.split("@")
        spec = load_cell_job(Cell(workload, int(devices), "grid"))
    else:
        spec = load_job(ROOT / job)
    cost_model = make_cost_model(spec)
    problem = Problem.build(build_metagraph(spec), cost_model)
    _check_all(problem, cost_model, _candidates(problem), job)


def test_tp_groups_inside_nodes_on_random_multi_node_jobs():
    groups = 0
    for seed in range(40):
        try:
            problem, cost_model = random_job(seed, max_nodes=4)
        except PlanningError:
            continue
        rng = random.Random(seed)
        schedules = [random_schedule(problem, rng) for _ in range(3)] + list(_candidates(problem, 0.1))
        groups += _check_all(problem, cost_model, schedules, seed)
    assert groups > 100  # TP groups were placed, not only data-parallel slices
