"""Baselines: the comparison systems' predicted iteration times under Loom's cost model.

Owns :func:`run_baselines` and one function per baseline (:data:`BASELINES` lists the keys).
Spindle's wavefront is placed and simulated like Loom's own plan. The task-level systems are not
wave schedules. They are simulated with the same primitives (curve times,
the program's moves (:func:`~planner.program.forward_moves` / :func:`~planner.program.backward_moves`, priced by
:func:`~planner.simulator.move_flows` / :func:`~planner.simulator.boundary_time`) for data moving between MetaOps, :func:`~planner.sync.finish_iteration` over the devices that hold each
layer) under this model:

- A MetaOp runs whole (all its layers, ``curve.time(n) * L``) on the first ``n`` devices of the group
  its task runs on. ``n`` is the largest valid count <= the group size.
- A task runs its MetaOps as *stages*, one after another. Before a stage, the inputs of its MetaOps
  move from where their predecessors ran (one concurrent boundary). Like the waves of a plan, a
  task's stages run forward in order and backward in reverse (:func:`~planner.simulator.backward_ends`),
  each stage's compute split by its slowest MetaOp's passes; gradients cross the boundary back
  after the stage's backward.
- Gradient sync and the optimizer step follow the same rule as a plan's
  (:func:`~planner.sync.finish_iteration`): a bucket is ready when the backward of the stage
  that runs its layers has finished in the *last* task (in time) that runs them, since gradients
  accumulate over all tasks that use a parameter. It then overlaps with whatever compute follows
  (the rest of that task's backward, later tasks). The optimizer (ZeRO-1) steps once compute and the
  device's buckets are done. Memory is not checked; these are the systems' times, not plans Loom
  would run.

Systems:

- ``sequential`` (Megatron-LM / DeepSpeed): each task in turn on all N devices. Every MetaOp runs
  at its fastest valid count, and every component is replicated on all N devices, so each
  trainable group is all-reduced over N. A group shared by several tasks is reduced only once the
  last of them has run its backward, so its sync overlaps only with what runs after that.
- ``uniform``: ceil(N / #tasks) devices per task, the last tasks trimmed by one each until the
  sizes sum to N, and each raised to the task's smallest runnable size. Tasks run concurrently on
  disjoint contiguous groups; when the sizes exceed N (for instance #tasks > N), tasks are
  list-scheduled longest-first on the earliest-free devices. A task's buckets overlap with the
  backward of its own earlier stages (a group shared across tasks waits for the slowest of them).
- ``optimus`` (Spindle-Optimus): every task starts on its smallest runnable size (1 device when it
  fits). Spare devices then go greedily to the task with the best marginal gain
  ``(T(n) - T(n')) / (n' - n)``, where ``n'`` is the task's next size that makes it faster and
  ``T`` is its compute time. Tasks run concurrently as in ``uniform``.
- ``distmm_mt`` (DistMM-MT): tasks in turn on all N devices, synced like ``sequential``. Inside a
  task, the MetaOps of each MetaLevel (e.g. the encoders of different modalities) split the N
  devices in proportion to their single-device work, snapped to valid counts. Spare devices go to
  the slowest MetaOp; a level lasts as long as its slowest MetaOp.
- ``spindle``: Spindle's wavefront schedule, placed and simulated.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_right
from collections.abc import Sequence

from planner.costmodel import CostModel, Layout
from planner.placement import PlacedSlice, build_ledger, place_schedule
from planner.schedule import Problem, Schedule
from planner.program import backward_moves, forward_moves, row_bytes
from planner.simulator import Flows, Phase, backward_ends, boundary_time, move_flows, simulate, split_passes
from planner.sync import finish_iteration

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


def run_stages(
    problem: Problem, cost_model: CostModel, stages: Sequence[Stage], where: dict[int, PlacedSlice]
) -> list[Phase]:
    """The timeline phases of ``stages`` (one per stage), transfers between them included.

    Each MetaOp runs whole. Its input comes from where its predecessors ran (``where``, which this
    fills in). All flows into one stage form one concurrent boundary, forward and backward. A stage's
    compute is split into forward and backward by its slowest MetaOp's passes.
    """
    ops = problem.graph.metaops
    phases = []
    for stage in stages:
        forward: list[Flows] = []
        backward: list[Flows] = []
        longest, slowest = 0.0, stage[0][0]
        for m, devices in stage:
            layout = problem.curves[m].layout(len(devices))
            for d in ops[m].deps:
                src = where.get(d)
                if src is None:
                    continue
                per_row = row_bytes(ops[d], ops[d].num_layers, cost_model.weight_bytes)
                forward.append(move_flows(forward_moves(src.devices, src.layout, devices, layout, ops[d].batch_size),
                                          per_row))
                if ops[d].backward_factor > 0:
                    backward.append(move_flows(backward_moves(src.devices, src.layout, devices, layout,
                                                              ops[d].batch_size), per_row))
            where[m] = PlacedSlice(m, 0, ops[m].num_layers, devices, layout)
            seconds = problem.curves[m].time(len(devices)) * ops[m].num_layers
            if seconds > longest:
                longest, slowest = seconds, m
        fwd, bwd = split_passes(ops[slowest], longest)
        phases.append(Phase(fwd, bwd, boundary_time(forward, cost_model), boundary_time(backward, cost_model)))
    return phases


def run_task(
    problem: Problem, cost_model: CostModel, stages: Sequence[Stage], where: dict[int, PlacedSlice],
    ready: dict[int, float], start: float = 0.0,
) -> float:
    """Run ``stages`` forward then backward from ``start``; returns when they end.

    Fills ``where`` (see :func:`run_stages`) and ``ready[m]``: when the backward of MetaOp ``m``'s stage ends.
    """
    phases = run_stages(problem, cost_model, stages, where)
    ends, finish = backward_ends(phases, start)
    for stage, end in zip(stages, ends):
        for m, _ in stage:
            ready[m] = end
    return finish


def chain_stages(problem: Problem, ops: Sequence[int], group: Sequence[int]) -> list[Stage]:
    """A task's MetaOps one after another, each on the first (largest valid count) devices of ``group``."""
    stages = []
    for m in ops:
        n = largest_count(problem, m, len(group))
        assert n is not None, f"group of {len(group)} devices is too small for MetaOp {m}"
        stages.append([(m, tuple(group[:n]))])
    return stages


