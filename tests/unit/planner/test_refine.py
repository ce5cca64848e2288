"""Transfer-aware local search (planner.refine) and its use in choose_candidate: never worse than its start,
within its budget, deterministic, and it removes a transfer that compute alone does not see."""

from __future__ import annotations

import pytest

from conftest import HeadCost, big_and_small

from planner.api import choose_candidate, make_cost_model, plan_job
from planner.bound import dag_bound
from planner.components import LayerSegment
from planner.costmodel import CostModel
from planner.devices import DEVICES, GIB, Hardware
from planner.metagraph import MetaOp, build_metagraph, finalize_graph
from planner.placement import STRATEGIES, place_schedule
from planner.refine import (
    evaluate, evaluation_cost, neighbours, order_neighbours, refine_order, refine_transfers, transfer_ends,
)
from planner.schedule import Problem, Schedule, Slice, Wave, check_schedule, compute_makespan, independent_runs
from planner.simulator import simulate
from planner.solver import SolverSettings, solve
from planner.spec import parse_job
from planner.spindle import spindle_schedule


def encoder_and_head() -> tuple[Problem, CostModel]:
    """An encoder with a 1 GB output batch feeds a light head; an independent filler MetaOp shares the head's wave."""
    cm = HeadCost(Hardware(DEVICES["a800"], 2, 4, 80 * GIB, 200e9, 25e9))
    seg = lambda name, out: LayerSegment(name, 4, 1e9, 1e6, 1e5, out, 1e4, 4)  # noqa: E731
    ops = [
        MetaOp(0, "t0.enc", "t0", "enc", seg("enc", 1e9 / 8), 4, 8, (), "enc", False, 2.0),
        MetaOp(1, "t0.head", "t0", "head", seg("head", 1e3), 2, 8, (0,), "head", False, 2.0),
        MetaOp(2, "t1.fill", "t1", "fill", seg("fill", 1e3), 2, 8, (), "fill", False, 2.0),
    ]
    return Problem.build(finalize_graph(ops), cm), cm


def head_on_one_device() -> Schedule:
    return Schedule((Wave((Slice(0, 4, 8),)), Wave((Slice(1, 2, 1), Slice(2, 2, 4)))))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_refine_widens_a_head_that_receives_a_large_batch(strategy):
    problem, cm = encoder_and_head()
    start = evaluate(problem, cm, head_on_one_device(), strategy)
    assert start is not None and start.sim.transfer_s > 0
    found, spent = refine_transfers(problem, cm, start, budget=1000)
    check_schedule(problem, found.schedule)
    assert found.sim.iteration_time_s < start.sim.iteration_time_s
    assert found.sim.transfer_s < start.sim.transfer_s
    head = next(s for w in found.schedule.waves for s in w.slices if s.metaop == 1)
    assert head.num_devices > 1
    assert 0 < spent <= 1000 + evaluation_cost(problem, found.schedule)
    assert refine_transfers(problem, cm, start, budget=1000) == (found, spent)  # deterministic


def test_refine_without_budget_returns_its_start():
    problem, cm = encoder_and_head()
    start = evaluate(problem, cm, head_on_one_device(), "pack")
    assert refine_transfers(problem, cm, start, budget=0) == (start, 0)


def test_neighbours_change_one_count_at_a_transfer_end_and_fit_their_wave():
    problem, cm = encoder_and_head()
    start = evaluate(problem, cm, head_on_one_device(), "pack")
    ends = transfer_ends(start)
    assert (1, 1) in ends and (0, 0) in ends  # the head's slice and the encoder's slice feeding it
    seen = 0
    for schedule in neighbours(problem, start):
        check_schedule(problem, schedule)
        before = {(k, s.metaop): s for k, w in enumerate(start.schedule.waves) for s in w.slices}
        after = {(k, s.metaop): s for k, w in enumerate(schedule.waves) for s in w.slices}
        changed = [key for key in before if before[key] != after.get(key)]
        assert len(changed) == 1 and changed[0] in ends
        seen += 1
    assert seen > 0


def test_refine_never_returns_a_worse_plan_than_its_start():
    """On a real two-node job: whatever the search visits, the result is at most the start's time."""
    job = parse_job(shared_encoder_job())
    cm = make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cm)
    for strategy in STRATEGIES:
        start = evaluate(problem, cm, spindle_schedule(problem), strategy)
        found, _ = refine_transfers(problem, cm, start, budget=300)
        assert found.sim.iteration_time_s <= start.sim.iteration_time_s


# --------------------------------------------------------------------------- choose_candidate and plan_job


def shared_encoder_job() -> dict:
    """A UniMed-like job on 2 nodes of 8 H100s: one ViT-L encoder shared by three tasks at different
    resolutions, each feeding a light head; the encoder's outputs (up to 1025 tokens x 1024) are large."""
    return {
        "name": "shared-encoder",
        "cluster": {"num_nodes": 2, "devices_per_node": 8, "device": "h100", "inter_node_gbps": 400},
        "components": {
            "encoder": {"kind": "vit", "num_layers": 24, "hidden_size": 1024, "num_heads": 16, "patch_size": 16,
                        "in_channels": 1, "image_size": 224, "tensor_parallel": [1, 2, 4], "recompute": True},
            "queries": {"kind": "decoder", "num_layers": 9, "hidden_size": 256, "num_heads": 8, "seq_len": 100},
            "pixels": {"kind": "transformer", "num_layers": 4, "hidden_size": 1024, "num_heads": 16},
        },
        "tasks": [
            {"name": "classify", "batch_size": 1024,
             "components": [{"component": "encoder", "image_size": 224}, {"component": "queries", "seq_len": 16}]},
            {"name": "segment", "batch_size": 128,
             "components": [{"component": "encoder", "image_size": 512}, {"component": "queries", "seq_len": 100}]},
            {"name": "reconstruct", "batch_size": 2048,
             "components": [{"component": "encoder", "image_size": 224}, {"component": "pixels", "seq_len": 197}]},
        ],
        "planner": {"time_limit_s": 5},
    }


