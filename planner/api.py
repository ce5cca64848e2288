"""The planner's entry point: a JobSpec in, a sealed Plan out.

``plan_job`` runs the whole pipeline: MetaGraph, cost model curves, bounds, Spindle's wavefront
(baseline and warm start), Loom's solver, placement, simulation, baselines, and packs the result
into a :class:`~planner.plan.Plan`. Pure: no files are written, nothing global is touched.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from planner import baselines as baselines_mod
from planner.bound import plan_bounds
from planner.bucketsplit import SPLIT, split_buckets, split_chosen
from planner.candidates import ADOPTED, adopt_best, runnable, schedule_of, zero_choice
from planner.costmodel import AnalyticCostModel, CostModel, Layout, ProfiledCostModel, lm_heads
from planner.devices import resolve_hardware
from planner.errors import PlanningError
from planner.generation import decode_refused
from planner.groupsplit import affordable, group_split_candidate
from planner.metagraph import MetaGraph, build_metagraph
from planner.placement import (
    STRATEGIES, PlacedSchedule, PlacedSlice, PlacedWave, TensorParallelRoomError, place_schedule,
)
from planner.leastcompute import (
    LEAST_SPLIT_TOP, Alternative, adopt_late, faster_time, held_back, near_fastest, prefer_less_compute,
    prefer_unsharded, waves_compute,
)
from planner.refine import Evaluated, evaluation_cost, refine_compute, refine_order, refine_transfers
from planner.plan import (
    Bounds, Plan, PlanCluster, PlanHandoff, PlanHandoffGather, PlanMetaOp, PlanSlice, PlanTransfer, PlanWave,
    Prediction, SolverReport, SyncGroup, micro_batch_walk, zero_sharded,
)
from planner.program import plan_buckets, plan_holdings, plan_pieces, process_groups
from planner.schedule import Problem, Schedule, check_schedule, compute_makespan, memory_tightened, reverse_runs
from planner.tighten import tighten_chosen
from planner.waveorder import reorder_chosen
from planner.rlbaselines import RoleBudget, rl_budget, rl_shaped, with_role_candidate
from planner.rows import row_shares
from planner.simulator import Simulation, one_f_one_b_if_no_slower, simulate
from planner.solver import Candidate, SolveResult, SolverSettings, clocks, solve
from planner.spec import JobSpec, micro_batch_counts
from planner.spindle import spindle_schedule

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PlanOutcome:
    """A plan plus what the caller may want to show but must not go into the (deterministic) plan."""

    plan: Plan
    problem: Problem
    placed: PlacedSchedule
    simulation: Simulation
    planning_time_s: float
    solve: SolveResult


def make_cost_model(job: JobSpec, costs: str | Path | dict | None = None) -> CostModel:
    """The analytic cost model of the job's cluster, or a profiled one (analytic fallback) from ``costs``: a cost
    file's path, or its contents (a profile just taken)."""
    hw = resolve_hardware(job.cluster)
    shard = job.training.shard_optimizer is not False  # auto: planned with ZeRO-1, then priced without (plan_job)
    # Activations and gradients cross devices in the compute precision (runtime.executor's wire dtype); parameters
    # (ZeRO-1's all-gather, weight hand-offs) move as the runtime holds them, float32 in every precision:
    # CostModel.param_bytes_moved; a decode copy's matrices in the compute precision, CostModel.decode_matrix_bytes
    # (docs/planner.md "What moves, at how many bytes").
    grad_bytes = weight_bytes = 4 if job.training.precision == "fp32" else 2
    memory = {"precision": job.training.precision, "optimizer": job.training.optimizer}  # what a device holds
    analytic = AnalyticCostModel(hw, shard_optimizer=shard, grad_bytes=grad_bytes, weight_bytes=weight_bytes, **memory)
    model = analytic if costs is None else ProfiledCostModel.load(
        costs, hw, fallback=analytic, shard_optimizer=shard, grad_bytes=grad_bytes, weight_bytes=weight_bytes,
        **memory)
    model.heads, model.kernels = lm_heads(job), job.training.kernels  # the LM heads' logits (memory model)
    model.step_reduces = 2 if job.training.grad_clip or job.training.precision == "fp16" else 1  # runtime.executor
    # pipelined micro-batches hold each one's activations (auto: plan_job plans both ways)
    return model.with_in_flight(job.training.micro_batches if job.training.pipeline_micro_batches is True else 1)


def pipelining_left_to_planner(job: JobSpec) -> bool:
    """Whether the planner decides if ``job``'s micro-batches run pipelined (``pipeline_micro_batches: auto`` with more
    than one micro-batch)."""
    return job.training.pipeline_micro_batches == "auto" and job.training.micro_batches > 1


def spec_hash(job: JobSpec) -> str:
    """The job's identity in plans and checkpoints: fields at their defaults are left out, so a Loom release that
    adds a spec field with a default keeps every earlier job's hash (its plans and checkpoints still belong to it)."""
    return hashlib.sha256(job.model_dump_json(exclude_defaults=True).encode()).hexdigest()[:16]


