"""Transfer-aware local search: improve a placed candidate on its simulated iteration time.

The solver ranks schedules by compute alone; placement and the simulator then add the activations
that move between device groups at wave boundaries. A slice that receives a large batch on few
devices (a light decoder on 2 devices fed by an encoder spread over 64) pays a transfer on a few
links, forward and backward, that its own compute never shows. This search changes the device count
of the slices at either end of the costliest transfers: every other valid count that fits the
slice's wave (the rest of the wave unchanged). Each neighbour is placed with the candidate's
placement strategy and simulated, and the best one that shortens the predicted iteration is kept;
rounds repeat until none does or the work budget is spent.

A second search, :func:`refine_compute`, moves compute instead: one or two layers of a MetaOp from one of its waves
to another, or one slice's device count, judged the same way (placed and simulated). Neighbours are tried in the
order of their waves' compute as the solver prices it (a wave's largest forward plus its largest backward,
:meth:`planner.schedule.Problem.duration`), and the first that shortens the simulated iteration is taken (first
improvement: a full round costs more evaluations than a grid cell can afford).

A third, :func:`refine_order`, keeps every wave and changes their order inside an independent run (a wave moved to
the run's start or end), which moves the transfers between waves and the gradient sync left after the last backward.

Deterministic: the neighbours are visited in a fixed order and the budget counts evaluations, never
seconds. Pure: no files, no globals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from planner.costmodel import CostModel
from planner.errors import PlanningError
from planner.placement import PlacedSchedule, PlacementTrace, place_traced
from planner.schedule import (Problem, Schedule, Slice, Wave, check_schedule, independent_runs, merge_adjacent_waves,
                              wave_duration)
from planner.simulator import Simulation, simulate

MAX_TRANSFERS = 4  # the costliest transfers whose ends are tried in one round
DEVICES_PER_UNIT = 64  # an evaluation costs one unit per slice per started block of this many devices


@dataclass(frozen=True)
class Evaluated:
    """A schedule, its placement under ``strategy`` and the simulation of that placement."""

    schedule: Schedule
    strategy: str
    placed: PlacedSchedule
    sim: Simulation
    trace: PlacementTrace | None = None  # how it was placed: a neighbour's placement resumes from it


def evaluate(problem: Problem, cost_model: CostModel, schedule: Schedule, strategy: str,
             resume: PlacementTrace | None = None) -> Evaluated | None:
    """Place ``schedule`` with ``strategy`` and simulate it; None when it does not fit in device memory. ``resume``:
    the trace of a placed schedule that starts with the same waves (:func:`planner.placement.place_traced`: the same
    placement, sooner)."""
    try:
        placed, trace = place_traced(problem, schedule, cost_model, strategy=strategy, resume=resume)
    except PlanningError:
        return None
    return Evaluated(schedule, strategy, placed, simulate(problem, placed, cost_model), trace)


def evaluation_cost(problem: Problem, schedule: Schedule) -> int:
    """Work units of one evaluation: placement and simulation grow with slices times devices."""
    blocks = -(-problem.num_devices // DEVICES_PER_UNIT)
    return max(1, sum(len(w.slices) for w in schedule.waves) * blocks)


def with_count(problem: Problem, schedule: Schedule, k: int, m: int, count: int) -> Schedule:
    """``schedule`` with MetaOp m's slice in wave k on ``count`` devices (identical adjacent waves merged)."""
    wave = schedule.waves[k]
    slices = tuple(Slice(s.metaop, s.num_layers, count) if s.metaop == m else s for s in wave.slices)
    waves = schedule.waves[:k] + (Wave(slices),) + schedule.waves[k + 1:]
    return Schedule(merge_adjacent_waves(problem, waves))


def transfer_ends(current: Evaluated) -> list[tuple[int, int]]:
    """(wave, MetaOp) of the consumer and the producer slice of the costliest transfers, costliest first,
    each pair once."""
    waves = current.schedule.waves
    ends: list[tuple[int, int]] = []
    ranked = sorted(current.sim.transfers, key=lambda t: (-t.time_s, t.after_wave, t.dst_metaop, t.src_metaop))
    def latest(m: int, k: int) -> tuple[int, int] | None:  # the last slice of MetaOp m in waves 0..k
        return next(((j, m) for j in range(k, -1, -1) if any(s.metaop == m for s in waves[j].slices)), None)

    for t in ranked[:MAX_TRANSFERS]:
        # the loss stage's transfers (after the last wave) end at the loss host's slice
        consumer = (t.after_wave + 1, t.dst_metaop) if t.after_wave + 1 < len(waves) else latest(t.dst_metaop, t.after_wave)
        producer = latest(t.src_metaop, t.after_wave)
        for end in (consumer, producer):
            if end is not None and end not in ends:
                ends.append(end)
    return ends


