"""Bucket splitting: cut a wave into two on the same devices so that gradient sync starts earlier or ends sooner.

A gradient bucket is the trainable layers one device set holds that become final at the same backward event
(:func:`planner.program.grad_buckets`): with one phase, all layers of a group that a wave runs on one device set.
Its all-reduce starts when that wave's backward is done and overlaps the backward of earlier waves
(:mod:`planner.sync`). Two ends of the backward decide how much of the sync is exposed:

- the wave whose backward runs *first* in a phase (its last wave) makes the first buckets ready: with many layers in
  it, the sync starts late, and the chain of all-reduces on a device set (a large group over several nodes) outlasts
  the backward left to hide it;
- the wave whose backward runs *last* (its first wave) makes the last buckets ready, and their all-reduce is exposed
  in full.

Splitting such a wave into two consecutive waves with the same slices on the same devices, each slice's layers cut
at the same fraction, changes neither compute (each device runs the same layers in the same order, with no barrier
between devices: planner.timeline), nor memory, and leaves the bytes moved alone (a continuing slice on the same
devices moves no rows); it makes two buckets of one, ready at two backward events. Where a cut leaves all of a
slice's layers on one side, the slice's input transfer moves to the boundary between the two waves, which can move a
device's end either way (clip-4@32: 147.8 -> 149.3 ms on the last device); every cut is priced by the simulator, and
memory is checked again after each. It costs one more collective's latency per
bucket. :func:`split_buckets` searches such cuts at the ends of every phase, best improvement first, each priced by
the simulator, and keeps only those that shorten the predicted iteration. Deterministic (a fixed order of moves and
a work budget in :func:`planner.refine.evaluation_cost` units); pure.
"""

from __future__ import annotations

from dataclasses import replace

from planner.candidates import schedule_of
from planner.costmodel import CostModel
from planner.phases import phase_ranges
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave
from planner.schedule import Problem, Schedule, ScheduleError, compute_makespan, merge_adjacent_waves
from planner.simulator import Simulation, simulate
from planner.solver import SolveResult

FRACTIONS = (0.25, 1 / 3, 0.5, 2 / 3, 0.75)  # where a wave is cut: the share of each slice's layers in the first part
SPLIT = ", bucket-split"  # method suffix of a plan this search improved
DEVICES_PER_UNIT = 64  # as planner.refine: one unit per slice per started block of this many devices


def split_cost(problem: Problem, placed: PlacedSchedule) -> int:
    """Work units of one evaluation (simulating ``placed``): slices times started blocks of 64 devices."""
    blocks = -(-problem.num_devices // DEVICES_PER_UNIT)
    return max(1, sum(len(w.slices) for w in placed.waves) * blocks)


def split_wave(placed: PlacedSchedule, k: int, fraction: float) -> PlacedSchedule | None:
    """``placed`` with wave ``k`` cut into two consecutive waves: each slice's first ``round(fraction x layers)``
    layers in the first, the rest in the second, on the same devices and layout. None when either part would be
    empty (no slice has layers on both sides of the cut)."""
    first, second = [], []
    for s in placed.waves[k].slices:
        a = int(round(s.num_layers * fraction))
        if a > 0:
            first.append(PlacedSlice(s.metaop, s.first_layer, a, s.devices, s.layout))
        if s.num_layers > a:
            second.append(PlacedSlice(s.metaop, s.first_layer + a, s.num_layers - a, s.devices, s.layout))
    if not first or not second:
        return None
    waves = placed.waves[:k] + (PlacedWave(tuple(first)), PlacedWave(tuple(second))) + placed.waves[k + 1:]
    return PlacedSchedule(waves, tuple(p if p <= k else p + 1 for p in placed.phases))


def unsplit(problem: Problem, schedule: Schedule) -> Schedule:
    """``schedule`` with the parts of every cut wave joined again (consecutive waves of the same slices on the same
    counts): the schedule whose compute makespan (sum of wave durations) a split plan has. The parts run as one wave
    does, since nothing waits between them, so the bench and the solver report count them as one."""
    return Schedule(merge_adjacent_waves(problem, schedule.waves))


def end_waves(placed: PlacedSchedule) -> list[int]:
    """The waves whose backward runs first and last in each phase (its last and first waves), in that order."""
    out: list[int] = []
    for a, b in phase_ranges(placed.phases, len(placed.waves)):
        for k in (b - 1, a):
            if k not in out:
                out.append(k)
    return out


def split_buckets(problem: Problem, cost_model: CostModel, placed: PlacedSchedule, sim: Simulation,
                  budget: int) -> tuple[PlacedSchedule, Simulation, int]:
    """Best-improvement search over :func:`split_wave` at :func:`end_waves` x :data:`FRACTIONS`, round after round
    (a cut wave's parts are ends again), until no cut shortens the predicted iteration or ``budget`` work units are
    spent (an evaluation that would pass it is not made). Returns the best placed schedule (``placed`` when nothing
    helps), its simulation and the units spent."""
    spent = 0
    while True:
        best: tuple[PlacedSchedule, Simulation] | None = None
        for k in end_waves(placed):
            for fraction in FRACTIONS:
                cut = split_wave(placed, k, fraction)
                if cut is None:
                    continue
                cost = split_cost(problem, cut)
                if spent + cost > budget:
                    return (*(best or (placed, sim)), spent)
                spent += cost
                found = simulate(problem, cut, cost_model)
                bar = best[1] if best is not None else sim
                # memory cannot grow (the same slices on the same devices); checked rather than assumed
                fits = max(found.peak_memory_bytes, default=0.0) <= max(sim.peak_memory_bytes, default=0.0) * (1 + 1e-9)
                if fits and found.iteration_time_s < bar.iteration_time_s * (1 - 1e-9):
                    best = (cut, found)
        if best is None:
            break
        placed, sim = best
    return placed, sim, spent


def split_chosen(problem: Problem, cost_model: CostModel, result: SolveResult, placed: PlacedSchedule, sim: Simulation,
                 budget: int) -> tuple[SolveResult, PlacedSchedule, Simulation, int]:
    """``result``'s plan with its waves cut where that shortens the predicted iteration (:func:`split_buckets`), its
    report updated (the schedule, its compute and gap, the method with :data:`SPLIT`); the
    units spent."""
    found, found_sim, spent = split_buckets(problem, cost_model, placed, sim, budget)
    if found is placed:
        return result, placed, sim, spent
    return searched_report(problem, result, found, found_sim, SPLIT), found, found_sim, spent


def searched_report(problem: Problem, result: SolveResult, placed: PlacedSchedule, sim: Simulation,
                    suffix: str) -> SolveResult:
    """``result``'s report for ``placed`` (simulated as ``sim``), what a local search made of its plan: the schedule,
    its compute and gap, status heuristic, the method with ``suffix``."""
    schedule = schedule_of(placed)
    try:
        makespan = compute_makespan(problem, schedule)  # the plan's waves' (the bench joins a cut wave's parts)
    except (ScheduleError, KeyError):  # a role placement on layouts the job's curves do not pick (as adopt_best)
        makespan = sim.compute_s
    gap = (makespan - result.bound_s) / makespan if makespan > 0 else 0.0
    return replace(result, schedule=schedule, objective_s=makespan, gap=gap, status="heuristic",
                   method=result.method + suffix)
