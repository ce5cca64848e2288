"""Tightening the chosen plan's waves (planner.tighten): less waves' compute, never a longer predicted iteration."""

from __future__ import annotations

from unittest.mock import patch

import pytest

from bench.planner.cells import Cell, load_cell_job
from planner import api
from planner.api import make_cost_model, plan_job
from planner.bucketsplit import split_cost
from planner.candidates import runnable, schedule_of
from planner.leastcompute import waves_compute
from planner.metagraph import build_metagraph
from planner.placement import PlacedSchedule
from planner.plan import plan_from_json
from planner.schedule import check_schedule, compute_makespan
from planner.simulator import simulate
from planner.tighten import TIGHTENED, _compute, catch_ups, layer_moves, tighten_waves
from planner.validate import check_program


@pytest.fixture(scope="module")
def clip10_8():
    """clip-10 on 8 devices (Spindle's grid): its fastest plan's waves end far apart (1.12x the per-level bound)."""
    job = load_cell_job(Cell("clip-10", 8, "grid"))
    cost_model = make_cost_model(job)
    with patch.object(api, "TIGHTEN_BUDGET", 0):  # the chosen plan as it was before tightening
        loose = plan_job(job, cost_model, with_baselines=False, progress=lambda msg: None)
    return job, cost_model, loose, plan_job(job, cost_model, with_baselines=False, progress=lambda msg: None)


def device_sequences(placed: PlacedSchedule) -> dict[int, list[tuple[int, int]]]:
    """device -> the (MetaOp, layer) it runs, in order."""
    out: dict[int, list[tuple[int, int]]] = {}
    for wave in placed.waves:
        for s in wave.slices:
            for d in s.devices:
                out.setdefault(d, []).extend((s.metaop, s.first_layer + i) for i in range(s.num_layers))
    return out


def layer_runs(placed: PlacedSchedule) -> dict[int, list[int]]:
    """MetaOp -> its layers in the order the waves run them."""
    out: dict[int, list[int]] = {}
    for wave in placed.waves:
        for s in wave.slices:
            out.setdefault(s.metaop, []).extend(range(s.first_layer, s.first_layer + s.num_layers))
    return out


def test_moves_keep_every_layer_once_in_order_and_catch_ups_keep_each_device_s_work(clip10_8):
    _, _, outcome, _ = clip10_8
    problem = outcome.problem
    joined = outcome.placed
    layers = {m: list(range(problem.layers(m))) for m in range(len(problem.graph))}
    assert layer_runs(joined) == layers
    moves, ups = layer_moves(joined), catch_ups(problem, joined)
    assert moves and ups
    memo: dict[int, tuple] = {}
    for cand in moves + ups:
        assert layer_runs(cand) == layers  # each layer once, in order
        assert _compute(problem, cand, memo) == pytest.approx(waves_compute(problem, schedule_of(cand)), rel=1e-12)
    for cand in ups:  # a catch-up changes which wave a device's work belongs to, never the work or its order
        assert device_sequences(cand) == device_sequences(joined)
        assert len(cand.waves) in (len(joined.waves), len(joined.waves) + 1)


def test_the_search_lowers_compute_never_the_iteration_and_is_deterministic(clip10_8):
    _, cost_model, outcome, tight = clip10_8
    problem = outcome.problem
    start = outcome.placed
    start_sim = simulate(problem, start, cost_model)
    found, sim, spent = tighten_waves(problem, cost_model, start, start_sim, budget=10**6)
    assert waves_compute(problem, schedule_of(found)) < waves_compute(problem, schedule_of(start)) * 0.995
    assert sim.iteration_time_s <= start_sim.iteration_time_s
    assert sim.iteration_time_s == simulate(problem, found, cost_model).iteration_time_s
    assert max(sim.peak_memory_bytes) <= cost_model.hw.memory_bytes
    check_schedule(problem, schedule_of(found))
    assert runnable(problem, found, cost_model.hw.devices_per_node) is None
    assert 0 < spent <= 10**6
    # a budget below one simulation simulates nothing; a lower ceiling than any schedule reaches takes nothing
    assert tighten_waves(problem, cost_model, start, start_sim, budget=0) == (start, start_sim, 0)
    assert tighten_waves(problem, cost_model, start, start_sim, budget=10 * split_cost(problem, start),
                         ceiling=start_sim.iteration_time_s * 0.5)[0] == start
    assert tighten_waves(problem, cost_model, start, start_sim, budget=10**6) == (found, sim, spent)
    # the planner's own search (its budget) finds a plan no slower than the loose one, with less compute
    assert tight.plan.predicted.iteration_time_s <= outcome.plan.predicted.iteration_time_s
    assert waves_compute(problem, tight.solve.schedule) < waves_compute(problem, outcome.solve.schedule)


def test_plan_job_tightens_and_the_plan_loads_with_its_program(clip10_8):
    job, _, loose, outcome = clip10_8
    plan = outcome.plan
    assert TIGHTENED not in loose.plan.solver.method
    assert TIGHTENED in plan.solver.method
    check_program(plan_from_json(plan.to_json(), "tight"), build_metagraph(job).metaops, "tight")
    assert plan.predicted.iteration_time_s == outcome.simulation.iteration_time_s
    assert plan.solver.objective_s == pytest.approx(compute_makespan(outcome.problem, outcome.solve.schedule), rel=1e-12)

