"""Local search on a wave schedule: exact moves that never lengthen it.

A wave lasts its largest forward plus its largest backward (:meth:`planner.schedule.Problem.duration`), so integer
layer counts leave idle time inside waves. Three moves remove it, each evaluated exactly on the sum of wave durations:

- **narrow**: a slice moves to the smallest count that keeps the wave as long as it is (frees devices, never
  lengthens the wave);
- **widen**: the slices that set the wave's largest forward or backward move to larger counts that fit the wave's
  free devices, when each gets below it;
- **shave**: the slowest slices of a wave give up just enough layers to reach the next shorter
  duration; the layers go to the other wave (or a new wave) inside the MetaOp's dependency range
  where they cost least. Accepted only when the total falls.

Dependencies stay satisfied: a MetaOp's layers only move to waves after its predecessors' last
wave and before its successors' first wave.

Work is counted, not timed: every slice-time evaluation is one unit, and :func:`polish` stops at its
budget (:data:`POLISH_BUDGET` by default) after the wave it is working on. A round costs about
waves x slices x counts units, so a 500-wave candidate gets a few waves of search, a 2-wave one many
rounds, and the result is the same on a busy machine as on an idle one.
"""

from __future__ import annotations

import math
import time

from planner.schedule import Problem, Schedule, Slice, Wave, merge_adjacent_waves

EPS = 1e-12
POLISH_BUDGET = 300_000  # slice-time evaluations per polish() call (~0.3-0.6 s of CPU)

WaveMap = dict[int, list[int]]  # metaop -> [num_devices, num_layers]


class _State:
    def __init__(self, problem: Problem, schedule: Schedule):
        self.p = problem
        self.waves: list[WaveMap] = [{s.metaop: [s.num_devices, s.num_layers] for s in w.slices} for w in schedule.waves]
        self.succ = problem.graph.successors()
        self.work = 0  # slice-time evaluations so far (the budget's unit)

    def t(self, m: int, n: int, l: int) -> float:
        self.work += 1
        return self.p.curves[m].time(n) * l

    def passes(self, m: int, n: int, l: int) -> tuple[float, float]:
        """A slice's (forward, backward) seconds."""
        self.work += 1
        f, b = self.p.pass_times[m][n]
        return f * l, b * l

    def dur(self, k: int, m: int = -1, n: int = 0, l: int = 0) -> float:
        """Wave k's duration (Problem.duration), with MetaOp m's slice (n devices, l layers) put in when m >= 0."""
        slices = self.slices(k, m, n, l)
        self.work += len(slices)  # one slice-time evaluation each, as passes() counts them
        return self.p.duration(slices)

    def slices(self, k: int, m: int = -1, n: int = 0, l: int = 0) -> list[tuple[int, int, int]]:
        """Wave k's slices (MetaOp, devices, layers), with m's put in when m >= 0."""
        return [(mm, nn, ll) for mm, (nn, ll) in self.waves[k].items() if mm != m] + ([(m, n, l)] if m >= 0 else [])

    def free(self, k: int) -> int:
        return self.p.num_devices - sum(n for n, _ in self.waves[k].values())

    def total(self) -> float:
        return sum(self.dur(k) for k in range(len(self.waves)))

    def span(self, m: int) -> tuple[int, int]:
        """Waves where m's layers may go: after its predecessors' last wave, before its successors' first."""
        last = lambda op: max((k for k, w in enumerate(self.waves) if op in w), default=-1)
        first = lambda op: min((k for k, w in enumerate(self.waves) if op in w), default=len(self.waves))
        lo = max((last(p) + 1 for p in self.p.graph.metaops[m].deps), default=0)
        hi = min((first(s) - 1 for s in self.succ[m]), default=len(self.waves) - 1)
        return lo, hi

    def schedule(self) -> Schedule:
        waves = [Wave(tuple(Slice(m, l, n) for m, (n, l) in sorted(w.items()))) for w in self.waves if w]
        return Schedule(merge_adjacent_waves(self.p, waves))


def _narrow(st: _State, k: int) -> None:
    """Each slice on the fewest devices that keep the wave as long as it is."""
    d = st.dur(k)
    for m, (n, l) in st.waves[k].items():
        smallest = next((c for c in st.p.curves[m].counts if c < n and st.dur(k, m, c, l) <= d + EPS), n)
        st.waves[k][m][0] = smallest


