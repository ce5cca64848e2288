"""Loom's last candidates: every baseline's schedule, adopted when it beats the solver's choice.

The solver's candidates are wave schedules (one phase, placed by :func:`~planner.placement.place_schedule`). The
baselines' schedules (:mod:`planner.baselines`) have shapes the solver does not search: task groups that run without
a barrier with each other, tasks in turn as phases. All are priced by the same simulator and checked by the same
memory ledger, so :func:`adopt_best` can put them side by side: the shortest predicted iteration among the solver's
choice and every baseline that fits in memory and that the runtime can execute (:func:`runnable`) is the plan. So
Loom is never predicted slower than a baseline whose plan fits. The plan's ``solver.method`` names an adopted
baseline (``"<name> schedule (baseline)"``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from planner.baselines import BaselinePlan
from planner.costmodel import CostModel
from planner.errors import PlanningError
from planner.generation import decode_refused
from planner.placement import PlacedSchedule
from planner.rlbaselines import RL_BASELINES
from planner.program import loss_hosts, plan_edges
from planner.phases import phase_of_waves
from planner.schedule import Problem, Schedule, ScheduleError, Slice, Wave, check_schedule, compute_makespan
from planner.simulator import Simulation, simulate
from planner.solver import SolveResult

log = logging.getLogger(__name__)

ADOPTED = " schedule (baseline)"  # method suffix of a plan that is a baseline's schedule


def schedule_of(placed: PlacedSchedule) -> Schedule:
    """The wave schedule (counts, no device ids) of a placed one."""
    return Schedule(tuple(Wave(tuple(Slice(s.metaop, s.num_layers, len(s.devices)) for s in w.slices))
                          for w in placed.waves))


def runnable(problem: Problem, placed: PlacedSchedule, devices_per_node: int) -> str | None:
    """Why the runtime could not execute ``placed`` (None: it can): a tensor-parallel group across nodes, a layer at
    two TP degrees or in two TP groups on one device, a decode whose weights it cannot place
    (planner.generation.decode_refused), an edge of the program crossing phases."""
    ops = problem.graph.metaops
    degree: dict[tuple[str, int], int] = {}
    group_on: dict[tuple[str, int], list[tuple[range, tuple[int, ...]]]] = {}  # (group, device) -> its layers' TP groups
    for wave in placed.waves:
        for s in wave.slices:
            tp, group = s.layout.tp_degree, ops[s.metaop].param_group
            layers = range(s.first_layer, s.first_layer + s.num_layers)
            for layer in layers:
                if degree.setdefault((group, layer), tp) != tp:
                    return f"layer {layer} of {group} at two tensor-parallel degrees"
            for r in range(0, len(s.devices), tp) if tp > 1 else ():
                members = s.devices[r:r + tp]
                if members[0] // devices_per_node != members[-1] // devices_per_node:
                    return f"{ops[s.metaop].name}: a tensor-parallel group spans nodes"
                for d in members:
                    for other, held in group_on.setdefault((group, d), []):
                        first = max(other.start, layers.start)
                        if first < min(other.stop, layers.stop) and held != members:
                            return f"layer {first} of {group} in two tensor-parallel groups on device {d}"
                    group_on[group, d].append((layers, members))
    why = decode_refused(ops, placed)  # the weights a tensor-parallel decode needs (runtime.rollout.Roles)
    if why is not None:
        return why
    if len(placed.phases) > 1:
        phase = phase_of_waves(placed.phases, len(placed.waves))
        hosts = loss_hosts(ops, placed)
        for edge in plan_edges(ops, placed):
            target = edge.target if edge.consumer is not None else hosts[edge.task][0]
            if phase[edge.producer[0]] != phase[target[0]]:
                return "an edge crosses phases"
    return None


def adopt_best(problem: Problem, devices_per_node: int, chosen: tuple[SolveResult, PlacedSchedule, Simulation] | None,
               baselines: Sequence[BaselinePlan], error: PlanningError | None = None, bound_s: float = 0.0,
               ) -> tuple[SolveResult, PlacedSchedule, Simulation]:
    """The solver's ``chosen`` plan, or the baseline schedule predicted faster (strictly) that fits and runs; with no
    solver plan (none fitted: ``error``), the fastest such baseline, else ``error`` is raised. ``bound_s``: the
    compute lower bound an adopted schedule's gap is measured against."""
    best = chosen
    for b in sorted(baselines, key=lambda b: b.sim.iteration_time_s):  # stable: BASELINES order among equals
        if best is not None and b.sim.iteration_time_s >= best[2].iteration_time_s * (1 - 1e-12):
            break
        why = b.unfit or runnable(problem, b.placed, devices_per_node)
        if why is not None:
            log.info("baseline %s not adopted: %s", b.name, why)
            continue
        schedule = schedule_of(b.placed)
        try:
            check_schedule(problem, schedule)
            makespan = compute_makespan(problem, schedule)
        except (ScheduleError, KeyError):  # a role placement on memory-tightened layouts the job's curves do not pick
            if b.name not in RL_BASELINES:
                raise
            makespan = b.sim.compute_s
        bound = chosen[0].bound_s if chosen is not None else bound_s
        gap = (makespan - bound) / makespan if makespan > 0 else 0.0
        template = chosen[0] if chosen is not None else SolveResult(schedule, "baselines", "heuristic", makespan, bound,
                                                                     gap, b.name + ADOPTED)
        result = replace(template, schedule=schedule, status="heuristic", objective_s=makespan, gap=gap,
                         method=b.name + ADOPTED)
        log.info("adopted the %s baseline's schedule: %.4g s", b.name, b.sim.iteration_time_s)
        best = (result, b.placed, b.sim)
        break
    if best is None:
        assert error is not None
        raise error
    return best