def _finish(
    problem: Problem, cost_model: CostModel, compute_end: float, where: dict[int, PlacedSlice], ready: dict[int, float]
) -> float:
    """Iteration time: compute ending at ``compute_end``, then the parameters as ``where`` holds them synced
    (each MetaOp's gradients final at ``ready[m]``, overlapping what follows) and stepped."""
    ms = sorted(where)
    ledger = build_ledger(problem, [where[m] for m in ms], cost_model)
    return finish_iteration(ledger, [ready[m] for m in ms], compute_end, cost_model).iteration_time_s


# --------------------------------------------------------------------------- sequential and DistMM-MT


def sequential_time(problem: Problem, cost_model: CostModel) -> float:
    """Megatron-LM / DeepSpeed style: each task in turn on all devices, components replicated everywhere."""
    everyone = tuple(range(problem.num_devices))
    where: dict[int, PlacedSlice] = {}
    ready: dict[int, float] = {}
    end = 0.0
    for _, ops in tasks_of(problem):
        end = run_task(problem, cost_model, chain_stages(problem, ops, everyone), where, ready, end)
    replicated = {}
    for m, s in where.items():  # every device holds every layer: the sync spans all N devices
        tp = s.layout.tp_degree
        replicated[m] = PlacedSlice(m, 0, s.num_layers, everyone, Layout(max(1, len(everyone) // tp), tp))
    return _finish(problem, cost_model, end, replicated, ready)


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


def distmm_mt_time(problem: Problem, cost_model: CostModel) -> float:
    """DistMM-MT: tasks in turn on all devices; each MetaLevel of a task splits them across its MetaOps."""
    where: dict[int, PlacedSlice] = {}
    ready: dict[int, float] = {}
    end = 0.0
    for _, ops in tasks_of(problem):
        levels: dict[int, list[int]] = {}
        for m in ops:
            levels.setdefault(problem.graph.metaops[m].level, []).append(m)
        stages = [st for lv in sorted(levels) for st in split_level(problem, levels[lv], problem.num_devices)]
        end = run_task(problem, cost_model, stages, where, ready, end)
    return _finish(problem, cost_model, end, where, ready)


# --------------------------------------------------------------------------- task-parallel: uniform, Optimus


def run_tasks_concurrently(problem: Problem, cost_model: CostModel, sizes: Sequence[int]) -> float:
    """Iteration time of the tasks run side by side on groups of ``sizes`` devices (in task order).

    When the sizes fit in N, groups are disjoint and contiguous and every task starts at 0. Otherwise
    tasks are list-scheduled longest-first (compute time at their size). Each one takes the
    ``size`` earliest-free devices and starts when the last of them is free.
    """
    tasks = tasks_of(problem)
    where: dict[int, PlacedSlice] = {}
    ready: dict[int, float] = {}
    if sum(sizes) <= problem.num_devices:
        start, makespan = 0, 0.0
        for (_, ops), size in zip(tasks, sizes):
            group = tuple(range(start, start + size))
            start += size
            makespan = max(makespan, run_task(problem, cost_model, chain_stages(problem, ops, group), where, ready))
        return _finish(problem, cost_model, makespan, where, ready)
    free = [0.0] * problem.num_devices
    order = sorted(range(len(tasks)), key=lambda t: (-task_compute(problem, tasks[t][1], sizes[t]), t))
    for t in order:
        group = tuple(sorted(sorted(range(problem.num_devices), key=lambda d: (free[d], d))[: sizes[t]]))
        begin = max(free[d] for d in group)
        end = run_task(problem, cost_model, chain_stages(problem, tasks[t][1], group), where, ready, begin)
        for d in group:
            free[d] = end
    return _finish(problem, cost_model, max(free), where, ready)


def uniform_sizes(num_tasks: int, num_devices: int) -> list[int]:
    """ceil(N / #tasks) per task, the last tasks trimmed by one each until the sizes sum to N (1 each when #tasks > N)."""
    if num_tasks > num_devices:
        return [1] * num_tasks
    base = math.ceil(num_devices / num_tasks)
    excess = base * num_tasks - num_devices
    return [base - (1 if t >= num_tasks - excess else 0) for t in range(num_tasks)]


def uniform_time(problem: Problem, cost_model: CostModel) -> float:
    """Uniform task split: equal device groups per task, tasks concurrent."""
    tasks = tasks_of(problem)
    even = uniform_sizes(len(tasks), problem.num_devices)
    sizes = [max(g, min_task_devices(problem, ops)) for g, (_, ops) in zip(even, tasks)]
    return run_tasks_concurrently(problem, cost_model, sizes)


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


def optimus_time(problem: Problem, cost_model: CostModel) -> float:
    """Spindle-Optimus: task-level marginal-gain allocation, tasks concurrent."""
    return run_tasks_concurrently(problem, cost_model, optimus_sizes(problem))


# --------------------------------------------------------------------------- Spindle and all of them


def spindle_time(problem: Problem, cost_model: CostModel, schedule: Schedule | None = None) -> float:
    """Spindle's wavefront schedule (computed when not given), placed without a memory check and simulated."""
    if schedule is None:
        from planner.spindle import spindle_schedule  # local: spindle is a sibling scheduler, imported on demand

        schedule = spindle_schedule(problem)
    placed = place_schedule(problem, schedule, cost_model, check_memory_limit=False, tp_within_nodes=False)
    return simulate(problem, placed, cost_model).iteration_time_s


def run_baselines(problem: Problem, cost_model: CostModel, spindle: Schedule | None = None) -> dict[str, float]:
    """Predicted iteration time (seconds) of every baseline in :data:`BASELINES`."""
    times = {
        "sequential": sequential_time(problem, cost_model),
        "uniform": uniform_time(problem, cost_model),
        "optimus": optimus_time(problem, cost_model),
        "distmm_mt": distmm_mt_time(problem, cost_model),
        "spindle": spindle_time(problem, cost_model, spindle),
    }
    for name, seconds in times.items():
        log.debug("baseline %s: %.4g s", name, seconds)
    return times