def _widen(st: _State, k: int) -> bool:
    """The slices that set the wave's largest forward or backward on more devices, when each gets below it."""
    passes = {m: st.passes(m, n, l) for m, (n, l) in st.waves[k].items()}
    forward, backward = (max((p[i] for p in passes.values()), default=0.0) for i in (0, 1))
    # a pass nothing runs in (every slice forward-only: a decode, a frozen scorer) has no slice to shorten
    critical = {m: (forward > EPS and f >= forward - EPS, backward > EPS and b >= backward - EPS)
                for m, (f, b) in passes.items()}
    free = st.free(k)
    changes = {}
    for m, (on_f, on_b) in critical.items():
        if not (on_f or on_b):
            continue
        n, l = st.waves[k][m]
        better = [c for c in st.p.curves[m].counts if n < c <= n + free
                  and all(not on or p < top - EPS for on, p, top in zip((on_f, on_b), st.passes(m, c, l),
                                                                       (forward, backward)))]
        if not better:
            return False
        changes[m] = better[0]
        free -= better[0] - n
    for m, c in changes.items():
        st.waves[k][m][0] = c
    return bool(changes)


def _best_destination(st: _State, m: int, layers: int, src: int) -> tuple[float, int | None, int]:
    """Cheapest (added seconds, wave or None for a new wave, count) to run ``layers`` more layers of m."""
    lo, hi = st.span(m)
    best: tuple[float, int | None, int] = (math.inf, None, 0)
    for j in range(lo, hi + 1):
        if j == src:
            continue
        d, w = st.dur(j), st.waves[j]
        if m in w:
            n, l = w[m]
            options = [(st.dur(j, m, n, l + layers) - d, j, n)]
        else:
            options = [(st.dur(j, m, c, layers) - d, j, c) for c in st.p.curves[m].counts if c <= st.free(j)]
        for opt in options:
            if opt[0] < best[0] - EPS:
                best = opt
    new_wave = (st.t(m, st.p.curves[m].counts[-1], layers), None, st.p.curves[m].counts[-1])
    return best if best[0] <= new_wave[0] else new_wave


def _shave(st: _State, k: int) -> bool:
    d = st.dur(k)
    times = {m: st.t(m, n, l) for m, (n, l) in st.waves[k].items()}
    lower = [t for t in times.values() if t < d - EPS]
    lower += [st.t(m, n, l - 1) for m, (n, l) in st.waves[k].items() if times[m] >= d - EPS]
    if not lower:
        return False
    target = max(lower)
    before = st.total()
    saved = [dict((m, list(v)) for m, v in w.items()) for w in st.waves]
    for m in [m for m, t in times.items() if t > target + EPS]:
        n, l = st.waves[k][m]
        out = l - int(target / st.p.curves[m].time(n) * (1 + 1e-12))
        out = min(l, max(out, 1))
        _, j, c = _best_destination(st, m, out, k)
        if st.waves[k][m][1] == out:
            del st.waves[k][m]
        else:
            st.waves[k][m][1] -= out
        if j is None:
            st.waves.insert(k + 1, {m: [c, out]})
        elif m in st.waves[j]:
            st.waves[j][m][1] += out
        else:
            st.waves[j][m] = [c, out]
    if st.total() < before - EPS * max(1.0, before):
        return True
    st.waves = saved
    return False


def polish(problem: Problem, schedule: Schedule, max_rounds: int = 60, deadline: float | None = None,
           budget: int = POLISH_BUDGET) -> Schedule:
    """Improve ``schedule`` by narrow/widen/shave moves until none helps, ``max_rounds``, ``budget`` slice-time
    evaluations are spent (deterministic), or this thread's CPU time ``time.thread_time()`` reaches ``deadline`` (a
    safety cap). Each move keeps the schedule valid, so it may stop anywhere."""
    st = _State(problem, schedule)
    for _ in range(max_rounds):
        improved = False
        k = 0
        while k < len(st.waves) and st.work < budget and (deadline is None or time.thread_time() < deadline):
            _narrow(st, k)
            improved |= _widen(st, k)
            improved |= _shave(st, k)
            k += 1
        st.waves = [w for w in st.waves if w]
        if not improved:
            break
    return st.schedule()

