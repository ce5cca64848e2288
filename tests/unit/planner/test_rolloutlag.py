"""``training.rollout_lag: 1`` priced as a pipeline (planner.rolloutlag) on the small GRPO job of test_generation: a
generation pool of its own hides the generation behind the rest, a colocated placement hides nothing, and both keep
the rows decoded a step ahead (no second copy of the weights), which the placer's memory check counts; the field's
one-line errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from orchestrator.render import format_seconds, render_plan_text
from planner.api import make_cost_model, plan_job
from planner.bound import iteration_bound
from planner.errors import PlanningError
from planner.metagraph import build_metagraph
from planner.placement import check_memory, placed_ledger
from planner.rlbaselines import (
    SPLIT_SIMULATED, _op_seconds, _used_devices, colocated_schedule, pool_sizes, split_at, split_candidates,
    split_estimates, split_schedule,
)
from planner.rolloutlag import generation_pool, lagged_generate
from planner.schedule import Problem
from planner.simulator import simulate
from planner.spec import parse_job
from tests.unit.planner.test_generation import grpo

SIZES = {"policy@generate": 2, "reward": 1, "reference": 1, "policy": 4}  # 8 devices, generation on 2 of its own


def problems(devices: int = 8):
    out = []
    for lag in (0, 1):
        job = parse_job(grpo(devices, rollout_lag=lag))
        cost_model = make_cost_model(job)
        out.append((Problem.build(build_metagraph(job), cost_model), cost_model))
    return out


def test_a_generation_pool_of_its_own_runs_beside_the_rest_and_keeps_the_rows_ahead():
    _, (lagged, cm) = problems()
    # the synchronous twin of the lagged job: its rows are as wide (P + 3N with the behaviour log-probabilities)
    sync = Problem.build(dataclasses.replace(lagged.graph, rollout_lag=0), cm)
    placed = split_schedule(sync, SIZES)
    a, b = simulate(sync, placed, cm), simulate(lagged, placed, cm)
    gen = a.wave_durations[0]  # the rollouts' wave: the generation alone on its pool
    assert {s.metaop for s in placed.waves[0].slices} == {0} and gen > 0
    rest = a.iteration_time_s - a.handoff_s - a.reduce_s - gen
    # the hand-off follows both sides (the runtime's exchange blocks sender and receiver): it is not hidden
    assert b.iteration_time_s == pytest.approx(max(gen, rest) + a.handoff_s + a.reduce_s, rel=1e-12)
    assert a.handoff_s > 0 and b.iteration_time_s < a.iteration_time_s
    assert b.lag_hidden_s == pytest.approx(a.iteration_time_s - b.iteration_time_s, rel=1e-12)
    rollout = sync.graph.metaops[0]
    rows = rollout.layer.out_bytes * rollout.batch_size / 2  # each of the 2 generating devices: half the rows
    assert 0 < rows < 0.01 * rollout.gen.decoder.params * cm.weight_bytes  # far below a copy of the weights
    # the devices the runtime decodes ahead on beside the step (runtime.executor): the generation's pool, by the same
    # rule; none when colocated
    slices = lambda p: ([(s.metaop, s.devices) for s in w.slices] for w in p.waves)  # noqa: E731
    assert generation_pool(slices(placed), lagged_generate(lagged.graph)) == {0, 1}
    assert generation_pool(slices(colocated_schedule(lagged)), lagged_generate(lagged.graph)) == set()
    for d in range(8):  # the rows decoded ahead, on the generating devices only
        assert b.peak_memory_bytes[d] == pytest.approx(a.peak_memory_bytes[d] + (rows if d < 2 else 0.0), rel=1e-12)


def test_colocated_hides_nothing_and_its_rows_ahead_can_make_a_plan_not_fit():
    (sync, cm), (lagged, _) = problems()
    placed = colocated_schedule(sync)
    a, b = simulate(sync, placed, cm), simulate(lagged, placed, cm)
    assert b.iteration_time_s == a.iteration_time_s and b.lag_hidden_s == 0.0
    assert max(b.peak_memory_bytes) > max(a.peak_memory_bytes)
    # the placer's check (the same ledger the simulator's peak comes from): a device memory between the two peaks
    # fits the on-policy plan and refuses the lagged one, naming its device
    memory = (max(a.peak_memory_bytes) + max(b.peak_memory_bytes)) / 2
    check_memory(placed_ledger(sync, placed, cm), memory, cm.hw.devices_per_node)
    with pytest.raises(PlanningError, match="device 0 .* needs"):
        check_memory(placed_ledger(lagged, placed, cm), memory, cm.hw.devices_per_node)


@pytest.mark.parametrize("training, needle", [
    ({"rollout_lag": 2}, "rollout_lag"),
])
def test_bad_lag_values_are_refused(training, needle):
    with pytest.raises(ValueError, match=needle):
        parse_job(grpo(4, **training))


def test_a_lag_needs_a_grpo_task_with_rollouts():
    spec = grpo(4, rollout_lag=1)
    spec["tasks"][0]["loss"] = "lm"
    with pytest.raises(ValueError, match=r"training.rollout_lag \(1\) needs a task with a grpo loss"):
        parse_job(spec)


def test_the_split_search_estimates_the_lagged_pipeline():
    """At lag 1 the split search ranks pool vectors by the pipeline: the generation beside the slowest other role
    (each on its own pool), not after it."""
    (sync, _), (lagged, _) = problems()
    sizes = np.array([[2, 1, 1, 4], [4, 1, 1, 2]])
    for row, s, t in zip(sizes, split_estimates(sync, sizes), split_estimates(lagged, sizes)):
        secs = [_op_seconds(sync, m, int(n), 1) for m, n in enumerate(row)]
        assert s == pytest.approx(secs[0] + max(secs[1:]), rel=1e-12)
        assert t == pytest.approx(max(secs[0], max(secs[1:])), rel=1e-12)


def test_the_split_search_simulates_distinct_placements_and_split_at_prices_given_pools():
    (_, _), (lagged, cm) = problems()
    found = split_candidates(lagged)
    used = _used_devices(lagged, np.array([list(c.values()) for c in found]), 1)
    assert len(found) == SPLIT_SIMULATED and len({tuple(u) for u in used}) == len(found)
    placed, sim = split_at(lagged, cm, SIZES)
    assert pool_sizes(lagged, placed) == SIZES and sim.lag_hidden_s > 0
    assert split_at(lagged, cm, {**SIZES, "policy": 8}) is None  # 14 devices of 8: not a split


def test_the_iteration_bound_holds_for_the_lagged_period():
    # the synchronous iteration's bound is above the period of a generation pool of its own: with the lag the bound
    # is the largest of half of it, the bound of the rest and one period's work (planner.bound.iteration_bound)
    (sync, cm), (lagged, _) = problems()
    _, split = split_at(lagged, cm, SIZES)
    periods = [split.iteration_time_s, simulate(lagged, colocated_schedule(lagged), cm).iteration_time_s]
    assert split.lag_hidden_s > 0 and iteration_bound(sync, cm) > split.iteration_time_s
    assert 0 < iteration_bound(lagged, cm) <= min(periods)
    assert iteration_bound(lagged, cm) >= iteration_bound(sync, cm) / 2


def test_the_lagged_bound_counts_one_period_s_work_of_every_metaop():
    """One step's MetaOps, side by side without precedence, within a period (planner.bound): above half the
    synchronous bound here (3.27 ms against 1.92 ms) and still below the period of every split the search simulates
    and of the colocated placement (the best 3.29 ms)."""
    _, (lagged, cm) = problems()
    bound = iteration_bound(lagged, cm)
    synchronous = dataclasses.replace(lagged, graph=dataclasses.replace(lagged.graph, rollout_lag=0))
    assert bound > 1.5 * iteration_bound(synchronous, cm) / 2
    periods = [simulate(lagged, colocated_schedule(lagged), cm).iteration_time_s]
    periods += [split_at(lagged, cm, sizes)[1].iteration_time_s for sizes in split_candidates(lagged)]
    assert len(periods) == 1 + SPLIT_SIMULATED
    assert bound <= min(periods) <= 1.02 * bound


def test_the_plan_says_what_the_lag_hides_and_its_parts_add_up():
    job = parse_job(grpo(8, rollout_lag=1))
    plan = plan_job(job, make_cost_model(job)).plan
    pred = plan.predicted
    parts = (pred.compute_s + pred.transfer_s + pred.sync_s + pred.optimizer_s + pred.gather_s + pred.handoff_s
             + pred.reduce_s)
    assert pred.lag_hidden_s > 0 and parts - pred.lag_hidden_s == pytest.approx(pred.iteration_time_s, rel=1e-9)
    text = render_plan_text(plan, width=400)
    assert f"- generation hidden behind the previous step {format_seconds(pred.lag_hidden_s)}" in text
    assert 0 < plan.bounds.iteration_s <= pred.iteration_time_s


def test_with_a_short_generation_the_lagged_bound_is_the_rest():
    # the generation made 100 times faster: half the synchronous bound is below what the rest alone needs, and the
    # bound (every other MetaOp waits for the rollouts) is the synchronous bound of the rest, still below every period
    _, (lagged, cm) = problems()
    early = lagged_generate(lagged.graph)

    def scaled(problem, factor):
        return dataclasses.replace(problem, curves=tuple(
            dataclasses.replace(c, times=tuple(t * factor for t in c.times)) if m in early else c
            for m, c in enumerate(problem.curves)))

    lagged = scaled(lagged, 0.01)
    synchronous = dataclasses.replace(lagged, graph=dataclasses.replace(lagged.graph, rollout_lag=0))
    rest = iteration_bound(scaled(synchronous, 1e-12), cm)
    bound = iteration_bound(lagged, cm)
    assert bound == pytest.approx(rest) and bound > iteration_bound(synchronous, cm) / 2
    periods = [split_at(lagged, cm, SIZES)[1].iteration_time_s,
               simulate(lagged, colocated_schedule(lagged), cm).iteration_time_s]
    assert bound <= min(periods)
