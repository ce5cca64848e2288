"""Least compute among near-fastest plans: the tie-break of the planner's choice.

:func:`planner.api.choose_candidate` ranks placed schedules by their simulated iteration time. Schedules within a
fraction of a percent of each other on the timeline can differ by several percent in their waves' compute (each wave
its largest forward plus its largest backward, planner.schedule.Problem.duration: the device time a plan holds),
because the timeline has no barrier between waves and hides a wave's idle devices that the waves' sum counts. Among
the schedules predicted within :data:`TOLERANCE` of the fastest, the planner keeps the one with the least waves'
compute that saves a larger share of compute than it adds to the iteration: what it gives up is bounded by the
tolerance, and never past a baseline's (:func:`prefer_less_compute`: Loom is never predicted slower than a baseline
that fits).

Pure: no files, no globals. What it must not import: the Ray or runtime layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from planner.baselines import BaselinePlan
from planner.bucketsplit import unsplit
from planner.candidates import runnable
from planner.costmodel import CostModel
from planner.placement import PlacedSchedule
from planner.refine import evaluation_cost
from planner.schedule import Problem, Schedule, compute_makespan
from planner.simulator import Simulation, simulate
from planner.solver import SolveResult

LATE = ("pool-diving",)  # solver candidates searched apart and adopted only where no slower (adopt_late)
TOLERANCE = 0.01  # predicted iteration a plan may give up (relative to the fastest found) for less waves' compute
LEAST_SPLIT_TOP = 3  # the least-compute placed schedules whose buckets are split as well as the fastest few
ZERO_BUDGET = 4000  # work units (refine.evaluation_cost) of pricing the search's schedules without ZeRO-1


@dataclass(frozen=True)
class Alternative:
    """A placed and simulated schedule near the fastest, with its waves' compute (a cut wave's parts joined)."""

    result: SolveResult
    placed: PlacedSchedule
    sim: Simulation
    compute_s: float


def waves_compute(problem: Problem, schedule: Schedule) -> float:
    """The waves' compute of ``schedule`` (seconds): the sum of its waves' durations (:func:`compute_makespan`), a bucket
    split's parts run as one wave (:func:`planner.bucketsplit.unsplit`). What the per-level bound bounds."""
    return compute_makespan(problem, unsplit(problem, schedule))


def near_fastest(alternatives: Sequence[Alternative], tolerance: float = TOLERANCE) -> list[Alternative]:
    """The alternatives predicted within ``tolerance`` of the fastest, least waves' compute first (then the faster,
    then the given order)."""
    if not alternatives:
        return []
    fastest = min(a.sim.iteration_time_s for a in alternatives)
    near = [a for a in alternatives if a.sim.iteration_time_s <= fastest * (1 + tolerance)]
    return sorted(near, key=lambda a: (a.compute_s, a.sim.iteration_time_s))


def baseline_ceiling(problem: Problem, devices_per_node: int, baselines: Sequence[BaselinePlan]) -> float:
    """The predicted iteration of the fastest baseline that fits in memory and runs (inf when none does)."""
    for b in sorted(baselines, key=lambda b: b.sim.iteration_time_s):
        if not b.unfit and runnable(problem, b.placed, devices_per_node) is None:
            return b.sim.iteration_time_s
    return float("inf")


def prefer_less_compute(problem: Problem, devices_per_node: int,
                        chosen: tuple[SolveResult, PlacedSchedule, Simulation],
                        alternatives: Sequence[Alternative], baselines: Sequence[BaselinePlan],
                        ) -> tuple[SolveResult, PlacedSchedule, Simulation]:
    """``chosen`` (the fastest of Loom's own schedules), or the alternative with the least waves' compute that saves
    at least as large a share of ``chosen``'s compute as it adds to its iteration (device time is not traded away
    for a token saving) and is predicted no slower than any baseline that fits in memory and runs (those baselines'
    fastest time is the ceiling; the alternatives are already within the tolerance of ``chosen``)."""
    ceiling = baseline_ceiling(problem, devices_per_node, baselines)
    own, fastest = waves_compute(problem, chosen[0].schedule), chosen[2].iteration_time_s
    for alt in alternatives:  # least compute first
        saved, lost = 1 - alt.compute_s / own, alt.sim.iteration_time_s / fastest - 1
        if saved > 1e-9 and saved >= lost and alt.sim.iteration_time_s <= ceiling:
            return alt.result, alt.placed, alt.sim
    return chosen