def neighbours(problem: Problem, current: Evaluated) -> Iterator[Schedule]:
    """Schedules one count change away at an end of a costly transfer, in a fixed order."""
    waves = current.schedule.waves
    for k, m in transfer_ends(current):
        here = next(s for s in waves[k].slices if s.metaop == m)
        free = problem.num_devices - waves[k].num_devices + here.num_devices
        for count in problem.curves[m].counts:
            if count != here.num_devices and count <= free:
                yield with_count(problem, current.schedule, k, m, count)


def refine_transfers(problem: Problem, cost_model: CostModel, start: Evaluated, budget: int) -> tuple[Evaluated, int]:
    """Best-improvement search from ``start`` over :func:`neighbours` (same placement strategy).

    Returns the best schedule found (``start`` when nothing helps) and the work units spent, at most
    ``budget`` plus one evaluation."""
    current, spent = start, 0
    seen = {start.schedule}
    while spent < budget:
        best = current
        trace = current.trace or place_traced(problem, current.schedule, cost_model, strategy=current.strategy,
                                              check_memory_limit=False)[1]  # its neighbours resume from it
        for schedule in neighbours(problem, current):
            if spent >= budget:
                break
            if schedule in seen:
                continue
            seen.add(schedule)
            check_schedule(problem, schedule)
            spent += evaluation_cost(problem, schedule)
            found = evaluate(problem, cost_model, schedule, current.strategy, trace)
            if found is not None and found.sim.iteration_time_s < best.sim.iteration_time_s * (1 - 1e-9):
                best = found
        if best is current:
            break
        current = best
    return current, spent


COMPUTE_DEVICES_PER_UNIT = 8  # the compute search's evaluation: one unit per slice per started block of this many
MOVED_LAYERS = (1, 2)  # layers one compute move takes from a slice to another slice of the same MetaOp
MIN_EVALUATIONS = 20  # a compute search whose budget affords fewer simulations of its start is not started


