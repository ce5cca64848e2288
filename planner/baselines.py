"""Baselines: the comparison systems' schedules, placed, memory-checked and priced by Loom's own simulator.

Owns :func:`baseline_plans` / :func:`run_baselines` and one schedule builder per baseline (:data:`BASELINES` lists
the keys). Every baseline is a :class:`~planner.placement.PlacedSchedule`, with phases (:mod:`planner.phases`) where
the system runs tasks one after another, so one simulator (:func:`~planner.simulator.simulate`: the per-device
timeline, the program's transfers, gradient sync overlapped with what follows, optimizer, all-gather) prices them
all, the memory ledger checks them (one that does not fit is marked), and Loom can adopt any of them
(:mod:`planner.candidates`). Shapes:

- A MetaOp runs whole (all its layers) on the first ``n`` devices of the group its task runs on, ``n`` the largest
  valid count <= the group size, at the curve's layout for ``n``.
- A task runs its MetaOps as *stages* in consecutive waves (a stage waits for its MetaOps' predecessors). The
  timeline runs each device group on its own: no barrier with other groups.

Systems:

- ``sequential`` (Megatron-LM / DeepSpeed): each task in turn on all N devices, each task a phase of its own, so its
  gradient sync overlaps the next task's compute and its activations are freed before the next task runs. Every
  MetaOp runs at its fastest valid count.
- ``uniform``: ceil(N / #tasks) devices per task, the last tasks trimmed by one each until the sizes sum to N, and
  each raised to the task's smallest runnable size. Tasks run concurrently on disjoint contiguous groups (one
  phase); when the sizes exceed N (for instance #tasks > N), tasks are list-scheduled longest-first (compute time at
  their size) on the earliest-free devices, a task running in the phase after the last task on any of its devices.
- ``optimus`` (Spindle-Optimus): every task starts on its smallest runnable size (1 device when it fits). Spare
  devices then go greedily to the task with the best marginal gain ``(T(n) - T(n')) / (n' - n)``, where ``n'`` is
  the task's next size that makes it faster and ``T`` is its compute time. Tasks run concurrently as in ``uniform``.
- ``distmm_mt`` (DistMM-MT): tasks in turn on all N devices, each a phase, as ``sequential``. Inside a task, the
  MetaOps of each MetaLevel (e.g. the encoders of different modalities) split the N devices in proportion to their
  single-device work, snapped to valid counts (one wave). Spare devices go to the slowest MetaOp.
- ``spindle``: Spindle's wavefront schedule, placed (without a memory check) like Loom's own candidates.

A task-in-turn shape whose program would cross phases (a MetaOp reading another task's output: only synthetic
problems) runs as one phase instead.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from planner.costmodel import CostModel
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave, check_memory, placed_ledger, place_schedule
from planner.errors import PlanningError
from planner.schedule import Problem, Schedule
from planner.simulator import Simulation, one_f_one_b_if_no_slower, simulate

if TYPE_CHECKING:  # rlbaselines builds on this module
    from planner.rlbaselines import RoleBudget

log = logging.getLogger(__name__)

BASELINES: tuple[str, ...] = ("sequential", "uniform", "optimus", "distmm_mt", "spindle")

Stage = list[tuple[int, tuple[int, ...]]]  # MetaOps running concurrently, each on its devices


# --------------------------------------------------------------------------- shared primitives


def tasks_of(problem: Problem) -> list[tuple[str, list[int]]]:
    """Tasks in order of first appearance, each with its MetaOp ids in topological (id) order."""
    out: dict[str, list[int]] = {}
    for op in problem.graph.metaops:
        out.setdefault(op.task, []).append(op.id)
    return list(out.items())


def largest_count(problem: Problem, m: int, num_devices: int) -> int | None:
    """The largest valid count of MetaOp ``m`` that is <= ``num_devices`` (None when there is none)."""
    counts = problem.curves[m].counts
    i = bisect_right(counts, num_devices) - 1
    return counts[i] if i >= 0 else None


def min_task_devices(problem: Problem, ops: Sequence[int]) -> int:
    """The smallest group that can run every MetaOp of a task."""
    return max(problem.curves[m].counts[0] for m in ops)


def task_compute(problem: Problem, ops: Sequence[int], num_devices: int) -> float:
    """Compute seconds of a task's MetaOps run one after another on a group of ``num_devices``."""
    total = 0.0
    for m in ops:
        n = largest_count(problem, m, num_devices)
        total += math.inf if n is None else problem.curves[m].time(n) * problem.layers(m)
    return total


