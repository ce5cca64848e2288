"""Bounds: the relaxed per-level optimum (hand cases, its defining equations) and the DAG bound's validity."""

from __future__ import annotations

import functools
import itertools
import random

import pytest
from conftest import make_curve, make_problem, random_problem, random_schedule
from random_jobs import diamond_problems

from planner.bound import dag_bound, dag_bound_terms, per_level_bound, relaxed_allocation
from planner.schedule import Schedule, Slice, Wave, check_schedule, compute_makespan
from planner.spindle import spindle_schedule


def _interp_time(curve, n: float) -> float:
    return curve.times[0] * curve.counts[0] / curve.speedup(n)


def _random_cases(count: int, concave: bool = True):
    for seed in range(count):
        num_ops = 2 + seed % 8
        yield seed, random_problem(seed, num_ops, (4, 8, 16, 32)[seed % 4], min(1 + seed % 3, num_ops), concave=concave)


# ---- relaxed_allocation: hand-computable cases


def test_linear_speedup_gives_total_work_over_n():
    # T(n) = t / n on every count 1..8: C* = sum L*t / N and n*_m proportional to the work.
    curves = [make_curve(range(1, 9), [2.0 / n for n in range(1, 9)]),
              make_curve(range(1, 9), [1.0 / n for n in range(1, 9)])]
    problem = make_problem([6, 4], [[], []], curves, 8)
    c_star, n_star = relaxed_allocation(problem, [0, 1])
    assert c_star == pytest.approx((6 * 2.0 + 4 * 1.0) / 8, rel=1e-12)
    assert n_star[0] == pytest.approx(8 * 12 / 16, rel=1e-12)
    assert n_star[1] == pytest.approx(8 * 4 / 16, rel=1e-12)


def test_fractional_allocation_between_sparse_counts():
    # Op 0 on counts {1, 2, 4} (speed-ups 1, 5/3, 5/2), 10 layers; op 1 scales linearly, 24 layers; N=8.
    # At n0 = 3 the interpolated speed-up is 25/12, so op 0 takes 4.8 s; op 1 needs 24/4.8 = 5 devices.
    curves = [make_curve([1, 2, 4], [1.0, 0.6, 0.4]), make_curve(range(1, 9), [1.0 / n for n in range(1, 9)])]
    problem = make_problem([10, 24], [[], []], curves, 8)
    c_star, n_star = relaxed_allocation(problem, [0, 1])
    assert c_star == pytest.approx(4.8, rel=1e-12)
    assert n_star[0] == pytest.approx(3.0, rel=1e-12)
    assert n_star[1] == pytest.approx(5.0, rel=1e-12)


def test_largest_counts_cap_the_allocation():
    # Counts top out at 2 and 3 on N=16: each op runs at its largest count, the slowest sets C*.
    curves = [make_curve([1, 2], [1.0, 0.7]), make_curve([1, 3], [2.0, 0.9])]
    problem = make_problem([5, 4], [[], []], curves, 16)
    c_star, n_star = relaxed_allocation(problem, [0, 1])
    assert c_star == pytest.approx(max(5 * 0.7, 4 * 0.9), rel=1e-12)
    assert n_star[1] == pytest.approx(3.0)
    assert sum(n_star.values()) < 16
    assert 5 * _interp_time(curves[0], n_star[0]) == pytest.approx(c_star, rel=1e-9)


def test_counts_above_num_devices_are_ignored():
    curve = make_curve([1, 2, 8], [1.0, 0.55, 0.2])
    problem = make_problem([4], [[]], [curve], 4)
    c_star, n_star = relaxed_allocation(problem, [0])
    assert n_star[0] <= 2.0
    assert c_star == pytest.approx(4 * 0.55)


def test_smallest_count_above_n_is_an_error():
    problem = make_problem([4], [[]], [make_curve([8], [1.0])], 4)
    with pytest.raises(ValueError, match="exceeds the 4 devices"):
        relaxed_allocation(problem, [0])


def test_empty_level_and_explicit_device_count():
    curves = [make_curve(range(1, 5), [1.0 / n for n in range(1, 5)])]
    problem = make_problem([8], [[]], curves, 4)
    assert relaxed_allocation(problem, []) == (0.0, {})
    assert relaxed_allocation(problem, [0], num_devices=2)[0] == pytest.approx(4.0)


@pytest.mark.parametrize("concave", [True, False])
def test_bisection_equations_hold(concave):
    for seed, problem in _random_cases(60, concave):
        for level in problem.graph.levels:
            c_star, n_star = relaxed_allocation(problem, level)
            total = sum(n_star.values())
            capped = [m for m in level if n_star[m] >= problem.curves[m].counts[-1] - 1e-9]
            if capped and total < problem.num_devices * (1 - 1e-9):
                # Idle devices only when the op setting C* already runs at its largest count.
                assert any(problem.layers(m) * problem.curves[m].times[-1] == pytest.approx(c_star, rel=1e-9)
                           for m in capped), seed
            else:
                assert total == pytest.approx(problem.num_devices, rel=1e-9), seed
            for m in level:
                finish = problem.layers(m) * _interp_time(problem.curves[m], n_star[m])
                assert finish == pytest.approx(c_star, rel=1e-9), (seed, m)