def test_choose_candidate_is_never_worse_than_packing_any_candidate():
    job = parse_job(shared_encoder_job())
    cm = make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cm)
    solved = solve(problem, SolverSettings(time_limit_s=5), warm=spindle_schedule(problem),
                   lower_bound=dag_bound(problem), progress=lambda _: None)
    chosen, placed, sim, _, _ = choose_candidate(problem, cm, solved)
    check_schedule(problem, chosen.schedule)
    packed = [simulate(problem, place_schedule(problem, c.schedule, cm), cm).iteration_time_s
              for c in solved.candidates]
    assert sim.iteration_time_s <= min(packed) * (1 + 1e-12)
    assert simulate(problem, placed, cm) == sim
    # the solver's objective is the chosen schedule's wave compute; the timeline (no barrier) may differ from it
    assert chosen.objective_s == pytest.approx(compute_makespan(problem, chosen.schedule))


def test_shared_encoder_job_beats_sequential_by_moving_little():
    """The wave schedules' compute is far below sequential's, and aligned placement plus the search keep the
    encoder's outputs from crossing the network, so Loom's plan beats the sequential baseline."""
    outcome = plan_job(parse_job(shared_encoder_job()), progress=lambda _: None)
    plan = outcome.plan
    assert plan.predicted.iteration_time_s < 0.97 * plan.baselines["sequential"]
    assert plan.predicted.transfer_s < 0.05 * plan.predicted.iteration_time_s
    assert plan.predicted.iteration_time_s <= plan.baselines["spindle"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_neighbour_placed_from_its_start_trace_is_placed_as_from_scratch(strategy):
    """The search places a neighbour from the start's trace (planner.placement.place_traced): the waves they share are
    taken over and the rest placed; the result must equal placing the neighbour from nothing, ledger included."""
    from bench.planner.cells import Cell, load_cell_job
    from planner.placement import place_traced
    from planner.refine import with_count

    job = load_cell_job(Cell("clip-4", 16, "grid"))
    cm = make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cm)
    start = spindle_schedule(problem)
    _, trace = place_traced(problem, start, cm, strategy=strategy)
    checked: set[int] = set()  # waves where a neighbour differs first
    for k, wave in enumerate(start.waves):
        for s in wave.slices[:2]:
            free = problem.num_devices - wave.num_devices + s.num_devices
            for count in (c for c in problem.curves[s.metaop].counts if c != s.num_devices and c <= free):
                other = with_count(problem, start, k, s.metaop, count)
                try:
                    fresh = place_schedule(problem, other, cm, strategy=strategy)
                except Exception as exc:  # noqa: BLE001 - the resumed placement must fail the same way
                    with pytest.raises(type(exc)):
                        place_traced(problem, other, cm, strategy=strategy, resume=trace)
                    continue
                resumed, again = place_traced(problem, other, cm, strategy=strategy, resume=trace)
                assert resumed == fresh
                assert again.committed == place_traced(problem, other, cm, strategy=strategy)[1].committed
                checked.add(k)
    assert len(checked) >= 3  # resumed after 0, 1, 2... shared waves


# --------------------------------------------------------------------------- the order search


def test_order_neighbours_move_one_wave_to_an_end_of_its_run():
    problem, _, schedule = big_and_small()
    swapped = Schedule(schedule.waves[::-1])
    # the first wave to the end, the last to the start
    assert list(order_neighbours(problem, schedule)) == [swapped, swapped]
    job = parse_job(shared_encoder_job())
    cm = make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cm)
    spindle = spindle_schedule(problem)
    runs = independent_runs(problem, spindle)
    seen = list(order_neighbours(problem, spindle))
    assert len(seen) == sum(2 * (end - first) - 2 for first, end in runs if end - first > 1)
    for moved in seen:
        check_schedule(problem, moved)
        assert compute_makespan(problem, moved) == pytest.approx(compute_makespan(problem, spindle))
        for first, end in runs:  # a wave stays in its run: the same waves, another order
            assert sorted(map(repr, moved.waves[first:end])) == sorted(map(repr, spindle.waves[first:end]))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_refine_order_runs_the_wave_with_the_large_gradient_last_in_forward(strategy):
    problem, cm, schedule = big_and_small()
    start = evaluate(problem, cm, schedule, strategy)
    assert start.sim.sync_s > 0
    found, spent = refine_order(problem, cm, start, budget=100)
    assert [s.metaop for w in found.schedule.waves for s in w.slices] == [1, 0]
    assert found.sim.sync_s < start.sim.sync_s and found.sim.iteration_time_s < start.sim.iteration_time_s
    assert found.sim.compute_s == pytest.approx(start.sim.compute_s)
    assert 0 < spent <= 100
    assert refine_order(problem, cm, start, budget=100) == (found, spent)  # deterministic
    assert refine_order(problem, cm, start, budget=1) == (start, 0)  # not one evaluation affordable
    again, _ = refine_order(problem, cm, found, budget=100)
    assert again is found  # nothing left to move
