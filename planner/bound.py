"""Lower bounds: Spindle's relaxed per-level optimum, a DAG bound, and a full-iteration bound.

Owns :func:`relaxed_allocation` (the continuous malleable-scheduling optimum of one MetaLevel,
Spindle §3.3 / Węglarz's theorem), :func:`per_level_bound` (its sum over levels, the reference
every plan is measured against), :func:`dag_bound` (a bound on the compute that stays valid when
a schedule overlaps levels) and :func:`iteration_bound` (compute plus the gradient sync and
optimizer time no schedule avoids). Pure functions of a :class:`~planner.schedule.Problem`
(and, for the iteration, the cost model); times are seconds.

Speed-up models. A MetaOp's curve gives per-layer times at its valid counts; ``W = times[0] *
counts[0]`` and the per-layer time at a fractional n is ``W / S(n)``.

- *Interpolated* (the one Spindle's code uses, ``S = Curve.speedup``): the speed-up linearly
  interpolated between adjacent valid counts, from 0 at n=0. It is what time-sharing two
  neighbouring counts achieves, which is why Spindle's two-point discretisation reproduces it
  exactly; Spindle's allocation (:mod:`planner.spindle`) uses it.
- *Concave hull* (:meth:`Curve.concave_hull`): throughput against devices under the upper concave
  hull of (0, 0) and the valid points, the best rate any mix of counts over time reaches. Every
  bound here uses it: where a curve is not concave (a super-linear step, e.g. a count whose layout
  switches to a cheaper tensor-parallel degree) the interpolation lies under the hull, and a
  relaxation on it can exceed the time of a real schedule (running the op on the larger count for
  part of the time and not at all otherwise). On concave curves both models coincide.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from planner.costmodel import CostModel, Curve
from planner.generation import decode_batches
from planner.metagraph import MetaOp
from planner.plan import Bounds
from planner.rolloutlag import lagged_generate
from planner.schedule import Problem
from planner.sync import gathers_overlap

log = logging.getLogger(__name__)

# Level ranges [a, b] tried by the malleable term of the DAG bound: all of them up to this many
# levels, else single levels, prefixes and suffixes only (keeps the bound O(levels) relaxations).
MAX_LEVELS_ALL_RANGES = 24
# Rows of the critical-path + area LP above which that term is skipped (HiGHS takes ~0.1 s per 10^4 rows).
MAX_CHAIN_AREA_ROWS = 50_000


@dataclass(frozen=True)
class _Profile:
    """Speed-up profile of one MetaOp: piecewise linear through (xs[i], speedups[i]), xs[0] = 0.

    ``work`` is seconds per layer at speed-up 1; the op lasts ``num_layers * work / S(n)``.
    """

    num_layers: int
    work: float
    xs: tuple[float, ...]
    speedups: tuple[float, ...]

    @property
    def total_work(self) -> float:
        return self.num_layers * self.work

    def fastest_duration(self) -> float:
        return self.total_work / self.speedups[-1]

    def devices_for(self, makespan: float) -> float:
        """Fewest (fractional) devices that finish the op in ``makespan`` s; inf when even the largest count can't."""
        need = self.total_work / makespan
        top = self.speedups[-1]
        if need >= top:
            # Within rounding of the top speed-up the answer is the largest count (breakpoints hit this).
            return self.xs[-1] if need <= top * (1 + 1e-12) else math.inf
        i = bisect_left(self.speedups, need)
        if self.speedups[i] == need:
            return self.xs[i]
        x0, x1, s0, s1 = self.xs[i - 1], self.xs[i], self.speedups[i - 1], self.speedups[i]
        return x0 + (need - s0) * (x1 - x0) / (s1 - s0)

    def segment_coefficients(self, makespan: float) -> tuple[float, float]:
        """(alpha, beta) with devices_for(C) = alpha + beta / C on the segment that holds ``makespan``."""
        need = self.total_work / makespan
        i = min(max(bisect_left(self.speedups, need), 1), len(self.speedups) - 1)
        x0, x1, s0, s1 = self.xs[i - 1], self.xs[i], self.speedups[i - 1], self.speedups[i]
        k = (x1 - x0) / (s1 - s0)
        return x0 - s0 * k, k * self.total_work