def plan_job(
    job: JobSpec,
    cost_model: CostModel | None = None,
    *,
    with_baselines: bool = True,
    progress: Progress | None = None,
) -> PlanOutcome:
    """Plan ``job``: returns the sealed Plan and the intermediate results (see PlanOutcome). With
    ``training.pipeline_micro_batches: auto`` and several micro-batches, the job is planned twice, micro-batches in
    order and pipelined (each on half the time limit; the role-placement searches of an RL-shaped job, bounded by work
    units, on the whole limit's in each, and all of them, once each has a placement that fits, by the end of the
    limit), and the plan predicted faster is kept (in order on a tie); each plan's
    baselines are priced with its own order, so it is never slower than any of them in either order. With
    ``training.grad_accum_steps: auto`` it is planned at several counts of micro-batches and the fastest plan kept
    (:func:`_plan_micro_batches`)."""
    say = progress or (lambda msg: log.info(msg))
    cost_model = cost_model or make_cost_model(job)
    # each role-placement search of an RL-shaped job: work units from the whole limit, and its end as a safety cap
    roles = RoleBudget(rl_budget(job.planner.time_limit_s), time.thread_time() + job.planner.time_limit_s)
    if job.micro_batches_auto:
        return _plan_micro_batches(job, cost_model, with_baselines, say, roles)
    return _plan_orders(job, cost_model, job.planner.time_limit_s, with_baselines, say, roles)


def _plan_orders(job: JobSpec, cost_model: CostModel, limit: float, with_baselines: bool, say: Progress,
                 roles: RoleBudget) -> PlanOutcome:
    """:func:`plan_job` of a job of a set count of micro-batches within ``limit`` CPU seconds, each role-placement
    search within ``roles``: planned in the order the job says, or in both (:func:`plan_job`)."""
    if not pipelining_left_to_planner(job):
        return _plan_one(job, cost_model, limit, with_baselines, say, roles)
    half = limit / 2
    in_order = _plan_one(job, cost_model.with_in_flight(1), half, with_baselines, say, roles)
    say(f"planning again with the {job.training.grad_accum_steps} micro-batches pipelined")
    try:
        piped = _plan_one(job, cost_model.with_in_flight(job.training.grad_accum_steps), half, with_baselines, say,
                          roles)
    except PlanningError as exc:  # e.g. every micro-batch's activations held at once do not fit
        say(f"pipelined micro-batches: no plan ({exc}); keeping them in order")
        return in_order
    total = in_order.planning_time_s + piped.planning_time_s
    faster = piped.simulation.iteration_time_s < in_order.simulation.iteration_time_s * (1 - 1e-9)
    chosen = piped if faster else in_order
    say(f"micro-batches {'pipelined' if faster else 'in order'}: predicted iteration "
        f"{chosen.simulation.iteration_time_s:.4g} s (in order {in_order.simulation.iteration_time_s:.4g} s, "
        f"pipelined {piped.simulation.iteration_time_s:.4g} s)")
    return replace(chosen, planning_time_s=total)


def _plan_micro_batches(job: JobSpec, cost_model: CostModel, with_baselines: bool, say: Progress,
                        roles: RoleBudget) -> PlanOutcome:
    """:func:`plan_job` for ``training.grad_accum_steps: auto``: the job planned at each count of
    :data:`planner.spec.MICRO_BATCH_COUNTS` it splits into (:meth:`JobSpec.micro_batches_refused`), each on an equal
    share of the time limit and with the job's whole role-placement budget (``roles``' work units: a smaller one finds
    other placements, and the count's baselines must be those of a job of that count; the limit's end caps them all);
    the plan predicted fastest (the fewer micro-batches on a tie), recording its count (Plan.grad_accum_steps). Each
    count's plan is never slower than its baselines, so the chosen one is never slower than any baseline at any count
    (every count is planned: the fastest is not where the times first turn up, e.g. bench/rl's 7B GRPO cell at one
    step off-policy, whose split placement is fastest at 32)."""
    counts = micro_batch_counts(job)
    limit = job.planner.time_limit_s / len(counts)
    best, error, total = None, None, 0.0  # best: (count, its outcome)
    for k in counts:
        say(f"grad_accum_steps auto: planning {k} micro-batch{'es' if k > 1 else ''}")
        at = job.with_micro_batches(k)
        try:
            outcome = _plan_orders(at, cost_model.with_in_flight(k if job.training.pipeline_micro_batches is True
                                                                 else 1), limit, with_baselines, say, roles)
        except PlanningError as exc:  # e.g. no placement fits at this count: others may
            say(f"{k} micro-batches: no plan ({str(exc).split('. ')[0]})")
            error, outcome = error or exc, None
        total += outcome.planning_time_s if outcome is not None else 0.0
        if outcome is not None and (best is None or outcome.simulation.iteration_time_s
                                    < best[1].simulation.iteration_time_s * (1 - 1e-9)):
            best = (k, outcome)
    if best is None:
        raise error
    k, outcome = best
    say(f"grad_accum_steps auto: {k} micro-batch{'es' if k > 1 else ''}, predicted iteration "
        f"{outcome.simulation.iteration_time_s:.4g} s")
    plan = outcome.plan.model_copy(update={"grad_accum_steps": k, "spec_hash": spec_hash(job)}).sealed()
    return replace(outcome, plan=plan, planning_time_s=total)