def least_compute(pool: Sequence[Alternative], time: Callable[[Alternative], float],
                  ceiling: float = float("inf")) -> Alternative:
    """The fastest of ``pool`` by ``time``, or one within :data:`TOLERANCE` of it with less waves' compute that saves
    at least the share of compute it adds to the iteration and takes no longer than ``ceiling``: the least such."""
    fastest = min(pool, key=time)
    near = [a for a in pool if time(a) <= time(fastest) * (1 + TOLERANCE)]
    for alt in sorted(near, key=lambda a: (a.compute_s, time(a))):
        saved, lost = 1 - alt.compute_s / fastest.compute_s, time(alt) / time(fastest) - 1
        if alt is fastest or (saved > 1e-9 and saved >= lost and time(alt) <= ceiling):
            return alt
    return fastest


def faster_time(problem: Problem, plain: CostModel, planned: tuple[SolveResult, PlacedSchedule, Simulation]) -> float:
    """``planned``'s predicted iteration (priced with ZeRO-1) or, when shorter and it fits in device memory, the same
    placed schedule's without ZeRO-1 (``plain``): its time at its faster setting."""
    _, placed, sim = planned
    alone = simulate(problem, placed, plain)
    if max(alone.peak_memory_bytes, default=0.0) > plain.hw.memory_bytes:
        return sim.iteration_time_s
    return min(sim.iteration_time_s, alone.iteration_time_s)


def prefer_unsharded(problem: Problem, plain: CostModel, chosen: tuple[SolveResult, PlacedSchedule, Simulation],
                     pool: Sequence[Alternative], baselines: Sequence[BaselinePlan], budget: int = ZERO_BUDGET,
                     ) -> tuple[SolveResult, PlacedSchedule, Simulation]:
    """``training.shard_optimizer: auto``. The search ranks its placed schedules with ZeRO-1, and
    :func:`planner.candidates.zero_choice` prices only the one it chose without it; but which schedule is fastest can
    change with the setting (ZeRO-1's all-gather ends the iteration where a schedule's first wave needs many weights
    at once; without it every holder steps all its parameters). So ``chosen`` and the alternatives of ``pool``
    (placed schedules of the search, fastest first, while ``budget`` work units of simulation last) each count at
    their faster setting that fits (``plain``: the cost model without ZeRO-1), and the rule of :func:`least_compute`
    picks one, no slower than the fastest fitting baseline unless it is the fastest. Returns its triple as the search
    priced it: zero_choice then decides its setting."""
    options, times, spent = [Alternative(*chosen, waves_compute(problem, chosen[0].schedule))], {}, 0
    for alt in sorted(pool, key=lambda a: a.sim.iteration_time_s):
        spent += evaluation_cost(problem, alt.result.schedule)
        if spent > budget:
            break
        if alt.placed is not chosen[1]:
            options.append(alt)
    for alt in options:
        times[id(alt)] = faster_time(problem, plain, (alt.result, alt.placed, alt.sim))
    ceiling = baseline_ceiling(problem, plain.hw.devices_per_node, baselines)
    pick = least_compute(options, lambda a: times[id(a)], ceiling)
    return pick.result, pick.placed, pick.sim


def held_back(solved: SolveResult) -> tuple[SolveResult, SolveResult | None]:
    """``solved`` without the candidates named in :data:`LATE`, and a copy holding only those (None when it has none
    or they are all it has). A candidate added to the solver changes which schedules the planner's searches start
    from (the best few of the pool), and so plans it does not win: searched apart, it competes only at the end."""
    cands = solved.candidates or ()
    late = tuple(c for c in cands if c.name in LATE)
    if not late or len(late) == len(cands):
        return solved, None
    return replace(solved, candidates=tuple(c for c in cands if c.name not in LATE)), replace(solved, candidates=late)


def adopt_late(problem: Problem, chosen: tuple[SolveResult, PlacedSchedule, Simulation],
               late: Sequence[Alternative]) -> tuple[SolveResult, PlacedSchedule, Simulation]:
    """``chosen``, or a held-back candidate's plan (:func:`held_back`) predicted no slower than it: among ``chosen`` and
    those, the least waves' compute within :data:`TOLERANCE` of the fastest that saves at least the share of compute
    it adds to the iteration (the rule of :func:`prefer_less_compute`). Never slower than ``chosen``."""
    ceiling = chosen[2].iteration_time_s
    pool = [a for a in late if a.sim.iteration_time_s <= ceiling]
    if not pool:
        return chosen
    pool.append(Alternative(*chosen, waves_compute(problem, chosen[0].schedule)))
    pick = least_compute(pool, lambda a: a.sim.iteration_time_s)
    return pick.result, pick.placed, pick.sim
