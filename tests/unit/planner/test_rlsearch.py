"""The role-placement searches' work budget, the vectorised split estimate, and streamed rollouts (the rows in chunks,
generation on a pool of its own) priced and memory-checked like every placement, on the small GRPO job of
test_generation."""

from __future__ import annotations

import numpy as np
import pytest

from planner.api import make_cost_model
from planner.metagraph import build_metagraph
from planner.rlbaselines import (
    RL_SEARCH_BUDGET, Work, _op_seconds, _search, _search_versions, colocated_schedule, rl_budget, rl_schedules,
    role_of, roles, split_candidates, split_estimates, tightened,
)
from planner.schedule import Problem
from planner.simulator import simulate
from planner.generation import decode_batches
from planner.streamed import streamed_candidate, streamed_job, streamed_problem
from planner.spec import parse_job
from tests.unit.planner.test_generation import grpo, setup


def test_split_estimate_is_the_list_schedule_of_the_roles():
    """The DAG is rollout -> {reward, reference, policy}, each role its own pool: the estimate is the generation on
    its pool, then the slowest scorer or trainer on its own pool."""
    _, _, problem = setup(8)
    names = roles(problem)
    assert names == ["policy@generate", "reward", "reference", "policy"]
    sizes = np.array([[2, 2, 2, 2], [4, 1, 1, 2], [1, 1, 1, 1], [1, 1, 2, 4]])
    got = split_estimates(problem, sizes)
    for row, t in zip(sizes, got):
        pool = dict(zip(names, row))
        secs = {m: _op_seconds(problem, m, int(pool[role_of(problem, m)]), 1) for m in range(4)}
        assert t == pytest.approx(secs[0] + max(secs[1], secs[2], secs[3]), rel=1e-12)
    assert secs[0] > 0 and got[0] != got[1]


def test_the_budget_stops_the_search_deterministically():
    _, cost_model, problem = setup(8)
    simulated = []

    def build(p, k, w):  # four placements of one layout version (the only one here: everything fits)
        for _ in range(4):
            simulated.append(k)
            yield colocated_schedule(p, k)

    units = sum(len(w.slices) for w in colocated_schedule(problem).waves)  # 8 devices: one 64-device block
    tiny = Work(1)
    assert _search_versions(problem, cost_model, build, tiny) is not None
    assert tiny.spent == units and not tiny.left()  # the first placement is always simulated, then it stops
    assert len(simulated) == 2  # the second was built, then the spent budget stopped the search
    simulated.clear()
    full = Work()
    _search_versions(problem, cost_model, build, full)
    assert len(tightened(problem, cost_model, 1)) == 1 and simulated == [1] * 4  # one stage fits: no more stages
    assert full.spent == 4 * units <= RL_SEARCH_BUDGET
    # from the limit, never the clock
    assert rl_budget(10) == 600 and rl_budget(1e6) == RL_SEARCH_BUDGET


def test_a_short_budget_still_finds_a_placement_that_fits():
    """Devices just too small for every role's whole model beside the others (test_generation's case): the first
    placements do not fit, and the search goes on past a tiny budget (up to RL_SEARCH_BUDGET) to stages that fit."""
    data = grpo(8)
    _, cost_model, problem = setup(8)
    data["cluster"]["memory_gib"] = 0.8 * max(simulate(problem, colocated_schedule(problem), cost_model)
                                              .peak_memory_bytes) / 2**30
    job = parse_job(data)
    cost_model = make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cost_model)
    work = Work(1)
    placed, sim = _search(problem, cost_model, lambda p, k, w: [colocated_schedule(p, k)], work)
    assert max(sim.peak_memory_bytes) <= cost_model.hw.memory_bytes and work.fits
    assert 1 < work.spent <= RL_SEARCH_BUDGET
    assert rl_schedules(problem, cost_model, 1).keys() == rl_schedules(problem, cost_model).keys()


def test_a_short_budget_coarsens_the_split_grain():
    _, _, problem = setup(8)
    fine = split_candidates(problem)
    assert any(n % 2 for s in fine for n in s.values())  # grain 1 at 8 devices
    work = Work(1e-3)
    assert split_candidates(problem, 1, work) == fine  # nothing fits yet: the search may go on
    work.fits = True  # once something fits, the budget binds
    coarse = split_candidates(problem, 1, work)
    assert coarse and all(n % 2 == 0 for s in coarse for n in s.values())
    assert work.spent > 0


def test_streamed_job_keeps_sample_groups_whole():
    job = parse_job(grpo(8))
    two = streamed_job(job, 2)
    assert two.training.grad_accum_steps == 2 and job.training.grad_accum_steps == 1
    assert streamed_job(job, 8) is None  # 2 rows a chunk would split a group of 4 samples
    assert streamed_job(two, 2) is None  # already accumulating


def test_streamed_rollouts_overlap_generation_with_scoring_and_fit():
    """Chunk i+1 is generated while chunk i is scored and trained: the generate slices have devices of their own,
    the plan fits in device memory (the ledger's peak), and the iteration is shorter than the chunks run one after
    another on the same placement."""
    job = parse_job(grpo(8))
    cost_model = make_cost_model(streamed_job(job, 2))
    problem = streamed_problem(job, 2, cost_model)
    assert problem.graph.num_micro_batches == 2 and decode_batches(problem.graph.metaops[0]) == 1
    placed, sim = streamed_candidate(problem, cost_model)
    gen = {d for w in placed.waves for s in w.slices if s.metaop == 0 for d in s.devices}
    rest = {d for w in placed.waves for s in w.slices if s.metaop != 0 for d in s.devices}
    assert gen and rest and not gen & rest
    assert max(sim.peak_memory_bytes) <= cost_model.hw.memory_bytes
    assert sim.iteration_time_s == simulate(problem, placed, cost_model).iteration_time_s
    one = {m: max(problem.curves[m].time(len(s.devices)) * s.num_layers for w in placed.waves for s in w.slices
                  if s.metaop == m) for m in range(4)}
    serial = 2 * (one[0] + max(one[1], one[2]) + one[3])  # no overlap: a lower estimate of two chunks in turn
    assert sim.compute_s < serial
    _, cost_model, problem = setup(8)
    assert streamed_candidate(problem, cost_model) is None  # one micro-batch: nothing to stream