def test_relaxed_optimum_is_minimal():
    # A slightly smaller C would need more than N devices: C* is the smallest feasible common finish.
    for seed, problem in _random_cases(30):
        for level in problem.graph.levels:
            c_star, n_star = relaxed_allocation(problem, level)
            if sum(n_star.values()) < problem.num_devices * (1 - 1e-9):
                continue
            speedups = [problem.curves[m].speedup(problem.num_devices) for m in level]
            need = sum(_devices_needed(problem.curves[m], problem.layers(m), c_star * (1 - 1e-6), s)
                       for m, s in zip(level, speedups))
            assert need > problem.num_devices, seed


def _devices_needed(curve, num_layers, makespan, top_speedup):
    target = curve.times[0] * curve.counts[0] * num_layers / makespan
    if target > top_speedup:
        return float("inf")
    lo, hi = 0.0, float(curve.counts[-1])
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if curve.speedup(mid) < target else (lo, mid)
    return hi


# ---- per-level and DAG bounds


def test_per_level_bound_sums_levels():
    curves = [make_curve(range(1, 5), [1.0 / n for n in range(1, 5)])] * 3
    problem = make_problem([4, 4, 8], [[], [0], [1]], curves, 4)
    assert per_level_bound(problem) == pytest.approx(1.0 + 1.0 + 2.0)


def test_dag_bound_sees_overlap_across_levels():
    # Two chains a->b (short) and c (long, one level): without barriers b overlaps c.
    lin = make_curve([1, 2], [1.0, 0.5])
    problem = make_problem([2, 2, 8], [[], [0], []], [lin, lin, lin], 4)
    assert dag_bound(problem) < per_level_bound(problem)
    # Area of all the work is 12 device-seconds on 4 devices.
    assert dag_bound(problem) >= 3.0 - 1e-12


def test_dag_bound_critical_path_on_a_chain():
    curves = [make_curve([1, 2], [1.0, 0.8]), make_curve([1, 4], [2.0, 0.9]), make_curve([1], [0.5])]
    problem = make_problem([3, 2, 4], [[], [0], [1]], curves, 8)
    assert dag_bound_terms(problem)["critical_path"] == pytest.approx(3 * 0.8 + 2 * 0.9 + 4 * 0.5)
    assert dag_bound(problem) == pytest.approx(per_level_bound(problem))


@pytest.mark.parametrize("concave", [True, False])
def test_dag_bound_below_per_level_and_spindle(concave):
    for seed, problem in _random_cases(50, concave):
        per_level = per_level_bound(problem)
        for name, value in dag_bound_terms(problem).items():
            assert value <= per_level * (1 + 1e-9), (seed, name)
        bound = dag_bound(problem)
        assert 0 < bound <= per_level
        assert bound <= compute_makespan(problem, spindle_schedule(problem)) * (1 + 1e-12), seed
        # the hull relaxation bounds every barrier schedule, whatever the curves' shape
        assert per_level <= compute_makespan(problem, spindle_schedule(problem)) * (1 + 1e-9), seed


# ---- concave hull: the bounds stay bounds on non-concave curves


def test_concave_hull_vertices_and_dominance():
    # Speed-ups 1, 1.25, 10/3 at counts 1, 2, 4: count 2 lies under the chord from (1, 1) to (4, 10/3).
    curve = make_curve([1, 2, 4], [1.0, 0.8, 0.3])
    assert curve.concave_hull() == ((1, 4), (1.0, 1.0 / 0.3))
    assert make_curve([1, 2, 4], [1.0, 0.8, 0.25]).concave_hull() == ((4,), (4.0,))  # (1, 1) on the chord: dropped
    assert curve.concave_hull(3) == ((1, 2), (1.0, 1.25))
    for seed in range(40):
        curve = random_problem(seed, 2, 16, 1, concave=seed % 2 == 0).curves[0]
        xs, ys = curve.concave_hull()
        px, py = (0,) + xs, (0.0,) + ys
        slopes = [(py[i + 1] - py[i]) / (px[i + 1] - px[i]) for i in range(len(xs))]
        assert all(a >= b * (1 - 1e-12) for a, b in zip(slopes, slopes[1:])), seed  # concave
        for n in curve.counts:  # the hull lies on or above every valid point
            i = next(k for k, x in enumerate(xs) if x >= n)
            x0, y0 = (xs[i - 1], ys[i - 1]) if i else (0, 0.0)
            on_hull = y0 + (ys[i] - y0) * (n - x0) / (xs[i] - x0)
            assert on_hull >= curve.speedup(n) * (1 - 1e-12), seed


