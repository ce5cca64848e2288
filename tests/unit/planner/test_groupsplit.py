"""The sync-aware group split (planner.groupsplit): gradient sync inside the device allocation. On a small hand-made
job the compute-only ranking picks the plan that is slower once sync is priced, and the split is faster; its sizes
trade devices for sync; plan_job adopts it (deterministically) where sync binds; a tight limit skips it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from planner import groupsplit
from planner.api import choose_candidate, plan_job
from planner.groupsplit import (
    SPLIT_METHOD, Unit, affordable, group_split_candidate, group_split_schedule, split_sizes, units_of,
)
from planner.plan import plan_from_json
from planner.solver import SolverSettings, solve
from planner.spec import parse_job
from planner.validate import check_program

from test_baselines import cost_model, op, problem_of


def two_group_problem(num_nodes: int = 2, params: float = 5e7):
    """Four single-MetaOp tasks over two parameter groups on nodes of 8 (perfect data-parallel scaling): group b has
    three times a's compute, both hold ``params`` parameters per layer."""
    cm = cost_model(num_nodes=num_nodes)
    ops = [op(0, "t0", "a", flops=1e9, params=params, batch=16), op(1, "t1", "a", flops=1e9, params=params, batch=16),
           op(2, "t2", "b", flops=3e9, params=params, batch=16), op(3, "t3", "b", flops=3e9, params=params, batch=16)]
    return problem_of(cm, *ops), cm