def chain_stages(problem: Problem, ops: Sequence[int], group: Sequence[int]) -> list[Stage]:
    """A task's MetaOps one after another, each on the first (largest valid count) devices of ``group``."""
    stages = []
    for m in ops:
        n = largest_count(problem, m, len(group))
        assert n is not None, f"group of {len(group)} devices is too small for MetaOp {m}"
        stages.append([(m, tuple(group[:n]))])
    return stages


def split_level(problem: Problem, ops: Sequence[int], num_devices: int) -> list[Stage]:
    """DistMM's split of ``num_devices`` across independent MetaOps, in proportion to single-device work.

    One stage, with contiguous device ranges in MetaOp order. When the MetaOps' smallest counts do
    not fit together, they run one after another at their fastest counts instead.
    """
    curves = [problem.curves[m] for m in ops]
    if len(ops) == 1 or sum(c.counts[0] for c in curves) > num_devices:
        return [[(m, tuple(range(c.counts[-1])))] for m, c in zip(ops, curves)]
    work = [c.times[0] * c.counts[0] * problem.layers(m) for m, c in zip(ops, curves)]
    counts = []
    for m, c, w in zip(ops, curves, work):
        share = num_devices * w / sum(work)
        counts.append(largest_count(problem, m, math.floor(share)) or c.counts[0])
    while sum(counts) > num_devices:  # snapping up to a smallest count overshot: shrink the widest
        i = max((i for i in range(len(ops)) if counts[i] > curves[i].counts[0]), key=lambda i: (counts[i], -i))
        counts[i] = curves[i].counts[curves[i].index(counts[i]) - 1]
    while True:  # spare devices: widen the slowest MetaOp that can grow within them
        spare = num_devices - sum(counts)
        growable = [i for i in range(len(ops))
                    if counts[i] != curves[i].counts[-1]
                    and curves[i].counts[curves[i].index(counts[i]) + 1] - counts[i] <= spare]
        if not growable:
            break
        i = max(growable, key=lambda i: (curves[i].time(counts[i]) * problem.layers(ops[i]), -i))
        counts[i] = curves[i].counts[curves[i].index(counts[i]) + 1]
    stage, start = [], 0
    for m, n in zip(ops, counts):
        stage.append((m, tuple(range(start, start + n))))
        start += n
    return [stage]


def uniform_sizes(num_tasks: int, num_devices: int) -> list[int]:
    """ceil(N / #tasks) per task, the last tasks trimmed by one each until the sizes sum to N (1 each when #tasks > N)."""
    if num_tasks > num_devices:
        return [1] * num_tasks
    base = math.ceil(num_devices / num_tasks)
    excess = base * num_tasks - num_devices
    return [base - (1 if t >= num_tasks - excess else 0) for t in range(num_tasks)]


def optimus_sizes(problem: Problem) -> list[int]:
    """Spindle-Optimus' allocation: greedy by marginal gain of task compute time per extra device."""
    tasks = tasks_of(problem)
    sizes = [min_task_devices(problem, ops) for _, ops in tasks]
    if sum(sizes) > problem.num_devices:
        return sizes
    # A task's time only drops where one of its MetaOps reaches a new valid count.
    steps = []
    for (_, ops), size in zip(tasks, sizes):
        points = sorted({n for m in ops for n in problem.curves[m].counts if n >= size})
        steps.append([(n, task_compute(problem, ops, n)) for n in points])
    position = [0] * len(tasks)
    spare = problem.num_devices - sum(sizes)
    while True:
        best, best_gain = None, 0.0
        for t, pts in enumerate(steps):
            if position[t] + 1 >= len(pts):
                continue
            (n0, t0), (n1, t1) = pts[position[t]], pts[position[t] + 1]
            gain = (t0 - t1) / (n1 - n0)
            if n1 - n0 <= spare and gain > best_gain:
                best, best_gain = t, gain
        if best is None:
            return sizes
        position[best] += 1
        spare -= steps[best][position[best]][0] - sizes[best]
        sizes[best] = steps[best][position[best]][0]


