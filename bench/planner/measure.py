"""One benchmark cell -> one record: predicted times, bounds, ratios, solver report, planning time.

Planning time is the median of ``repeats`` wall-clock runs of ``plan_job(job, with_baselines=False)``
after ``warmup`` untimed runs (every run builds its own cost model, so no cache carries over), and beside it the
median of the same runs' process CPU seconds (``planning_cpu_median_s``: what the planner itself spends, which a
machine shared with other work inflates far less than the wall clock; the solver runs one thread). The
numbers come from one extra, untimed run with baselines. Two kinds of ratio are recorded:

* full: predicted iteration time (compute + transfers + shared-parameter sync + optimizer, from
  the simulator) over a bound. The bounds cover compute only, so these ratios include overheads
  the bound never sees.
* compute-only: the schedule's compute makespan (sum of wave durations, no placement; a bucket-split wave's
  parts joined, planner.bucketsplit.unsplit) over a bound. This is what the bound actually bounds; Spindle's
  compute makespan is measured the same way on its own wavefront schedule.

Scale cells (:func:`measure_cell_isolated`) are planned in a fresh process each, so that the process's peak
resident memory (``peak_rss_mib``, from ``getrusage``) is that cell's alone, and their planning time is that of
the whole ``loom plan`` (``plan_job`` *with* baselines, what the issue's targets bound): median of ``repeats``
runs, the last of which gives the numbers. Every record also carries Loom's peak device memory beside the
device's, and which baselines' plans do not fit (``baseline_notes``).
"""

from __future__ import annotations

import logging
import multiprocessing
import resource
import statistics
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from planner.api import PlanOutcome, plan_job
from planner.bound import relaxed_allocation
from planner.bucketsplit import unsplit
from planner.layerbound import pass_layer_bound
from planner.schedule import Problem, compute_makespan
from planner.spindle import spindle_schedule

from bench.common import median_of
from bench.planner.cells import Cell, load_cell_job

log = logging.getLogger(__name__)


def _quiet(_msg: str) -> None:
    """Progress sink for the timed runs: keeps the planner's chatter out of the timings and the log."""


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def measure_cell(cell: Cell, repeats: int = 3, warmup: int = 1, with_baselines: bool = False) -> dict[str, Any]:
    """Plan ``cell`` and return its record; a failure becomes a record with ``error`` set (never raises).
    ``with_baselines``: the timed runs are whole plannings (baselines included) and the last one gives the
    numbers; otherwise they plan without baselines and one extra run gives the numbers."""
    record: dict[str, Any] = {"cell": cell.name, "workload": cell.workload, "group": cell.group,
                              "num_devices": cell.num_devices, "error": None,
                              "planning_time_includes_baselines": with_baselines}
    started = time.perf_counter()
    try:
        job = load_cell_job(cell)
        timed_iterations: list[float] = []
        cpu_samples: list[float] = []

        def run_once() -> PlanOutcome:
            cpu = time.process_time()
            outcome = plan_job(job, with_baselines=with_baselines, progress=_quiet)
            cpu_samples.append(time.process_time() - cpu)
            timed_iterations.append(outcome.plan.predicted.iteration_time_s)
            return outcome

        timing = median_of(run_once, repeats=repeats, warmup=warmup)
        outcome = timing.result if with_baselines else plan_job(job, with_baselines=True, progress=_quiet)
        record.update(_describe(outcome))
        record["planning_time_median_s"] = timing.median_s
        record["planning_time_samples_s"] = list(timing.samples_s)
        record["planning_cpu_median_s"] = statistics.median(cpu_samples[warmup:])
        record["planning_cpu_samples_s"] = cpu_samples[warmup:]
        record["timed_iteration_s"] = timed_iterations[warmup:]
    except Exception as exc:  # a benchmark reports a failing cell and goes on to the next
        record["error"] = f"{type(exc).__name__}: {exc}"
        log.error("%s failed:\n%s", cell.name, traceback.format_exc())
    record["wall_s"] = time.perf_counter() - started
    return record


