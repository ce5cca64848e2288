"""Tightening the chosen plan's waves (planner.tighten): less waves' compute, never a longer predicted iteration."""

from __future__ import annotations

import pytest

from bench.planner.cells import Cell, load_cell_job
from planner.api import make_cost_model, plan_placed
from planner.bucketsplit import split_cost
from planner.candidates import runnable, schedule_of
from planner.leastcompute import waves_compute
from planner.metagraph import build_metagraph
from planner.placement import PlacedSchedule, place_schedule
from planner.plan import plan_from_json
from planner.schedule import Problem, check_schedule, compute_makespan
from planner.simulator import simulate
from planner.spindle import spindle_schedule
from planner.tighten import TIGHTENED, _compute, catch_ups, layer_moves, tighten_waves
from planner.validate import check_program


@pytest.fixture(scope="module")
def spindle4_8():
    """Spindle's wavefront on clip-4@8, placed: its waves are balanced on their slowest slices, so a wave whose
    ViT-H slice (a quarter of its time in forward: recomputed) runs beside the text towers (a third) lasts more than its
    slowest slice on the timeline; the planner's own waves are priced that way already."""
    job = load_cell_job(Cell("clip-4", 8, "grid"))
    cost_model = make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cost_model)
    placed = place_schedule(problem, spindle_schedule(problem), cost_model)
    return job, cost_model, problem, placed, simulate(problem, placed, cost_model)


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


def test_moves_keep_every_layer_once_in_order_and_catch_ups_keep_each_device_s_work(spindle4_8):
    _, _, problem, joined, _ = spindle4_8
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


def test_the_search_lowers_compute_never_the_iteration_and_is_deterministic(spindle4_8):
    _, cost_model, problem, start, start_sim = spindle4_8
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


def test_a_tightened_plan_loads_with_its_program(spindle4_8):
    job, cost_model, problem, start, start_sim = spindle4_8
    found, sim, _ = tighten_waves(problem, cost_model, start, start_sim, budget=10**6)
    plan = plan_placed(job, found, cost_model, "spindle" + TIGHTENED)
    check_program(plan_from_json(plan.to_json(), "tight"), build_metagraph(job).metaops, "tight")
    assert plan.predicted.iteration_time_s == sim.iteration_time_s
    assert plan.solver.objective_s == pytest.approx(compute_makespan(problem, schedule_of(found)), rel=1e-12)
