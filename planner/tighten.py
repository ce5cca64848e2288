"""Tighten the chosen plan's waves: less waves' compute at no cost to the predicted iteration.

The planner chooses on the simulated iteration (planner.api), and the timeline has no barrier between waves: a
device whose slice ends early in one wave starts its next slice at once. So the fastest plan often has waves whose
slices end far apart, and the waves' compute (each wave its slowest slice, what the per-level bound bounds and a
barrier-synchronised run would take) sits 4-12% above the bound while the timeline's sits within 3%.
:func:`tighten_waves` moves layers of a MetaOp between two of its consecutive slices (the end of one to the start of
the next, or back: "catch up" work of the next wave), on the same devices and layouts, so that a wave's slices end
closer together. Each move that lowers the waves' compute is simulated, the largest saving first, and the first one
whose predicted iteration is no longer than the plan's (``ceiling``) and whose peak memory fits is taken; rounds
repeat until none is or the work budget is spent. Neither the plan's iteration nor its memory limit is traded for
compute.

Deterministic (a fixed order of moves, a work budget counted in simulations, never seconds); pure.
"""

from __future__ import annotations

import math
from dataclasses import replace

from planner.bucketsplit import split_cost
from planner.candidates import schedule_of
from planner.costmodel import CostModel
from planner.leastcompute import waves_compute
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave
from planner.schedule import Problem, ScheduleError, check_schedule, compute_makespan
from planner.simulator import Simulation, simulate
from planner.solver import SolveResult

TIGHTENED = ", tightened"  # method suffix of a plan this search changed
MAX_MOVED = 4  # at most this many layers move in one step (16 found the same on the grid, at more CPU)
MIN_SIMULATIONS = 10  # a search whose budget affords fewer simulations of the plan is not started


def layer_moves(placed: PlacedSchedule) -> list[PlacedSchedule]:
    """Every placed schedule one layer move away: MetaOp m's slices in waves a < b, consecutive among m's slices,
    give 1..MAX_MOVED layers from the end of a to the start of b or from the start of b to the end of a, on the same
    devices and layouts. A slice that gives all its layers is dropped, and its wave with it when it was the wave's
    only slice (a wave that starts a phase is kept). The caller checks dependencies
    (:func:`planner.schedule.check_schedule`)."""
    where: dict[int, list[tuple[int, int]]] = {}
    for k, wave in enumerate(placed.waves):
        for i, s in enumerate(wave.slices):
            where.setdefault(s.metaop, []).append((k, i))
    out = []
    for m in sorted(where):
        for (a, i), (b, j) in zip(where[m], where[m][1:]):
            sa, sb = placed.waves[a].slices[i], placed.waves[b].slices[j]
            for d in range(1, MAX_MOVED + 1):
                if sa.num_layers >= d:  # a's last d layers to b
                    out.append(_moved(placed, a, i, replace(sa, num_layers=sa.num_layers - d), b, j,
                                      replace(sb, first_layer=sb.first_layer - d, num_layers=sb.num_layers + d)))
                if sb.num_layers >= d:  # b's first d layers to a
                    out.append(_moved(placed, a, i, replace(sa, num_layers=sa.num_layers + d), b, j,
                                      replace(sb, first_layer=sb.first_layer + d, num_layers=sb.num_layers - d)))
    return [x for x in out if x is not None]


def catch_ups(problem: Problem, placed: PlacedSchedule) -> list[PlacedSchedule]:
    """Every placed schedule one catch-up away: wave k is cut at the end of one of its shorter slices (each longer
    slice's first layers that end by then in the first part, the rest in a second part on the same devices), and in
    the second part the devices whose slices have ended run the first layers of wave k+1's slices that lie wholly on
    them (as many layers as end by the second part's end, at least one). What the timeline does without a barrier:
    a device whose slice ends early starts its next one; the waves now say so. Waves in another phase than k are not
    touched; dependencies are checked by the caller (:func:`planner.schedule.check_schedule`)."""
    out = []
    for k in range(len(placed.waves) - 1):
        if k + 1 in placed.phases:
            continue
        wave = placed.waves[k]
        times = [_seconds(problem, s) for s in wave.slices]
        for cut in sorted(set(t for t in times if t < max(times) * (1 - 1e-9))):
            for rounding in (math.floor, round):
                found = _catch_up(problem, placed, k, cut, rounding, times)
                if found is not None and found not in out:
                    out.append(found)
    return out


