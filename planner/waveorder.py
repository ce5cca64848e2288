"""The order of a placed plan's waves, searched under the plan's own cost model (the last step of the choice).

:func:`planner.refine.refine_order` reorders candidate schedules inside the search, placing each order again, and
with ``training.shard_optimizer: auto`` the search prices every schedule with ZeRO-1, although most plans on two or
more nodes end up stepping without it (:func:`planner.candidates.zero_choice`): which order hides the most sync
differs between the settings (without ZeRO-1 no all-gather ends the iteration, so the last gradients' all-reduce is
what is left exposed). This step takes the chosen plan as placed, each slice on its devices, and moves one wave to
the start or the end of its independent run (and phase): the MetaOps' layer indices follow the new order and nothing
else changes (a slice keeps its devices, layers and layout, so its memory and compute), so only the transfers between
waves and the sync's overlap move. Each move is simulated with the cost model the plan is priced with; the first that
shortens the predicted iteration is taken, until none does or the work budget is spent. Never slower than its start.

Pure; deterministic (moves in a fixed order, a budget in work units, never seconds).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from planner.bucketsplit import searched_report, split_cost
from planner.candidates import runnable, schedule_of
from planner.costmodel import CostModel
from planner.phases import phase_ranges
from planner.placement import PlacedSchedule, PlacedWave
from planner.schedule import Problem, independent_runs
from planner.simulator import Simulation, simulate
from planner.solver import SolveResult

REORDERED_IN_PLACE = ", reordered in place"  # method suffix of a plan whose placed waves this search moved


def move_wave(placed: PlacedSchedule, k: int, to: int) -> PlacedSchedule:
    """``placed`` with wave ``k`` moved to position ``to`` and every MetaOp's layers numbered again in wave order
    (the same slices on the same devices)."""
    waves = list(placed.waves)
    waves.insert(to, waves.pop(k))
    done: dict[int, int] = {}
    out = []
    for wave in waves:
        slices = []
        for s in wave.slices:
            first = done.get(s.metaop, 0)
            slices.append(replace(s, first_layer=first))
            done[s.metaop] = first + s.num_layers
        out.append(PlacedWave(tuple(slices)))
    return replace(placed, waves=tuple(out))


def wave_moves(problem: Problem, placed: PlacedSchedule) -> Iterator[PlacedSchedule]:
    """Every placed schedule one wave moved to the start or the end of its independent run inside its phase, earlier
    waves first."""
    runs = independent_runs(problem, schedule_of(placed))
    for first, end in phase_ranges(placed.phases, len(placed.waves)):
        for a, b in runs:
            lo, hi = max(a, first), min(b, end)
            for k in range(lo, hi):
                for to in (lo, hi - 1):
                    if to != k:
                        yield move_wave(placed, k, to)


def reorder_placed(problem: Problem, cost_model: CostModel, placed: PlacedSchedule, sim: Simulation,
                   budget: int) -> tuple[PlacedSchedule, Simulation, int]:
    """First-improvement search over :func:`wave_moves` from ``placed`` (simulated as ``sim``), each move priced with
    ``cost_model`` and kept when it shortens the predicted iteration, fits in device memory and stays runnable, until
    none does or ``budget`` work units (:func:`planner.bucketsplit.split_cost`) are spent (an evaluation that would
    pass it is not made). Returns the best placed schedule, its simulation and the units spent."""
    spent, memory, seen = 0, cost_model.hw.memory_bytes, {placed}
    improved = True
    while improved:
        improved = False
        for moved in wave_moves(problem, placed):
            if moved in seen:
                continue
            cost = split_cost(problem, moved)
            if spent + cost > budget:
                return placed, sim, spent
            seen.add(moved)
            spent += cost
            found = simulate(problem, moved, cost_model)
            if (found.iteration_time_s < sim.iteration_time_s * (1 - 1e-9)
                    and max(found.peak_memory_bytes, default=0.0) <= memory
                    and runnable(problem, moved, cost_model.hw.devices_per_node) is None):
                placed, sim, improved = moved, found, True
                break
    return placed, sim, spent


def reorder_chosen(problem: Problem, cost_model: CostModel, result: SolveResult, placed: PlacedSchedule,
                   sim: Simulation, budget: int) -> tuple[SolveResult, PlacedSchedule, Simulation]:
    """``result``'s plan with its waves reordered where that shortens its predicted iteration (:func:`reorder_placed`
    under ``cost_model``, the plan's own), its report updated (:func:`planner.bucketsplit.searched_report`)."""
    found, found_sim, _ = reorder_placed(problem, cost_model, placed, sim, budget)
    if found is placed:
        return result, placed, sim
    return searched_report(problem, result, found, found_sim, REORDERED_IN_PLACE), found, found_sim