def _plan_one(job: JobSpec, cost_model: CostModel, limit: float, with_baselines: bool, say: Progress,
              roles: RoleBudget) -> PlanOutcome:
    """:func:`plan_job` with the micro-batch order ``cost_model`` prices (:attr:`CostModel.in_flight`), within
    ``limit`` CPU seconds, each role-placement search within ``roles``."""
    # the limit counts this thread's CPU time: wall time grows with other load, and the process's CPU time with the
    # solver's worker threads (HiGHS's spin while waiting), either of which made plans differ between runs
    start, start_cpu = clocks()
    graph = build_metagraph(job)
    say(f"MetaGraph: {len(graph)} MetaOps in {len(graph.levels)} levels, {len(graph.param_groups)} parameter groups")
    problem = Problem.build(graph, cost_model)
    auto_zero = job.training.shard_optimizer == "auto"
    # with ZeRO-1 left to the planner, the bound without it (no all-gather after the step) holds for either setting
    bounds = plan_bounds(problem, cost_model.with_shard_optimizer(False) if auto_zero else cost_model)
    say(f"bounds: per-level {bounds.per_level_s:.4g} s, DAG {bounds.dag_s:.4g} s, iteration {bounds.iteration_s:.4g} s")
    warm = spindle_schedule(problem)
    reserve = finishing_reserve(problem, limit)
    settings = SolverSettings(
        solver=job.planner.solver, time_limit_s=limit, mip_gap=job.planner.mip_gap,
        level_barriers=job.planner.level_barriers, deadline=start_cpu + limit - reserve, started=(start, start_cpu),
    )
    every = solve(problem, settings, warm=warm, lower_bound=bounds.dag_s, progress=say)
    solved, late = held_back(every)
    try:
        found = choose_candidate(problem, cost_model, solved, deadline=settings.deadline, grace_s=reserve / 2)
        planned, error = problem, None
        late = late_alternatives(problem, cost_model, late, settings.deadline)
    except PlanningError as exc:  # no solver candidate fits (memory, or TP groups inside nodes): tighter layouts
        try:
            planned, found = repair_memory(problem, cost_model, settings, bounds, exc, say)
            error, late = None, ()
        except PlanningError as still:  # nothing the solver finds fits: a baseline's schedule may
            found, planned, error, late = None, problem, still, ()
    chosen, pool = (found[:3], found[4]) if found is not None else (None, ())
    searched = chosen[0] if chosen is not None else None  # choose_candidate tried its bucket splits already
    # RL-shaped jobs: Loom's role placement and the colocated/split baselines, each search on a work budget and, once
    # it has a placement that fits, within the job's whole limit (a safety cap: the units end it first on a job whose
    # planning takes less)
    chosen = with_role_candidate(problem, cost_model, chosen, bounds.dag_s, roles)
    error = None if chosen is not None else error
    # the sync-aware split (gradient sync inside the allocation: planner.groupsplit) competes on the simulated
    # iteration; whether it runs depends on the limit, not the clock
    if affordable(problem, limit, reserve):
        split = group_split_candidate(problem, cost_model, chosen[0] if chosen else None, bounds.dag_s)
        # with ZeRO-1 left to the planner each at its faster setting, as every later choice is (prefer_unsharded)
        time_of = partial(faster_time, problem, cost_model.with_shard_optimizer(False)) if auto_zero else \
            (lambda triple: triple[2].iteration_time_s)
        if split is not None and (chosen is None or time_of(split) < time_of(chosen) * (1 - 1e-12)):
            say(f"sync-aware group split: predicted iteration {split[2].iteration_time_s:.4g} s")
            chosen, planned, error = split, problem, None
    # the baselines always run, past the limit too: every one is a candidate (planner.candidates), and skipping them by
    # the clock made the same job's plan differ between runs (the role placements' searches stop at the limit once
    # one fits: without a placement of its own the RL job has no plan)
    baseline_plans = baselines_mod.baseline_plans(problem, cost_model, spindle=warm, rl_budget=roles)
    if rl_shaped(problem) and roles.deadline is not None and time.thread_time() >= roles.deadline:
        say("time limit reached: role-placement searches cut short (a larger planner.time_limit_s may find a faster "
            "plan)")
    result, placed, sim = adopt_best(problem, cost_model.hw.devices_per_node, chosen, baseline_plans, error, bounds.dag_s)
    if result.method.endswith(ADOPTED):
        planned = problem  # a baseline's schedule is on the job's own curves, not a memory repair's
    elif result is searched:  # near the fastest, the least waves' compute, never slower than a baseline that fits
        result, placed, sim = prefer_less_compute(planned, cost_model.hw.devices_per_node, (result, placed, sim),
                                                  near_fastest(pool), baseline_plans)
        result, placed, sim = adopt_late(planned, (result, placed, sim), late)
        if auto_zero:  # each of the search's schedules at its faster ZeRO-1 setting; zero_choice below sets it
            result, placed, sim = prefer_unsharded(planned, cost_model.with_shard_optimizer(False),
                                                   (result, placed, sim), (*pool, *late), baseline_plans)
        result = replace(result, candidates=every.candidates)  # the report lists every candidate, held back or not
        # the waves made to say what the timeline runs: less waves' compute, never a longer predicted iteration
        result, placed, sim = tighten_chosen(planned, cost_model, result, placed, sim, TIGHTEN_BUDGET)
        searched = result
    if result is not searched:  # a baseline's, the group split's or a role placement's schedule: its buckets may split
        if settings.past_deadline():  # a search like the others: past the limit (2 CPU s at 16,384 devices) it is not
            log.info("time limit reached: bucket split of the chosen plan skipped")
        else:
            result, placed, sim = split_chosen(planned, cost_model, result, placed, sim, SPLIT_BUDGET)[:3]
    if auto_zero:  # ZeRO-1 or not, whichever is faster (each baseline likewise): one more simulation of the plan and
        # of each baseline, made past the limit too, as the baselines are, so the choice never depends on the clock
        (result, placed, sim), cost_model, baseline_plans = zero_choice(planned, cost_model, (result, placed, sim),
                                                                        baseline_plans)
    if settings.past_deadline():  # a search like the others
        log.info("time limit reached: order search of the chosen plan skipped")
    else:  # its waves' order under the setting it runs with (planner.waveorder)
        result, placed, sim = reorder_chosen(planned, cost_model, result, placed, sim, IN_PLACE_BUDGET)
    if cost_model.in_flight > 1:  # pipelined: walked 1F1B where that is no slower (each wave holds fewer activations)
        cost_model, sim = one_f_one_b_if_no_slower(planned, cost_model, placed, sim)
    say(f"chose {result.method}: compute {result.objective_s:.4g} s, predicted iteration {sim.iteration_time_s:.4g} s")
    baseline_times = {b.name: b.sim.iteration_time_s for b in baseline_plans} if with_baselines else {}
    notes = baseline_notes(problem, cost_model.hw.devices_per_node, baseline_plans) if with_baselines else {}
    plan = build_plan(job, graph, cost_model, placed, sim, result, bounds, baseline_times, notes)
    elapsed = time.perf_counter() - start
    say(f"planned in {elapsed:.2f} s: predicted iteration {sim.iteration_time_s:.4g} s")
    return PlanOutcome(plan, planned, placed, sim, elapsed, result)