UNSHARDED = ", optimizer unsharded"  # method suffix of a plan that steps without ZeRO-1 (training.shard_optimizer: auto)


def zero_choice(problem: Problem, sharded: CostModel, chosen: tuple[SolveResult, PlacedSchedule, Simulation],
                baselines: Sequence[BaselinePlan],
                ) -> tuple[tuple[SolveResult, PlacedSchedule, Simulation], CostModel, list[BaselinePlan]]:
    """``training.shard_optimizer: auto``: Loom's ``chosen`` plan and every baseline, each priced with ZeRO-1
    (``sharded``, what they were planned under) and without it, each at the faster setting that fits in device memory
    (ZeRO-1's all-gather of the updated weights can end the iteration where the first wave needs them at once; without
    it every holder steps all its parameters and keeps all their optimizer state). Then :func:`adopt_best` between
    them, so the rule holds in both settings. Returns the plan, the cost model it is priced with and the baselines as
    reported (their faster setting)."""
    plain = sharded.with_shard_optimizer(False)
    memory = sharded.hw.memory_bytes

    def fits(sim: Simulation) -> bool:
        return max(sim.peak_memory_bytes, default=0.0) <= memory

    result, placed, sim = chosen
    alone = simulate(problem, placed, plain)
    unsharded = {id(alone)}
    if fits(alone) and alone.iteration_time_s < sim.iteration_time_s * (1 - 1e-12):
        chosen = (replace(result, method=result.method + UNSHARDED), placed, alone)
    reported = []
    for b in baselines:
        other = simulate(problem, b.placed, plain)
        if fits(other) and (b.unfit or other.iteration_time_s < b.sim.iteration_time_s * (1 - 1e-12)):
            unsharded.add(id(other))
            b = replace(b, sim=other, unfit=None)
        reported.append(b)
    best = adopt_best(problem, sharded.hw.devices_per_node, chosen, reported)
    if id(best[2]) not in unsharded:
        return best, sharded, reported
    if not best[0].method.endswith(UNSHARDED):  # an adopted baseline's schedule, priced without ZeRO-1
        best = (replace(best[0], method=best[0].method + UNSHARDED), *best[1:])
    return best, plain, reported
