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

The result is the best of the MILP's incumbent, the LP rounding and the warm start given by the
caller (Spindle's wavefront), so it is never worse than the greedy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from planner.milp import (
    build_wave_milp, explain_infeasible, make_solver, quiet_highs, set_start, solve_wave_milp,
)
from planner.errors import PlanningError
from planner.schedule import Problem, Schedule, Slice, Wave, compute_makespan, merge_adjacent_waves

log = logging.getLogger(__name__)

Config = tuple[tuple[int, int], ...]  # ((metaop, num_devices), ...) sorted by metaop


@dataclass(frozen=True)
class SolverSettings:
    solver: str = "highs"  # "highs" or "cbc"
    time_limit_s: float = 10.0  # wall-clock backstop of each MILP solve
    mip_gap: float = 0.005
    level_barriers: bool = False  # True: Spindle's level barriers (no overlap of MetaLevels)
    max_nodes: int = 2000  # deterministic work limit of the MILP (branch-and-bound nodes)


@dataclass(frozen=True)
class SolveResult:
    schedule: Schedule
    solver: str
    status: str  # "optimal" (within mip_gap of the LP bound of its windows), "feasible", or "heuristic"
    objective_s: float  # compute makespan of ``schedule``
    bound_s: float  # a lower bound valid for every schedule (the caller's, raised by the LP when barriers hold)
    gap: float  # (objective - bound) / objective
    warm_start: str  # which candidate won: "milp", "lp-rounding" or the caller's warm start name
    lp_value_s: float = 0.0  # fractional-layer optimum of the chosen windows


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


# --------------------------------------------------------------------------- configuration LP


@dataclass(frozen=True)
class LPSolution:
    value: float  # seconds
    columns: tuple[tuple[int, Config, float], ...]  # (stage, configuration, duration s) with duration > 0


def price_configuration(values: Sequence[np.ndarray], counts: Sequence[np.ndarray], num_devices: int) -> tuple[float, list[tuple[int, int]]]:
    """Multiple-choice knapsack: pick at most one count per group maximising the summed value with
    sum of counts <= ``num_devices``. Returns (best value, [(group index, option index)]). Exact DP."""
    dp = np.zeros(num_devices + 1)
    choices = []
    for vals, cnts in zip(values, counts):
        new = dp.copy()
        arg = np.full(num_devices + 1, -1, dtype=np.int32)
        for j, (v, n) in enumerate(zip(vals, cnts)):
            n = int(n)
            if n > num_devices:
                break
            cand = np.full(num_devices + 1, -np.inf)
            cand[n:] = dp[: num_devices + 1 - n] + v
            better = cand > new * (1 + 1e-12) + 1e-300
            new[better] = cand[better]
            arg[better] = j
        choices.append(arg)
        dp = new
    picked, cap = [], num_devices
    for g in range(len(choices) - 1, -1, -1):
        j = int(choices[g][cap])
        if j >= 0:
            picked.append((g, j))
            cap -= int(counts[g][j])
    return float(dp[num_devices]), picked[::-1]


