"""Which plans a plan cache keeps, and which shapes each runs: a local search on the expected step time.

Input: every candidate plan priced at every distinct shape (:class:`Priced`: seconds, inf where the plan does
not fit the shape's memory) and the seconds to switch between any two plans. A choice gives every shape a
plan; its expected step time (:func:`expected_time`) is the probability-weighted time of each shape under its
plan plus the expected switch cost: consecutive buckets drawn independently, each served for ``run_length``
steps, so ``sum_ab m_a m_b switch[a][b] / run_length`` with ``m_a`` the probability mass plan ``a`` runs.

:func:`choose_plans` starts from the best static choice (one plan for every shape, among those that fit
every shape), then adds plans one at a time, each time the one whose addition (with the shapes moved to it
by :func:`improve`) lowers the expected time most, until ``max_plans`` or no addition helps. Every accepted
step lowers the objective, so the cache is never predicted slower than the best static plan. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

INF = float("inf")
REL_TOL = 1e-9  # an improvement must exceed this fraction of the objective (ties keep the earlier choice)
MAX_PASSES = 50  # passes of improve() over the shapes (each pass that moves nothing ends it)


@dataclass(frozen=True)
class Priced:
    """``seconds[i][j]``: plan ``i`` at shape ``j`` (inf: does not fit); ``probs[j]``; ``switch[a][b]``: seconds to
    go from plan ``a`` to plan ``b``. ``plans`` and ``points`` are carried for the caller (any objects)."""

    plans: list
    points: list
    probs: list[float]
    seconds: list[list[float]]
    switch: list[list[float]]


def draw_buckets(probabilities: Sequence[float], run_length: int, steps: int, seed: int = 0) -> list[int]:
    """The bucket of each step ``0 .. steps - 1``: a bucket drawn with its probability (seeded, so a resumed run
    draws the same), served for ``run_length`` steps, then the next draw: the process :func:`expected_time` prices."""
    p = np.asarray(probabilities, dtype=float)
    draws = np.random.default_rng(seed).choice(len(p), size=-(-steps // run_length), p=p / p.sum())
    return [int(draws[k // run_length]) for k in range(steps)]


def expected_time(priced: Priced, choice: Sequence[int], run_length: int) -> tuple[float, float]:
    """(mean step time, its switch part) when shape ``j`` runs plan ``choice[j]``."""
    compute = sum(p * priced.seconds[i][j] for j, (p, i) in enumerate(zip(priced.probs, choice)))
    mass = _masses(priced, choice)
    return compute + _switch(priced, mass) / run_length, _switch(priced, mass) / run_length


def _masses(priced: Priced, choice: Sequence[int]) -> dict[int, float]:
    mass: dict[int, float] = {}
    for p, i in zip(priced.probs, choice):
        mass[i] = mass.get(i, 0.0) + p
    return mass


def _switch(priced: Priced, mass: dict[int, float]) -> float:
    return sum(ma * mb * priced.switch[a][b] for a, ma in mass.items() for b, mb in mass.items())


def improve(priced: Priced, choice: list[int], allowed: Sequence[int], run_length: int) -> list[int]:
    """Move single shapes to another plan of ``allowed`` while that lowers :func:`expected_time`: passes over the
    shapes in order, plans in ``allowed`` order, first improvement taken."""
    choice = list(choice)
    mass = _masses(priced, choice)
    total = expected_time(priced, choice, run_length)[0]
    for _ in range(MAX_PASSES):
        moved = False
        for j, p in enumerate(priced.probs):
            a = choice[j]
            for b in allowed:
                if b == a or priced.seconds[b][j] == INF:
                    continue
                trial = dict(mass)
                trial[a] -= p
                trial[b] = trial.get(b, 0.0) + p
                if trial[a] <= 0:
                    del trial[a]
                delta = p * (priced.seconds[b][j] - priced.seconds[a][j]) + (
                    _switch(priced, trial) - _switch(priced, mass)) / run_length
                if delta < -REL_TOL * total:
                    choice[j], mass, a, total, moved = b, trial, b, total + delta, True
        if not moved:
            break
    return choice


def choose_plans(priced: Priced, max_plans: int, run_length: int, allowed: Sequence[int] | None = None) -> list[int]:
    """Every shape's plan (indices into ``priced.plans``, only ``allowed`` ones when given), using at most
    ``max_plans`` plans (module docstring). Without a plan that fits every shape, the start gives each shape its
    fastest plan that fits."""
    num_points = len(priced.probs)
    candidates = list(range(len(priced.plans))) if allowed is None else list(allowed)
    static = [i for i in candidates if INF not in priced.seconds[i]]
    if static:
        best_static = min(static, key=lambda i: expected_time(priced, [i] * num_points, run_length)[0])
        choice = [best_static] * num_points
    else:
        choice = [min(candidates, key=lambda i: priced.seconds[i][j]) for j in range(num_points)]
    best = expected_time(priced, choice, run_length)[0]
    while len(set(choice)) < max_plans:
        kept = sorted(set(choice))
        trials = []
        for i in candidates:
            if i not in kept:
                trial = improve(priced, choice, kept + [i], run_length)
                trials.append((expected_time(priced, trial, run_length)[0], i, trial))
        if not trials:
            break
        value, _, trial = min(trials, key=lambda t: (t[0], t[1]))
        if not value < best * (1 - REL_TOL) or len(set(trial)) > max_plans:
            break
        choice, best = trial, value
    return choice