def compute_cost(problem: Problem, schedule: Schedule) -> int:
    """Work units of one evaluation of the compute search: slices times started blocks of 8 devices (finer than
    :func:`evaluation_cost`: a 32-device cell affords a quarter of an 8-device cell's evaluations, a 1,024-device
    job with 100 slices none)."""
    blocks = -(-problem.num_devices // COMPUTE_DEVICES_PER_UNIT)
    return max(1, sum(len(w.slices) for w in schedule.waves) * blocks)


def compute_neighbours(problem: Problem, schedule: Schedule) -> Iterator[Schedule]:
    """Schedules one compute move away, the least waves' compute (:func:`planner.schedule.wave_duration`) first (ties
    in a fixed order): a MetaOp that runs in two waves gives one or two layers from one to the other (its first and
    last wave stay, so its dependencies hold), or a slice takes another valid count that fits its wave."""
    waves = schedule.waves
    base = [wave_duration(problem, w) for w in waves]

    def changed(k: int, m: int, layers: int = 0, count: int | None = None) -> tuple[Slice, ...]:
        return tuple(Slice(s.metaop, s.num_layers + layers, count or s.num_devices) if s.metaop == m else s
                     for s in waves[k].slices)

    runs: dict[int, list[int]] = {}
    for k, wave in enumerate(waves):
        for s in wave.slices:
            runs.setdefault(s.metaop, []).append(k)
    moves: list[tuple[float, int, dict[int, tuple[Slice, ...]]]] = []
    for m, ks in sorted(runs.items()):
        for a in ks:
            have = next(s.num_layers for s in waves[a].slices if s.metaop == m)
            for b in ks:
                for d in MOVED_LAYERS:
                    if a != b and have > d:
                        na, nb = changed(a, m, -d), changed(b, m, d)
                        gain = wave_duration(problem, Wave(na)) + wave_duration(problem, Wave(nb)) - base[a] - base[b]
                        moves.append((gain, len(moves), {a: na, b: nb}))
    for k, wave in enumerate(waves):
        for s in wave.slices:
            free = problem.num_devices - wave.num_devices + s.num_devices
            for count in problem.curves[s.metaop].counts:
                if count != s.num_devices and count <= free:
                    nk = changed(k, s.metaop, 0, count)
                    moves.append((wave_duration(problem, Wave(nk)) - base[k], len(moves), {k: nk}))
    moves.sort(key=lambda x: (x[0], x[1]))
    for _, _, change in moves:
        yield Schedule(merge_adjacent_waves(problem, [Wave(change.get(k, w.slices)) for k, w in enumerate(waves)]))


def refine_compute(problem: Problem, cost_model: CostModel, start: Evaluated, budget: int) -> tuple[Evaluated, int]:
    """First-improvement search from ``start`` over :func:`compute_neighbours` (same placement strategy): the first
    neighbour whose simulated iteration is shorter is taken and its neighbours are listed again, until none is or
    ``budget`` work units (:func:`compute_cost`) are spent (an evaluation that would pass it is not made); not
    started when the budget affords fewer than :data:`MIN_EVALUATIONS` evaluations. Returns the best schedule found
    (``start`` when nothing helps) and the units spent."""
    # too few affordable evaluations to find anything (a 100-MetaOp job on 128 devices: 3): not started, so such a
    # job's plan, often at its time limit, does not lose the search's CPU seconds to it
    if compute_cost(problem, start.schedule) * MIN_EVALUATIONS > budget:
        return start, 0
    return first_improvement(problem, cost_model, start, budget, compute_neighbours, compute_cost)


def order_neighbours(problem: Problem, schedule: Schedule) -> Iterator[Schedule]:
    """The same waves with one of them moved to the start or the end of its independent run
    (:func:`planner.schedule.independent_runs`: any order of a run is valid), earlier waves first."""
    waves = schedule.waves
    for first, end in independent_runs(problem, schedule):
        for k in range(first, end):
            for to in (first, end - 1):
                if to != k:
                    moved = list(waves)
                    moved.insert(to, moved.pop(k))
                    yield Schedule(tuple(moved))


def refine_order(problem: Problem, cost_model: CostModel, start: Evaluated, budget: int) -> tuple[Evaluated, int]:
    """First-improvement search from ``start`` over :func:`order_neighbours` (same placement strategy; work units of
    :func:`evaluation_cost`). The order of a run's waves changes no wave's compute but where each MetaOp's layers
    sit, so the transfers between waves and which gradients are ready last (the sync nothing after it hides): a wave
    with few parameters to sync does best at the start, whose backward runs last. Returns the best schedule found
    (``start`` when nothing helps) and the units spent."""
    return first_improvement(problem, cost_model, start, budget, order_neighbours, evaluation_cost)


def first_improvement(problem: Problem, cost_model: CostModel, start: Evaluated, budget: int,
                      neighbours: Callable[[Problem, Schedule], Iterable[Schedule]],
                      cost: Callable[[Problem, Schedule], int]) -> tuple[Evaluated, int]:
    """From ``start``, take the first of ``neighbours`` whose simulated iteration is shorter and list its neighbours
    again, until none is or ``budget`` units of ``cost`` are spent (an evaluation that would pass it is not made).
    Returns the best schedule found and the units spent."""
    current, spent = start, 0
    seen = {start.schedule}
    improved = cost(problem, start.schedule) <= budget  # not one evaluation affordable: not even its start re-placed
    while improved:
        improved = False
        trace = current.trace or place_traced(problem, current.schedule, cost_model, strategy=current.strategy,
                                              check_memory_limit=False)[1]  # its neighbours resume from it
        for schedule in neighbours(problem, current.schedule):
            if schedule in seen:
                continue
            units = cost(problem, schedule)
            if spent + units > budget:
                return current, spent
            seen.add(schedule)
            check_schedule(problem, schedule)
            spent += units
            found = evaluate(problem, cost_model, schedule, current.strategy, trace)
            if found is not None and found.sim.iteration_time_s < current.sim.iteration_time_s * (1 - 1e-9):
                current, improved = found, True
                break
    return current, spent
