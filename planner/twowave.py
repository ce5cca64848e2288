"""Two-wave packing of one stage: exact for given wave durations, searched over the durations.

Inside a stage (a set of MetaOps with no dependency between them) consider schedules of two waves
of durations D1 and D2. Each MetaOp m picks a count a for wave 1 (or none) and runs as many of its
layers as fit, l1 = min(L_m, floor(D1 / T_m(a))); the rest must fit in wave 2 on the smallest count
b with floor(D2 / T_m(b)) >= L_m - l1. Whether some choice fits N devices in both waves is a
two-capacity assignment that a dynamic program over wave 1's devices decides exactly:
f[c] = least wave-2 devices over all choices using at most c devices in wave 1; feasible when
f[N] <= N. For a fixed D1 feasibility is monotone in D2, so D2 is found by bisection over the
breakpoints T_m(n) * l, and D1 is searched over a grid of breakpoints and refined around the best.

This is Spindle's two-point discretisation made exact at layer granularity: each MetaOp still uses
at most two device counts, but the layer split and both wave lengths are chosen jointly for all
MetaOps instead of greedily aligned, and the one-wave optimum is a special case (D2 = 0).

The search is sized by work, not time: one feasibility test costs about (options per MetaOp) x
MetaOps x (N + a constant for listing the options) cells of the DP, so the grid of D1 values shrinks
with the instance to keep the whole search within :data:`TWO_WAVE_BUDGET` (deterministic; the full
48-point grid on Spindle's grid, 4 points at 10,240 devices x 500 MetaOps). Beyond 2,048 devices the
DP counts devices in grains (:func:`~planner.patterns.device_grain`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from planner.patterns import device_grain
from planner.schedule import Problem, Slice, Wave

TWO_WAVE_BUDGET = 6e9  # DP cells (MetaOps x options x devices, summed over feasibility tests) per stage
OPTION_CELLS = 4000  # listing one option of one MetaOp (Python) costs about as much as this many DP cells
MIN_GRID = 2

Assignment = list[tuple[int, int, int, int, int]]  # (metaop, count wave 1, layers wave 1, count wave 2, layers wave 2)


def _options(problem: Problem, m: int, d1: float, d2: float) -> list[tuple[int, int, int, int]]:
    """Pareto options (a, l1, b, l2) of MetaOp m for durations d1, d2 (a or b = 0: absent from that wave)."""
    curve, total = problem.curves[m], problem.layers(m)
    out: list[tuple[int, int, int, int]] = []
    best_b = None
    for a in (0,) + curve.counts:
        l1 = 0 if a == 0 else min(total, int(d1 / curve.time(a) * (1 + 1e-12)))
        if a and l1 == 0:
            continue
        need = total - l1
        if need == 0:
            b, l2 = 0, 0
        else:
            b = next((n for n in curve.counts if int(d2 / curve.time(n) * (1 + 1e-12)) >= need), None)
            if b is None:
                continue
            l2 = need
        if best_b is not None and b >= best_b:
            continue  # more wave-1 devices for no fewer wave-2 devices: dominated
        best_b = b
        out.append((a, l1, b, l2))
        if b == 0:
            break
    return out


def _feasible(problem: Problem, ops: Sequence[int], d1: float, d2: float, reconstruct: bool = False):
    """The DP over wave-1 devices (in grains, see patterns.device_grain); returns None when infeasible, else True or
    (with reconstruct) the assignment."""
    grain = device_grain(problem.num_devices)
    cap = problem.num_devices // grain
    f = np.zeros(cap + 1)
    choices = []
    for m in ops:
        opts = _options(problem, m, d1, d2)
        if not opts:
            return None
        g = np.full(cap + 1, np.inf)
        arg = np.full(cap + 1, -1, dtype=np.int16)
        for j, (a, _, b, _) in enumerate(opts):
            a, b = -(-a // grain), -(-b // grain)
            if a > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[a:] = f[: cap + 1 - a] + b
            better = cand < g
            g = np.where(better, cand, g)
            arg[better] = j
        f = g
        choices.append((opts, arg))
    if f[cap] > cap:
        return None
    if not reconstruct:
        return True
    picked: Assignment = []
    c = cap
    for m, (opts, arg) in zip(reversed(ops), reversed(choices)):
        a, l1, b, l2 = opts[int(arg[c])]
        picked.append((m, a, l1, b, l2))
        c -= -(-a // grain)
    return picked[::-1]


def _breakpoints(problem: Problem, ops: Sequence[int], upper: float) -> np.ndarray:
    values = np.unique(np.concatenate([
        np.outer(problem.curves[m].times, np.arange(1, problem.layers(m) + 1)).ravel() for m in ops
    ]))
    return values[values <= upper * (1 + 1e-12)]


def _min_d2(problem: Problem, ops: Sequence[int], d1: float, points: np.ndarray, limit: float) -> float | None:
    """Smallest breakpoint D2 <= limit - d1 that makes (d1, D2) feasible (0 included), by bisection."""
    cand = np.concatenate([[0.0], points[points <= limit - d1 + 1e-15]])
    if not len(cand) or _feasible(problem, ops, d1, cand[-1]) is None:
        return None
    lo, hi = 0, len(cand) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _feasible(problem, ops, d1, cand[mid]) is not None:
            hi = mid
        else:
            lo = mid + 1
    return float(cand[lo])


def search_grid(problem: Problem, ops: Sequence[int], num_points: int, grid: int, budget: float) -> int:
    """D1 values to try (the refinement tries as many again) so that the search's feasibility tests, each about
    options x (device grains + OPTION_CELLS) cells and ~log2(points) of them per D1, stay within ``budget``."""
    options = sum(len(problem.curves[m].counts) + 1 for m in ops)
    grains = problem.num_devices // device_grain(problem.num_devices) + 1
    per_d1 = options * (grains + OPTION_CELLS) * (np.log2(max(num_points, 2)) + 2)
    return int(max(MIN_GRID, min(grid, budget / (2 * per_d1))))


def pack_stage(problem: Problem, ops: Sequence[int], grid: int = 48,
               budget: float = TWO_WAVE_BUDGET) -> tuple[float, list[Wave]] | None:
    """Best two-wave schedule of the independent MetaOps ``ops`` found by the search, as (makespan, waves);
    None when no two-wave schedule exists (more MetaOps than two waves of N devices can hold). ``grid``: D1 values
    tried (and as many again around the best), fewer where ``budget`` (DP cells, see :func:`search_grid`) says."""
    ops = list(ops)
    upper = sum(problem.curves[m].times[0] * problem.layers(m) for m in ops)
    points = _breakpoints(problem, ops, upper)
    grid = search_grid(problem, ops, len(points), grid, budget)
    best: tuple[float, float, float] | None = None  # (total, d1, d2)

    def consider(d1: float) -> None:
        nonlocal best
        limit = best[0] if best else upper
        d2 = _min_d2(problem, ops, d1, points, limit)
        if d2 is not None and (best is None or d1 + d2 < best[0] - 1e-15):
            best = (d1 + d2, d1, d2)

    for idx in np.unique(np.linspace(0, len(points) - 1, min(grid, len(points))).round().astype(int)):
        consider(float(points[idx]))
    if best is not None:  # refine: every breakpoint near the best d1
        pos = int(np.searchsorted(points, best[1]))
        for idx in range(max(0, pos - grid // 2), min(len(points), pos + grid // 2)):
            consider(float(points[idx]))
    if best is None:
        return None
    assignment = _feasible(problem, ops, best[1], best[2], reconstruct=True)
    waves = [
        Wave(tuple(Slice(m, l1, a) for m, a, l1, _, _ in assignment if a)),
        Wave(tuple(Slice(m, l2, b) for m, _, _, b, l2 in assignment if b)),
    ]
    return best[0], [w for w in waves if w.slices]