class _Builder:
    """Waves and phases of a baseline being built: stages go into the earliest wave after their MetaOps' predecessors
    and after a given wave, within the current phase."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.waves: list[list[PlacedSlice]] = []
        self.wave_of: dict[int, int] = {}
        self.starts = [0]
        self.crossing = False  # a stage reads an earlier phase's output: the whole schedule becomes one phase

    def new_phase(self) -> None:
        if len(self.waves) > self.starts[-1]:
            self.starts.append(len(self.waves))

    def put(self, stage: Stage, after: int = -1) -> int:
        """Place ``stage`` in the earliest wave > ``after`` (and > its MetaOps' predecessors' waves); returns it."""
        ops = self.problem.graph.metaops
        deps = [self.wave_of[d] for m, _ in stage for d in ops[m].deps if d in self.wave_of]
        self.crossing |= any(k < self.starts[-1] for k in deps)
        k = max([after + 1, self.starts[-1], *(k + 1 for k in deps)])
        while len(self.waves) <= k:
            self.waves.append([])
        for m, devices in stage:
            layout = self.problem.curves[m].layout(len(devices))
            self.waves[k].append(PlacedSlice(m, 0, ops[m].num_layers, tuple(devices), layout))
            self.wave_of[m] = k
        return k

    def put_slice(self, m: int, first_layer: int, num_layers: int, devices: tuple[int, ...], after: int = -1) -> int:
        """Layers ``first_layer .. first_layer + num_layers`` of MetaOp ``m`` on ``devices`` in the earliest wave >
        ``after`` (and > its predecessors' waves); returns it. A MetaOp split so runs its parts in the waves given."""
        ops = self.problem.graph.metaops
        deps = [self.wave_of[d] for d in ops[m].deps if d in self.wave_of]
        self.crossing |= any(k < self.starts[-1] for k in deps)
        k = max([after + 1, self.starts[-1], *(k + 1 for k in deps)])
        while len(self.waves) <= k:
            self.waves.append([])
        layout = self.problem.curves[m].layout(len(devices))
        self.waves[k].append(PlacedSlice(m, first_layer, num_layers, tuple(devices), layout))
        self.wave_of[m] = k
        return k

    def placed(self) -> PlacedSchedule:
        phases = (0,) if self.crossing else tuple(self.starts)
        return PlacedSchedule(tuple(PlacedWave(tuple(w)) for w in self.waves), phases)


def run_chain(builder: _Builder, stages: Sequence[Stage]) -> None:
    """A task's stages one after another, from the start of the builder's current phase."""
    k = -1
    for stage in stages:
        k = builder.put(stage, k)


# --------------------------------------------------------------------------- the schedules


def sequential_schedule(problem: Problem) -> PlacedSchedule:
    """Megatron-LM / DeepSpeed style: each task in turn (a phase) on all devices, each MetaOp at its fastest count."""
    everyone = tuple(range(problem.num_devices))
    builder = _Builder(problem)
    for _, ops in tasks_of(problem):
        builder.new_phase()
        run_chain(builder, chain_stages(problem, ops, everyone))
    return builder.placed()


def distmm_mt_schedule(problem: Problem) -> PlacedSchedule:
    """DistMM-MT: tasks in turn (phases) on all devices; each MetaLevel of a task splits them across its MetaOps."""
    builder = _Builder(problem)
    for _, ops in tasks_of(problem):
        levels: dict[int, list[int]] = {}
        for m in ops:
            levels.setdefault(problem.graph.metaops[m].level, []).append(m)
        builder.new_phase()
        run_chain(builder, [st for lv in sorted(levels) for st in split_level(problem, levels[lv], problem.num_devices)])
    return builder.placed()


def concurrent_schedule(problem: Problem, sizes: Sequence[int]) -> PlacedSchedule:
    """The tasks side by side on groups of ``sizes`` devices (in task order).

    When the sizes fit in N, groups are disjoint and contiguous and every task starts in wave 0 (one phase).
    Otherwise tasks are list-scheduled longest-first (compute time at their size): each takes the ``size``
    earliest-free devices and runs in the phase after the last task on any of them."""
    tasks = tasks_of(problem)
    builder = _Builder(problem)
    if sum(sizes) <= problem.num_devices:
        start = 0
        for (_, ops), size in zip(tasks, sizes):
            run_chain(builder, chain_stages(problem, ops, tuple(range(start, start + size))))
            start += size
        return builder.placed()
    free = [0.0] * problem.num_devices
    phase_on = [-1] * problem.num_devices
    rounds: dict[int, list[tuple[list[int], tuple[int, ...]]]] = {}
    order = sorted(range(len(tasks)), key=lambda t: (-task_compute(problem, tasks[t][1], sizes[t]), t))
    for t in order:
        group = tuple(sorted(sorted(range(problem.num_devices), key=lambda d: (free[d], d))[: sizes[t]]))
        end = max(free[d] for d in group) + task_compute(problem, tasks[t][1], sizes[t])
        phase = 1 + max(phase_on[d] for d in group)
        for d in group:
            free[d], phase_on[d] = end, phase
        rounds.setdefault(phase, []).append((tasks[t][1], group))
    for phase in sorted(rounds):
        builder.new_phase()
        for ops, group in rounds[phase]:
            run_chain(builder, chain_stages(problem, ops, group))
    return builder.placed()


def uniform_schedule(problem: Problem) -> PlacedSchedule:
    """Uniform task split: equal device groups per task, tasks concurrent."""
    tasks = tasks_of(problem)
    even = uniform_sizes(len(tasks), problem.num_devices)
    return concurrent_schedule(problem, [max(g, min_task_devices(problem, ops)) for g, (_, ops) in zip(even, tasks)])


def optimus_schedule(problem: Problem) -> PlacedSchedule:
    """Spindle-Optimus: task-level marginal-gain allocation, tasks concurrent."""
    return concurrent_schedule(problem, optimus_sizes(problem))


def spindle_placed(problem: Problem, cost_model: CostModel, schedule: Schedule | None = None) -> PlacedSchedule:
    """Spindle's wavefront schedule (computed when not given), placed without a memory check."""
    if schedule is None:
        from planner.spindle import spindle_schedule  # local: spindle is a sibling scheduler, imported on demand

        schedule = spindle_schedule(problem)
    return place_schedule(problem, schedule, cost_model, check_memory_limit=False, tp_within_nodes=False)


# --------------------------------------------------------------------------- all of them


@dataclass(frozen=True)
class BaselinePlan:
    """One baseline's placed schedule, its simulation, and why it does not fit in device memory (None: it fits)."""

    name: str
    placed: PlacedSchedule
    sim: Simulation
    unfit: str | None


def baseline_schedules(problem: Problem, cost_model: CostModel, spindle: Schedule | None = None,
                       rl_budget: RoleBudget | None = None) -> dict[str, PlacedSchedule]:
    """Every baseline's placed schedule, keyed as :data:`BASELINES`, then (an RL-shaped job: a use that does not
    train) the colocated and best split role placements (planner.rlbaselines; each search within ``rl_budget``, its
    default when None)."""
    from planner.rlbaselines import RoleBudget, rl_schedules  # local: rlbaselines builds on this module

    return {
        "sequential": sequential_schedule(problem),
        "uniform": uniform_schedule(problem),
        "optimus": optimus_schedule(problem),
        "distmm_mt": distmm_mt_schedule(problem),
        "spindle": spindle_placed(problem, cost_model, spindle),
        **{name: placed for name, (placed, _) in rl_schedules(
            problem, cost_model, RoleBudget() if rl_budget is None else rl_budget).items()},
    }


def memory_error(problem: Problem, placed: PlacedSchedule, cost_model: CostModel) -> str | None:
    """Why ``placed`` does not fit in device memory (the ledger's error line), or None."""
    try:
        check_memory(placed_ledger(problem, placed, cost_model), cost_model.hw.memory_bytes,
                     max(1, cost_model.hw.devices_per_node))
    except PlanningError as exc:
        return str(exc)
    return None


def baseline_plans(problem: Problem, cost_model: CostModel, spindle: Schedule | None = None,
                   rl_budget: RoleBudget | None = None) -> list[BaselinePlan]:
    """Every baseline placed, simulated and memory-checked, in :data:`BASELINES` order (``rl_budget``: see
    :func:`baseline_schedules`)."""
    out = []
    for name, placed in baseline_schedules(problem, cost_model, spindle, rl_budget).items():
        sim = simulate(problem, placed, cost_model)  # its peaks are the ledger's: only an unfit plan needs the message
        if cost_model.in_flight > 1:  # pipelined: walked 1F1B where that is no slower, as Loom's plan is
            sim = one_f_one_b_if_no_slower(problem, cost_model, placed, sim)[1]
        fits = max(sim.peak_memory_bytes, default=0.0) <= cost_model.hw.memory_bytes
        out.append(BaselinePlan(name, placed, sim, None if fits else memory_error(problem, placed, cost_model)))
        log.debug("baseline %s: %.4g s%s", name, sim.iteration_time_s, " (does not fit)" if out[-1].unfit else "")
    return out


def run_baselines(problem: Problem, cost_model: CostModel, spindle: Schedule | None = None) -> dict[str, float]:
    """Predicted iteration time (seconds) of every baseline in :data:`BASELINES`."""
    return {b.name: b.sim.iteration_time_s for b in baseline_plans(problem, cost_model, spindle)}
