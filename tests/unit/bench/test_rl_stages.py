"""bench/rl/stages.py: runs of pipeline-stage waves are found, and re-priced as 1F1B ((m + p - 1) / m x the slowest
stage, m = 4p) in place of their sum, on- and off-policy; a placement without stages keeps its prediction."""

from __future__ import annotations

import pytest

from bench.rl.stages import MICRO_PER_STAGE, pipelined_s, stage_runs
from planner.api import make_cost_model
from planner.metagraph import build_metagraph
from planner.rlbaselines import colocated_schedule
from planner.schedule import Problem
from planner.simulator import simulate
from planner.spec import parse_job
from tests.unit.planner.test_generation import grpo


@pytest.mark.parametrize("lag", [0, 1])
def test_stage_waves_are_priced_as_1f1b(lag):
    job = parse_job(grpo(4, rollout_lag=lag))
    cm = make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cm)
    flat = colocated_schedule(problem)
    staged = colocated_schedule(problem, stages=2)  # each 2-layer MetaOp in 2 stages of 2 devices
    assert stage_runs(flat) == [] and stage_runs(staged) == [[1, 2], [3, 4], [5, 6]]
    sim = simulate(problem, flat, cm)
    assert pipelined_s(problem, flat, sim) == pytest.approx(sim.iteration_time_s, rel=1e-12)
    sim = simulate(problem, staged, cm)
    m = MICRO_PER_STAGE * 2
    saved = sum(sum(sim.wave_durations[k] for k in run) - (m + 1) / m * max(sim.wave_durations[k] for k in run)
                for run in stage_runs(staged))
    assert saved > 0
    # colocated: nothing overlaps at lag 1 either, so the saving comes off the iteration as it is
    assert pipelined_s(problem, staged, sim) == pytest.approx(sim.iteration_time_s - saved, rel=1e-9)
