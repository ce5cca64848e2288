"""Bucket splitting (planner.bucketsplit): a cut wave keeps every device's work and memory, makes two gradient buckets
of one, and the search keeps only cuts that shorten the simulated iteration, within its budget; plan_job's split plans load
and carry the program their waves give."""

from __future__ import annotations

import pytest

from bench.planner.cells import Cell, load_cell_job
from planner.api import make_cost_model, plan_job
from planner.bucketsplit import SPLIT, end_waves, split_buckets, split_cost, split_wave, unsplit
from planner.candidates import runnable, schedule_of
from planner.metagraph import build_metagraph
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave
from planner.plan import plan_from_json
from planner.refine import evaluate
from planner.schedule import check_schedule, compute_makespan, reverse_runs
from planner.simulator import simulate
from planner.spindle import spindle_schedule
from planner.validate import check_program


@pytest.fixture(scope="module")
def clip4_32():
    """clip-4 on 32 devices (Spindle's grid): one level, a ViT-H over four nodes whose sync outlasts the backward."""
    job = load_cell_job(Cell("clip-4", 32, "grid"))
    cost_model = make_cost_model(job)
    return job, cost_model, plan_job(job, cost_model, with_baselines=False, progress=lambda msg: None)


def per_device_layers(placed: PlacedSchedule) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """(device, MetaOp) -> the (first layer, count) runs it executes, contiguous runs joined."""
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for wave in placed.waves:
        for s in wave.slices:
            for d in s.devices:
                runs = out.setdefault((d, s.metaop), [])
                if runs and runs[-1][0] + runs[-1][1] == s.first_layer:
                    runs[-1] = (runs[-1][0], runs[-1][1] + s.num_layers)
                else:
                    runs.append((s.first_layer, s.num_layers))
    return out


def test_a_cut_wave_keeps_work_memory_and_devices_and_makes_two_buckets(clip4_32):
    _, cost_model, outcome = clip4_32
    problem, placed = outcome.problem, outcome.placed
    # the last wave every slice of which has two layers or more: each part holds every slice
    k = max(k for k, w in enumerate(placed.waves) if all(s.num_layers >= 2 for s in w.slices))
    cut = split_wave(placed, k, 0.5)
    assert cut is not None and len(cut.waves) == len(placed.waves) + 1
    assert per_device_layers(cut) == per_device_layers(placed)
    assert {s.devices for s in cut.waves[k].slices} <= {s.devices for s in placed.waves[k].slices}
    assert runnable(problem, cut, cost_model.hw.devices_per_node) is None
    before, after = simulate(problem, placed, cost_model), simulate(problem, cut, cost_model)
    assert after.peak_memory_bytes == pytest.approx(before.peak_memory_bytes, rel=1e-12)
    assert len(after.buckets) > len(before.buckets)
    moved = lambda sim: sorted((t.src_metaop, t.dst_metaop, t.bytes) for t in sim.transfers)
    assert moved(after) == moved(before)  # the parts move no rows between them
    assert unsplit(problem, schedule_of(cut)) == unsplit(problem, schedule_of(placed))  # joined again: the same


def test_a_wave_of_single_layers_cannot_be_cut_and_phases_shift():
    one = PlacedSchedule((PlacedWave((PlacedSlice(0, 0, 1, (0,), None),)),
                          PlacedWave((PlacedSlice(1, 0, 3, (1,), None),))), phases=(0, 1))
    assert split_wave(one, 0, 0.5) is None
    cut = split_wave(one, 1, 1 / 3)
    assert [[(s.first_layer, s.num_layers) for s in w.slices] for w in cut.waves] == [[(0, 1)], [(0, 1)], [(1, 2)]]
    assert cut.phases == (0, 1)
    assert split_wave(PlacedSchedule(one.waves, (0, 1)), 0, 0.5) is None
    assert end_waves(PlacedSchedule(one.waves + one.waves[1:], (0, 1))) == [0, 2, 1]


def test_the_search_shortens_the_iteration_within_its_budget(clip4_32):
    _, cost_model, outcome = clip4_32
    problem = outcome.problem
    # Spindle's schedule in reverse, packed: what the plan's cuts started from, so that the search has something to find
    joined = evaluate(problem, cost_model, reverse_runs(problem, spindle_schedule(problem)), "pack").placed
    start = simulate(problem, joined, cost_model)
    found, sim, spent = split_buckets(problem, cost_model, joined, start, budget=10**6)
    assert sim.iteration_time_s < start.iteration_time_s * 0.99  # the ViT-H's sync starts a wave earlier
    assert sim.sync_s < start.sync_s
    assert sim.iteration_time_s == simulate(problem, found, cost_model).iteration_time_s
    check_schedule(problem, schedule_of(found))
    assert compute_makespan(problem, unsplit(problem, schedule_of(found))) == pytest.approx(
        compute_makespan(problem, unsplit(problem, schedule_of(joined))), rel=1e-12)
    assert 0 < spent <= 10**6
    # a budget smaller than one evaluation evaluates nothing; one of a few evaluations stays within it
    assert split_buckets(problem, cost_model, joined, start, budget=0) == (joined, start, 0)
    small = 3 * split_cost(problem, split_wave(joined, len(joined.waves) - 1, 0.5))
    assert split_buckets(problem, cost_model, joined, start, budget=small)[2] <= small
    # deterministic
    again = split_buckets(problem, cost_model, joined, start, budget=10**6)
    assert again[0] == found and again[2] == spent


def test_plan_job_splits_buckets_and_the_plan_loads_with_its_program(clip4_32):
    job, _, outcome = clip4_32
    plan = outcome.plan
    assert SPLIT in plan.solver.method
    loaded = plan_from_json(plan.to_json(), "split")
    check_program(loaded, build_metagraph(job).metaops, "split")
    # two consecutive waves hold the same slices on the same devices: the cut
    pairs = [(a, b) for a, b in zip(plan.waves, plan.waves[1:])
             if [(s.metaop, s.devices) for s in a.slices] == [(s.metaop, s.devices) for s in b.slices]]
    assert pairs
    firsts = {k for k, (a, b) in enumerate(zip(plan.waves, plan.waves[1:])) if (a, b) in pairs}
    assert firsts <= {b.ready_wave for b in plan.grad_buckets}  # each part's gradients are final after its backward
