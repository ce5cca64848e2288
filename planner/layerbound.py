"""A per-level bound on wave schedules' compute with whole layers and valid device counts (the pattern LP).

The per-level bound (:func:`planner.bound.per_level_bound`) relaxes layers and devices to reals: a MetaOp may run
0.04 of a device for the whole level. A wave schedule cannot: a wave is a set of slices, each a whole number of
layers of one MetaOp on a valid count, and it lasts its slowest slice. Any such set is a *pattern* ``p`` with
duration ``D_p``, and a level's waves are patterns used an integer number of times. Relaxing only those repetitions
gives the linear program

    minimise  sum_p D_p x_p   subject to   sum_p l_{m,p} x_p >= L_m  (every MetaOp m),  x >= 0,

whose value no wave schedule with level barriers beats (its waves are one feasible x). It is solved by column
generation: the dual prices ``pi`` of the restricted master price every pattern exactly, since a pattern's value
``sum_m pi_m l_m`` at a duration ``D`` is a multiple-choice knapsack over the devices (each MetaOp at one valid count,
``min(L_m, floor(D / t_m(n)))`` layers) and only the finitely many slice times ``l t_m(n)`` need be tried as ``D``.
The bound returned is never the master's value but the dual certificate ``sum_m pi_m L_m / rho`` with ``rho`` the
largest ``value / D`` over every pattern: ``pi / rho`` is dual feasible, so by weak duality the certificate is a
lower bound whether or not the generation converged (it equals the LP optimum when it did).

Pure; numpy and HiGHS (highspy) only. Entry point: :func:`layer_bound`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from planner.schedule import Problem

log = logging.getLogger(__name__)

MAX_DURATIONS = 20_000  # distinct slice times of a level above which the bound is not computed (0.0: the caller's)
MAX_CELLS = 2_000_000  # durations x devices of one pricing DP above which the bound is not computed
MAX_ROUNDS = 100  # column-generation rounds per level
COLUMNS_PER_ROUND = 8  # patterns added per round (the best durations by reduced cost)


def _durations(problem: Problem, ids: Sequence[int], num_devices: int) -> np.ndarray:
    times = {l * t for m in ids for n, t in zip(problem.curves[m].counts, problem.curves[m].times) if n <= num_devices
             for l in range(1, problem.layers(m) + 1)}
    return np.array(sorted(times))


def _layers(problem: Problem, m: int, duration: np.ndarray, num_devices: int) -> list[tuple[int, np.ndarray]]:
    """(count, layers of m that fit in each duration on that count) for m's valid counts up to ``num_devices``."""
    out = []
    for n, t in zip(problem.curves[m].counts, problem.curves[m].times):
        if n <= num_devices:
            # a hair of slack rounds a slice that exactly fills D up: more layers -> a larger value -> a smaller bound
            out.append((n, np.minimum(problem.layers(m), np.floor(duration / t * (1 + 1e-12)))))
    return out


def _price(problem: Problem, ids: Sequence[int], pi: np.ndarray, duration: np.ndarray, num_devices: int) -> np.ndarray:
    """The largest ``sum_m pi_m l_m`` of a pattern at each duration (multiple-choice knapsack over the devices)."""
    best = np.zeros((len(duration), num_devices + 1))
    for i, m in enumerate(ids):
        new = best.copy()
        for n, layers in _layers(problem, m, duration, num_devices):
            gain = best[:, :num_devices + 1 - n] + (pi[i] * layers)[:, None]
            np.maximum(new[:, n:], gain, out=new[:, n:])
        best = new
    return best[:, num_devices]


def _pattern(problem: Problem, ids: Sequence[int], pi: np.ndarray, duration: float, num_devices: int) -> np.ndarray:
    """The layers per MetaOp (in ``ids`` order) of a best pattern at ``duration`` (the knapsack, traced back)."""
    d = np.array([duration])
    tables, best = [], np.zeros(num_devices + 1)
    for i, m in enumerate(ids):
        options = [(n, float(layers[0])) for n, layers in _layers(problem, m, d, num_devices)]
        new, pick = best.copy(), np.zeros(num_devices + 1, dtype=int)
        for j, (n, layers) in enumerate(options):
            gain = best[:num_devices + 1 - n] + pi[i] * layers
            better = gain > new[n:]
            new[n:][better], pick[n:][better] = gain[better], j + 1
        tables.append((options, pick))
        best = new
    out, cap = np.zeros(len(ids)), num_devices
    for i in range(len(ids) - 1, -1, -1):
        options, pick = tables[i]
        if pick[cap]:
            n, layers = options[pick[cap] - 1]
            out[i], cap = layers, cap - n
    return out


def layer_bound(problem: Problem, ids: Sequence[int], num_devices: int | None = None) -> float:
    """A lower bound (seconds) on the compute of every wave schedule of the independent MetaOps ``ids`` on
    ``num_devices`` (default N): the pattern LP's dual certificate (module docstring). 0.0 when the level is too
    large to price (:data:`MAX_DURATIONS`, :data:`MAX_CELLS`) or HiGHS fails."""
    import highspy

    from planner.milp import quiet_highs  # local: HiGHS only when the bound is computed

    num_devices = problem.num_devices if num_devices is None else num_devices
    ids = list(ids)
    if not ids:
        return 0.0
    duration = _durations(problem, ids, num_devices)
    if len(duration) > MAX_DURATIONS or len(duration) * (num_devices + 1) > MAX_CELLS:
        return 0.0
    demand = np.array([float(problem.layers(m)) for m in ids])
    h = quiet_highs()
    h.setOptionValue("threads", 1)
    h.addRows(len(ids), demand, np.full(len(ids), np.inf), 0, np.zeros(0, dtype=np.int32),
              np.zeros(0, dtype=np.int32), np.zeros(0))
    for i, m in enumerate(ids):  # one pattern per MetaOp: all its layers on its largest count
        n, t = max((n, t) for n, t in zip(problem.curves[m].counts, problem.curves[m].times) if n <= num_devices)
        h.addCol(demand[i] * t, 0.0, np.inf, 1, np.array([i], dtype=np.int32), np.array([demand[i]]))
    bound = 0.0
    for _ in range(MAX_ROUNDS):
        h.run()
        if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            log.warning("pattern LP bound: HiGHS ended with %s", h.modelStatusToString(h.getModelStatus()))
            return 0.0
        pi = np.maximum(np.array(h.getSolution().row_dual), 0.0)
        value = _price(problem, ids, pi, duration, num_devices)
        rho = max(1.0, float(np.max(value / duration)))
        bound = max(bound, float(pi @ demand) / rho)
        gain = value - duration
        order = np.argsort(-gain)[:COLUMNS_PER_ROUND]
        added = 0
        for k in order:
            if gain[k] <= 1e-9 * duration[k]:
                break
            layers = _pattern(problem, ids, pi, float(duration[k]), num_devices)
            rows = np.nonzero(layers)[0]
            h.addCol(float(duration[k]), 0.0, np.inf, len(rows), rows.astype(np.int32), layers[rows])
            added += 1
        if not added:
            break
    # a little below the certificate: HiGHS's dual tolerances must not push a bound above a schedule
    return bound * (1 - 1e-7)