def test_ignoring_sync_picks_the_slower_plan_and_the_split_is_faster():
    """The solver ranks by compute: its best placed candidate computes less than the split but spreads each group over
    both nodes, so its all-reduces cross the network; the split keeps each group inside one node and ends sooner."""
    problem, cm = two_group_problem()
    chosen = choose_candidate(problem, cm, solve(problem, SolverSettings(time_limit_s=5)))
    split = group_split_candidate(problem, cm, chosen[0], 0.0)
    assert split is not None and split[0].method.startswith(SPLIT_METHOD)
    assert chosen[0].objective_s < split[0].objective_s  # compute alone prefers the solver's plan
    # with sync priced the split wins clearly (by 9.8%: by more before the solver's plan had its buckets split)
    assert split[2].iteration_time_s < chosen[2].iteration_time_s * 0.95
    assert split[2].sync_s < chosen[2].sync_s
    dpn = cm.hw.devices_per_node
    for group in ("a", "b"):  # each group's data-parallel devices are node-local: one intra-node bucket
        devices = {d for w in split[1].waves for s in w.slices
                   if problem.graph.metaops[s.metaop].param_group == group for d in s.devices}
        assert len({d // dpn for d in devices}) == 1, (group, devices)


def test_sizes_trade_devices_for_sync(monkeypatch):
    """With sync priced, a group with heavy parameters gets fewer devices than compute alone would give it (and the
    groups never overlap); without parameters to sync, the allocation is compute's."""
    problem, cm = two_group_problem(num_nodes=16, params=2e8)
    units = units_of(problem, 1)
    assert [(u.group, u.stage, u.stages) for u in units] == [("a", 0, 1), ("b", 0, 1)]
    priced = split_sizes(problem, cm, units)
    monkeypatch.setattr(groupsplit, "sync_estimate", lambda cost_model, bucket: 0.0)
    compute_only = split_sizes(problem, cm, units)
    assert sum(priced) <= problem.num_devices and sum(compute_only) <= problem.num_devices
    assert priced[1] < compute_only[1] and priced[0] <= compute_only[0]
    placed = group_split_schedule(problem, cm)  # (with the monkeypatched estimate) every device runs one group only
    owner: dict[int, str] = {}
    for w in placed.waves:
        for s in w.slices:
            for d in s.devices:
                assert owner.setdefault(d, problem.graph.metaops[s.metaop].param_group) == \
                    problem.graph.metaops[s.metaop].param_group


def test_stages_cut_every_metaop_of_a_heavy_group_into_layer_runs_on_their_own_devices():
    """In 2 stages each MetaOp of both (equally heavy) groups runs its layers 0-1 then 2-3, on the stage's devices;
    every stage is one bucket over devices no other stage holds."""
    problem, cm = two_group_problem(num_nodes=16, params=2e8)
    units = units_of(problem, 2)
    assert units == [Unit("a", 0, 2, (0, 1)), Unit("a", 1, 2, (0, 1)), Unit("b", 0, 2, (2, 3)), Unit("b", 1, 2, (2, 3))]
    assert [units[0].layers(problem, 0), units[1].layers(problem, 0)] == [(0, 2), (2, 2)]
    placed = group_split_schedule(problem, cm, 2)
    holders: dict[tuple[str, int], set[int]] = {}
    wave_of: dict[tuple[int, int], int] = {}
    for k, w in enumerate(placed.waves):
        for s in w.slices:
            holders.setdefault((problem.graph.metaops[s.metaop].param_group, s.first_layer), set()).update(s.devices)
            wave_of[s.metaop, s.first_layer] = k
    assert sorted(holders) == [("a", 0), ("a", 2), ("b", 0), ("b", 2)]
    sets = list(holders.values())
    assert all(not (x & y) for i, x in enumerate(sets) for y in sets[i + 1:])
    assert all(wave_of[m, 0] < wave_of[m, 2] for m in range(4))


def sync_bound_job() -> dict:
    """Two wide transformer stacks used by two tasks each, with little compute per step, on 2 nodes of 8 A800s (at
    sequence length 64 the wave plan wins once ZeRO-1's gathers overlap the next forward; at 32 sync still binds)."""
    stack = {"kind": "transformer", "num_layers": 4, "hidden_size": 1024, "num_heads": 16, "seq_len": 32}
    return {"name": "sync-bound", "cluster": {"num_nodes": 2, "devices_per_node": 8, "device": "a800"},
            "components": {"a": dict(stack), "b": dict(stack)},
            "tasks": [{"name": f"t{i}", "batch_size": 16 * (1 + i % 2), "components": [{"component": "ab"[i // 2]}]}
                      for i in range(4)]}


def test_plan_job_adopts_the_split_where_sync_binds_and_is_deterministic():
    job = parse_job(sync_bound_job())
    first, second = plan_job(job).plan, plan_job(job).plan
    assert first.solver.method.startswith(SPLIT_METHOD)
    assert first.predicted.iteration_time_s <= min(first.baselines.values()) * (1 + 1e-12)
    assert first.to_json() == second.to_json()
    from planner.metagraph import build_metagraph

    check_program(plan_from_json(first.to_json(), "split"), build_metagraph(job).metaops, "split")


def test_a_tight_time_limit_skips_the_split():
    """Decided from the limit (never the clock): 10,240 devices x 500 MetaOps under the default 10 s limit, not under
    the 2 s one (whose finishing work keeps half of it)."""
    big = SimpleNamespace(graph=[None] * 500, num_devices=10240)
    assert affordable(big, 10.0, 5.0) and not affordable(big, 2.0, 1.0)
    assert affordable(SimpleNamespace(graph=[None] * 8, num_devices=8), 1.0, 0.0)


@pytest.mark.parametrize("num_groups", [17])
def test_no_split_when_groups_outnumber_devices(num_groups):
    cm = cost_model(num_nodes=2)
    problem = problem_of(cm, *[op(m, f"t{m}", f"g{m}") for m in range(num_groups)])
    assert split_sizes(problem, cm, units_of(problem, 1)) is None and group_split_schedule(problem, cm) is None


def test_a_staged_split_is_a_valid_plan_priced_identically_from_the_plan():
    """A 2-stage split of a real job becomes a Plan that loads, whose program is its waves', and that the simulator
    prices from the Plan exactly as from the builder."""
    from planner.api import make_cost_model, plan_placed, predict_plan
    from planner.metagraph import build_metagraph
    from planner.schedule import Problem
    from planner.simulator import simulate

    job = parse_job(sync_bound_job())
    cm = make_cost_model(job)
    graph = build_metagraph(job)
    problem = Problem.build(graph, cm)
    placed = group_split_schedule(problem, cm, 2)
    assert any(s.first_layer > 0 for w in placed.waves for s in w.slices)
    plan = plan_from_json(plan_placed(job, placed, cm, method="split").to_json(), "split")
    check_program(plan, graph.metaops, "split")
    expected = simulate(problem, placed, cm).iteration_time_s
    assert plan.predicted.iteration_time_s == pytest.approx(expected, rel=1e-12)
    assert predict_plan(job, plan, cm).iteration_time_s == pytest.approx(expected, rel=1e-12)
