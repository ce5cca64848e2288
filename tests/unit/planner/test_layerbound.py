"""The pattern-LP bound (planner.layerbound): never above the exact optimum of a one-level wave schedule (brute force
over every wave on instances small enough to enumerate), never below the fluid per-level bound, and above it where
whole layers or valid counts leave devices idle."""

from __future__ import annotations

import functools
import itertools
import random

import pytest
from conftest import make_curve, make_problem

from planner.bound import relaxed_allocation
from planner.layerbound import layer_bound


def exact_compute(problem, ids) -> float:
    """The least sum of wave durations over every wave schedule of the independent MetaOps ``ids``: a wave takes
    1..remaining layers of each MetaOp it holds, on a valid count, within N devices (memoised over what remains)."""
    n_dev = problem.num_devices
    options = []  # per MetaOp: (count, time per layer), plus "not in this wave"
    for m in ids:
        options.append([(n, t) for n, t in zip(problem.curves[m].counts, problem.curves[m].times) if n <= n_dev])

    @functools.lru_cache(maxsize=None)
    def best(remaining: tuple[int, ...]) -> float:
        if not any(remaining):
            return 0.0
        result = float("inf")
        per_op = []
        for i, left in enumerate(remaining):
            per_op.append([None] + [(n, t, l) for n, t in options[i] for l in range(1, left + 1)] if left else [None])
        for wave in itertools.product(*per_op):
            slices = [s for s in wave if s is not None]
            if not slices or sum(n for n, _, _ in slices) > n_dev:
                continue
            duration = max(l * t for _, t, l in slices)
            if duration >= result:
                continue
            rest = tuple(left - (s[2] if s is not None else 0) for left, s in zip(remaining, wave))
            result = min(result, duration + best(rest))
        return result

    return best(tuple(problem.layers(m) for m in ids))


def _random_instance(seed: int):
    rng = random.Random(seed)
    num_ops = 2 + seed % 2
    num_devices = rng.choice((2, 3, 4))
    curves, layers = [], []
    for _ in range(num_ops):
        counts = sorted(rng.sample(range(1, num_devices + 1), rng.randint(1, num_devices)))
        t, times = rng.uniform(0.5, 3.0), []
        for _ in counts:
            times.append(t)
            t *= rng.uniform(0.45, 0.95)  # sub-linear or super-linear steps alike
        curves.append(make_curve(counts, times))
        layers.append(rng.randint(1, 3))
    return make_problem(layers, [[] for _ in layers], curves, num_devices)


@pytest.mark.parametrize("seed", range(30))
def test_between_the_fluid_bound_and_the_exact_optimum(seed):
    problem = _random_instance(seed)
    ids = list(range(len(problem.graph)))
    exact = exact_compute(problem, ids)
    bound = layer_bound(problem, ids)
    fluid = relaxed_allocation(problem, ids, hull=True)[0]
    assert bound <= exact * (1 + 1e-9)
    assert bound >= fluid * (1 - 1e-6)


def test_tighter_than_the_fluid_bound_where_whole_layers_idle_devices():
    """Two MetaOps of one layer, 1.0 s on 1 device and 0.6 s on 2; N = 3. The fluid bound gives each 1.5 devices
    (speed-up 4/3 on the hull): 0.75 s. A wave holds whole layers: at 0.6 s only one MetaOp fits (on 2 devices), at
    1.0 s both: every pattern runs at most one layer per 0.5 s, so the LP and the exact optimum are 1.0 s."""
    curve = make_curve([1, 2], [1.0, 0.6])
    problem = make_problem([1, 1], [[], []], [curve, curve], 3)
    ids = [0, 1]
    assert relaxed_allocation(problem, ids, hull=True)[0] == pytest.approx(0.75)
    assert exact_compute(problem, ids) == pytest.approx(1.0)
    assert layer_bound(problem, ids) == pytest.approx(1.0, rel=1e-6)


def test_strictly_tighter_on_some_random_instance():
    gains = []
    for seed in range(30):
        problem = _random_instance(seed)
        ids = list(range(len(problem.graph)))
        gains.append(layer_bound(problem, ids) / relaxed_allocation(problem, ids, hull=True)[0])
    assert max(gains) > 1.05  # whole layers on valid counts leave devices idle that the fluid bound counts busy
