"""Every baseline's schedule as a candidate (planner.candidates): representable as a Plan, priced identically from the
builder and from the Plan, adopted when it beats the solver's choice and fits, and never beaten by Loom's plan on
seeded random jobs (the shipped jobs: tests/unit/planner/test_program.py)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from conftest import make_curve, make_problem

from bench.workloads.generate import clip_like_job
from planner.api import make_cost_model, plan_job, plan_placed, predict_plan
from planner.baselines import BASELINES, baseline_plans, sequential_schedule
from planner.bucketsplit import SPLIT
from planner.candidates import ADOPTED, UNSHARDED, adopt_best, runnable
from planner.costmodel import Layout
from planner.errors import PlanningError
from planner.metagraph import build_metagraph, finalize_graph
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave
from planner.plan import plan_from_json
from planner.schedule import Problem
from planner.spec import parse_job
from planner.validate import check_program

from test_baselines import cost_model, op


def two_node_job() -> dict:
    """Three tasks (one shares its text tower) on 2 nodes of 2 CPU devices: uniform and optimus give each task its own
    devices, sequential and DistMM-MT run them in turn as phases."""
    return {
        "name": "three-tasks",
        "cluster": {"num_nodes": 2, "devices_per_node": 2, "device": "cpu"},
        "components": {
            "img": {"kind": "vit", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "patch_size": 4,
                    "image_size": 8, "in_channels": 3},
            "txt": {"kind": "transformer", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "seq_len": 6},
            "aud": {"kind": "transformer", "num_layers": 3, "hidden_size": 32, "num_heads": 4, "seq_len": 6},
        },
        "tasks": [
            {"name": "caption", "batch_size": 8, "components": [{"component": "img"}, {"component": "txt",
                                                                                       "seq_len": 5}]},
            {"name": "align", "batch_size": 4, "loss": "contrastive",
             "components": [{"component": "aud", "after": []}, {"component": "txt", "after": []}]},
            {"name": "hear", "batch_size": 4, "components": [{"component": "aud"}]},
        ],
        "training": {"precision": "fp32"},
        "planner": {"time_limit_s": 1},
    }


@pytest.mark.parametrize("spec", ["examples/vlm-cpu.yaml", "two-node"])
def test_every_baseline_schedule_is_a_plan_priced_identically_by_both_paths(spec):
    """Each baseline's placed schedule becomes a sealed Plan that loads (planner.validate.check_plan), whose program is
    the one its waves and phases give, and that the simulator prices from the Plan exactly as from the builder."""
    from planner.spec import load_job

    job = parse_job(two_node_job()) if spec == "two-node" else load_job(spec)
    cm = make_cost_model(job)
    graph = build_metagraph(job)
    problem = Problem.build(graph, cm)
    plans = baseline_plans(problem, cm)
    assert [b.name for b in plans] == list(BASELINES)
    shapes = set()
    for b in plans:
        plan = plan_from_json(plan_placed(job, b.placed, cm, method=b.name).to_json(), b.name)
        check_program(plan, graph.metaops, b.name)
        assert plan.phases == list(b.placed.phases)
        assert plan.predicted.iteration_time_s == pytest.approx(b.sim.iteration_time_s, rel=1e-12)
        assert predict_plan(job, plan, cm).iteration_time_s == pytest.approx(b.sim.iteration_time_s, rel=1e-12)
        assert runnable(problem, b.placed, cm.hw.devices_per_node) is None, b.name
        shapes.add((b.name, len(plan.phases) > 1))
    # the shapes the solver's wave schedules lack are among them: tasks in turn as phases
    assert ("sequential", True) in shapes and ("distmm_mt", True) in shapes


@pytest.mark.parametrize("seed", range(3))
def test_loom_is_never_slower_than_a_fitting_baseline_on_random_jobs(seed):
    job = clip_like_job(3 + 2 * seed, num_nodes=1 + seed % 2, seed=seed)
    plan = plan_job(job.model_copy(update={"planner": job.planner.model_copy(update={"time_limit_s": 1.0})})).plan
    assert set(plan.baselines) == set(BASELINES)
    fitting = [t for name, t in plan.baselines.items() if name not in plan.baseline_notes]
    assert fitting and plan.predicted.iteration_time_s <= min(fitting) * (1 + 1e-9)


def problem_and_baselines(memory_gib: float | None = None):
    """Two independent tasks on 8 devices: their baselines, simulated and checked against devices of ``memory_gib``
    (the curves' 80 GiB when None)."""
    cm = cost_model()
    problem = Problem.build(finalize_graph([op(0, "ta", "a", flops=3e9, params=1e7), op(1, "tb", "b", params=1e7)]), cm)
    if memory_gib is not None:
        cm = type(cm)(replace(cm.hw, memory_bytes=memory_gib * 2**30))
    return problem, cm, baseline_plans(problem, cm)


def test_the_fastest_fitting_baseline_is_adopted_over_a_slower_choice():
    problem, cm, plans = problem_and_baselines()
    slowest = max(plans, key=lambda b: b.sim.iteration_time_s)
    fastest = min(plans, key=lambda b: b.sim.iteration_time_s)
    assert fastest.sim.iteration_time_s < slowest.sim.iteration_time_s
    from planner.candidates import schedule_of
    from planner.solver import SolveResult

    chosen = (SolveResult(schedule_of(slowest.placed), "highs", "optimal", 1.0, 0.5, 0.5, "packing-ilp"),
              slowest.placed, slowest.sim)
    result, placed, sim = adopt_best(problem, cm.hw.devices_per_node, chosen, plans)
    assert sim.iteration_time_s == fastest.sim.iteration_time_s and placed == fastest.placed
    assert result.method == fastest.name + ADOPTED and result.status == "heuristic" and result.bound_s == 0.5
    # the solver's choice stays when no baseline is strictly faster
    assert adopt_best(problem, cm.hw.devices_per_node, (chosen[0], fastest.placed, fastest.sim), plans)[0] is chosen[0]


def test_a_baseline_that_does_not_fit_is_never_adopted():
    problem, cm, plans = problem_and_baselines(memory_gib=0.05)
    assert all(b.unfit and "GiB" in b.unfit for b in plans)
    error = PlanningError("nothing fits")
    with pytest.raises(PlanningError, match="nothing fits"):
        adopt_best(problem, cm.hw.devices_per_node, None, plans, error)


def test_a_task_reading_another_tasks_output_runs_in_one_phase():
    """Only synthetic problems have such edges; tasks in turn would cross phases with them, so the shape is one phase."""
    cm = cost_model()
    problem = Problem.build(finalize_graph([op(0, "ta", "a"), op(1, "tb", "b", deps=(0,))]), cm)
    placed = sequential_schedule(problem)
    assert placed.phases == (0,) and runnable(problem, placed, cm.hw.devices_per_node) is None


def test_plan_job_adopts_a_baseline_when_no_solver_candidate_fits(monkeypatch):
    """The glue in plan_job: with every solver candidate over memory (forced here), the fastest fitting baseline is the
    plan, with its phases; the plan loads, its program is its waves' and phases', and it names the baseline."""
    import planner.api as api

    def nothing_fits(*args, **kwargs):
        raise PlanningError("device 0 needs more memory than it has")

    monkeypatch.setattr(api, "choose_candidate", nothing_fits)
    monkeypatch.setattr(api, "group_split_candidate", lambda *args, **kwargs: None)  # no sync-aware split either
    job = parse_job(two_node_job())
    plan = plan_from_json(plan_job(job).plan.to_json(), "adopted")
    fitting = {name: t for name, t in plan.baselines.items() if name not in plan.baseline_notes}
    best = min((name for name in BASELINES if name in fitting), key=fitting.get)  # BASELINES order among equals
    # the baseline's schedule, or that schedule with waves cut where its buckets sync sooner (planner.bucketsplit);
    # stepping without ZeRO-1 where that is faster (training.shard_optimizer: auto)
    method = plan.solver.method.removesuffix(UNSHARDED)
    assert method in (best + ADOPTED, best + ADOPTED + SPLIT)
    if method.endswith(SPLIT):
        assert plan.predicted.iteration_time_s < fitting[best]
    else:
        assert plan.predicted.iteration_time_s == pytest.approx(fitting[best], rel=1e-12)
    check_program(plan, build_metagraph(job).metaops, "adopted")
    cm = make_cost_model(job)
    placed = {b.name: b.placed for b in baseline_plans(Problem.build(build_metagraph(job), cm), cm)}[best]
    assert plan.phases == list(placed.phases) or (plan.solver.method.endswith(SPLIT)  # a cut shifts later phases
                                                  and len(plan.phases) == len(placed.phases))


def test_baseline_notes_say_why_loom_may_not_adopt_a_baseline():
    """A baseline whose plan does not fit, and one that fits but the runtime could not run (a tensor-parallel group
    across nodes), each get a note (the plan's baseline_notes: `loom plan` marks them, the planner bench's best
    fitting baseline leaves them out); a runnable one that fits gets none."""
    from planner.api import baseline_notes
    from planner.baselines import BaselinePlan
    from bench.planner.report import _marker, best_fitting_baseline

    problem = make_problem([4], [[]], [make_curve([1, 2, 4, 8], [8.0, 4.5, 2.5, 1.5])], 8)

    def placed(devices, tp):
        return PlacedSchedule((PlacedWave((PlacedSlice(0, 0, 4, devices, Layout(len(devices) // tp, tp)),)),))

    def sim(seconds):
        return SimpleNamespace(iteration_time_s=seconds)

    plans = [BaselinePlan("across", placed((3, 4), 2), sim(1.0), None),
             BaselinePlan("oom", placed((0, 1), 2), sim(1.5), "device 0 needs 90 GiB"),
             BaselinePlan("fine", placed((0, 1, 2, 3), 2), sim(3.0), None),
             BaselinePlan("slower", placed((3, 4), 2), sim(4.0), None)]  # after one Loom could adopt: not checked
    notes = baseline_notes(problem, 4, plans)
    assert notes == {"across": "the runtime cannot run its plan (op0: a tensor-parallel group spans nodes)",
                     "oom": "its plan does not fit in device memory: device 0 needs 90 GiB"}
    assert [_marker(notes.get(b.name)) for b in plans] == [" (cannot run)", " (OOM)", "", ""]
    record = {"iteration_s": {"loom": 2.0, "across": 1.0, "oom": 1.5, "fine": 3.0, "slower": 4.0},
              "baseline_notes": notes}
    assert best_fitting_baseline(record) == ("fine", 3.0)


def test_runnable_names_each_tensor_parallel_layout_the_runtime_cannot_build():
    """Two MetaOps sharing one parameter group (4 layers) on 2 nodes of 4 devices: a TP group across nodes, a layer at
    two degrees, a layer in two TP groups on one device are refused; layers apart, or the same groups, run."""
    curve = make_curve([1, 2, 4, 8], [8.0, 4.5, 2.5, 1.5])
    base = make_problem([4, 4], [[], []], [curve, curve], 8)
    ops = tuple(replace(o, param_group="shared") for o in base.graph.metaops)
    problem = Problem(finalize_graph(list(ops)), base.curves, 8)

    def placed(*slices):  # (metaop, first layer, layers, devices, tp) per wave
        return PlacedSchedule(tuple(PlacedWave((PlacedSlice(m, first, n, devs, Layout(len(devs) // tp, tp)),))
                                    for m, first, n, devs, tp in slices))

    assert runnable(problem, placed((0, 0, 4, (2, 3, 4, 5), 2), (1, 0, 4, (2, 3, 4, 5), 2)), 4) is None
    assert runnable(problem, placed((0, 0, 4, (0, 1), 1), (1, 0, 4, (2, 3), 1)), 4) is None  # TP 1: any devices
    assert runnable(problem, placed((0, 0, 2, (0, 1), 2), (1, 2, 2, (1, 2), 2)), 4) is None  # other layers
    assert runnable(problem, placed((0, 0, 4, (3, 4), 2),), 4) == "op0: a tensor-parallel group spans nodes"
    assert runnable(problem, placed((0, 0, 4, (0, 1), 2), (1, 3, 1, (0, 1, 2, 3), 4)), 4) == \
        "layer 3 of shared at two tensor-parallel degrees"
    assert runnable(problem, placed((0, 0, 4, (0, 1, 2, 3), 2), (1, 1, 3, (1, 2), 2)), 4) == \
        "layer 1 of shared in two tensor-parallel groups on device 1"
