"""Spindle's wavefront scheduler (ASPLOS'25 §3.3-3.4, Algorithm 1), implemented faithfully.

It is both a baseline the benchmarks compare against and the warm start of Loom's ILP. Per
MetaLevel, in order, with level barriers (Spindle's semantics):
  1. relaxed allocation C*, n*_m (:func:`planner.bound.relaxed_allocation`);
  2. two-point discretisation of each n*_m onto the neighbouring valid counts
     (:func:`discretise_allocation`), giving at most two (devices, layers) tuples per MetaOp;
  3. the wavefront: waves built greedily (propose first-fit, extend idle devices, align durations
     by slicing whole layers, commit) until every tuple's layers are scheduled;
  4. adjacent waves holding the same (MetaOp, devices) set are merged.
Every wave consumes at least one whole tuple (the shortest one), so a level has at most
2 x #MetaOps waves. Pure and deterministic: ties are broken by MetaOp id and device count.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass

from planner.bound import relaxed_allocation
from planner.costmodel import Curve
from planner.schedule import Problem, Schedule, Slice, Wave, merge_adjacent_waves

log = logging.getLogger(__name__)

# Slack when comparing a time quotient with an integer (floor(l*T/T) must stay l).
_EPS = 1e-9


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def discretise_allocation(curve: Curve, num_layers: int, n_star: float) -> list[tuple[int, int]]:
    """Spindle's two-point allocation of a relaxed ``n_star`` (Eq. 10): ``[(devices, layers), ...]``.

    With n_lo <= n* <= n_hi the neighbouring valid counts, the layers split as l_hi + l_lo = L and
    T(n_hi) l_hi + T(n_lo) l_lo = L T(n*) (same finish time as the relaxed op; T(n*) from the
    linearly interpolated speed-up, which time-sharing n_lo and n_hi reproduces exactly). Both are
    rounded half up; any remainder is pushed onto the wider tuple (onto the other when the wider one
    rounds to 0), so the layers sum to L; tuples with 0 layers are dropped. Below the smallest
    count the low point is a dummy 0-device tuple (infinitely slow, hence 0 layers) and the op gets
    all its layers on the smallest count. Result: wider tuple first, 1 or 2 entries.
    """
    counts = curve.counts
    if n_star <= counts[0]:
        return [(counts[0], num_layers)]
    if n_star >= counts[-1]:
        return [(counts[-1], num_layers)]
    hi = next(i for i, c in enumerate(counts) if c >= n_star)
    if counts[hi] == n_star:
        return [(counts[hi], num_layers)]
    t_hi, t_lo = curve.times[hi], curve.times[hi - 1]
    t_star = curve.times[0] * counts[0] / curve.speedup(n_star)
    l_hi_real = num_layers * (t_lo - t_star) / (t_lo - t_hi)
    l_hi = _round_half_up(l_hi_real)
    l_lo = _round_half_up(num_layers - l_hi_real)
    remainder = num_layers - l_hi - l_lo
    if l_hi > 0:
        l_hi += remainder
    else:
        l_lo += remainder
    out = [(counts[hi], l_hi), (counts[hi - 1], l_lo)]
    return [(n, l) for n, l in out if l > 0]


@dataclass
class _Tuple:
    """An ASL-tuple of the pool: ``num_layers`` layers of ``metaop`` planned on ``num_devices`` devices."""

    metaop: int
    num_devices: int
    num_layers: int


@dataclass
class _Candidate:
    """A tuple proposed for the wave being built; ``num_devices`` may be widened by the extend step."""

    source: _Tuple
    num_devices: int


def _tuple_time(problem: Problem, metaop: int, num_devices: int, num_layers: int) -> float:
    return problem.curves[metaop].time(num_devices) * num_layers


def _propose(problem: Problem, pool: list[_Tuple], finished: list[bool]) -> list[_Candidate]:
    """Step 1: first-fit up to N devices, pool in the code's default order "bigN_bigT"
    (most devices first, then longest time; ties by MetaOp id), one tuple per MetaOp, and only
    MetaOps whose predecessors have no layers left ("is_prepared")."""
    order = sorted(pool, key=lambda p: (-p.num_devices, -_tuple_time(problem, p.metaop, p.num_devices, p.num_layers),
                                        p.metaop))
    free = problem.num_devices
    chosen: list[_Candidate] = []
    in_wave: set[int] = set()
    for p in order:
        if p.num_devices > free or p.metaop in in_wave:
            continue
        if not all(finished[d] for d in problem.graph.metaops[p.metaop].deps):
            continue
        chosen.append(_Candidate(p, p.num_devices))
        in_wave.add(p.metaop)
        free -= p.num_devices
    return chosen


def _remaining_time(problem: Problem, pool: list[_Tuple], widened: dict[int, _Candidate]) -> dict[int, float]:
    """Remaining execution time per MetaOp over its pool tuples (a candidate's tuple at its widened count)."""
    out: dict[int, float] = {}
    for p in pool:
        cand = widened.get(id(p))
        n = cand.num_devices if cand is not None else p.num_devices
        out[p.metaop] = out.get(p.metaop, 0.0) + _tuple_time(problem, p.metaop, n, p.num_layers)
    return out


def _extend(problem: Problem, pool: list[_Tuple], wave: list[_Candidate]) -> None:
    """Step 2: while devices idle, widen a tuple of the wave to its next valid count.

    Priority goes to the MetaOp with the largest remaining execution time (the paper's behaviour;
    the code's default ``extend_rule=None`` skips this step). Remaining time is re-evaluated after
    each widening so that idle devices spread over the heaviest MetaOps; a tuple whose next count
    does not fit the idle devices is not widened further in this wave (idle devices only shrink).
    """
    idle = problem.num_devices - sum(c.num_devices for c in wave)
    if idle <= 0 or not wave:
        return
    by_source = {id(c.source): c for c in wave}
    remaining = _remaining_time(problem, pool, by_source)
    heap = [(-remaining[c.source.metaop], c.source.metaop, k) for k, c in enumerate(wave)]
    heapq.heapify(heap)
    while heap and idle > 0:
        _, metaop, k = heapq.heappop(heap)
        cand = wave[k]
        counts = problem.curves[metaop].counts
        nxt = counts.index(cand.num_devices) + 1
        if nxt == len(counts) or counts[nxt] - cand.num_devices > idle:
            continue
        per_layer_old = problem.curves[metaop].time(cand.num_devices)
        idle -= counts[nxt] - cand.num_devices
        cand.num_devices = counts[nxt]
        saved = (per_layer_old - problem.curves[metaop].time(cand.num_devices)) * cand.source.num_layers
        remaining[metaop] -= saved
        heapq.heappush(heap, (-remaining[metaop], metaop, k))


def _align(problem: Problem, wave: list[_Candidate]) -> list[Slice]:
    """Step 3: cut every tuple to the shortest tuple's duration by slicing whole layers (code's rule):
    layers_exec = max(round(min_time / T), 1); wave time = max executed time; scheduled layers =
    min(l, floor(wave_time / T)), so tuples that fit in the wave's time run as many layers as fit."""
    per_layer = [problem.curves[c.source.metaop].time(c.num_devices) for c in wave]
    min_time = min(t * c.source.num_layers for t, c in zip(per_layer, wave))
    executed = [min(max(_round_half_up(min_time / t), 1), c.source.num_layers) for t, c in zip(per_layer, wave)]
    wave_time = max(t * x for t, x in zip(per_layer, executed))
    return [
        Slice(c.source.metaop, min(c.source.num_layers, int(math.floor(wave_time / t + _EPS))), c.num_devices)
        for t, c in zip(per_layer, wave)
    ]


def _schedule_level(problem: Problem, level: tuple[int, ...], finished: list[bool]) -> list[Wave]:
    """Algorithm 1 on one MetaLevel; marks its MetaOps finished."""
    c_star, n_star = relaxed_allocation(problem, level)
    pool = [
        _Tuple(m, n, layers)
        for m in level
        for n, layers in discretise_allocation(problem.curves[m], problem.layers(m), n_star[m])
    ]
    num_tuples = len(pool)
    waves: list[Wave] = []
    left = {m: problem.layers(m) for m in level}
    while pool:
        candidates = _propose(problem, pool, finished)
        assert candidates, f"no tuple of level {level} fits N={problem.num_devices}"
        _extend(problem, pool, candidates)
        slices = _align(problem, candidates)
        for cand, s in zip(candidates, slices):
            # Commit: the leftover stays in the pool at its *planned* count (the allocation plan's
            # n; a widening only uses devices idle in this wave).
            cand.source.num_layers -= s.num_layers
            left[s.metaop] -= s.num_layers
        pool = [p for p in pool if p.num_layers > 0]
        waves.append(Wave(tuple(sorted(slices, key=lambda s: s.metaop))))
        for m in {s.metaop for s in slices}:
            finished[m] = left[m] == 0
    assert len(waves) <= num_tuples, f"level {level}: {len(waves)} waves > {num_tuples} tuples"
    merged = list(merge_adjacent_waves(problem, waves))
    log.debug("level %s: C*=%.4g s, %d tuples, %d waves (%d after merging)", level, c_star, num_tuples,
              len(waves), len(merged))
    return merged


def spindle_schedule(problem: Problem) -> Schedule:
    """Spindle's plan of ``problem``: per MetaLevel in order, with level barriers (see module docstring).

    The result satisfies :func:`~planner.schedule.check_schedule`, has at most 2 x #MetaOps waves
    per level, and depends only on ``problem`` (deterministic).
    """
    finished = [False] * len(problem.graph)
    waves: list[Wave] = []
    for level in problem.graph.levels:
        level_waves = _schedule_level(problem, level, finished)
        assert len(level_waves) <= 2 * len(level)
        waves.extend(level_waves)
    return Schedule(tuple(waves))