def test_hull_bound_below_a_schedule_the_interpolated_one_exceeds():
    # Two independent ops of 4 layers, speed-ups 1, 1.1, 4 at counts 1, 2, 4 on N=4 (a super-linear step: e.g. the
    # 4-device layout's cheaper tensor-parallel degree). Interpolation gives each op 2 devices at speed-up 1.1:
    # C* = 4 x 0.9 = 3.6 s. Running one op after the other on all 4 devices takes 2 x 4 x 0.25 = 2.0 s.
    curve = make_curve([1, 2, 4], [1.0, 0.9, 0.25])
    problem = make_problem([4, 4], [[], []], [curve, curve], 4)
    feasible = Schedule((Wave((Slice(0, 4, 4),)), Wave((Slice(1, 4, 4),))))
    check_schedule(problem, feasible)
    makespan = compute_makespan(problem, feasible)
    assert makespan == pytest.approx(2.0)
    interpolated = relaxed_allocation(problem, [0, 1])[0]
    assert interpolated == pytest.approx(3.6) and interpolated > makespan  # the old bound: no bound
    assert per_level_bound(problem) == pytest.approx(2.0)  # hull: speed-up 2 on 2 devices each, tight here
    assert per_level_bound(problem) <= makespan * (1 + 1e-12)
    assert dag_bound(problem) <= makespan * (1 + 1e-12)


# ---- the critical-path + area LP


@pytest.mark.parametrize("concave", [True, False])
def test_chain_area_between_its_special_cases_and_per_level(concave):
    for seed, problem in _random_cases(40, concave):
        terms = dag_bound_terms(problem)
        min_area = sum(problem.layers(m) * min(c * t for c, t in zip(problem.curves[m].counts, problem.curves[m].times)
                                               if c <= problem.num_devices) for m in range(len(problem.graph)))
        assert terms["chain_area"] >= terms["critical_path"] * (1 - 1e-6), seed
        assert terms["chain_area"] >= min_area / problem.num_devices * (1 - 1e-6), seed
        assert terms["chain_area"] <= per_level_bound(problem) * (1 + 1e-6), seed


def test_chain_area_below_schedules_of_diamond_jobs_and_above_the_other_terms_on_some():
    rng, tighter = random.Random(0), 0
    for seed, problem in diamond_problems(25):
        terms = dag_bound_terms(problem)
        for schedule in [spindle_schedule(problem)] + [random_schedule(problem, rng) for _ in range(3)]:
            assert terms["chain_area"] <= compute_makespan(problem, schedule) * (1 + 1e-9), seed
        tighter += terms["chain_area"] > max(v for k, v in terms.items() if k != "chain_area") * (1 + 1e-3)
    assert tighter >= 5, tighter


# ---- brute force on tiny instances: every wave schedule, with and without level barriers


def _brute_force_makespan(problem, ids=None) -> float:
    """Optimal sum of wave durations over all wave schedules of MetaOps ``ids`` (default all), no barriers."""
    ids = tuple(range(len(problem.graph))) if ids is None else tuple(ids)
    full = tuple(problem.layers(m) for m in ids)

    @functools.cache
    def best(done: tuple[int, ...]) -> float:
        if done == full:
            return 0.0
        finished = {m for m, d, f in zip(ids, done, full) if d == f}
        options = []
        for m, d, f in zip(ids, done, full):
            deps_ok = all(p in finished or p not in ids for p in problem.graph.metaops[m].deps)
            opts = [None]
            if d < f and deps_ok:
                counts = [n for n in problem.curves[m].counts if n <= problem.num_devices]
                opts += [(n, k) for n in counts for k in range(1, f - d + 1)]
            options.append(opts)
        out = float("inf")
        for choice in itertools.product(*options):
            picked = [(i, c) for i, c in enumerate(choice) if c is not None]
            if not picked or sum(n for _, (n, _) in picked) > problem.num_devices:
                continue
            duration = max(problem.curves[ids[i]].time(n) * k for i, (n, k) in picked)
            after = list(done)
            for i, (_, k) in picked:
                after[i] += k
            out = min(out, duration + best(tuple(after)))
        return out

    return best(tuple(0 for _ in ids))


@pytest.mark.parametrize("seed", range(12))
def test_bounds_against_brute_force(seed):
    problem = random_problem(100 + seed, 3, (2, 3, 4)[seed % 3], 1 + seed % 2, concave=seed % 4 != 3)
    problem = make_problem([min(problem.layers(m), 3) for m in range(3)],
                           [op.deps for op in problem.graph.metaops], problem.curves, problem.num_devices)
    optimum = _brute_force_makespan(problem)
    assert dag_bound(problem) <= optimum * (1 + 1e-12)
    with_barriers = sum(_brute_force_makespan(problem, level) for level in problem.graph.levels)
    assert optimum <= with_barriers * (1 + 1e-12)
    assert with_barriers <= compute_makespan(problem, spindle_schedule(problem)) * (1 + 1e-12)
    # Węglarz's relaxed optimum on concave-hull speed-ups bounds every barrier schedule, concave curves or not
    assert per_level_bound(problem) <= with_barriers * (1 + 1e-9)