def _usable(curve: Curve, num_devices: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The curve's counts and times up to ``num_devices`` (a larger count cannot run on N devices)."""
    k = bisect_left(curve.counts, num_devices + 1)
    if k == 0:
        raise ValueError(
            f"smallest valid device count {curve.counts[0]} exceeds the {num_devices} devices available; "
            "the MetaOp cannot run. Use more devices or allow a smaller count."
        )
    return curve.counts[:k], curve.times[:k]


def _interpolated_profile(curve: Curve, num_layers: int, num_devices: int) -> _Profile:
    counts, times = _usable(curve, num_devices)
    work = curve.times[0] * curve.counts[0]
    return _Profile(num_layers, work, (0.0,) + tuple(map(float, counts)), (0.0,) + tuple(work / t for t in times))


def _hull_profile(curve: Curve, num_layers: int, num_devices: int) -> _Profile:
    """The profile through the upper concave hull of (0, 0) and the valid (count, speed-up) points up to
    ``num_devices`` (:meth:`Curve.concave_hull`): the best rate any mix of counts reaches."""
    _usable(curve, num_devices)  # the smallest count must fit
    xs, speedups = curve.concave_hull(num_devices)
    work = curve.times[0] * curve.counts[0]
    return _Profile(num_layers, work, (0.0,) + tuple(map(float, xs)), (0.0,) + speedups)


def _total_devices(profiles: Sequence[_Profile], makespan: float) -> float:
    return sum(p.devices_for(makespan) for p in profiles)


def _solve_common_finish(profiles: Sequence[_Profile], num_devices: int) -> float:
    """C* of independent malleable jobs: smallest C with sum_m n_m(C) <= N (every job finishes at C).

    n_m(C) is non-increasing in C and of the form alpha + beta / C between the breakpoints
    C = L_m W_m / S_m(x_i) (an op reaching a valid count). A binary search over the sorted
    breakpoints finds the interval holding the root, where sum n_m(C) = A + B / C is solved in
    closed form: C* is exact up to float rounding (relative error ~1e-13), no bisection tolerance.
    """
    floor = max(p.fastest_duration() for p in profiles)  # no op can beat its largest count
    if _total_devices(profiles, floor) <= num_devices:
        return floor  # the slowest op at its largest count sets C*; the other devices stay idle
    points = sorted({floor} | {p.total_work / s for p in profiles for s in p.speedups[1:] if p.total_work / s > floor})
    lo, hi = 0, len(points) - 1  # invariant: total(points[lo]) > N
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _total_devices(profiles, points[mid]) > num_devices:
            lo = mid
        else:
            hi = mid - 1
    left = points[lo]
    right = points[lo + 1] if lo + 1 < len(points) else math.inf
    probe = 0.5 * (left + right) if right < math.inf else 2.0 * left
    alpha = beta = 0.0
    for p in profiles:
        a, b = p.segment_coefficients(probe)
        alpha += a
        beta += b
    # total(right) <= N < total(left) guarantees N - alpha > beta / right >= 0.
    return min(max(beta / (num_devices - alpha), left), right)


def relaxed_allocation(
    problem: Problem, ids: Sequence[int], num_devices: int | None = None, *, hull: bool = False
) -> tuple[float, dict[int, float]]:
    """Relaxed malleable optimum of the independent MetaOps ``ids`` on ``num_devices`` (default N).

    Returns ``(C*, {m: n*_m})`` with ``L_m * T_m(n*_m) = C*`` for every m, T at fractional n from
    the linearly interpolated speed-up (module docstring: Spindle's model, which its allocation
    uses), or with ``hull`` from the upper concave hull of the speed-up points (the relaxation
    every schedule satisfies, whatever the curve's shape: the bounds use this one). Normally
    ``sum n*_m = N``; when even the slowest MetaOp at its largest valid count needs more than C*
    (its largest count caps it), C* is that MetaOp's fastest duration and ``sum n*_m < N``: the
    other devices would idle. Valid counts above ``num_devices`` are ignored. Exact to float
    rounding (relative ~1e-13; see :func:`_solve_common_finish`). Empty ``ids`` give ``(0.0, {})``.
    """
    num_devices = problem.num_devices if num_devices is None else num_devices
    ids = list(ids)
    if not ids:
        return 0.0, {}
    build = _hull_profile if hull else _interpolated_profile
    profiles = [build(problem.curves[m], problem.layers(m), num_devices) for m in ids]
    c_star = _solve_common_finish(profiles, num_devices)
    return c_star, {m: min(p.devices_for(c_star), p.xs[-1]) for m, p in zip(ids, profiles)}


def per_level_bound(problem: Problem) -> float:
    """Sum over MetaLevels of the relaxed optimum C* on concave-hull speed-ups: Spindle's reference bound, valid
    for every schedule with level barriers (Węglarz's theorem on the hull relaxation, see :func:`dag_bound`)."""
    return sum(relaxed_allocation(problem, level, hull=True)[0] for level in problem.graph.levels)


def _heads_and_tails(problem: Problem, fastest: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Longest chain of fastest durations strictly before (head) and strictly after (tail) each MetaOp."""
    num_ops = len(problem.graph)
    head = np.zeros(num_ops)
    for op in problem.graph.metaops:  # ids are a topological order
        head[op.id] = max((head[d] + fastest[d] for d in op.deps), default=0.0)
    tail = np.zeros(num_ops)
    succ = problem.graph.successors()
    for m in reversed(range(num_ops)):
        tail[m] = max((fastest[s] + tail[s] for s in succ[m]), default=0.0)
    return head, tail


def _energy_term(head: np.ndarray, tail: np.ndarray, areas: np.ndarray, num_devices: int) -> float:
    """max over S = {m: head_m >= h, tail_m >= q} (non-empty) of h + q + area(S) / N."""
    hs = np.unique(head)
    qs = np.unique(tail)
    in_h = (head[None, :] >= hs[:, None]).astype(float)
    in_q = (tail[None, :] >= qs[:, None]).astype(float)
    area = (in_h * areas[None, :]) @ in_q.T
    count = in_h @ in_q.T
    value = hs[:, None] + qs[None, :] + area / num_devices
    return float(np.max(np.where(count > 0, value, 0.0)))


def _level_ranges(num_levels: int) -> list[tuple[int, int]]:
    if num_levels <= MAX_LEVELS_ALL_RANGES:
        return [(a, b) for a in range(num_levels) for b in range(a, num_levels)]
    return sorted({(a, a) for a in range(num_levels)} | {(0, b) for b in range(num_levels)}
                  | {(a, num_levels - 1) for a in range(num_levels)})


def _chain_area(problem: Problem, hulls: Sequence[_Profile]) -> float:
    """The critical-path + area LP of :func:`dag_bound` (0.0 past :data:`MAX_CHAIN_AREA_ROWS` rows, or if HiGHS fails).

    Variables: C, and per MetaOp its active time tau_m, start S_m and area A_m. Minimise C subject to
    tau_m >= fastest_m, S_m >= S_d + tau_d for every edge d -> m, C >= S_m + tau_m, A_m >= alpha_i tau_m
    + beta_i for every segment i of m's hull (area = tau x devices_for(tau) is alpha tau + beta on each
    segment, convex in tau), and N C >= sum_m A_m.
    """
    num_ops, n = len(hulls), problem.num_devices
    num_rows = sum(len(p.xs) - 1 for p in hulls) + sum(len(op.deps) for op in problem.graph.metaops) + num_ops + 1
    if num_ops == 0 or num_rows > MAX_CHAIN_AREA_ROWS:
        return 0.0
    import highspy

    from planner.milp import quiet_highs  # local: HiGHS only when the bound is computed

    tau, start, area = (lambda m: 1 + m), (lambda m: 1 + num_ops + m), (lambda m: 1 + 2 * num_ops + m)
    lower, starts, index, value = [], [], [], []

    def row(low: float, cols: list[int], coefs: list[float]) -> None:
        lower.append(low)
        starts.append(len(index))
        index.extend(cols)
        value.extend(coefs)

    for op in problem.graph.metaops:
        m, p = op.id, hulls[op.id]
        for d in op.deps:
            row(0.0, [start(m), start(d), tau(d)], [1.0, -1.0, -1.0])
        row(0.0, [0, start(m), tau(m)], [1.0, -1.0, -1.0])
        for i in range(1, len(p.xs)):
            k = (p.xs[i] - p.xs[i - 1]) / (p.speedups[i] - p.speedups[i - 1])
            alpha, beta = p.xs[i - 1] - p.speedups[i - 1] * k, k * p.total_work
            row(beta, [area(m), tau(m)], [1.0, -alpha])
    row(0.0, [0] + [area(m) for m in range(num_ops)], [float(n)] + [-1.0] * num_ops)
    h = quiet_highs()
    h.setOptionValue("threads", 1)
    num_vars = 1 + 3 * num_ops
    low = np.zeros(num_vars)
    low[1:1 + num_ops] = [p.fastest_duration() for p in hulls]
    h.addVars(num_vars, low, np.full(num_vars, np.inf))
    h.changeColsCost(1, np.array([0], dtype=np.int32), np.array([1.0]))
    h.addRows(len(lower), np.array(lower), np.full(len(lower), np.inf), len(index), np.array(starts, dtype=np.int32),
              np.array(index, dtype=np.int32), np.array(value))
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        log.warning("critical-path + area LP: HiGHS ended with %s; the term is left out", h.modelStatusToString(h.getModelStatus()))
        return 0.0
    # A little below the LP optimum: HiGHS's feasibility tolerance must not push a bound above a schedule.
    return max(0.0, float(h.getInfo().objective_function_value) * (1 - 1e-7))


def dag_bound_terms(problem: Problem) -> dict[str, float]:
    """The three terms of :func:`dag_bound` (seconds), before the final max: see its docstring."""
    n = problem.num_devices
    interp = [_interpolated_profile(problem.curves[m], problem.layers(m), n) for m in range(len(problem.graph))]
    fastest = [p.fastest_duration() for p in interp]
    head, tail = _heads_and_tails(problem, fastest)
    critical_path = float(np.max(head + np.asarray(fastest) + tail)) if fastest else 0.0
    # Min area per layer = min_i counts_i * times_i (below counts[0] the interpolated area is flat).
    areas = np.array([problem.layers(m) * min(c * t for c, t in zip(*_usable(problem.curves[m], n)))
                      for m in range(len(problem.graph))])
    energy = _energy_term(head, tail, areas, n) if len(areas) else 0.0
    hulls = [_hull_profile(problem.curves[m], problem.layers(m), n) for m in range(len(problem.graph))]
    levels = problem.graph.levels
    malleable = 0.0
    for a, b in _level_ranges(len(levels)):
        ids = [m for lv in levels[a:b + 1] for m in lv]
        window = _solve_common_finish([hulls[m] for m in ids], n)
        malleable = max(malleable, float(min(head[ids]) + window + min(tail[ids])))
    return {"critical_path": critical_path, "energy": energy, "malleable": malleable,
            "chain_area": _chain_area(problem, hulls)}


def dag_bound(problem: Problem) -> float:
    """A lower bound on the makespan of every valid wave schedule, level barriers or not.

    Let head_m (tail_m) be the longest chain of predecessors (successors) of m, each at its
    fastest duration L * T(largest count): m cannot start before head_m nor end after C - tail_m.
    The bound is the max of four terms, each valid for any schedule in which a MetaOp runs its
    layers one slice at a time on valid counts and starts after its predecessors end:
      - critical path: max_m head_m + L_m T_m(largest) + tail_m;
      - energy: every MetaOp of S = {m: head_m >= h, tail_m >= q} runs inside [h, C - q], so
        N (C - h - q) >= sum_{m in S} L_m min_n n T_m(n) (a slice holds its devices for at least
        its own duration), for every threshold pair with S non-empty;
      - malleable: for S = the MetaOps of levels a..b, C >= min_S head + C*_hull(S) + min_S tail,
        where C*_hull(S) is the relaxed optimum of S with precedence dropped and each speed-up
        replaced by the upper concave hull of its valid points. Any schedule processes m at a
        rate S_m(n) <= hull_m(n) on n devices, so it is feasible for that relaxation, whose
        optimum (concave rates: Węglarz) is C*_hull(S) — a valid bound even for non-concave curves;
      - chain + area (an LP, :func:`_chain_area`): critical path and energy at once, trading a
        MetaOp's speed for its area. Let tau_m be the time m runs (the sum of its slices' times).
        Its slices do all its work, L_m W_m = sum_k t_k S(n_k) <= sum_k t_k hull(n_k) <= tau_m
        hull(A_m / tau_m) by concavity (A_m = sum_k n_k t_k, its area), so A_m >= tau_m
        n_hull(L_m W_m / tau_m) =: a_m(tau_m), which is convex (a perspective) and linear on each
        hull segment. A path's MetaOps run one after another, so tau summed along every path is
        <= C, and all areas fit in N C. The LP's optimum is <= the per-level bound (tau_m = its
        level's C* is feasible) and >= the critical path and the energy term at h = q = 0.
    Each term is <= :func:`per_level_bound` (a chain visits each level once and each fastest
    duration is <= its level's C*; the energy and hull optima of levels a..b are <= the sum of
    their levels' C*); the result is clamped to it to drop float noise.

    What it cannot see (measured on diamond jobs, tests/unit/planner/random_jobs.py
    ``diamond_job``: an encoder feeding two branches of 1-3 MetaOps that a fusion MetaOp joins, 1-3
    such tasks on 8-64 devices): every term is a fluid relaxation in which a MetaOp time-shares its
    valid counts to use any average number of devices. Beside a MetaOp that holds k devices the
    others can only use valid counts <= N - k, which may be far fewer: in seed 18 a branch holds 8
    of 64 devices for 0.63 s, the other task's encoder (valid counts 8, 16, 32, 64) can use 32 of the
    remaining 56, and its chain cannot start anything else meanwhile. Loom's compute there is 1.268 s,
    a hand-built wave schedule 1.150 s, the bound 0.847 s (0.845 s without the LP term): 1.268 / 1.150
    of the gap is the search's; the rest, 1.150 / 0.847, the relaxation's (devices the discrete counts
    leave idle) unless a schedule better than the hand-built one exists. Only a configuration LP over
    sets of valid counts that fit together (with precedence) would see those idle devices. Over 25
    diamond jobs (seeds 0-24; Loom's solver at a 1 s limit on a loaded 2-core machine) the LP term
    takes the geometric mean of compute / bound from 1.111 to 1.105 and the worst from 1.500 to
    1.496; the jobs it moves most: seed 19 1.344 -> 1.283, seed 1 1.132 -> 1.110, seed 21 1.214 ->
    1.197, seed 0 1.361 -> 1.344.
    """
    terms = dag_bound_terms(problem)
    return min(max(terms.values(), default=0.0), per_level_bound(problem))


# --------------------------------------------------------------------------- the whole iteration


@dataclass(frozen=True)
class _PassChains:
    """Per MetaOp, in one micro-batch: a lower bound on its forward and on its backward seconds (each the least over
    its valid counts up to N of its layers' share there; a decode of several micro-batches' rows, all in the first
    one, :func:`planner.generation.decode_batches`, at that multiple), its least device-seconds, and the longest
    chains of such passes in the timeline's DAG of passes (:func:`timeline_compute_bound`): before its forward
    (``head``), from its forward's end to its backward's end (``to_backward_end``: the successors that pass
    gradients back, each from its forward to its backward's end, then its backward; 0 without one), and after its
    backward (``after_b``: its inputs' backward, where it passes gradients back) and after its forward
    (``after_f``)."""

    fwd: np.ndarray
    bwd: np.ndarray
    areas: np.ndarray
    head: np.ndarray
    to_backward_end: np.ndarray
    after_b: np.ndarray
    after_f: np.ndarray


def _pass_chains(problem: Problem) -> _PassChains:
    ops = problem.graph.metaops
    num = len(ops)
    fwd, bwd, areas = np.zeros(num), np.zeros(num), np.zeros(num)
    for op in ops:
        counts, times = _usable(problem.curves[op.id], problem.num_devices)
        shares = problem.forward_shares[op.id][:len(counts)]
        layers = problem.layers(op.id)
        fwd[op.id] = layers * min(t * f for t, f in zip(times, shares)) * decode_batches(op)
        bwd[op.id] = layers * min(t * (1 - f) for t, f in zip(times, shares)) if op.backward_factor > 0 else 0.0
        areas[op.id] = layers * min(c * t for c, t in zip(counts, times))
    head, after_b = np.zeros(num), np.zeros(num)
    for op in ops:  # ids are a topological order
        head[op.id] = max((head[d] + fwd[d] for d in op.deps), default=0.0)
        if bwd[op.id] > 0:
            after_b[op.id] = max((bwd[d] + after_b[d] for d in op.deps if bwd[d] > 0), default=0.0)
    succ = problem.graph.successors()
    to_backward_end, after_f = np.zeros(num), np.zeros(num)
    for m in reversed(range(num)):
        onward = max((fwd[s] + after_f[s] for s in succ[m]), default=0.0)
        if bwd[m] > 0:
            to_backward_end[m] = max((fwd[s] + to_backward_end[s] for s in succ[m] if bwd[s] > 0),
                                     default=0.0) + bwd[m]
            onward = max(onward, to_backward_end[m] + after_b[m])
        after_f[m] = onward
    return _PassChains(fwd, bwd, areas, head, to_backward_end, after_b, after_f)


def timeline_compute_bound(problem: Problem, chains: _PassChains | None = None) -> float:
    """A lower bound on when the compute of every schedule ends on the simulator's timeline (:mod:`planner.timeline`):
    micro-batch by micro-batch, or pipelined, with every worker running the forward of its waves in order and their
    backward in reverse, so a MetaOp's forward waits only for its inputs' forwards, its backward for the backward of
    the successors that pass gradients back, and nothing waits for a whole wave.

    :func:`dag_bound` treats a MetaOp as one block after its predecessors, which wave sums obey and the timeline need
    not (a MetaOp whose predecessor trains starts before that predecessor's backward). Here each MetaOp is two
    passes (forward; backward where it runs one) in a DAG of passes: forward after the inputs' forwards, backward
    after its forward and after the backward of every successor that runs one. With head_m the longest chain of
    passes before m's forward and tail_m the longest after its last pass (each pass at :class:`_PassChains`'s
    lower bound), every micro-batch runs m inside [head_m, C - tail_m], so, for k micro-batches, C is at least

    - the longest chain of passes (one micro-batch's);
    - h + q + k x area(S) / N for S = {m: head_m >= h, tail_m >= q} (least device-seconds, as :func:`dag_bound`);
    - min_S head + min_S tail + k x C*_hull(S) for S the MetaOps of levels a..b (the relaxed optimum scales with
      the work).
    """
    ops = problem.graph.metaops
    if not ops:
        return 0.0
    k = problem.graph.num_micro_batches
    n = problem.num_devices
    chains = _pass_chains(problem) if chains is None else chains
    head, bwd, after_b, after_f = chains.head, chains.bwd, chains.after_b, chains.after_f
    tail = np.where(bwd > 0, after_b, after_f)  # after m's last pass
    critical_path = float(np.max(head + chains.fwd + after_f))
    energy = _energy_term(head, tail, k * chains.areas, n)
    hulls = [_hull_profile(problem.curves[m], problem.layers(m), n) for m in range(len(ops))]
    malleable = 0.0
    levels = problem.graph.levels
    for a, b in _level_ranges(len(levels)):
        ids = [m for lv in levels[a:b + 1] for m in lv]
        window = _solve_common_finish([hulls[m] for m in ids], n)
        malleable = max(malleable, float(min(head[ids]) + k * window + min(tail[ids])))
    return max(critical_path, energy, malleable)


def _group_shard_params(problem: Problem) -> dict[str, tuple[float, bool]]:
    """Per parameter group: (fewest parameters of one layer among its MetaOps, whether all of them train)."""
    out: dict[str, tuple[float, bool]] = {}
    for op in problem.graph.metaops:
        low, trains = out.get(op.param_group, (math.inf, True))
        out[op.param_group] = (min(low, op.layer.params), trains and not op.frozen)
    return out


def _trainable_params(problem: Problem) -> float:
    """Parameters every schedule must step: for each group whose MetaOps all train, its layers (the most any of
    its MetaOps has) at the fewest parameters per layer among them."""
    layers: dict[str, int] = {}
    for op in problem.graph.metaops:
        layers[op.param_group] = max(layers.get(op.param_group, 0), op.num_layers)
    return sum(layers[g] * params for g, (params, trains) in _group_shard_params(problem).items() if trains)


def _cheapest(collective, nbytes: float, num_devices: int) -> float:
    """The cheaper of a collective's intra- and cross-node prices (either may apply to an unplaced slice)."""
    return min(collective(nbytes, num_devices, cross_node=False), collective(nbytes, num_devices, cross_node=True))


def _last_buckets(problem: Problem, cost_model: CostModel, m: int,
                  groups: dict[str, list[MetaOp]]) -> list[tuple[float, float]]:
    """Per valid count of MetaOp ``m`` (up to N): (a layer's seconds there, the fewest seconds the gradient of its
    slice at that count can take once its backward is the last to end). The second is its all-reduce and (ZeRO-1,
    unless the gathers overlap the next iteration: :func:`planner.sync.gathers_overlap`) the all-gather after the
    step, over at least its data-parallel ranks, on cross-node links where the count spans nodes (a tensor-parallel
    group never does, so a data-parallel group over more devices than a node holds does), else the cheaper links.
    0 at a count with one data-parallel rank, and at every count when its group (``groups``: members per parameter
    group) has a frozen member."""
    op = problem.graph.metaops[m]
    group_ops = groups[op.param_group]
    curve = problem.curves[m]
    counts, times = _usable(curve, problem.num_devices)
    if any(o.frozen for o in group_ops):
        return [(t, 0.0) for t in times]
    per_node = cost_model.hw.devices_per_node
    out = []
    for n, t, layout in zip(counts, times, curve.layouts):
        if layout.dp_degree <= 1:
            out.append((t, 0.0))
            continue
        # One layer's TP shard; a shared group's shard may be cut by another member's larger TP degree.
        tp = layout.tp_degree if len(group_ops) == 1 else max(max(o.allowed_tp) for o in group_ops)
        shard = min(o.layer.params for o in group_ops) / tp

        def price(collective, nbytes: float) -> float:
            if n > per_node:
                return collective(nbytes, layout.dp_degree, cross_node=True)
            return _cheapest(collective, nbytes, layout.dp_degree)

        seconds = price(cost_model.allreduce_time, cost_model.grad_bytes * shard)
        if cost_model.shard_optimizer and not gathers_overlap(problem.graph, cost_model):
            seconds += price(cost_model.allgather_time, cost_model.param_bytes_moved * shard)
        out.append((t, seconds))
    return out


def iteration_terms(problem: Problem, cost_model: CostModel) -> dict[str, float]:
    """The parts of :func:`iteration_bound` (seconds), at the MetaOp and count that minimise it: ``compute``
    (:func:`timeline_compute_bound`), ``last_path`` (the chain through the slice whose backward ends last, at
    that count), ``optimizer`` (the step of every trainable parameter spread evenly over all devices) and
    ``last_bucket`` (the cheapest sync of that slice there)."""
    ops = problem.graph.metaops
    k = problem.graph.num_micro_batches
    chains = _pass_chains(problem)
    compute = timeline_compute_bound(problem, chains)
    optimizer = cost_model.optimizer_time(_trainable_params(problem) / problem.num_devices)
    # The backward that ends last belongs to a trainable MetaOp none of whose predecessors runs a backward pass.
    last = [op.id for op in ops if not op.frozen and all(ops[d].backward_factor == 0 for d in op.deps)]
    groups: dict[str, list[MetaOp]] = {}
    for op in ops:
        groups.setdefault(op.param_group, []).append(op)
    best = {"compute": compute, "last_path": 0.0, "optimizer": optimizer, "last_bucket": 0.0}
    total = math.inf
    for m in last:
        # the slice's devices run at least one layer of every micro-batch; with one, its forward, the passes of the
        # successors that pass gradients back and its backward run in turn
        between = chains.to_backward_end[m] - chains.bwd[m] if k == 1 else 0.0
        for layer_s, sync_s in _last_buckets(problem, cost_model, m, groups):
            path = chains.head[m] + k * layer_s + between
            value = max(compute, path) + max(optimizer, sync_s)
            if value < total:
                total = value
                best.update(last_path=float(path), last_bucket=sync_s)
    return best


def plan_bounds(problem: Problem, cost_model: CostModel) -> Bounds:
    """Every bound of ``problem``, as the Plan records them."""
    return Bounds(per_level_s=per_level_bound(problem), dag_s=dag_bound(problem),
                  iteration_s=iteration_bound(problem, cost_model))


def iteration_bound(problem: Problem, cost_model: CostModel) -> float:
    """A lower bound on the predicted iteration time of every schedule the simulator prices (s).

    ``max(compute, last_path) + max(optimizer, last_bucket)`` of :func:`iteration_terms`; transfers, input modules
    and loss heads count 0 (a placement may keep data local; they are 0 unless profiled). Why each part is
    unavoidable, in the simulator's model (:mod:`planner.simulator`, :mod:`planner.sync`):

    - compute and transfers end at ``T_c >= timeline_compute_bound`` (the timeline's passes, micro-batch by
      micro-batch or pipelined; transfers, embeddings and the loss stage add >= 0);
    - every device steps after ``T_c``, and the steps together cover every trainable parameter at least once
      (ZeRO-1 shards a bucket over its participants, TP over its ranks; without sharding each holder steps it
      all). The optimizer time is linear in the parameters, so the slowest device needs at least
      ``optimizer_time(P / N)``;
    - the backward that ends last (at ``T_c``: nothing but gradient transfers to producers that run backward
      could follow, and it has none) belongs to a trainable MetaOp ``m`` whose predecessors run no backward
      (a predecessor that did would run its backward after it; a frozen MetaOp runs one only downstream of a
      trainable one). Its slice's layers become final at ``T_c``; each TP shard's bucket holds at least that
      shard, over at least the slice's data-parallel ranks, so its all-reduce (and, under ZeRO-1 with gathers that
      end the iteration, the all-gather after its devices step) runs after ``T_c`` with nothing left to hide it.
      Where the gathers overlap the next iteration's forward (:func:`planner.sync.gathers_overlap`), the forward
      that precedes ``m``'s slice on its devices (forward-only predecessors, earlier waves of frozen MetaOps) may
      hide its gather, so the gather is not counted. At a count of more devices than a node holds the
      data-parallel group spans nodes (a tensor-parallel group never does), so the cross-node price applies; at
      smaller counts the cheaper of the two; 0 at a count of one data-parallel rank. This needs collective times
      non-decreasing in bytes and devices (the alpha-beta model's; profiled link fits with a non-negative
      intercept).

    Both tails follow ``T_c``, but they may overlap each other, so their max is taken, not their sum. ``T_c`` is
    also at least the chain through ``m``'s last slice at its count ``n``: the longest chain of passes before its
    forward (:class:`_PassChains`), then the slice's devices running a layer of every micro-batch (forward and
    backward), with one micro-batch the passes of the successors that pass gradients back between its forward and
    its backward. Count and
    sync go together (a count whose sync is cheap may be slow), so the bound is the least over ``m`` and ``n`` of
    ``max(timeline_compute_bound, chain) + max(optimizer, sync at n)``.

    With ``training.rollout_lag: 1`` the simulator prices the pipeline's period, ``max(G, R) + H``
    (:mod:`planner.rolloutlag`), where ``G + R`` is the synchronous iteration: the bound is the larger of half the
    synchronous bound and, when every other MetaOp depends on every lagged generate MetaOp (so nothing runs beside
    the generation in the synchronous iteration), the synchronous bound of the job with those MetaOps taking no
    time (a bound on ``R``) and :func:`_one_period_compute`. That last one holds because the period overlaps only
    where the generation has devices of its own: there ``G`` covers the generation's work on its pool and ``R`` the
    rest's on the other devices (all of it after ``G`` in the synchronous iteration), so ``max(G, R)`` is the
    makespan of a schedule of every MetaOp side by side on N devices; elsewhere the period is the synchronous
    iteration, whose bound is at least it (its malleable term over every level, its energy term, its chains).
    """
    synchronous = _synchronous_bound(problem, cost_model)
    early = lagged_generate(problem.graph)
    if not early:
        return synchronous
    rest = together = 0.0
    if all(early <= ancestors for m, ancestors in enumerate(_ancestors(problem.graph)) if m not in early):
        instant = tuple(replace(c, times=tuple(t * 1e-12 for t in c.times)) if m in early else c
                        for m, c in enumerate(problem.curves))
        rest = _synchronous_bound(replace(problem, curves=instant), cost_model)
        together = _one_period_compute(problem)
    return max(synchronous / 2, rest, together)


def _one_period_compute(problem: Problem) -> float:
    """A lower bound on the compute of one step's MetaOps run side by side, precedence dropped: the longest forward
    plus backward of one MetaOp, the least device-seconds of all over N, and their relaxed optimum on concave-hull
    speed-ups all at once (Węglarz; both x k micro-batches): what a lagged period holds (:func:`iteration_bound`)."""
    k, n = problem.graph.num_micro_batches, problem.num_devices
    chains = _pass_chains(problem)
    hulls = [_hull_profile(problem.curves[m], problem.layers(m), n) for m in range(len(problem.graph))]
    return max(float(np.max(chains.fwd + chains.bwd)), k * float(chains.areas.sum()) / n,
               k * _solve_common_finish(hulls, n))


def _synchronous_bound(problem: Problem, cost_model: CostModel) -> float:
    """:func:`iteration_bound` of the synchronous iteration (every MetaOp in the step it serves)."""
    terms = iteration_terms(problem, cost_model)
    return max(terms["compute"], terms["last_path"]) + max(terms["optimizer"], terms["last_bucket"])


def _ancestors(graph) -> list[set[int]]:
    """Per MetaOp, every MetaOp it depends on, directly or not (ids are a topological order)."""
    out: list[set[int]] = []
    for op in graph.metaops:
        out.append(set(op.deps).union(*(out[d] for d in op.deps)))
    return out
