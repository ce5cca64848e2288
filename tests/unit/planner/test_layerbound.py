"""The pattern-LP bound (planner.layerbound): never above the exact optimum of a one-level wave schedule (brute force
over every wave on instances small enough to enumerate), never below the fluid per-level bound, and above it where
whole layers or valid counts leave devices idle."""

from __future__ import annotations

import functools
import itertools
import random

import pytest
from conftest import make_curve, make_problem, random_schedule
from random_jobs import diamond_problems

from planner.bound import relaxed_allocation
from planner.layerbound import layer_bound, pass_layer_bound
from planner.schedule import compute_makespan
from planner.spindle import spindle_schedule


def exact_compute(problem, ids, passes: bool = False) -> float:
    """The least sum of wave durations over every wave schedule of the independent MetaOps ``ids``: a wave takes
    1..remaining layers of each MetaOp it holds, on a valid count, within N devices (memoised over what remains), and
    lasts its slowest slice or, with ``passes``, its largest forward plus its largest backward (the curves' shares)."""
    n_dev = problem.num_devices
    options = []  # per MetaOp: (count, time per layer, forward share), plus "not in this wave"
    for m in ids:
        curve = problem.curves[m]
        options.append([(n, t, curve.forward_fraction(n)) for n, t in zip(curve.counts, curve.times) if n <= n_dev])

    def duration(slices) -> float:
        if not passes:
            return max(l * t for _, t, _, l in slices)
        return max(l * t * f for _, t, f, l in slices) + max(l * t * (1 - f) for _, t, f, l in slices)

    @functools.lru_cache(maxsize=None)
    def best(remaining: tuple[int, ...]) -> float:
        if not any(remaining):
            return 0.0
        result = float("inf")
        per_op = []
        for i, left in enumerate(remaining):
            per_op.append([None] + [(n, t, f, l) for n, t, f in options[i] for l in range(1, left + 1)]
                          if left else [None])
        for wave in itertools.product(*per_op):
            slices = [s for s in wave if s is not None]
            if not slices or sum(s[0] for s in slices) > n_dev:
                continue
            took = duration(slices)
            if took >= result:
                continue
            rest = tuple(left - (s[3] if s is not None else 0) for left, s in zip(remaining, wave))
            result = min(result, took + best(rest))
        return result

    return best(tuple(problem.layers(m) for m in ids))


def _random_instance(seed: int, shares: tuple[float, ...] = (), step: tuple[float, float] = (0.45, 0.95)):
    """Two or three one-level MetaOps on 2-4 devices, each count's time ``step`` (drawn from that range) of the one
    before; each with a forward share drawn from ``shares`` (if any)."""
    rng = random.Random(seed)
    num_ops = 2 + seed % 2
    num_devices = rng.choice((2, 3, 4))
    curves, layers = [], []
    for _ in range(num_ops):
        counts = sorted(rng.sample(range(1, num_devices + 1), rng.randint(1, num_devices)))
        t, times = rng.uniform(0.5, 3.0), []
        for _ in counts:
            times.append(t)
            t *= rng.uniform(*step)  # sub-linear or super-linear steps alike
        curves.append(make_curve(counts, times, forward=rng.choice(shares) if shares else None))
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


@pytest.mark.parametrize("seed", range(20))
def test_the_pass_aware_bound_lies_between_the_joint_one_and_the_exact_optimum(seed):
    """MetaOps that split their time differently between forward and backward (a quarter, a third): the bound on
    waves priced by their largest forward plus largest backward is never above the exact optimum so priced, and never
    below the bound on waves priced by their slowest slice (every pattern costs at least as much)."""
    problem = _random_instance(seed, shares=(0.25, 0.5), step=(0.8, 0.97))  # poor scaling: waves share devices
    ids = list(range(len(problem.graph)))
    exact = exact_compute(problem, ids, passes=True)
    bound = pass_layer_bound(problem, ids)
    assert bound <= exact * (1 + 1e-9)
    assert bound >= layer_bound(problem, ids) * (1 - 1e-6)


def test_the_pass_aware_bound_prices_a_wave_s_two_passes():
    """Two one-layer MetaOps of 1 s on one device each, N = 2, one a quarter forward and one a third: together a wave
    lasts max(0.25, 1/3) + max(0.75, 2/3) = 13/12 s (alone, 1 s each): the exact optimum and the bound are 13/12 s,
    the slowest-slice bound 1 s."""
    curves = [make_curve([1], [1.0], forward=0.25), make_curve([1], [1.0], forward=1 / 3)]
    problem = make_problem([1, 1], [[], []], curves, 2)
    assert layer_bound(problem, [0, 1]) == pytest.approx(1.0, rel=1e-6)
    assert exact_compute(problem, [0, 1], passes=True) == pytest.approx(13 / 12)
    assert pass_layer_bound(problem, [0, 1]) == pytest.approx(13 / 12, rel=1e-6)


def test_the_whole_job_bound_holds_for_schedules_that_cross_levels():
    """With precedence dropped (every MetaOp of a diamond job in one call) the bound holds for every wave schedule,
    with level barriers (Spindle's) or without (random ones, each wave any ready MetaOps); whole layers on valid counts
    lift it above the whole job's fluid bound on some jobs (by 1-4% on seeds 0, 1, 5, 6, 11)."""
    rng, above = random.Random(0), 0
    for seed, problem in diamond_problems(12):
        ids = list(range(len(problem.graph)))
        bound, fluid = pass_layer_bound(problem, ids), relaxed_allocation(problem, ids, hull=True)[0]
        assert bound >= fluid * (1 - 1e-6), seed
        for schedule in [spindle_schedule(problem)] + [random_schedule(problem, rng) for _ in range(4)]:
            assert bound <= compute_makespan(problem, schedule) * (1 + 1e-9), seed
        above += bound > fluid * 1.01
    assert above >= 4, above