def _measure_in_child(cell: Cell, repeats: int, warmup: int) -> dict[str, Any]:
    record = measure_cell(cell, repeats=repeats, warmup=warmup, with_baselines=True)
    record["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return record


def measure_cell_isolated(cell: Cell, repeats: int = 1, warmup: int = 0) -> dict[str, Any]:
    """:func:`measure_cell` with baselines in a fresh (spawned) process, plus that process's peak RSS."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_in_child, cell, repeats, warmup).result()


def pattern_lp_bound(problem: Problem) -> float:
    """The per-level bound tightened by whole layers, valid counts and the passes: over the levels, the larger of the
    fluid optimum and the pattern LP's certificate with each wave priced as the compute the bench reports is (its
    largest forward plus its largest backward, :func:`planner.layerbound.pass_layer_bound`; 0 where a level is too
    large to price). Still a lower bound on every wave schedule with level barriers
    (tests/unit/planner/test_layerbound.py)."""
    return sum(max(relaxed_allocation(problem, level, hull=True)[0], pass_layer_bound(problem, level))
               for level in problem.graph.levels)


def any_order_lp_bound(problem: Problem) -> float:
    """The pattern LP of the whole job with precedence dropped (every MetaOp in one level): a lower bound on the compute
    of every wave schedule, level barriers or not (a schedule that keeps precedence is one that drops it); on a
    one-level job, :func:`pattern_lp_bound` itself."""
    ids = range(len(problem.graph))
    return max(relaxed_allocation(problem, ids, hull=True)[0], pass_layer_bound(problem, ids))


def _describe(outcome: PlanOutcome) -> dict[str, Any]:
    """The numbers of one planned cell (see the module docstring for what each ratio means)."""
    plan, problem = outcome.plan, outcome.problem
    graph = problem.graph
    loom_s = plan.predicted.iteration_time_s
    iteration = {**plan.baselines, "loom": loom_s}
    per_level, dag = plan.bounds.per_level_s, plan.bounds.dag_s
    # a bucket-split wave's parts run as one wave (planner.bucketsplit.unsplit): its compute is the joined wave's
    loom_compute = compute_makespan(problem, unsplit(problem, outcome.solve.schedule))
    # the solver ranks its candidates by compute, the planner by the simulated iteration: the least compute it found
    least_compute = min((c.makespan_s for c in outcome.solve.candidates), default=None)
    spindle_compute = compute_makespan(problem, spindle_schedule(problem))
    pattern_lp = pattern_lp_bound(problem)
    spindle_s = plan.baselines.get("spindle")
    sequential_s = plan.baselines.get("sequential")
    return {
        "num_tasks": len({op.task for op in graph.metaops}),
        "num_metaops": len(graph),
        "num_levels": len(graph.levels),
        "num_waves": len(plan.waves),
        "iteration_s": iteration,
        "predicted": plan.predicted.model_dump(),
        "bounds": {"per_level_s": per_level, "dag_s": dag, "pattern_lp_s": pattern_lp,
                   "any_order_lp_s": pattern_lp if len(graph.levels) == 1 else any_order_lp_bound(problem)},
        # the allocation LP (valid counts, whole layers per pattern, fractional repetitions; best window kind): what
        # integer device counts alone cost; the least-compute candidate adds the packing; the plan, the choice
        "compute_s": {"loom": loom_compute, "spindle": spindle_compute, "solver_least": least_compute,
                      "allocation_lp": outcome.solve.lp_value_s or None},
        "ratios": {
            "loom_over_per_level": _ratio(loom_s, per_level),
            "loom_over_dag": _ratio(loom_s, dag),
            "loom_compute_over_per_level": _ratio(loom_compute, per_level),
            "loom_compute_over_dag": _ratio(loom_compute, dag),
            "solver_least_compute_over_per_level": _ratio(least_compute, per_level),
            "loom_compute_over_pattern_lp": _ratio(loom_compute, pattern_lp),
            "solver_least_compute_over_pattern_lp": _ratio(least_compute, pattern_lp),
            "spindle_compute_over_per_level": _ratio(spindle_compute, per_level),
            "spindle_compute_over_dag": _ratio(spindle_compute, dag),
            "speedup_vs_spindle": _ratio(spindle_s, loom_s),
            "speedup_vs_sequential": _ratio(sequential_s, loom_s),
            "compute_speedup_vs_spindle": _ratio(spindle_compute, loom_compute),
        },
        "peak_memory_gib": {"loom": max(plan.peak_memory_bytes, default=0.0) / 2**30,
                            "device": plan.cluster.memory_bytes / 2**30},
        "solver": plan.solver.model_dump(),
        "baseline_notes": dict(plan.baseline_notes),
    }