def solve_configuration_lp(problem: Problem, windows: Sequence[tuple[int, int]], num_stages: int,
                           max_iterations: int = 5000) -> LPSolution:
    """Column generation for min sum(y) s.t. layers[m]: sum over configurations of y / T_m(n) >= L_m."""
    num_ops = len(problem.graph)
    scale = float(np.median([c.times[0] for c in problem.curves]))  # work in units near 1
    rates = [np.array([scale / t for t in c.times]) for c in problem.curves]  # layers per time unit
    counts = [np.array(c.counts) for c in problem.curves]
    layers = np.array([op.num_layers for op in problem.graph.metaops], dtype=float)
    h = quiet_highs()
    h.setOptionValue("threads", 1)
    inf = 1e30
    h.addRows(num_ops, layers, np.full(num_ops, inf), 0, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0))
    columns: list[tuple[int, Config]] = []

    def add(stage: int, config: Config) -> None:
        idx = np.array([m for m, _ in config], dtype=np.int32)
        vals = np.array([rates[m][problem.curves[m].index(n)] for m, n in config])
        h.addCol(1.0, 0.0, inf, len(config), idx, vals)
        columns.append((stage, config))

    for m in range(num_ops):  # a feasible start: each MetaOp alone at its fastest count
        add(windows[m][0], ((m, int(counts[m][-1])),))
    eligible = [[m for m in range(num_ops) if windows[m][0] <= s <= windows[m][1]] for s in range(num_stages)]
    seen = set(columns)
    for _ in range(max_iterations):
        h.run()
        duals = np.abs(np.array(h.getSolution().row_dual))
        added = 0
        for s, ops in enumerate(eligible):
            ops = [m for m in ops if duals[m] > 1e-12]
            if not ops:
                continue
            best, picked = price_configuration([duals[m] * rates[m] for m in ops], [counts[m] for m in ops],
                                               problem.num_devices)
            if best <= 1 + 1e-9:
                continue
            config = tuple(sorted((ops[g], int(counts[ops[g]][j])) for g, j in picked))
            if (s, config) not in seen:
                seen.add((s, config))
                add(s, config)
                added += 1
        if not added:
            break
    else:
        log.warning("configuration LP stopped after %d column-generation rounds", max_iterations)
    y = np.array(h.getSolution().col_value)
    kept = tuple((s, c, float(v) * scale) for (s, c), v in zip(columns, y) if v > 1e-9)
    return LPSolution(float(h.getInfo().objective_function_value) * scale, kept)


# --------------------------------------------------------------------------- from LP to waves


def order_waves(problem: Problem, lp: LPSolution) -> list[tuple[int, Config, float]]:
    """Waves by stage; inside a stage, chain configurations greedily so neighbours share (MetaOp, count) pairs."""
    out = []
    for s in sorted({st for st, _, _ in lp.columns}):
        pool = sorted([c for c in lp.columns if c[0] == s], key=lambda c: (-c[2], c[1]))
        chain = [pool.pop(0)]
        while pool:
            last = set(chain[-1][1])
            j = max(range(len(pool)), key=lambda i: (len(last & set(pool[i][1])), pool[i][2], -i))
            chain.append(pool.pop(j))
        out.extend(chain)
    return out


def round_lp(problem: Problem, waves: Sequence[tuple[int, Config, float]]) -> Schedule:
    """Integer layers from the LP: each MetaOp's fractional layers per wave rounded by largest remainder.
    Keeps one (possibly empty) wave per LP wave so that it aligns with the MILP's waves (its MIP start)."""
    shares: dict[int, list[tuple[int, int, float]]] = {}
    for k, (_, config, dur) in enumerate(waves):
        for m, n in config:
            shares.setdefault(m, []).append((k, n, dur / problem.curves[m].time(n)))
    slices: list[list[Slice]] = [[] for _ in waves]
    for m, parts in shares.items():
        total, target = sum(p[2] for p in parts), problem.layers(m)
        exact = [p[2] * target / total for p in parts]
        ints = [int(np.floor(e)) for e in exact]
        for i in sorted(range(len(parts)), key=lambda i: (-(exact[i] - ints[i]), i))[: target - sum(ints)]:
            ints[i] += 1
        for (k, n, _), layers in zip(parts, ints):
            if layers > 0:
                slices[k].append(Slice(m, layers, n))
    return Schedule(tuple(Wave(tuple(s)) for s in slices))


# --------------------------------------------------------------------------- packing and exact MILPs

EXACT_MAX_CANDIDATES = 600  # the full model is tried when it has at most this many (m, k, n) triples


def _neighbour_counts(counts: Sequence[int], n: int) -> list[int]:
    i = counts.index(n)
    return [counts[j] for j in (i - 1, i, i + 1) if 0 <= j < len(counts)]


