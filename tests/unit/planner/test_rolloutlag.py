"""``training.rollout_lag: 1`` priced as a pipeline (planner.rolloutlag) on the small GRPO job of test_generation: a
generation pool of its own hides the generation behind the rest, a colocated placement hides nothing, and both hold
a second copy of the generating weights; the field's one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from planner.api import make_cost_model
from planner.metagraph import build_metagraph
from planner.rlbaselines import (
    SPLIT_SIMULATED, _op_seconds, _used_devices, colocated_schedule, pool_sizes, split_at, split_candidates,
    split_estimates, split_schedule,
)
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


def test_a_generation_pool_of_its_own_runs_beside_the_rest_and_holds_a_second_copy():
    (sync, cm), (lagged, _) = problems()
    placed = split_schedule(sync, SIZES)
    a, b = simulate(sync, placed, cm), simulate(lagged, placed, cm)
    gen = a.wave_durations[0]  # the rollouts' wave: the generation alone on its pool
    assert {s.metaop for s in placed.waves[0].slices} == {0} and gen > 0
    rest = a.iteration_time_s - a.handoff_s - a.reduce_s - gen
    assert b.iteration_time_s == pytest.approx(max(gen + a.handoff_s, rest) + a.reduce_s, rel=1e-12)
    assert b.iteration_time_s < a.iteration_time_s
    assert b.lag_hidden_s == pytest.approx(a.iteration_time_s - b.iteration_time_s, rel=1e-12)
    decoder = sync.graph.metaops[0].gen.decoder
    for d in range(8):  # the behaviour copy on the generating devices only (data parallel: whole weights each)
        extra = decoder.params * cm.param_bytes_moved if d < 2 else 0.0
        assert b.peak_memory_bytes[d] == pytest.approx(a.peak_memory_bytes[d] + extra, rel=1e-9)


def test_colocated_hides_nothing_and_pays_the_copy():
    (sync, cm), (lagged, _) = problems()
    placed = colocated_schedule(sync)
    a, b = simulate(sync, placed, cm), simulate(lagged, placed, cm)
    assert b.iteration_time_s == a.iteration_time_s and b.lag_hidden_s == 0.0
    assert max(b.peak_memory_bytes) > max(a.peak_memory_bytes)


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