def _seconds(problem: Problem, s: PlacedSlice) -> float:
    return problem.curves[s.metaop].time(len(s.devices)) * s.num_layers


def _catch_up(problem: Problem, placed: PlacedSchedule, k: int, cut: float, rounding, times: list[float],
              ) -> PlacedSchedule | None:
    first, second, free = [], [], set()
    for s, t in zip(placed.waves[k].slices, times):
        if t <= cut * (1 + 1e-9):
            first.append(s)
            free.update(s.devices)
            continue
        a = min(s.num_layers, int(rounding(s.num_layers * cut / t)))
        if a > 0:
            first.append(replace(s, num_layers=a))
        second.append(replace(s, first_layer=s.first_layer + a, num_layers=s.num_layers - a))
    end = max(_seconds(problem, s) for s in second)
    running = {s.metaop for s in second}
    rest = []
    for y in placed.waves[k + 1].slices:
        per_layer = problem.curves[y.metaop].time(len(y.devices))
        n = min(y.num_layers, int(end / per_layer + 1e-9)) if per_layer > 0 else 0
        if n > 0 and y.metaop not in running and free.issuperset(y.devices):
            second.append(replace(y, num_layers=n))
            free.difference_update(y.devices)
            if y.num_layers > n:
                rest.append(replace(y, first_layer=y.first_layer + n, num_layers=y.num_layers - n))
        else:
            rest.append(y)
    if len(rest) == len(placed.waves[k + 1].slices) and all(a is b for a, b in zip(rest, placed.waves[k + 1].slices)):
        return None  # nothing caught up
    waves = placed.waves[:k] + (PlacedWave(tuple(first)), PlacedWave(tuple(second)))
    waves += ((PlacedWave(tuple(rest)),) if rest else ()) + placed.waves[k + 2:]
    shift = 1 if rest else 0
    return PlacedSchedule(waves, tuple(p if p <= k else p + shift for p in placed.phases))


def _moved(placed: PlacedSchedule, a: int, i: int, sa: PlacedSlice, b: int, j: int,
           sb: PlacedSlice) -> PlacedSchedule | None:
    waves: list[PlacedWave | None] = list(placed.waves)
    for k, n, s in ((a, i, sa), (b, j, sb)):
        slices = [x for x in placed.waves[k].slices[:n] + (s,) + placed.waves[k].slices[n + 1:] if x.num_layers > 0]
        if not slices and k in placed.phases:
            return None
        waves[k] = PlacedWave(tuple(slices)) if slices else None
    gone = [k for k, w in enumerate(waves) if w is None]
    phases = tuple(p - sum(1 for k in gone if k < p) for p in placed.phases)
    return PlacedSchedule(tuple(w for w in waves if w is not None), phases)


def _compute(problem: Problem, placed: PlacedSchedule, memo: dict[int, tuple]) -> float:
    """:func:`planner.leastcompute.waves_compute` of ``placed`` (cut waves' parts joined), each wave's signature,
    slices and duration remembered in ``memo`` by identity: a move changes two or three of the waves it lists."""
    total, group, joined = 0.0, None, False
    for wave in placed.waves:
        entry = memo.get(id(wave))
        if entry is None or entry[0] is not wave:
            slices = {s.metaop: (len(s.devices), s.num_layers) for s in wave.slices}
            sig = frozenset((m, n) for m, (n, _) in slices.items())
            entry = memo[id(wave)] = (wave, sig, slices, _duration(problem, slices))
        if group is not None and entry[1] == group[1]:
            group = (None, group[1], {m: (n, layers + entry[2][m][1]) for m, (n, layers) in group[2].items()}, 0.0)
            joined = True
            continue
        if group is not None:
            total += _duration(problem, group[2]) if joined else group[3]
        group, joined = entry, False
    if group is not None:
        total += _duration(problem, group[2]) if joined else group[3]
    return total


