"""The compute search (planner.refine.refine_compute) and its use in plan_job: its moves keep a schedule valid, it is
never worse than its start, stays within its budget, is deterministic, and on a grid cell whose towers split their
time differently between forward and backward it shortens the simulated iteration."""

from __future__ import annotations

import pytest

import planner.api as api
from bench.planner.cells import Cell, load_cell_job
from planner.api import make_cost_model, plan_job
from planner.metagraph import build_metagraph
from planner.refine import MIN_EVALUATIONS, compute_cost, compute_neighbours, evaluate, refine_compute
from planner.schedule import Problem, check_schedule, compute_makespan
from planner.spindle import spindle_schedule


@pytest.fixture(scope="module")
def clip4_8():
    job = load_cell_job(Cell("clip-4", 8, "grid"))
    cm = make_cost_model(job)
    return job, Problem.build(build_metagraph(job), cm), cm


def test_neighbours_move_layers_within_a_metaop_or_change_one_count(clip4_8):
    _, problem, _ = clip4_8
    start = spindle_schedule(problem)
    before = {(k, s.metaop): s for k, w in enumerate(start.waves) for s in w.slices}
    moved = counted = 0
    for schedule in compute_neighbours(problem, start):
        check_schedule(problem, schedule)  # every layer once, dependencies, valid counts, N devices
        if len(schedule.waves) != len(start.waves):
            continue  # two waves merged: checked above
        after = {(k, s.metaop): s for k, w in enumerate(schedule.waves) for s in w.slices}
        assert after.keys() == before.keys()  # no MetaOp enters or leaves a wave
        changed = [key for key in before if before[key] != after[key]]
        if len(changed) == 1:
            (k, m), = changed
            assert after[k, m].num_layers == before[k, m].num_layers
            assert after[k, m].num_devices != before[k, m].num_devices
            counted += 1
        else:
            assert len(changed) == 2 and changed[0][1] == changed[1][1]
            a, b = (after[key].num_layers - before[key].num_layers for key in changed)
            assert a == -b and abs(a) in (1, 2)
            assert all(after[key].num_devices == before[key].num_devices for key in changed)
            moved += 1
    assert moved > 0 and counted > 0


def test_neighbours_come_best_estimate_first(clip4_8):
    _, problem, _ = clip4_8
    start = spindle_schedule(problem)
    base = compute_makespan(problem, start)
    estimates = [compute_makespan(problem, s) - base
                 for s in compute_neighbours(problem, start)]
    # merging two identical adjacent waves only shortens the sum; otherwise the order is the estimate's
    unmerged = [e for e, s in zip(estimates, compute_neighbours(problem, start)) if len(s.waves) == len(start.waves)]
    assert all(b >= a - 1e-12 for a, b in zip(unmerged, unmerged[1:]))  # the sums' rounding aside


def test_refine_compute_shortens_clip4_on_the_timeline_within_its_budget(clip4_8):
    """clip-4's ViT-H recomputes (a quarter of its time in forward) beside towers that do not (a third): Spindle's
    schedule, balanced on forward + backward per slice, leaves time that moving layers and counts recovers."""
    _, problem, cm = clip4_8
    start = evaluate(problem, cm, spindle_schedule(problem), "pack")
    budget = 1500
    found, spent = refine_compute(problem, cm, start, budget)
    check_schedule(problem, found.schedule)
    assert found.sim.iteration_time_s < start.sim.iteration_time_s * (1 - 1e-3)
    assert max(found.sim.peak_memory_bytes) <= cm.hw.memory_bytes
    assert 0 < spent <= budget
    assert refine_compute(problem, cm, start, budget) == (found, spent)  # deterministic


def test_refine_compute_without_budget_for_enough_evaluations_returns_its_start(clip4_8):
    _, problem, cm = clip4_8
    start = evaluate(problem, cm, spindle_schedule(problem), "pack")
    assert refine_compute(problem, cm, start, 0) == (start, 0)
    assert refine_compute(problem, cm, start, compute_cost(problem, start.schedule) * MIN_EVALUATIONS - 1) == (start, 0)


def test_compute_cost_grows_with_devices(clip4_8):
    _, problem, _ = clip4_8
    schedule = spindle_schedule(problem)
    slices = sum(len(w.slices) for w in schedule.waves)
    assert compute_cost(problem, schedule) == slices  # 8 devices: one block
    wide = Problem(problem.graph, problem.curves, 10_240)
    assert compute_cost(wide, schedule) == slices * 1280 > api.COMPUTE_BUDGET  # never searched at that size
    # every grid cell affords the search; the 100-MetaOp sweep at 128 devices does not (16 blocks x 100+ slices)
    assert compute_cost(problem, schedule) * MIN_EVALUATIONS <= api.COMPUTE_BUDGET
    assert 16 * 100 * MIN_EVALUATIONS > api.COMPUTE_BUDGET


def test_the_compute_search_shortens_the_plan(monkeypatch):
    """ofasys-4@8: the plan is faster with the compute search (its schedule compute-refined) than without it (the
    solver's waves are priced as the timeline runs them, but the timeline also overlaps waves and carries transfers);
    the search is placed and simulated at every step, so it never makes the schedule it starts from slower."""
    job = load_cell_job(Cell("ofasys-4", 8, "grid"))
    with_search = plan_job(job, with_baselines=False, progress=lambda _: None)
    monkeypatch.setattr(api, "COMPUTE_BUDGET", 0)
    without = plan_job(job, with_baselines=False, progress=lambda _: None)
    assert with_search.simulation.iteration_time_s < without.simulation.iteration_time_s
    assert "compute-refined" in with_search.plan.solver.method
    assert "compute-refined" not in without.plan.solver.method