def baseline_notes(problem: Problem, devices_per_node: int, baseline_plans) -> dict[str, str]:
    """Why Loom may not adopt a baseline's plan, by baseline: it does not fit in device memory (every such one), or it
    fits and the runtime could not run it (planner.candidates.runnable: e.g. Spindle's wavefront with one layer at
    two tensor-parallel degrees), so a plan slower than such a baseline says why. Runnability is checked fastest
    first, up to the first baseline Loom could adopt: whether a slower one runs changes neither Loom's choice nor
    which baseline is the fastest it could adopt."""
    notes = {b.name: f"its plan does not fit in device memory: {b.unfit}" for b in baseline_plans if b.unfit}
    for b in sorted((b for b in baseline_plans if not b.unfit), key=lambda b: b.sim.iteration_time_s):
        why = runnable(problem, b.placed, devices_per_node)
        if why is None:
            break
        notes[b.name] = f"the runtime cannot run its plan ({why})"
    return notes


MEMORY_SHARES = (0.5, 0.25)  # feasibility repair: the device memory one MetaOp's layers may take, tighter each try


def repair_memory(problem: Problem, cost_model: CostModel, settings: SolverSettings, bounds: Bounds,
                  error: PlanningError, say: Progress) -> tuple[Problem, tuple]:
    """Memory as a constraint of the allocation: when no candidate fits, solve again on :func:`memory_tightened`
    problems (each share of :data:`MEMORY_SHARES` in turn) until one fits; its problem and choose_candidate's result.
    Raises the first placement error when none fits."""
    for share in MEMORY_SHARES:
        tight = memory_tightened(problem, cost_model, share)
        if tight is None:
            continue
        say(f"{repair_reason(error)}; solving again with each MetaOp within {share:g} of a device")
        # the held-back candidates are left out here (plan_job searches them only on the job's own curves)
        solved = held_back(solve(tight, settings, warm=spindle_schedule(tight), lower_bound=bounds.dag_s,
                                 progress=say))[0]
        try:
            return tight, choose_candidate(tight, cost_model, solved, deadline=settings.deadline)
        except PlanningError:
            continue
    raise error


def repair_reason(error: PlanningError) -> str:
    """Why the solver's candidates were refused, for the memory repair's progress line: a wave without room for its
    tensor-parallel groups inside nodes is not a memory limit (tighter layouts may still place: other TP degrees)."""
    if isinstance(error, TensorParallelRoomError):
        return "no candidate keeps its tensor-parallel groups inside nodes"
    return "no candidate fits in device memory"


FINISH_CPU_S_PER_CELL = 1.5e-6  # CPU seconds per MetaOp x device of what follows the search (baselines, one placement)


def finishing_reserve(problem: Problem, limit_s: float) -> float:
    """CPU seconds of the time limit kept for the work after the search (placing the chosen candidate, the baselines,
    packing the plan), which grows with MetaOps x devices: ~1.5 s at 100 x 10,240; at most half the limit."""
    return min(0.5 * limit_s, FINISH_CPU_S_PER_CELL * len(problem.graph) * problem.num_devices)


def plan_schedule(job: JobSpec, schedule: Schedule, cost_model: CostModel | None = None, method: str = "given",
                  phases: tuple[int, ...] = (0,)) -> Plan:
    """A sealed Plan for a given wave schedule (placed and simulated like the planner's own; ``phases``: the first wave
    of each phase, planner.phases), e.g. the sequential baseline for a side-by-side run, or a hand-made schedule in
    tests. No baselines."""
    cost_model = cost_model or make_cost_model(job)
    problem = Problem.build(build_metagraph(job), cost_model)
    check_schedule(problem, schedule)
    return plan_placed(job, replace(place_schedule(problem, schedule, cost_model), phases=tuple(phases)), cost_model,
                       method)


def plan_placed(job: JobSpec, placed: PlacedSchedule, cost_model: CostModel | None = None, method: str = "given") -> Plan:
    """A sealed Plan for a placed schedule as it is (e.g. a baseline's, planner.baselines), simulated. No baselines."""
    cost_model = cost_model or make_cost_model(job)
    graph = build_metagraph(job)
    problem = Problem.build(graph, cost_model)
    sim = simulate(problem, placed, cost_model)
    bounds = plan_bounds(problem, cost_model)
    schedule = schedule_of(placed)
    try:
        makespan = compute_makespan(problem, schedule)
    except KeyError:  # a count the job's curves do not pick (uneven row shares, planner.rows): as simulated
        makespan = sim.compute_s
    gap = (makespan - bounds.dag_s) / makespan if makespan > 0 else 0.0
    result = SolveResult(schedule, method, "heuristic", makespan, bounds.dag_s, gap, method)
    return build_plan(job, graph, cost_model, placed, sim, result, bounds, {})


