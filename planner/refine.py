"""Transfer-aware local search: improve a placed candidate on its simulated iteration time.

The solver ranks schedules by compute alone; placement and the simulator then add the activations
that move between device groups at wave boundaries. A slice that receives a large batch on few
devices (a light decoder on 2 devices fed by an encoder spread over 64) pays a transfer on a few
links, forward and backward, that its own compute never shows. This search changes the device count
of the slices at either end of the costliest transfers: every other valid count that fits the
slice's wave (the rest of the wave unchanged). Each neighbour is placed with the candidate's
placement strategy and simulated, and the best one that shortens the predicted iteration is kept;
rounds repeat until none does or the work budget is spent.

Deterministic: the neighbours are visited in a fixed order and the budget counts evaluations, never
seconds. Pure: no files, no globals.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from planner.costmodel import CostModel
from planner.errors import PlanningError
from planner.placement import PlacedSchedule, PlacementTrace, place_traced
from planner.schedule import Problem, Schedule, Slice, Wave, check_schedule, merge_adjacent_waves
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
