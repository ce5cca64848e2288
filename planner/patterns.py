"""Wave patterns: the allocation LP by column generation and the packing ILP over its columns.

A *pattern* is one possible wave: a set of (MetaOp m, devices n, integer layers l) with the
devices summing to at most N; it lasts D = max over its slices of F_m(n) * l plus max over its slices of B_m(n) * l
(a layer's forward and backward seconds: every forward runs before every backward, Problem.duration). The master
problem chooses how many times y_p each pattern runs (a pattern run y times is one wave with y*l layers):

    minimise  sum_p D_p y_p
    layers[m]:  sum_p l_{m,p} y_p >= L_m        for every MetaOp m
    y_p >= 0 (LP) or integer (ILP)

Patterns are generated per stage, only from MetaOps whose stage window contains that stage, so the
stage windows carry the dependencies. Pricing a pattern for duals pi is
max_D (max {sum pi_m l_m : sum n_m <= N, F_m(n_m) l_m <= r D, B_m(n_m) l_m <= (1 - r) D} - D): for a fixed cap D
and forward share r each MetaOp picks its count and then as many layers as fit, a multiple-choice knapsack over the
devices solved exactly by dynamic programming, vectorised over a set of candidate caps D (breakpoints T_m(n) * l)
times the forward shares of the MetaOps priced (:func:`pass_shares`; one when they all split their time alike, where
this is max_D over T_m(n_m) l_m <= D).
Integer layers are part of every pattern, so the LP already prices the rounding that a
fractional-layer relaxation ignores, and its columns pack well as an ILP (Gilmore-Gomory style).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pulp

from planner.milp import make_solver, quiet_highs
from planner.schedule import Problem, Schedule, Slice, Wave, merge_adjacent_waves

log = logging.getLogger(__name__)

Pattern = tuple[tuple[int, int, int], ...]  # ((metaop, num_devices, num_layers), ...) sorted by metaop
NUM_CAPS = 48  # candidate duration caps priced per stage and round (16 beyond 128 devices)
WORK_BUDGET = 1e9  # knapsack cells (caps x options x devices) priced per master: a deterministic work limit


@dataclass(frozen=True)
class Column:
    stage: int
    pattern: Pattern
    duration: float  # seconds


@dataclass(frozen=True)
class PatternLP:
    value: float  # seconds
    columns: tuple[Column, ...]
    y: tuple[float, ...]
    rounds: int


def pattern_duration(problem: Problem, pattern: Pattern) -> float:
    return problem.duration(pattern)


GRAIN_CAPACITY = 2048  # device DPs (pricing, two-wave packing) count devices in grains that keep N / grain under this


def device_grain(num_devices: int) -> int:
    """Devices per unit of the device DPs: 1 up to GRAIN_CAPACITY devices, else the smallest power of two that
    brings N / grain under it (8 at 10,240). A count n weighs ceil(n / grain) grains of N // grain, so what the DPs
    accept always fits (conservative: a few devices of a large cluster may go unused by a pattern)."""
    grain = 1
    while num_devices // grain > GRAIN_CAPACITY:
        grain *= 2
    return grain


def knapsack_many(values: Sequence[np.ndarray], weights: Sequence[Sequence[int]], capacity: int) -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
    """Multiple-choice knapsack for many value vectors at once.

    ``values[g]`` has shape (num_caps, len(weights[g])) (-inf = option unavailable). For each cap row,
    pick at most one option per group with total weight <= capacity maximising the value. Returns the
    best value per row and, per row, the picked (group, option) pairs. Exact dynamic programming."""
    num_rows = values[0].shape[0] if values else 0
    dp = np.zeros((num_rows, capacity + 1))
    choices = []
    for vals, wts in zip(values, weights):
        new = dp.copy()
        arg = np.full((num_rows, capacity + 1), -1, dtype=np.int16)
        for j, w in enumerate(wts):
            if w > capacity:
                break
            # only the columns w.. can take option j (below w it does not fit, and -inf never beats new >= 0):
            # updated in place on those columns, the same comparisons and values as over the whole row
            cand = dp[:, : capacity + 1 - w] + vals[:, j : j + 1]
            target = new[:, w:]
            better = cand > target + 1e-12 * np.abs(target) + 1e-300
            np.copyto(target, cand, where=better)
            np.copyto(arg[:, w:], j, where=better)
        choices.append(arg)
        dp = new
    # walk the choices back, every row at once: row r's capacity left before group g
    rows, cap = np.arange(num_rows), np.full(num_rows, capacity)
    picked = np.full((len(choices), num_rows), -1, dtype=np.int64)
    for g in range(len(choices) - 1, -1, -1):
        j = choices[g][rows, cap].astype(np.int64)
        picked[g] = j
        cap = cap - np.where(j >= 0, np.asarray(weights[g], dtype=np.int64)[np.maximum(j, 0)], 0)
    picks = [[(g, j) for g, j in enumerate(row) if j >= 0] for row in picked.T.tolist()]
    return dp[:, capacity], picks


def candidate_caps(problem: Problem, ops: Sequence[int], num: int = NUM_CAPS) -> np.ndarray:
    """Up to ``num`` durations spread over the sorted breakpoints T_m(n) * l of ``ops``."""
    values = np.unique(np.concatenate([
        np.outer(problem.curves[m].times, np.arange(1, problem.layers(m) + 1)).ravel() for m in ops
    ]))
    if len(values) <= num:
        return values
    return values[np.unique(np.linspace(0, len(values) - 1, num).round().astype(int))]


MAX_SHARES = 3  # forward shares priced per cap (pass_shares)


def pass_shares(problem: Problem, ops: Sequence[int]) -> np.ndarray:
    """The forward shares F_m(n) / T_m(n) of ``ops`` at their counts (:attr:`Problem.forward_shares`), ascending, one
    of each within 1e-9; at most :data:`MAX_SHARES` of them, spread over the sorted values."""
    shares = np.unique([s for m in ops for s in problem.forward_shares[m]])
    shares = shares[np.concatenate([[True], np.diff(shares) > 1e-9])]
    if len(shares) <= MAX_SHARES:
        return shares
    return shares[np.unique(np.linspace(0, len(shares) - 1, MAX_SHARES).round().astype(int))]


def price_patterns(problem: Problem, duals: np.ndarray, ops: Sequence[int], caps: np.ndarray,
                   limits: Sequence[int]) -> list[tuple[float, Pattern]]:
    """Patterns of ``ops`` with negative reduced cost D_p - sum pi_m l_m, most negative first (one per cap and
    forward share). A MetaOp runs at most ``limits[m]`` layers in a pattern."""
    ops = [m for m in ops if duals[m] > 1e-12 and limits[m] > 0]
    if not ops:
        return []
    shares = pass_shares(problem, ops)[:, None]
    rows = np.tile(caps, len(shares))[:, None]  # every cap at the first share, then at the next, ...
    values, weights, layer_tables = [], [], []
    for m in ops:
        times, own = np.array(problem.curves[m].times), np.array(problem.forward_shares[m])
        # the cap's forward part r D bounds the forward own * T l, its backward part the rest: l <= D / T * fit, where
        # fit is 1 exactly when own == r (the slowest-slice pricing of one share, bit for bit)
        with np.errstate(divide="ignore", invalid="ignore"):  # a pass of no seconds bounds nothing
            fit = np.minimum(np.where(own > 0, shares / own, np.inf),
                             np.where(own < 1, (1 - shares) / (1 - own), np.inf))
        fit = np.repeat(fit, len(caps), axis=0)
        layers = np.minimum(np.floor(rows / times[None, :] * fit * (1 + 1e-12)), limits[m])
        layer_tables.append(layers)
        values.append(np.where(layers >= 1, duals[m] * layers, -np.inf))
        weights.append(list(problem.curves[m].counts))
    grain = device_grain(problem.num_devices)
    grains = [[-(-n // grain) for n in counts] for counts in weights]
    best, picks = knapsack_many(values, grains, problem.num_devices // grain)
    found: dict[Pattern, float] = {}
    for row, picked in enumerate(picks):
        if not picked:
            continue
        pattern = tuple(sorted((ops[g], weights[g][j], int(layer_tables[g][row, j])) for g, j in picked))
        reduced = pattern_duration(problem, pattern) - sum(duals[m] * l for m, _, l in pattern)
        if reduced < -1e-9 * max(1.0, best[row]):
            found[pattern] = min(found.get(pattern, 0.0), reduced)
    return sorted(((rc, p) for p, rc in found.items()), key=lambda item: (item[0], item[1]))


class PatternMaster:
    """The pattern LP of one set of stage windows, kept in HiGHS between column-generation rounds.

    ``demand`` (the rows' lower bounds) starts at every MetaOp's layer count; diving lowers it to
    what is left after fixing some pattern repetitions."""

    def __init__(self, problem: Problem, windows: Sequence[tuple[int, int]], num_stages: int, per_stage: int = 3,
                 work_budget: float = WORK_BUDGET):
        self.problem = problem
        self.per_stage = per_stage
        self.work, self.work_budget = 0.0, work_budget
        num_ops = len(problem.graph)
        self.demand = np.array([problem.layers(m) for m in range(num_ops)], dtype=float)
        self.h = quiet_highs()
        self.h.setOptionValue("threads", 1)
        self.h.addRows(num_ops, self.demand, np.full(num_ops, 1e30), 0, np.zeros(0, np.int32), np.zeros(0, np.int32),
                       np.zeros(0))
        self.columns: list[Column] = []
        self._seen: set[tuple[int, Pattern]] = set()
        for m in range(num_ops):  # feasible start: each MetaOp alone, all layers, fastest count
            self.add(windows[m][0], ((m, problem.curves[m].counts[-1], problem.layers(m)),))
        self.eligible = [[m for m in range(num_ops) if windows[m][0] <= s <= windows[m][1]] for s in range(num_stages)]
        num_caps = NUM_CAPS if problem.num_devices <= 128 else NUM_CAPS // 3
        self.caps = [candidate_caps(problem, ops, num_caps) if ops else np.zeros(0) for ops in self.eligible]
        capacity = problem.num_devices // device_grain(problem.num_devices)
        self.round_work = sum(len(c) * len(pass_shares(problem, ops)) * sum(len(problem.curves[m].counts) for m in ops)
                              * (capacity + 1) for c, ops in zip(self.caps, self.eligible) if ops)

    def add(self, stage: int, pattern: Pattern) -> None:
        duration = pattern_duration(self.problem, pattern)
        idx = np.array([m for m, _, _ in pattern], dtype=np.int32)
        self.h.addCol(duration, 0.0, 1e30, len(pattern), idx, np.array([float(l) for _, _, l in pattern]))
        self.columns.append(Column(stage, pattern, duration))
        self._seen.add((stage, pattern))

    def set_demand(self, demand: np.ndarray) -> None:
        self.demand = demand.astype(float)
        idx = np.arange(len(demand), dtype=np.int32)
        self.h.changeRowsBounds(len(demand), idx, self.demand, np.full(len(demand), 1e30))

    def generate(self, max_rounds: int, deadline: float | None = None) -> int:
        """Column generation until no pattern prices out, ``max_rounds``, the work budget or this process's CPU
        time ``time.thread_time()`` reaches ``deadline`` (a backstop: the LP over the columns so far); returns the
        rounds run."""
        limits = [int(round(d)) for d in self.demand]
        for rounds in range(1, max_rounds + 1):
            self.h.run()
            if self.work >= self.work_budget or (deadline is not None and time.thread_time() >= deadline):
                return rounds
            self.work += self.round_work
            duals = np.abs(np.array(self.h.getSolution().row_dual))
            added = 0
            for s, ops in enumerate(self.eligible):
                for _, pattern in price_patterns(self.problem, duals, ops, self.caps[s], limits)[: self.per_stage]:
                    if (s, pattern) not in self._seen:
                        self.add(s, pattern)
                        added += 1
            if not added:
                return rounds
        self.h.run()
        return max_rounds

    def solution(self) -> tuple[float, np.ndarray]:
        return float(self.h.getInfo().objective_function_value), np.array(self.h.getSolution().col_value)

    def snapshot(self, rounds: int) -> PatternLP:
        value, y = self.solution()
        return PatternLP(value, tuple(self.columns), tuple(float(v) for v in y), rounds)


def solve_pattern_lp(problem: Problem, windows: Sequence[tuple[int, int]], num_stages: int,
                     max_rounds: int = 400, deadline: float | None = None) -> tuple[PatternLP, PatternMaster]:
    """Column generation for the pattern LP (stopped at ``deadline``, see PatternMaster.generate); returns the LP
    and the live master (for diving)."""
    master = PatternMaster(problem, windows, num_stages)
    rounds = master.generate(max_rounds, deadline)
    if rounds >= max_rounds:
        log.info("pattern LP: stopped at the round limit (%d); the LP may not be optimal", max_rounds)
    return master.snapshot(rounds), master


def dive(master: PatternMaster, rounds_per_step: int = 8, deadline: float | None = None) -> list[int]:
    """Residual diving: fix every pattern the LP runs at least once (its whole repetitions), or, when the
    LP runs every pattern less than once, one repetition of its largest; lower the demand by what the
    fixed patterns cover and re-generate columns for the rest. Returns repetitions per column.
    Column generation shares the master's work budget; ``deadline`` (``time.thread_time()``) is only a safety cap."""
    problem = master.problem
    residual = np.array([problem.layers(m) for m in range(len(problem.graph))])
    counts: dict[int, int] = {}
    while residual.any():
        master.set_demand(residual)
        if deadline is None or time.thread_time() < deadline:
            master.generate(rounds_per_step, deadline)
        else:
            master.h.run()
        _, y = master.solution()
        whole = [(p, int(np.floor(v + 1e-6))) for p, v in enumerate(y) if v >= 1 - 1e-6]
        for p, c in whole or [(int(np.argmax(y)), 1)]:
            if not any(residual[m] for m, _, _ in master.columns[p].pattern):
                continue
            counts[p] = counts.get(p, 0) + c
            for m, _, l in master.columns[p].pattern:
                residual[m] = max(0, residual[m] - c * l)
    return [counts.get(i, 0) for i in range(len(master.columns))]


def round_layers(problem: Problem, lp: PatternLP) -> Schedule:
    """A schedule from the LP's fractional repetitions by rounding layers, not repetitions: each pattern the LP runs
    y_p > 0 times becomes one wave with floor(y_p x l) layers of each of its MetaOps (on the pattern's counts), then
    each MetaOp's missing layers go one at a time to the wave of it that they lengthen least (ties: the earlier),
    and any excess leaves its longest slice. Waves in stage order (the windows carry the dependencies), the longest
    first within a stage. A packing that keeps the LP's device split where the packing ILP must round whole
    repetitions (clip-10@8: 1.024x the per-level bound polished, 1.036x the best other method)."""
    support = sorted(((col, y) for col, y in zip(lp.columns, lp.y) if y > 1e-9),
                     key=lambda item: (item[0].stage, -item[0].duration * item[1], item[0].pattern))
    waves = [{m: [n, int(np.floor(l * y + 1e-9))] for m, n, l in col.pattern} for col, y in support]

    def duration(wave: dict[int, list[int]], more: int = -1) -> float:  # with one more layer of MetaOp ``more``
        return problem.duration((m, n, l + (m == more)) for m, (n, l) in wave.items())

    for m in range(len(problem.graph)):
        holders = [i for i, w in enumerate(waves) if m in w]
        have = sum(waves[i][m][1] for i in holders)
        for _ in range(problem.layers(m) - have):
            def growth(i: int) -> tuple[float, int]:
                return duration(waves[i], m) - duration(waves[i]), i
            waves[min(holders, key=growth)][m][1] += 1
        for _ in range(have - problem.layers(m)):
            waves[max((i for i in holders if waves[i][m][1] > 0),
                      key=lambda i: (problem.curves[m].time(waves[i][m][0]) * waves[i][m][1], -i))][m][1] -= 1
    out = [Wave(tuple(Slice(m, l, n) for m, (n, l) in sorted(w.items()) if l > 0)) for w in waves]
    return Schedule(merge_adjacent_waves(problem, [w for w in out if w.slices]))


def solve_pattern_ip(problem: Problem, columns: Sequence[Column], start: Sequence[int], solver_name: str,
                     time_limit_s: float, mip_gap: float, max_nodes: int) -> tuple[list[int] | None, str, float]:
    """The packing ILP over generated columns (integer repetitions y_p), warm-started from ``start``."""
    model = pulp.LpProblem("loom_patterns", pulp.LpMinimize)
    upper = max(problem.layers(m) for m in range(len(problem.graph)))
    y = [model.add_variable(f"y_{i}", 0, upper, cat="Integer") for i in range(len(columns))]
    model += pulp.lpSum(col.duration * v for col, v in zip(columns, y))
    terms: dict[int, list] = {}
    for col, v in zip(columns, y):
        for m, _, l in col.pattern:
            terms.setdefault(m, []).append(l * v)
    for m in range(len(problem.graph)):
        terms_m = terms.get(m, [])
        model += pulp.lpSum(terms_m) >= problem.layers(m), f"layers[m={m}]"
    for v, c in zip(y, start):
        v.setInitialValue(c)
    model.solve(make_solver(solver_name, time_limit_s, mip_gap, max_nodes))
    if model.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None, pulp.LpStatus[model.status].lower(), float("nan")
    status = "optimal" if model.sol_status == pulp.LpSolutionOptimal else "feasible"
    info = getattr(getattr(model, "solverModel", None), "getInfo", None)
    gap = float(info().mip_gap) if info is not None else (0.0 if status == "optimal" else float("nan"))
    return [int(round(v.varValue or 0)) for v in y], status, gap


def patterns_to_schedule(problem: Problem, columns: Sequence[Column], counts: Sequence[int]) -> Schedule:
    """Waves from chosen pattern repetitions: stage order; excess layers trimmed where they cost most."""
    chosen = [(col, c) for col, c in zip(columns, counts) if c > 0]
    chosen.sort(key=lambda item: (item[0].stage, -item[0].duration * item[1], item[0].pattern))
    waves = [{m: [n, l * c] for m, n, l in col.pattern} for col, c in chosen]
    _trim_excess(problem, waves)
    ordered = _order_within_stages(problem, [col.stage for col, _ in chosen], waves)
    return Schedule(merge_adjacent_waves(problem, ordered))


def _trim_excess(problem: Problem, waves: list[dict[int, list[int]]]) -> None:
    """Remove layers run beyond L_m, each time from the slice whose wave it makes longest."""
    total = [0] * len(problem.graph)
    for wave in waves:
        for m, (_, l) in wave.items():
            total[m] += l
    for m in range(len(problem.graph)):
        for _ in range(total[m] - problem.layers(m)):
            def cost(w):
                n, l = w[m]
                return problem.curves[m].time(n) * l
            wave = max((w for w in waves if m in w), key=cost)
            wave[m][1] -= 1
            if wave[m][1] == 0:
                del wave[m]


def _order_within_stages(problem: Problem, stages: Sequence[int], waves: Sequence[dict[int, list[int]]]) -> list[Wave]:
    """Inside a stage the waves' order is free: chain them so neighbours share (MetaOp, count) pairs."""
    out: list[Wave] = []
    for s in sorted(set(stages)):
        pool = [w for st, w in zip(stages, waves) if st == s and w]
        chain: list[dict[int, list[int]]] = []
        while pool:
            if chain:
                last = {(m, v[0]) for m, v in chain[-1].items()}
                j = max(range(len(pool)), key=lambda i: (len(last & {(m, v[0]) for m, v in pool[i].items()}), -i))
            else:
                j = 0
            chain.append(pool.pop(j))
        out.extend(Wave(tuple(Slice(m, l, n) for m, (n, l) in sorted(w.items()))) for w in chain)
    return out
