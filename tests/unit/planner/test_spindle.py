"""Spindle's wavefront scheduler: two-point discretisation, hand-traced waves, invariants on random instances."""

from __future__ import annotations

import pytest
from conftest import make_curve, make_problem, random_problem

from planner.bound import per_level_bound, relaxed_allocation
from planner.schedule import Slice, check_schedule, compute_makespan
from planner.spindle import discretise_allocation, spindle_schedule


def _linear(max_count: int, per_layer_1: float = 1.0):
    return make_curve(range(1, max_count + 1), [per_layer_1 / n for n in range(1, max_count + 1)])


# ---- two-point discretisation (Eq. 10)


@pytest.mark.parametrize("times", [(1.0, 0.5), (1.0, 3 / 7)])
def test_fig5a_metaop2(times):
    # Paper Fig. 5a: n* = 1.5, L = 12 on counts {1, 2} -> (2 devices, 8 layers) + (1 device, 4 layers).
    # Linear speed-up splits 8 + 4 exactly; T(2)/T(1) = 3/7 gives the paper's 8.4 + 3.6, rounded to 8 + 4.
    assert discretise_allocation(make_curve([1, 2], times), 12, 1.5) == [(2, 8), (1, 4)]


def test_discretisation_preserves_finish_time_before_rounding():
    curve = make_curve([1, 2, 4, 8], [1.0, 0.6, 0.35, 0.2])
    for n_star in (1.3, 2.7, 5.5, 7.9):
        tuples = discretise_allocation(curve, 1000, n_star)
        t_star = curve.times[0] / curve.speedup(n_star)
        finish = sum(curve.time(n) * layers for n, layers in tuples)
        assert sum(layers for _, layers in tuples) == 1000
        # Rounding moves at most one layer between the two counts.
        assert abs(finish - 1000 * t_star) <= max(curve.times) + 1e-9
        assert {n for n, _ in tuples} <= {c for c in curve.counts if abs(c - n_star) < 4}


def test_below_smallest_count_gets_smallest_count():
    # n* under the smallest valid count: the low point is a dummy 0-device tuple, dropped.
    assert discretise_allocation(make_curve([2, 4], [1.0, 0.6]), 7, 0.7) == [(2, 7)]


def test_exact_count_is_one_tuple_and_zero_layer_tuples_are_dropped():
    curve = make_curve([1, 2, 4], [1.0, 0.6, 0.4])
    assert discretise_allocation(curve, 5, 2.0) == [(2, 5)]
    assert discretise_allocation(curve, 5, 4.0) == [(4, 5)]
    # n* just above 2: l_hi ~ 0.05 rounds to 0, everything stays on 2 devices.
    assert discretise_allocation(curve, 5, 2.02) == [(2, 5)]


def test_rounding_remainder_goes_to_the_wider_tuple():
    # T(2)/T(1) = 3/7 at n* = 1.5 puts 70% of the layers on 2 devices: 5 layers split 3.5 + 1.5;
    # half-up gives 4 + 2, one too many, taken back from the wider tuple.
    assert discretise_allocation(make_curve([1, 2], [1.0, 3 / 7]), 5, 1.5) == [(2, 3), (1, 2)]


# ---- hand-traced wavefronts


def test_two_balanced_ops_share_one_wave():
    problem = make_problem([6, 6], [[], []], [_linear(4), _linear(4)], 4)
    schedule = spindle_schedule(problem)
    assert [w.slices for w in schedule.waves] == [(Slice(0, 6, 2), Slice(1, 6, 2))]
    assert compute_makespan(problem, schedule) == pytest.approx(per_level_bound(problem))


def test_extension_fills_idle_devices():
    # A (counts {1,2,4}, linear, 6 layers) and B (linear 1..4, 2 layers) on 4 devices: C* = 2,
    # n*_A = 3 -> (4 dev, 4 layers) + (2 dev, 2 layers); n*_B = 1 -> (1 dev, 2 layers).
    # Wave 1: A(4) fills the devices. Wave 2: A(2) + B(1) leave one idle; B has the most remaining
    # time (2 s vs 1 s), so it widens to 2 devices and both finish in 1 s: makespan 2 = C*.
    a = make_curve([1, 2, 4], [1.0, 0.5, 0.25])
    problem = make_problem([6, 2], [[], []], [a, _linear(4)], 4)
    schedule = spindle_schedule(problem)
    assert [w.slices for w in schedule.waves] == [(Slice(0, 4, 4),), (Slice(0, 2, 2), Slice(1, 2, 2))]
    assert compute_makespan(problem, schedule) == pytest.approx(2.0)


def test_align_slices_to_the_shortest_tuple():
    # A (9 layers) and B (3 layers) on counts {1, 2} (2 s/layer on 1, 1 s/layer on 2), N = 4.
    # A at its largest count sets C* = 9 s, so B's relaxed share is 2/3 device -> 1 device, widened
    # to 2 by the idle devices. Wave 1: B's 3 s is shortest, A runs 3 layers; wave 2: A's other 6.
    capped = make_curve([1, 2], [2.0, 1.0])
    problem = make_problem([9, 3], [[], []], [capped, capped], 4)
    schedule = spindle_schedule(problem)
    assert [w.slices for w in schedule.waves] == [(Slice(0, 3, 2), Slice(1, 3, 2)), (Slice(0, 6, 2),)]


def test_levels_run_in_order_with_barriers():
    problem = make_problem([4, 4, 4], [[], [0], []], [_linear(2), _linear(2), _linear(2)], 4)
    schedule = spindle_schedule(problem)
    check_schedule(problem, schedule)
    first_b = next(k for k, w in enumerate(schedule.waves) if any(s.metaop == 1 for s in w.slices))
    assert all(s.metaop != 2 for w in schedule.waves[first_b:] for s in w.slices)


# ---- properties on random instances


def _cases():
    for seed in range(48):
        num_ops = 2 + seed % 11
        yield seed, random_problem(seed, num_ops, (4, 8, 16, 32)[seed % 4], min(1 + seed % 4, num_ops),
                                   concave=seed % 3 != 0)


def test_random_schedules_are_valid_deterministic_and_bounded():
    for seed, problem in _cases():
        schedule = spindle_schedule(problem)
        check_schedule(problem, schedule)
        assert spindle_schedule(problem) == schedule, seed
        for level in problem.graph.levels:
            waves = [w for w in schedule.waves if any(s.metaop in level for s in w.slices)]
            assert all(s.metaop in level for w in waves for s in w.slices), seed  # level barriers
            assert len(waves) <= 2 * len(level), seed


def test_adjacent_waves_never_share_the_same_slice_set():
    for seed, problem in _cases():
        waves = spindle_schedule(problem).waves
        for a, b in zip(waves, waves[1:]):
            assert {(s.metaop, s.num_devices) for s in a.slices} != {(s.metaop, s.num_devices) for s in b.slices}, seed


def test_spindle_stays_near_the_relaxed_bound_on_divisible_work():
    # Many layers and linear speed-up on every count: rounding costs little, so the greedy should
    # be close to C* (the paper reports <= 7% on its workloads).
    for seed in range(10):
        base = random_problem(1000 + seed, 4, 16, 1)
        curves = [_linear(16, base.curves[m].times[0]) for m in range(4)]
        problem = make_problem([40 + 10 * m for m in range(4)], [[]] * 4, curves, 16)
        c_star, _ = relaxed_allocation(problem, problem.graph.levels[0])
        assert compute_makespan(problem, spindle_schedule(problem)) <= 1.1 * c_star, seed