def predict_plan(job: JobSpec, plan: Plan, cost_model: CostModel) -> Simulation:
    """The simulator's iteration for ``plan`` exactly as placed (same slices on the same devices) under
    ``cost_model``: e.g. a plan made with one profile, predicted with a later one; with ZeRO-1 as the plan runs it
    (planner.plan.zero_sharded)."""
    pipelined, one_f_one_b = micro_batch_walk(plan, job.training)
    cost_model = cost_model.with_shard_optimizer(zero_sharded(plan, job.training)).with_in_flight(
        job.training.grad_accum_steps if pipelined else 1).with_one_f_one_b(one_f_one_b)
    graph = build_metagraph(job)
    waves = tuple(PlacedWave(tuple(
        PlacedSlice(s.metaop, s.first_layer, s.num_layers, tuple(s.devices), Layout(s.dp_degree, s.tp_degree))
        for s in wave.slices)) for wave in plan.waves)
    return simulate(Problem.build(graph, cost_model), PlacedSchedule(waves, tuple(plan.phases)), cost_model)


PLACE_BUDGET = 200_000  # work units (refine.evaluation_cost) of placing and simulating candidates: all of them up to
# ~1,000 devices x 200 MetaOps, the best few beyond (the first always, whatever it costs)
UNFIT_BEFORE_REPAIR = 4  # candidates over memory (shortest compute first) after which, none fitting, memory is
# repaired: the solver's four LP-based ones (synth-vlm-15@4096: layer rounding, the packing ILP and diving need 105-109
# GiB of 80, two-wave packing fits)
REFINE_TOP = 2  # the best placed candidates (distinct schedules) the transfer-aware search starts from
REFINE_BUDGET = 4000  # work units of that search (refine.evaluation_cost), shared by its starts
REFINED = ", transfer-refined"  # method suffix of a plan the search improved
COMPUTE_BUDGET = 2000  # work units (refine.compute_cost) of the compute search from the best placed candidate: about
# 40-100 evaluations at 8 devices, at most 25 at 32; not started below refine.MIN_EVALUATIONS (most 32-device cells, the
# sweep and scale cells). The solver prices waves as the timeline runs them, so it finds little: 6000 units made
# clip-4@16 1.2% faster and clip-4@32 0.2% slower, the other grid cells equal, for 0.1-0.5 CPU s more a cell
# (ofasys-7@16 then plans in over 3 s)
COMPUTE_REFINED = ", compute-refined"  # method suffix of a plan that search improved
ORDER_TOP, ORDER_LEAST = 2, 2  # the fastest and then the least-compute placed schedules the order search starts from
ORDER_BUDGET = 2000  # work units (refine.evaluation_cost) of that search, shared by its starts: 25-60 evaluations
# at 8-32 devices
ORDER_SPLIT_BUDGET = 2000  # work units (bucketsplit.split_cost) of splitting the schedules it improved
REORDERED = ", reordered"  # method suffix of a plan that search improved
IN_PLACE_BUDGET = 2000  # work units (bucketsplit.split_cost) of reordering the chosen plan in place (planner.waveorder)
SPLIT_TOP = 8  # the best placed candidates (distinct schedules, refined ones included) whose buckets are split
SPLIT_BUDGET = 12_000  # work units (bucketsplit.split_cost) of bucket splitting, shared by those candidates
LATE_SHARE = 0.25  # of each search budget above, for the held-back candidates' own search (late_alternatives)
TIGHTEN_BUDGET = 1500  # work units (bucketsplit.split_cost: slices per simulation at <= 64 devices) of tightening
# the chosen plan's waves (planner.tighten): 15-40 simulations in a grid cell, not started in the sweep and scale cells
LEAST_SPLIT_BUDGET = 3000  # work units of splitting the least-compute schedules (leastcompute.LEAST_SPLIT_TOP)