def packing_candidates(problem: Problem, waves: Sequence[tuple[int, Config, float]]) -> list[tuple[int, int, int]]:
    """(m, k, n) for each LP wave k, each MetaOp m of its configuration and n its LP count or a neighbour."""
    return [(m, k, n) for k, (_, config, _) in enumerate(waves) for m, n_lp in config
            for n in _neighbour_counts(problem.curves[m].counts, n_lp)]


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
    solver = make_solver(settings.solver, settings.time_limit_s, settings.mip_gap, settings.max_nodes)
    result = solve_wave_milp(problem, milp, solver)
    if result.schedule is None and result.status == "infeasible":
        raise PlanningError("no wave schedule: " + explain_infeasible(problem, build, solver))
    return result


# --------------------------------------------------------------------------- driver


def _best_lp(problem: Problem, settings: SolverSettings, say) -> LPSolution:
    modes = ("levels",) if settings.level_barriers else ("levels", "asap", "alap")
    best: LPSolution | None = None
    for mode in modes:
        windows, num_stages = stage_windows(problem, mode)
        t0 = time.perf_counter()
        lp = solve_configuration_lp(problem, windows, num_stages)
        say(f"allocation LP ({mode} windows): {lp.value:.4g} s, {len(lp.columns)} configurations, "
            f"{time.perf_counter() - t0:.2f} s")
        if best is None or lp.value < best.value * (1 - 1e-9):
            best = lp
    return best


def solve(problem: Problem, settings: SolverSettings, warm: Schedule | None = None, lower_bound: float = 0.0,
          progress: Callable[[str], None] | None = None, warm_name: str = "spindle") -> SolveResult:
    """Plan the waves of ``problem``; the result is never worse than ``warm`` (compute makespan)."""
    say = progress or log.info
    lp = _best_lp(problem, settings, say)
    waves = order_waves(problem, lp)
    aligned = round_lp(problem, waves)
    rounded = Schedule(merge_adjacent_waves(problem, aligned.waves))
    # candidates: (makespan, name, schedule, status)
    found = [(compute_makespan(problem, rounded), "lp-rounding", rounded, "heuristic")]
    if warm is not None:
        found.append((compute_makespan(problem, warm), warm_name, warm, "heuristic"))
    solver = make_solver(settings.solver, settings.time_limit_s, settings.mip_gap, settings.max_nodes)
    t0 = time.perf_counter()
    milp = build_wave_milp(problem, packing_candidates(problem, waves), len(waves), precedence=False)
    set_start(problem, milp, aligned)
    packed = solve_wave_milp(problem, milp, solver)
    if packed.schedule is not None:
        found.append((compute_makespan(problem, packed.schedule), "milp", packed.schedule, packed.status))
        say(f"wave MILP ({settings.solver}, {len(milp.z)} binaries): {found[-1][0]:.4g} s, {packed.status}, "
            f"{time.perf_counter() - t0:.2f} s")
    num_exact_waves = sum(op.num_layers for op in problem.graph.metaops)
    if len(full_candidates(problem, 1)) * num_exact_waves <= EXACT_MAX_CANDIDATES:
        best = min(found, key=lambda c: (c[0], c[1]))
        exact = solve_exact(problem, settings, num_exact_waves, start=_pad(best[2], num_exact_waves))
        if exact.schedule is not None:
            found.append((compute_makespan(problem, exact.schedule), "exact-milp", exact.schedule, exact.status))
    objective, name, schedule, status = min(found, key=lambda c: (c[0], c[1]))
    bound = max(lower_bound, lp.value if settings.level_barriers else 0.0)
    if name == "exact-milp" and status == "optimal":
        bound = max(bound, objective / (1 + settings.mip_gap))
    if name != "exact-milp" and status == "optimal" and objective > lp.value * (1 + settings.mip_gap) + 1e-12:
        status = "feasible"  # optimal for its restricted model, not proven within the gap of the LP
    gap = (objective - bound) / objective if objective > 0 else 0.0
    return SolveResult(schedule, settings.solver, status, objective, bound, gap, name, lp.value)


def _pad(schedule: Schedule, num_waves: int) -> Schedule:
    waves = list(schedule.waves[:num_waves])
    return Schedule(tuple(waves + [Wave(())] * (num_waves - len(waves))))
