"""The order of a placed plan's waves (planner.waveorder): a moved wave keeps its slices on their devices and the
MetaOps' layers follow the new order; the search stays inside independent runs and phases, only takes what shortens
the predicted iteration, within its budget, and plan_job's last step never makes a plan slower."""

from __future__ import annotations

import pytest
from conftest import big_and_small

from bench.planner.cells import Cell, load_cell_job
from planner import api
from planner.api import plan_job
from planner.candidates import runnable, schedule_of
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave, place_schedule
from planner.schedule import check_schedule
from planner.simulator import simulate
from planner.waveorder import REORDERED_IN_PLACE, move_wave, reorder_placed, wave_moves


def per_device(placed: PlacedSchedule) -> list[tuple[int, int, int]]:
    """(device, MetaOp, layers) of every slice on every device, sorted: what a reorder must not change."""
    return sorted((d, s.metaop, s.num_layers) for w in placed.waves for s in w.slices for d in s.devices)


def test_a_moved_wave_keeps_its_devices_and_the_layers_follow_the_order():
    a, b, c = (PlacedWave((PlacedSlice(0, 0, 2, (0, 1), None), PlacedSlice(1, 0, 3, (2,), None))),
               PlacedWave((PlacedSlice(1, 3, 1, (0, 1, 2), None),)),
               PlacedWave((PlacedSlice(0, 2, 4, (2,), None), PlacedSlice(1, 4, 2, (0, 1), None))))
    placed = PlacedSchedule((a, b, c), (0,))
    moved = move_wave(placed, 2, 0)
    assert [[(s.metaop, s.first_layer, s.num_layers, s.devices) for s in w.slices] for w in moved.waves] == [
        [(0, 0, 4, (2,)), (1, 0, 2, (0, 1))], [(0, 4, 2, (0, 1)), (1, 2, 3, (2,))], [(1, 5, 1, (0, 1, 2))]]
    assert per_device(moved) == per_device(placed)
    assert move_wave(moved, 0, 2) == placed  # and back
    assert move_wave(move_wave(placed, 0, 2), 2, 0) == placed


def test_moves_stay_inside_runs_and_phases():
    problem, cm, schedule = big_and_small()
    placed = place_schedule(problem, schedule, cm)
    swapped = move_wave(placed, 0, 1)
    assert list(wave_moves(problem, placed)) == [swapped, swapped]
    assert list(wave_moves(problem, PlacedSchedule(placed.waves, (0, 1)))) == []  # each wave its own phase


@pytest.mark.parametrize("budget", [10, 1000])
def test_the_search_runs_the_large_gradient_first_and_never_slower(budget):
    problem, cm, schedule = big_and_small()
    placed = place_schedule(problem, schedule, cm)
    start = simulate(problem, placed, cm)
    found, sim, spent = reorder_placed(problem, cm, placed, start, budget)
    assert [s.metaop for w in found.waves for s in w.slices] == [1, 0]  # the big gradient's backward now runs first
    assert sim.iteration_time_s < start.iteration_time_s and sim.sync_s < start.sync_s
    assert sim == simulate(problem, found, cm) and per_device(found) == per_device(placed)
    check_schedule(problem, schedule_of(found))
    assert runnable(problem, found, cm.hw.devices_per_node) is None
    assert 0 < spent <= budget
    assert reorder_placed(problem, cm, placed, start, budget) == (found, sim, spent)  # deterministic
    assert reorder_placed(problem, cm, placed, start, 0) == (placed, start, 0)
    assert reorder_placed(problem, cm, found, sim, budget)[0] is found  # nothing left to move


def test_plan_job_reorders_last_and_never_slower(monkeypatch):
    """clip-4@32: the plan (priced without ZeRO-1, as it runs) is at most what it is without the last order search."""
    job = load_cell_job(Cell("clip-4", 32, "grid"))
    planned = plan_job(job, with_baselines=False, progress=lambda _: None)
    monkeypatch.setattr(api, "reorder_chosen", lambda problem, cm, result, placed, sim, budget: (result, placed, sim))
    before = plan_job(job, with_baselines=False, progress=lambda _: None)
    assert planned.simulation.iteration_time_s <= before.simulation.iteration_time_s
    if planned.solve.method.endswith(REORDERED_IN_PLACE):
        assert planned.simulation.iteration_time_s < before.simulation.iteration_time_s
        assert per_device(planned.placed) == per_device(before.placed)
    else:
        assert planned.placed == before.placed
