"""Loom's solver: workload parallelization and dependency-driven wave scheduling.

One monolithic wave MILP does not close its gap at realistic sizes (stack notes: 47-84% gap after
60 s at 40 MetaOps x 64 devices), so the solver exploits the problem's structure in three steps:

1. **Stage windows (dependency-driven).** MetaOps are given windows of *stages*; a MetaOp may run
   in any stage of its window and its successors only in later stages. BFS levels give Spindle's
   barriers; ASAP- and ALAP-extended windows let a MetaOp with slack (a text-only task's LLM, a
   light encoder) spread over several levels, so levels overlap where dependencies allow.
2. **Allocation: configuration LP by column generation.** A *configuration* is a set of (MetaOp,
   device count) pairs that fit on N devices. Variables are the durations y of configurations per
   stage; rows ``layers[m]`` ask that each MetaOp's layers are covered (a configuration runs
   y / T_m(n) layers of m). Pricing a new configuration is a multiple-choice knapsack over the
   devices, solved exactly by dynamic programming, so the LP is solved to optimality. Its value is
   the best schedule with valid device counts and fractional layer counts for these windows.
3. **Packing: wave MILP (PuLP, HiGHS by default, CBC as fallback).** Each positive configuration
   becomes a wave; integer layers x[m,k,n] and binaries z[m,k,n] over the LP's count and its two
   neighbours, rows ``layers[m]``, ``one_slice[m,k]``, ``link[m,k,n]``, ``capacity[k]``,
   ``duration[m,k,n]``; objective: sum of wave durations. Warm-started from a rounding of the LP
   and limited by a node limit (deterministic) and a wall-clock backstop.

4. **Pool diving** (:mod:`planner.pooldive`, up to its size): the LP priced again on more caps, a pool of patterns
   priced at perturbed duals, and a dive over that pool finished by a small packing ILP; a candidate where it saves
   compute (:data:`POOL_GAIN`).

The result is the best of the MILP's incumbent, the LP rounding and the warm start given by the
caller (Spindle's wavefront), so it is never worse than the greedy.

**Time limit.** ``SolverSettings.deadline`` (``planner.time_limit_s`` of this process's CPU time after planning
starts) bounds the whole search, not only each MILP: once it has passed, the optional work (column generation,
further LP window modes, local search rounds, the two-wave packing of later levels, the packing ILP, the exact
MILP) is skipped and the best candidate so far wins. CPU time, not the wall clock, so that a busy machine does
not change the plan: on an idle one the two agree. HiGHS limits only wall time, so a MILP's limit is the CPU time
left scaled by the wall/CPU rate planning has had so far (:meth:`SolverSettings.milp_limit_s`). Normal jobs finish long before it, so only oversized ones
see a different (never invalid) plan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from planner.milp import build_wave_milp, explain_infeasible, make_solver, set_start, solve_wave_milp
from planner.patterns import (
    Column, PatternLP, PatternMaster, dive, pattern_duration, patterns_to_schedule, round_layers, solve_pattern_ip,
    solve_pattern_lp,
)
from planner.polish import polish
from planner.pooldive import pool_dive
from planner.twowave import pack_stage
from planner.errors import PlanningError
from planner.schedule import Problem, Schedule, Slice, Wave, compute_makespan

log = logging.getLogger(__name__)



MAX_WALL_PER_CPU = 16.0
EXACT_TIME_SHARE = 0.5  # of the time left, what the exact MILP may take; stopped by the clock, its result is dropped
POOL_GAIN = 0.01  # of the least compute among the other candidates: what pool diving's must save to become one


def clocks() -> tuple[float, float]:
    """(wall, this thread's CPU) now: where planning starts, for :meth:`SolverSettings.milp_limit_s`'s rate."""
    return time.perf_counter(), time.thread_time()


@dataclass(frozen=True)
class SolverSettings:
    solver: str = "highs"  # "highs" or "cbc"
    time_limit_s: float = 10.0  # wall-clock backstop of each MILP solve
    mip_gap: float = 0.005
    level_barriers: bool = False  # True: Spindle's level barriers (no overlap of MetaLevels)
    max_nodes: int = 2000  # deterministic work limit of the MILP (branch-and-bound nodes)
    deadline: float | None = None  # time.thread_time() after which optional search stops; solve(): start + limit
    started: tuple[float, float] | None = None  # clocks() when planning started (None: the MILP limit is wall time)

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.thread_time() >= self.deadline

    def milp_limit_s(self) -> float:
        """The wall-clock limit of a MILP solve started now: time_limit_s, or the CPU time left before the deadline,
        in wall seconds at the rate this process has been getting CPU (HiGHS limits wall time only: on a machine
        shared with other work, a limit of the CPU seconds left cut solves short that finish on an idle one, and the
        plan changed with the load)."""
        left = self.time_limit_s if self.deadline is None else self.deadline - time.thread_time()
        return max(min(self.time_limit_s, left), 0.01) * self.wall_per_cpu()

    def wall_per_cpu(self) -> float:
        """Wall seconds per CPU second this thread has had since planning started (>= 1, 1 on an idle machine: the
        planner is CPU-bound), capped at :data:`MAX_WALL_PER_CPU`; 1 without ``started`` or before 0.05 s of CPU."""
        if self.started is None:
            return 1.0
        wall, cpu = time.perf_counter() - self.started[0], time.thread_time() - self.started[1]
        return min(max(wall / cpu, 1.0), MAX_WALL_PER_CPU) if cpu > 0.05 else 1.0


@dataclass(frozen=True)
class SolveResult:
    schedule: Schedule
    solver: str
    status: str  # "optimal" (exact model, within mip_gap), "feasible" (an ILP incumbent), or "heuristic"
    objective_s: float  # compute makespan of ``schedule``
    bound_s: float  # a lower bound valid for every schedule (the caller's, raised by the LP when barriers hold)
    gap: float  # (objective - bound) / objective
    method: str  # which candidate won: lp-diving, two-wave, packing-ilp, lp-rounding, pool-diving, exact-milp, spindle,
    # sequential (+polish, reversed)
    lp_value_s: float = 0.0  # the allocation LP's value for the chosen windows
    candidates: tuple = ()  # every Candidate considered, shortest first (for callers that rank by full time)


# --------------------------------------------------------------------------- stage windows


def stage_windows(problem: Problem, mode: str) -> tuple[list[tuple[int, int]], int]:
    """Per MetaOp the [first, last] stage it may run in, and the number of stages.

    ``levels``: its BFS level only (Spindle). ``asap``: from its level to just before the earliest
    level of a successor. ``alap``: from just after its predecessors' latest ALAP level to its ALAP
    level. Both extended forms keep last(pred) < first(succ) on every edge."""
    ops = problem.graph.metaops
    num_stages = len(problem.graph.levels)
    asap = [op.level for op in ops]
    succ = problem.graph.successors()
    height = [0] * len(ops)  # longest path (in edges) to a sink
    for op in reversed(ops):
        height[op.id] = 1 + max((height[s] for s in succ[op.id]), default=-1)
    alap = [num_stages - 1 - h for h in height]
    if mode == "levels":
        return [(a, a) for a in asap], num_stages
    if mode == "asap":
        return [(asap[m], min((asap[s] for s in succ[m]), default=num_stages) - 1) for m in range(len(ops))], num_stages
    if mode == "alap":
        return [(max((alap[p] for p in ops[m].deps), default=-1) + 1, alap[m]) for m in range(len(ops))], num_stages
    raise ValueError(f"unknown window mode {mode!r}")


# --------------------------------------------------------------------------- exact MILP (small instances)

EXACT_MAX_CANDIDATES = 300  # the full model is tried when it has at most this many (m, k, n) triples


def full_candidates(problem: Problem, num_waves: int) -> list[tuple[int, int, int]]:
    """Every (m, k, n): the monolithic wave model of DESIGN.md section 4.3."""
    return [(m, k, n) for m in range(len(problem.graph)) for k in range(num_waves) for n in problem.curves[m].counts]


def solve_exact(problem: Problem, settings: SolverSettings, num_waves: int | None = None,
                start: Schedule | None = None):
    """The full wave MILP with precedence rows over ``num_waves`` waves (default: one per layer, which
    is exact). For small instances only. Raises PlanningError with an explanation when infeasible."""
    num_waves = num_waves or sum(op.num_layers for op in problem.graph.metaops)
    cands = full_candidates(problem, num_waves)

    def build(families=None):
        kwargs = {"families": families} if families is not None else {}
        return build_wave_milp(problem, cands, num_waves, precedence=True, **kwargs)

    milp = build()
    if start is not None:
        set_start(problem, milp, start)
    # at most half the time left: the placement and refinement after the search keep theirs
    solver = make_solver(settings.solver, settings.milp_limit_s() * EXACT_TIME_SHARE, settings.mip_gap,
                         settings.max_nodes)
    result = solve_wave_milp(problem, milp, solver)
    if result.schedule is None and result.status == "infeasible":
        raise PlanningError("no wave schedule: " + explain_infeasible(problem, build, solver))
    if getattr(solver, "time_limited", False):  # an incumbent of wherever the clock stopped it: not reproducible
        return replace(result, schedule=None, status="time limit")
    return result


# --------------------------------------------------------------------------- driver


def _best_lp(problem: Problem, settings: SolverSettings, say) -> tuple[PatternLP, PatternMaster, list[tuple[int, int]]]:
    """The pattern LP for each kind of stage windows; the one with the lowest value, its master and windows."""
    modes = ("levels",) if settings.level_barriers else ("levels", "asap", "alap")
    best = None
    tried = set()
    for mode in modes:
        if best is not None and settings.past_deadline():
            say(f"time limit reached: allocation LP of the {mode} windows skipped")
            break
        windows, num_stages = stage_windows(problem, mode)
        if tuple(windows) in tried:
            continue
        tried.add(tuple(windows))
        t0 = time.perf_counter()
        lp, master = solve_pattern_lp(problem, windows, num_stages, deadline=settings.deadline)
        say(f"allocation LP ({mode} windows): {lp.value:.4g} s, {len(lp.columns)} patterns, {lp.rounds} rounds, "
            f"{time.perf_counter() - t0:.2f} s")
        if best is None or lp.value < best[0].value * (1 - 1e-9):
            best = (lp, master, windows)
    return best


@dataclass(frozen=True)
class Candidate:
    name: str
    schedule: Schedule
    makespan_s: float
    status: str  # "optimal", "feasible" or "heuristic"


def _candidate(problem: Problem, name: str, schedule: Schedule, status: str = "heuristic",
               deadline: float | None = None) -> Candidate:
    """A candidate after local search (which never lengthens a schedule; it stops at ``deadline``)."""
    polished = polish(problem, schedule, deadline=deadline)
    return Candidate(name, polished, compute_makespan(problem, polished), status)


def _two_wave(problem: Problem, say, deadline: float | None = None) -> list[Candidate]:
    waves = []
    for level in problem.graph.levels:
        if deadline is not None and time.thread_time() >= deadline:
            say("time limit reached: two-wave packing skipped")
            return []
        packed = pack_stage(problem, level)
        if packed is None:
            return []
        waves.extend(packed[1])
    found = _candidate(problem, "two-wave", Schedule(tuple(waves)), deadline=deadline)
    say(f"two-wave packing per level: {found.makespan_s:.4g} s")
    return [found]


def _wave_columns(problem: Problem, schedule: Schedule, windows) -> list[Column] | None:
    """The waves of ``schedule`` as pattern columns, each in the first stage every one of its MetaOps may use;
    None when some wave fits no stage of ``windows``."""
    out = []
    for wave in schedule.waves:
        lo = max(windows[s.metaop][0] for s in wave.slices)
        hi = min(windows[s.metaop][1] for s in wave.slices)
        if lo > hi:
            return None
        pattern = tuple(sorted((s.metaop, s.num_devices, s.num_layers) for s in wave.slices))
        out.append(Column(lo, pattern, pattern_duration(problem, pattern)))
    return out


def _recombine(problem: Problem, settings: SolverSettings, master: PatternMaster, windows, dived: Sequence[int],
               lp: PatternLP, found: Sequence[Candidate], say) -> list[Candidate]:
    """The packing ILP over the LP's support, the diving patterns and every candidate's waves: it may
    recombine waves of different methods. Warm-started from the best candidate whose waves fit the windows."""
    index: dict[tuple[int, tuple], int] = {}
    columns: list[Column] = []

    def column_id(col: Column) -> int:
        key = (col.stage, col.pattern)
        if key not in index:
            index[key] = len(columns)
            columns.append(col)
        return index[key]

    start: dict[int, int] = {}
    for i in sorted({i for i, v in enumerate(lp.y) if v > 1e-9} | {i for i, c in enumerate(dived) if c}):
        j = column_id(master.columns[i])
        if dived[i]:
            start[j] = dived[i]
    best_start = (compute_makespan(problem, patterns_to_schedule(problem, master.columns, dived)), start)
    for cand in found:
        cols = _wave_columns(problem, cand.schedule, windows)
        if cols is None:
            continue
        ids = [column_id(c) for c in cols]
        if cand.makespan_s < best_start[0]:
            best_start = (cand.makespan_s, {j: ids.count(j) for j in ids})
    t0 = time.perf_counter()
    warm = [best_start[1].get(j, 0) for j in range(len(columns))]
    counts, status, _ = solve_pattern_ip(problem, columns, warm, settings.solver, settings.milp_limit_s(),
                                         settings.mip_gap, settings.max_nodes)
    if counts is None:
        return []
    # optimal over these columns only, so a feasible plan for the whole problem
    packed = _candidate(problem, "packing-ilp", patterns_to_schedule(problem, columns, counts), "feasible",
                        settings.deadline)
    say(f"packing ILP ({settings.solver}, {len(columns)} columns): {packed.makespan_s:.4g} s, {status}, "
        f"{time.perf_counter() - t0:.2f} s")
    return [packed]


def sequential_schedule(problem: Problem) -> Schedule:
    """Megatron-LM/DeepSpeed style as waves: one MetaOp per wave, task after task, each on its fastest count.
    A candidate because with heavy activations or tiny workloads moving nothing can beat sharing devices."""
    tasks = list(dict.fromkeys(op.task for op in problem.graph.metaops))
    order = sorted(problem.graph.metaops, key=lambda op: (tasks.index(op.task), op.id))
    return Schedule(tuple(Wave((Slice(op.id, op.num_layers, problem.curves[op.id].counts[-1]),)) for op in order))


def solve(problem: Problem, settings: SolverSettings, warm: Schedule | None = None, lower_bound: float = 0.0,
          progress: Callable[[str], None] | None = None, warm_name: str = "spindle") -> SolveResult:
    """Plan the waves of ``problem``. Candidates from every method are improved by local search and the
    shortest wins, so the result is never worse than ``warm`` (compute makespan)."""
    say = progress or log.info
    t0 = time.perf_counter()
    if settings.deadline is None:
        settings = replace(settings, deadline=time.thread_time() + settings.time_limit_s)
    deadline = settings.deadline
    lp, master, windows = _best_lp(problem, settings, say)
    lp_exact = not settings.past_deadline()  # column generation stopped by the deadline: its value bounds nothing
    dived = dive(master, deadline=deadline)
    found = [_candidate(problem, "lp-diving", patterns_to_schedule(problem, master.columns, dived), deadline=deadline)]
    say(f"diving: {found[-1].makespan_s:.4g} s, {len(master.columns)} patterns, {time.perf_counter() - t0:.2f} s")
    found += _two_wave(problem, say, deadline)
    seq = sequential_schedule(problem)
    found += [Candidate("sequential", seq, compute_makespan(problem, seq), "heuristic"),
              _candidate(problem, "sequential+polish", seq, deadline=deadline)]
    if warm is not None:
        found += [Candidate(warm_name, warm, compute_makespan(problem, warm), "heuristic"),
                  _candidate(problem, warm_name + "+polish", warm, deadline=deadline)]
    if settings.past_deadline():
        say(f"time limit ({settings.time_limit_s:g} s) reached: packing ILP and exact MILP skipped")
    else:
        found += _recombine(problem, settings, master, windows, dived, lp, found, say)
    # after the packing ILP, which it would warm-start and change
    found.append(_candidate(problem, "lp-rounding", round_layers(problem, lp), deadline=deadline))
    say(f"layer rounding of the allocation LP: {found[-1].makespan_s:.4g} s")
    if not settings.past_deadline():  # last: it prices the master again (more columns, the whole demand)
        t1 = time.perf_counter()
        pooled = pool_dive(problem, master, lambda s: polish(problem, s, deadline=deadline))
        if pooled is not None:
            makespan = compute_makespan(problem, pooled)
            say(f"pool diving: {makespan:.4g} s, {time.perf_counter() - t1:.2f} s")
            # a candidate when it saves compute: it is placed and searched on its own (planner.leastcompute.LATE)
            if makespan < min(c.makespan_s for c in found) * (1 - POOL_GAIN):
                found.append(Candidate("pool-diving", pooled, makespan, "heuristic"))
    num_exact_waves = sum(op.num_layers for op in problem.graph.metaops)
    if len(full_candidates(problem, 1)) * num_exact_waves <= EXACT_MAX_CANDIDATES and not settings.past_deadline():
        best = min(found, key=lambda c: (c.makespan_s, c.name))
        exact = solve_exact(problem, settings, num_exact_waves, start=_pad(best.schedule, num_exact_waves))
        if exact.schedule is not None:
            found.append(Candidate("exact-milp", exact.schedule, compute_makespan(problem, exact.schedule), exact.status))
    best = min(found, key=lambda c: (c.makespan_s, c.name))
    bound = max(lower_bound, lp.value if settings.level_barriers and lp_exact else 0.0)
    status = best.status
    if best.name == "exact-milp" and status == "optimal":
        bound = max(bound, best.makespan_s / (1 + settings.mip_gap))
    # the LP is optimal over the columns its pricing found (candidate caps, a work budget), so a schedule off those
    # columns (layer rounding's waves) can beat it by a hair (1.7e-5 on a random job): never a bound above a schedule
    bound = min(bound, best.makespan_s)
    gap = (best.makespan_s - bound) / best.makespan_s if best.makespan_s > 0 else 0.0
    return SolveResult(best.schedule, settings.solver, status, best.makespan_s, bound, gap, best.name, lp.value,
                       tuple(sorted(found, key=lambda c: (c.makespan_s, c.name))))


def _pad(schedule: Schedule, num_waves: int) -> Schedule:
    waves = list(schedule.waves[:num_waves])
    return Schedule(tuple(waves + [Wave(())] * (num_waves - len(waves))))