def _duration(problem: Problem, slices: dict[int, tuple[int, int]]) -> float:
    return problem.duration((m, n, layers) for m, (n, layers) in slices.items())


def _valid(problem: Problem, placed: PlacedSchedule) -> bool:
    try:
        check_schedule(problem, schedule_of(placed))
    except ScheduleError:
        return False
    return True


def tighten_chosen(problem: Problem, cost_model: CostModel, result: SolveResult, placed: PlacedSchedule,
                   sim: Simulation, budget: int) -> tuple[SolveResult, PlacedSchedule, Simulation]:
    """The chosen plan after :func:`tighten_waves` (no slower: its own iteration is the ceiling), its report updated
    (schedule, compute, gap, method with :data:`TIGHTENED`). Not started when ``budget`` affords fewer than
    :data:`MIN_SIMULATIONS` simulations of the plan (hundreds of slices or thousands of devices: the sweep and scale
    cells), nor on a plan whose counts the job's curves do not price (a role placement's layouts)."""
    if split_cost(problem, placed) * MIN_SIMULATIONS > budget:
        return result, placed, sim
    try:
        waves_compute(problem, schedule_of(placed))
    except KeyError:
        return result, placed, sim
    found, found_sim, _ = tighten_waves(problem, cost_model, placed, sim, budget)
    if found is placed:
        return result, placed, sim
    schedule = schedule_of(found)
    makespan = compute_makespan(problem, schedule)
    gap = (makespan - result.bound_s) / makespan if makespan > 0 else 0.0
    return (replace(result, schedule=schedule, objective_s=makespan, gap=gap, status="heuristic",
                    method=result.method + TIGHTENED), found, found_sim)


def tighten_waves(problem: Problem, cost_model: CostModel, placed: PlacedSchedule, sim: Simulation, budget: int,
                  ceiling: float | None = None) -> tuple[PlacedSchedule, Simulation, int]:
    """First-improvement search over :func:`layer_moves` and :func:`catch_ups`, the largest waves' compute saving first: a move is taken
    when its simulated iteration is at most ``ceiling`` (default: ``sim``'s) and every device's peak memory fits.
    Returns the placed schedule found (``placed`` when no move is taken), its simulation and the work units spent
    (:func:`planner.bucketsplit.split_cost` per simulation; an evaluation that would pass ``budget`` is not made)."""
    ceiling = sim.iteration_time_s if ceiling is None else ceiling
    memory = cost_model.hw.memory_bytes
    spent, seen = 0, {placed}
    memo: dict[int, tuple] = {}
    compute = _compute(problem, placed, memo)
    while True:
        moves = []
        for n, cand in enumerate(layer_moves(placed) + catch_ups(problem, placed)):
            c = _compute(problem, cand, memo)
            if c < compute * (1 - 1e-9) and cand not in seen and _valid(problem, cand):
                moves.append((c, n, cand))
        moves.sort(key=lambda x: (x[0], x[1]))
        taken = False
        for c, _, cand in moves:
            cost = split_cost(problem, cand)
            if spent + cost > budget:
                return placed, sim, spent
            spent += cost
            seen.add(cand)
            found = simulate(problem, cand, cost_model)
            if found.iteration_time_s <= ceiling * (1 + 1e-12) and max(found.peak_memory_bytes, default=0.0) <= memory:
                placed, sim, compute, taken = cand, found, c, True
                break
        if not taken:
            return placed, sim, spent