def choose_candidate(problem: Problem, cost_model: CostModel, solved: SolveResult, deadline: float | None = None,
                     grace_s: float = math.inf, share: float = 1.0,
                     ) -> tuple[SolveResult, PlacedSchedule, Simulation, dict[str, str], tuple[Alternative, ...]]:
    """Place and simulate every candidate schedule the solver found; keep the shortest predicted iteration.

    The solver ranks by compute alone; transfers and shared-parameter sync depend on placement, so the
    final choice is made on the full simulated time: every candidate in both orders of its independent
    runs, under every placement strategy (one node: packing only), then the transfer-aware local search
    (:mod:`planner.refine`) from the best few, the compute search from the best and bucket splits. A candidate that does not fit in memory is skipped; when
    none fits, the error of the shortest one is raised. Also returns why each unfit candidate failed, and every
    placed, refined or split schedule as an Alternative (the caller may prefer one of those predicted within
    :data:`planner.leastcompute.TOLERANCE` of the chosen one once the baselines are known,
    :func:`prefer_less_compute`, or one that is faster at the other ZeRO-1 setting, :func:`prefer_unsharded`).
    Placing stops at :data:`PLACE_BUDGET` work units (see :func:`_place_candidates`; the first candidate is always
    placed): deterministic. ``share`` scales the budgets of the searches after placing (the held-back candidates' own
    search: :func:`late_alternatives`). Past ``deadline`` (``time.thread_time()``, the planner's time limit; a safety cap) only
    the best candidate's variants are still placed and the local search is skipped."""
    placed_all, error, unfit = _place_candidates(problem, cost_model, solved, deadline, grace_s)
    if not placed_all:
        raise error
    ranked = sorted(placed_all, key=lambda e: e[2].sim.iteration_time_s)  # stable: solver order among equals
    best_name, cand, best = ranked[0]
    budget = int(REFINE_BUDGET * share)
    for name, start_cand, ev in _distinct(ranked, REFINE_TOP):
        if deadline is not None and time.thread_time() >= deadline:
            log.info("time limit reached: transfer-aware search skipped")
            break
        found, spent = refine_transfers(problem, cost_model, ev, budget)
        budget -= spent
        if found.sim.iteration_time_s < best.sim.iteration_time_s * (1 - 1e-12):
            best_name, cand, best = name + REFINED, start_cand, found
        if found is not ev:
            ranked.append((name + REFINED, start_cand, found))
    # the compute search (planner.refine.refine_compute) from the best so far: layers and counts moved, judged on the
    # simulated iteration
    if deadline is None or time.thread_time() < deadline:
        found, _ = refine_compute(problem, cost_model, best, int(COMPUTE_BUDGET * share))
        if found is not best:
            best_name, best = best_name + COMPUTE_REFINED, found
            ranked.append((best_name, cand, found))
    # bucket splits (planner.bucketsplit) on the best few distinct schedules: a schedule whose sync starts late or
    # ends with a large bucket can overtake one that was faster before; then on the least-compute few, which a split
    # may bring within the tolerance of the fastest (planner.leastcompute)
    split, tried = _split_some(problem, cost_model, sorted(ranked, key=lambda e: e[2].sim.iteration_time_s),
                               SPLIT_TOP, int(SPLIT_BUDGET * share), deadline, [])
    by_compute = sorted(ranked, key=lambda e: (waves_compute(problem, e[2].schedule), e[2].sim.iteration_time_s))
    pool = ranked + split + _split_some(problem, cost_model, by_compute, LEAST_SPLIT_TOP,
                                        int(LEAST_SPLIT_BUDGET * share), deadline, tried)[0]
    # last, the order search (planner.refine.refine_order) from the fastest and the least-compute few, each result's
    # buckets split again: a schedule's wave order decides its transfers and its last, unhidden sync
    reordered = _reorder_some(problem, cost_model, sorted(pool, key=lambda e: e[2].sim.iteration_time_s),
                              int(ORDER_BUDGET * share), int(ORDER_SPLIT_BUDGET * share), deadline)
    pool += reordered
    for name, start_cand, ev in split + reordered:
        if ev.sim.iteration_time_s < best.sim.iteration_time_s * (1 - 1e-12):
            best_name, cand, best = name, start_cand, ev
    # the searches move slices between devices: keep only what the runtime can decode (planner.generation)
    pool = [e for e in pool if decode_refused(problem.graph.metaops, e[2].placed) is None]
    if decode_refused(problem.graph.metaops, best.placed) is not None:
        best_name, cand, best = min(pool, key=lambda e: e[2].sim.iteration_time_s)
    results = {id(e[2]): _result_of(problem, solved, e[0], e[1], e[2]) for e in pool}
    alternatives = tuple(Alternative(results[id(e[2])], e[2].placed, e[2].sim, waves_compute(problem, e[2].schedule))
                         for e in pool)
    return results[id(best)], best.placed, best.sim, unfit, alternatives


def late_alternatives(problem: Problem, cost_model: CostModel, late: SolveResult | None, deadline: float | None,
                      ) -> tuple[Alternative, ...]:
    """The held-back candidates (:data:`planner.leastcompute.LATE`) through the same search as the others
    (:func:`choose_candidate`: placed, refined, split), each on its own (so that one more held back leaves the others'
    searches as they were): their placed schedules, for :func:`planner.leastcompute.adopt_late`. Empty when there are
    none, none fits, past ``deadline``, or where one placement of them costs more than their transfer-aware search's
    budget (the scale cells)."""
    if late is None or (deadline is not None and time.thread_time() >= deadline):
        return ()
    if evaluation_cost(problem, late.candidates[0].schedule) > REFINE_BUDGET * LATE_SHARE:
        return ()  # not one refining step affordable (thousands of devices): placing them alone costs seconds
    found: list[Alternative] = []
    for name in dict.fromkeys(c.name for c in late.candidates):
        if found and deadline is not None and time.thread_time() >= deadline:
            break
        try:
            found += choose_candidate(problem, cost_model, replace(late, candidates=tuple(
                c for c in late.candidates if c.name == name)), deadline=deadline, share=LATE_SHARE)[4]
        except PlanningError:
            continue
    return tuple(found)


def _reorder_some(problem: Problem, cost_model: CostModel, ranked: list, budget: int, split_budget: int,
                  deadline: float | None) -> list:
    """The order search (:func:`planner.refine.refine_order`) from the :data:`ORDER_TOP` fastest and then the
    :data:`ORDER_LEAST` least-compute distinct schedules of ``ranked`` (name, candidate, Evaluated; fastest first),
    sharing ``budget`` work units, within ``deadline``: each improved one as (name + REORDERED, candidate,
    Evaluated), and then those of them whose buckets ``split_budget`` work units split (:func:`_split_some`)."""
    by_compute = sorted(ranked, key=lambda e: (waves_compute(problem, e[2].schedule), e[2].sim.iteration_time_s))
    out = []
    for name, start_cand, ev in _distinct(by_compute, ORDER_TOP + ORDER_LEAST, _distinct(ranked, ORDER_TOP)):
        if budget <= 0 or (deadline is not None and time.thread_time() >= deadline):
            break
        found, spent = refine_order(problem, cost_model, ev, budget)
        budget -= spent
        if found is not ev:
            out.append((name + REORDERED, start_cand, found))
    return out + _split_some(problem, cost_model, out, len(out), split_budget, deadline, [])[0]


