"""The role-placement searches' work budget, the vectorised split estimate, and streamed rollouts (the rows in chunks,
generation on a pool of its own) priced and memory-checked like every placement, on the small GRPO job of
test_generation."""

from __future__ import annotations

import time

import numpy as np
import pytest

from planner.api import make_cost_model
from planner.metagraph import build_metagraph
from planner.rlbaselines import (
    GEN_SHARES, RL_SEARCH_BUDGET, RoleBudget, Work, _distinct, _op_seconds, _search, _search_versions,
    colocated_schedule, level_split_schedule, rl_budget, rl_schedules, role_of, roles, split_candidates,
    split_estimates, tightened,
)
from planner.schedule import Problem
from planner.simulator import simulate
from planner.generation import decode_batches
from planner.streamed import streamed_candidate, streamed_job, streamed_problem
from planner.spec import parse_job
from tests.unit.planner.test_generation import grpo, setup


def test_distinct_pool_sizes_are_numpy_unique_by_counting():
    rng = np.random.default_rng(0)
    for values in (np.array([3]), rng.integers(0, 70, 1000), rng.integers(1, 9, 40_000) * 8):
        distinct, at = _distinct(values)
        expected, inverse = np.unique(values, return_inverse=True)
        assert distinct.tolist() == expected.tolist() and at.tolist() == inverse.tolist()


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
    tiny = Work(RoleBudget(1))
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


def test_past_the_deadline_a_search_stops_once_a_placement_fits():
    """The deadline is a safety cap: a search whose planner time limit has passed simulates until it has a
    placement that fits, then stops, whatever units are left; one that has nothing fitting yet goes on."""
    _, cost_model, problem = setup(8)
    simulated = []

    def build(p, k, w):
        for _ in range(4):
            simulated.append(k)
            yield colocated_schedule(p, k)

    late = Work(RoleBudget(RL_SEARCH_BUDGET, deadline=time.thread_time()))
    assert late.left() == RL_SEARCH_BUDGET  # nothing fits yet: the units decide
    assert _search_versions(problem, cost_model, build, late) is not None
    assert late.fits and late.left() == 0 and len(simulated) == 2  # the first fit, then the deadline stopped it
    simulated.clear()
    _search_versions(problem, cost_model, build, Work(RoleBudget(RL_SEARCH_BUDGET, deadline=time.thread_time() + 60)))
    assert len(simulated) == 4  # a deadline not reached: the units decide


def test_a_short_budget_still_finds_a_placement_that_fits():
    """Devices just too small for every role's whole model beside the others (test_generation's case): the first
    placements do not fit, and the search goes on past a tiny budget (up to RL_SEARCH_BUDGET) to stages that fit."""
    cost_model, problem = tight_memory(0.8)
    work = Work(RoleBudget(1))
    placed, sim = _search(problem, cost_model, lambda p, k, w: [colocated_schedule(p, k)], work)
    assert max(sim.peak_memory_bytes) <= cost_model.hw.memory_bytes and work.fits
    assert 1 < work.spent <= RL_SEARCH_BUDGET
    assert rl_schedules(problem, cost_model, RoleBudget(1)).keys() == rl_schedules(problem, cost_model).keys()


def tight_memory(share: float):
    """The small GRPO job on devices of ``share`` of its colocated placement's peak memory."""
    data = grpo(8)
    _, cost_model, problem = setup(8)
    data["cluster"]["memory_gib"] = share * max(simulate(problem, colocated_schedule(problem), cost_model)
                                                .peak_memory_bytes) / 2**30
    job = parse_job(data)
    cost_model = make_cost_model(job)
    return cost_model, Problem.build(build_metagraph(job), cost_model)


@pytest.mark.parametrize("share", [0.8, 0.4])
def test_the_search_simulates_placements_that_do_not_fit_only_when_none_does(monkeypatch, share):
    """The search keeps what simulating every placement and taking the best by (does not fit, predicted iteration)
    keeps; placements that do not fit (by the memory ledger) are simulated only when none fits (share 0.4: none
    does, and the fastest of them is the result)."""
    import planner.rlbaselines as rlbaselines

    cost_model, problem = tight_memory(share)
    seen = []

    def build(p, k, w):
        for alone in (False, True):
            for gen_share in GEN_SHARES:
                placed = level_split_schedule(p, k, alone, gen_share)
                seen.append((p, placed))
                yield placed

    simulated = []
    monkeypatch.setattr(rlbaselines, "simulate", lambda p, placed, cm: simulated.append(placed) or simulate(
        p, placed, cm))
    placed, sim = _search_versions(problem, cost_model, build, Work())
    sims = [(p, q, simulate(p, q, cost_model)) for p, q in seen if q is not None]
    fits = [max(x.peak_memory_bytes) <= cost_model.hw.memory_bytes for _, _, x in sims]
    best = min(range(len(sims)), key=lambda i: (not fits[i], sims[i][2].iteration_time_s))
    assert placed is sims[best][1] and sim.iteration_time_s == sims[best][2].iteration_time_s
    assert any(fits) == (share == 0.8) and not all(fits)
    # with something that fits, no placement that does not fit was simulated
    assert len(simulated) == (sum(fits) if any(fits) else len(sims))


def test_a_short_budget_coarsens_the_split_grain():
    _, _, problem = setup(8)
    fine = split_candidates(problem)
    assert any(n % 2 for s in fine for n in s.values())  # grain 1 at 8 devices
    work = Work(RoleBudget(1e-3))
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
