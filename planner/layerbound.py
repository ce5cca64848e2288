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

**As the timeline prices a wave** (:func:`pass_layer_bound`): the runtime runs every forward before every backward,
so a wave lasts its largest forward plus its largest backward (:meth:`planner.schedule.Problem.duration`), more than
its slowest slice where its slices split their time differently between the passes (a recomputed ViT beside towers
that are not: a quarter and a third of their time in forward). With MetaOps of two forward shares s1 < s2, a pattern
whose slowest slice of each share takes T1 and T2 seconds lasts ``max(s1 T1, s2 T2) + max((1 - s1) T1, (1 - s2) T2)``,
and its value is largest when each share's slices fill their own cap, so pricing tries every pair (T1, T2) of the two
shares' slice times (0: none of that share) with every split of the devices between them: the same certificate,
exact over every pattern so priced. Every pattern lasts at least its slowest slice, so this bound is never below
:func:`layer_bound`'s optimum.

Pure; numpy and HiGHS (highspy) only. Entry points: :func:`layer_bound`, :func:`pass_layer_bound`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from planner.schedule import Problem

log = logging.getLogger(__name__)

MAX_DURATIONS = 20_000  # distinct slice times of a level above which the bound is not computed (0.0: the caller's)
MAX_CELLS = 2_000_000  # durations x devices of one pricing DP above which the bound is not computed
MAX_PAIRS = 4_000_000  # pass_layer_bound: pairs of the two shares' durations above which it is the slowest-slice bound
MAX_SPLITS = 200_000_000  # ... and pairs x device splits (one pricing round's additions) above which it is too
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


def _table(problem: Problem, ids: Sequence[int], pi: np.ndarray, duration: np.ndarray, num_devices: int) -> np.ndarray:
    """The largest ``sum_m pi_m l_m`` of a pattern at each duration (rows) on at most d devices (columns 0..N): a
    multiple-choice knapsack over the devices."""
    best = np.zeros((len(duration), num_devices + 1))
    for i, m in enumerate(ids):
        new = best.copy()
        for n, layers in _layers(problem, m, duration, num_devices):
            gain = best[:, :num_devices + 1 - n] + (pi[i] * layers)[:, None]
            np.maximum(new[:, n:], gain, out=new[:, n:])
        best = new
    return best


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
    ``num_devices`` (default N), each wave priced by its slowest slice: the pattern LP's dual certificate (module
    docstring). 0.0 when the level is too large to price (:data:`MAX_DURATIONS`, :data:`MAX_CELLS`) or HiGHS fails."""
    num_devices = problem.num_devices if num_devices is None else num_devices
    ids = list(ids)
    if not ids:
        return 0.0
    duration = _durations(problem, ids, num_devices)
    if len(duration) > MAX_DURATIONS or len(duration) * (num_devices + 1) > MAX_CELLS:
        return 0.0

    def price(pi: np.ndarray) -> tuple[np.ndarray, np.ndarray, Callable[[int], np.ndarray]]:
        return (_table(problem, ids, pi, duration, num_devices)[:, num_devices], duration,
                lambda k: _pattern(problem, ids, pi, float(duration[k]), num_devices))

    return _certificate(problem, ids, num_devices, price)


def share_classes(problem: Problem, ids: Sequence[int]) -> list[tuple[float, list[int]]] | None:
    """``ids`` grouped by the share of their time that runs in forward (:attr:`Problem.forward_shares`), ascending;
    None when a MetaOp's share changes with its count."""
    out: dict[float, list[int]] = {}
    for m in ids:
        shares = set(problem.forward_shares[m])
        if len(shares) > 1:
            return None
        out.setdefault(shares.pop(), []).append(m)
    return sorted(out.items())


def pass_layer_bound(problem: Problem, ids: Sequence[int], num_devices: int | None = None) -> float:
    """:func:`layer_bound` with each wave priced as the timeline runs it: its largest forward plus its largest
    backward (:meth:`Problem.duration`), for MetaOps of two forward shares s1 < s2 (module docstring); otherwise (one
    share: the same pricing; more, a share changing with the count, or a level too large, :data:`MAX_PAIRS`,
    :data:`MAX_SPLITS`) the slowest-slice bound, which every pattern's pass-priced duration is at least."""
    num_devices = problem.num_devices if num_devices is None else num_devices
    ids = list(ids)
    classes = share_classes(problem, ids)
    if classes is None or len(classes) != 2:
        return layer_bound(problem, ids, num_devices)
    (s1, ids1), (s2, ids2) = classes
    t1, t2 = (np.concatenate([[0.0], _durations(problem, c, num_devices)]) for c in (ids1, ids2))
    pairs = len(t1) * len(t2)
    if pairs > MAX_PAIRS or pairs * (num_devices + 1) > MAX_SPLITS or \
            max(len(t1), len(t2)) * (num_devices + 1) > MAX_CELLS:
        return layer_bound(problem, ids, num_devices)
    duration = np.maximum(s1 * t1[:, None], s2 * t2[None, :]) + np.maximum((1 - s1) * t1[:, None],
                                                                           (1 - s2) * t2[None, :])
    duration[0, 0] = np.inf  # the empty pattern
    k1 = len(ids1)

    def price(pi: np.ndarray) -> tuple[np.ndarray, np.ndarray, Callable[[int], np.ndarray]]:
        v1, v2 = _table(problem, ids1, pi[:k1], t1, num_devices), _table(problem, ids2, pi[k1:], t2, num_devices)
        value, split = np.full(duration.shape, -np.inf), np.zeros(duration.shape, dtype=np.int64)
        for d in range(num_devices + 1):  # d devices for the first share's slices, the rest for the second's
            both = v1[:, d][:, None] + v2[:, num_devices - d][None, :]
            better = both > value
            value[better], split[better] = both[better], d

        def pattern(k: int) -> np.ndarray:
            i, j = divmod(k, duration.shape[1])
            d = int(split[i, j])
            return np.concatenate([_pattern(problem, ids1, pi[:k1], float(t1[i]), d),
                                   _pattern(problem, ids2, pi[k1:], float(t2[j]), num_devices - d)])

        return value.ravel(), duration.ravel(), pattern

    return _certificate(problem, ids1 + ids2, num_devices, price)


def _certificate(problem: Problem, ids: Sequence[int], num_devices: int,
                 price: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, Callable[[int], np.ndarray]]]) -> float:
    """Column generation for the pattern LP of ``ids`` (rows in that order) and its dual certificate: ``price(pi)``
    gives every candidate pattern's best value ``sum_m pi_m l_m``, its duration, and the layers (per row) of the k-th;
    0.0 where HiGHS fails."""
    import highspy

    from planner.milp import quiet_highs  # local: HiGHS only when the bound is computed

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
        value, duration, pattern = price(pi)
        rho = max(1.0, float(np.max(value / duration)))
        bound = max(bound, float(pi @ demand) / rho)
        gain = value - duration
        added = 0
        for k in np.argsort(-gain)[:COLUMNS_PER_ROUND]:
            if gain[k] <= 1e-9 * duration[k]:
                break
            layers = pattern(int(k))
            rows = np.nonzero(layers)[0]
            h.addCol(float(duration[k]), 0.0, np.inf, len(rows), rows.astype(np.int32), layers[rows])
            added += 1
        if not added:
            break
    # a little below the certificate: HiGHS's dual tolerances must not push a bound above a schedule
    return bound * (1 - 1e-7)