def _distinct(entries: list, top: int, first: list | None = None) -> list:
    """``first`` (default none) and then ``entries`` (name, candidate, Evaluated) whose schedule none before has, up to
    ``top`` in all."""
    out = list(first or [])
    for entry in entries:
        if len(out) >= top:
            break
        if all(entry[2].schedule != other[2].schedule for other in out):
            out.append(entry)
    return out


def _split_some(problem: Problem, cost_model: CostModel, entries: list, top: int, budget: int,
                deadline: float | None, done: list) -> tuple[list, list]:
    """Bucket splits (:func:`planner.bucketsplit.split_buckets`) of the first ``top`` distinct schedules of
    ``entries`` (name, candidate, Evaluated) not in ``done`` (schedules tried already), within ``budget`` work units
    and ``deadline``: each improved one as (name + SPLIT, candidate, Evaluated), and ``done`` with those tried."""
    out, tried = [], list(done)
    for name, start_cand, ev in entries:
        if len(tried) - len(done) == top or budget <= 0 or (deadline is not None and time.thread_time() >= deadline):
            break
        if any(ev.schedule == other for other in tried):
            continue
        tried.append(ev.schedule)
        found, found_sim, spent = split_buckets(problem, cost_model, ev.placed, ev.sim, budget)
        budget -= spent
        if found is not ev.placed:
            out.append((name + SPLIT, start_cand, Evaluated(schedule_of(found), ev.strategy, found, found_sim)))
    return out, tried


def _result_of(problem: Problem, solved: SolveResult, name: str, cand: Candidate, ev: Evaluated) -> SolveResult:
    """The solver's report for a placed schedule: its compute, gap and method; a reordered schedule has its
    candidate's status, a refined or split one is a local-search result."""
    makespan = compute_makespan(problem, ev.schedule)
    gap = (makespan - solved.bound_s) / makespan if makespan > 0 else 0.0
    status = "heuristic" if name.endswith((REFINED, COMPUTE_REFINED, REORDERED, SPLIT)) else cand.status
    return replace(solved, schedule=ev.schedule, status=status, objective_s=makespan, gap=gap, method=name)


def _place_candidates(problem: Problem, cost_model: CostModel, solved: SolveResult, deadline: float | None = None,
                      grace_s: float = math.inf,
                      ) -> tuple[list[tuple[str, Candidate, Evaluated]], PlanningError | None, dict[str, str]]:
    """Candidate x order x strategy placements that fit, named (in candidate, then variant, order); the first
    placement error; why each unfit candidate (its own order, packed) failed.

    Two passes, so that a budget or the time limit that allows only a few placements spreads them over the
    candidates: first every candidate in its own order, packed (shortest compute first); then the other orders and
    strategies, the best candidates of the first pass first. Once something fits, the first pass stops at half of
    :data:`PLACE_BUDGET` work units, the second at all of it, and both past ``deadline`` (the best candidate's
    variants excepted for ``grace_s`` more seconds, part of what the time limit keeps after the search); with nothing fitting after :data:`UNFIT_BEFORE_REPAIR` candidates, placing stops. A
    variant whose schedule and strategy were placed already (a reversed candidate equal to another) is skipped."""
    candidates = list(solved.candidates or ())
    strategies = STRATEGIES if cost_model.hw.num_nodes > 1 else STRATEGIES[:1]
    orders = [("", lambda c: c.schedule), (" reversed", lambda c: reverse_runs(problem, c.schedule))]
    placed: dict[tuple[int, int, int], tuple[str, Candidate, Evaluated]] = {}
    error, unfit, spent, seen = None, {}, 0, set()

    def stop(grace: bool = False) -> bool:
        past = deadline is not None and time.thread_time() >= deadline + (grace_s if grace else 0.0)
        return bool(placed) and (spent >= PLACE_BUDGET or past)

    def place(i: int, o: int, s: int) -> None:
        nonlocal error, spent
        cand, (order, schedule_of), strategy = candidates[i], orders[o], strategies[s]
        schedule = schedule_of(cand)
        if (schedule, strategy) in seen:
            return
        seen.add((schedule, strategy))
        check_schedule(problem, schedule)
        spent += evaluation_cost(problem, schedule)
        try:
            result = place_schedule(problem, schedule, cost_model, strategy=strategy)
            why = decode_refused(problem.graph.metaops, result)  # a decode the runtime cannot give its weights
            if why is not None:
                raise PlanningError(f"{cand.name}: {why}")
        except PlanningError as exc:
            error = error or exc
            if o == 0 and s == 0:
                unfit[cand.name] = str(exc)
            return
        suffix = order + ("" if s == 0 else f", {strategy}ed placement")
        placed[i, o, s] = (cand.name + suffix, cand, Evaluated(schedule, strategy, result, simulate(problem, result,
                                                                                                      cost_model)))

    def first_pass_time(i: int) -> float:
        return placed[i, 0, 0][2].sim.iteration_time_s if (i, 0, 0) in placed else float("inf")

    for passes in range(2):
        if passes == 0:  # one per schedule up to the order of its runs (two-wave is often packing-ilp reversed)
            keys, forms = [], set()
            for i, cand in enumerate(candidates):
                if cand.schedule not in forms:
                    keys.append((i, 0, 0))
                    forms |= {cand.schedule, orders[1][1](cand)}
        else:
            keys = [(i, o, s) for i in sorted(range(len(candidates)), key=lambda i: (first_pass_time(i), i))
                    for o in range(len(orders)) for s in range(len(strategies)) if (o, s) != (0, 0)]
        for n, key in enumerate(keys):
            # past the time limit, the other orders and strategies of the best candidate are still placed
            if stop(grace=passes == 1 and n < len(orders) * len(strategies) - 1):
                break
            if spent >= PLACE_BUDGET / (2 - passes) or (not placed and len(unfit) >= UNFIT_BEFORE_REPAIR):
                break  # with none fitting, the caller repairs memory instead
            place(*key)
    if len(placed) < len(candidates) * len(orders) * len(strategies):
        log.info("placement budget or time limit: %d placements of %d candidates", len(placed), len(candidates))
    return [placed[key] for key in sorted(placed)], error, unfit


def build_plan(
    job: JobSpec, graph: MetaGraph, cost_model: CostModel, placed: PlacedSchedule, sim: Simulation,
    result: SolveResult, bounds: Bounds, baseline_times: dict[str, float], baseline_notes: dict[str, str] | None = None,
) -> Plan:
    """Pack the pieces into a sealed Plan (pure data, deterministic)."""
    hw = cost_model.hw
    metaops = [
        PlanMetaOp(
            id=op.id, name=op.name, task=op.task, component=op.component, layer_key=op.key,
            num_layers=op.num_layers, batch_size=op.batch_size, deps=list(op.deps), level=op.level,
            param_group=op.param_group, frozen=op.frozen, params_per_layer=op.layer.params,
            out_bytes_per_sample=op.layer.out_bytes, use=op.use, segment=op.segment, recompute=op.recompute,
            input_modules=list(op.input_modules), mode=op.mode,
        )
        for op in graph.metaops
    ]
    waves, start = [], 0.0
    for k, (wave, duration) in enumerate(zip(placed.waves, sim.wave_durations)):
        slices = [
            PlanSlice(
                metaop=s.metaop, first_layer=s.first_layer, num_layers=s.num_layers, devices=list(s.devices),
                dp_degree=s.layout.dp_degree, tp_degree=s.layout.tp_degree, time_s=seconds,
                forward_s=passes[0],
                memory_bytes=cost_model.layer_memory(graph.metaops[s.metaop], s.layout) * s.num_layers,
                rows=list(row_shares(graph.metaops[s.metaop].batch_size, s.layout.dp_degree)),
            )
            for s, seconds, passes in zip(wave.slices, sim.slice_seconds[k], sim.slice_passes[k])
        ]
        phase = sim.phases[k]
        waves.append(PlanWave(index=k, start_s=start, duration_s=duration, forward_s=phase.forward_s,
                              transfer_in_s=phase.transfer_in_s, transfer_back_s=phase.transfer_back_s, slices=slices))
        start += duration
    loss = sim.phases[-1]
    plan = Plan(
        job=job.name,
        spec_hash=spec_hash(job),
        cost_model=cost_model.source,
        cluster=PlanCluster(num_nodes=hw.num_nodes, devices_per_node=hw.devices_per_node, device=hw.device.name,
                            memory_bytes=hw.memory_bytes),
        metaops=metaops,
        waves=waves,
        phases=list(placed.phases),
        transfers=[PlanTransfer(**vars(t)) for t in sim.transfers],
        pieces=plan_pieces(graph.metaops, placed, cost_model.weight_bytes),
        holdings=plan_holdings(sim.holdings),
        grad_buckets=plan_buckets(sim.buckets),
        process_groups=process_groups(sim.holdings, placed),
        sync_groups=[SyncGroup(**vars(g)) for g in sim.sync_groups],
        handoffs=[PlanHandoff(**vars(h)) for h in sim.handoffs],
        handoff_gathers=[PlanHandoffGather(**vars(g)) for g in sim.handoff_gathers],
        predicted=Prediction(iteration_time_s=sim.iteration_time_s, compute_s=sim.compute_s,
                             transfer_s=sim.transfer_s, sync_s=sim.sync_s, optimizer_s=sim.optimizer_s,
                             gather_s=sim.gather_s, loss_s=loss.forward_s, loss_transfer_in_s=loss.transfer_in_s,
                             loss_transfer_back_s=loss.transfer_back_s, handoff_s=sim.handoff_s,
                             reduce_s=sim.reduce_s, lag_hidden_s=sim.lag_hidden_s),
        shard_optimizer=cost_model.shard_optimizer if job.training.shard_optimizer == "auto" else None,
        pipelined=cost_model.in_flight > 1 if pipelining_left_to_planner(job) else None,
        one_f_one_b=True if cost_model.one_f_one_b and cost_model.in_flight > 1 else None,
        peak_memory_bytes=list(sim.peak_memory_bytes),
        solver=SolverReport(name=result.solver, status=result.status, objective_s=result.objective_s,
                            bound_s=result.bound_s, gap=result.gap, method=result.method),
        bounds=bounds,
        baselines=dict(sorted(baseline_times.items())),
        baseline_notes=dict(sorted((baseline_notes or {}).items())),
    )
    return plan.sealed()
