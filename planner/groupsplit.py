"""Sync-aware device split: every parameter group on a device range of its own, sized against its gradient sync.

The solver ranks schedules by compute and prices the gradient sync afterwards. At scale that order fails: a
parameter group whose MetaOps are spread over thousands of devices (or whose layers are split across waves on
different device sets, so each layer range is an all-reduce bucket of its own) pays a ring all-reduce whose latency
grows with its participants (``2 (P - 1)`` steps) and a ZeRO-1 all-gather after it; at 10,240 devices that is ten
times the compute. This search step trades device counts for sync instead:

1. **Sizes.** Each group ``g`` gets ``D_g`` devices, whole nodes (or a power-of-two share of one node), chosen to
   minimise ``max_g f_g(D_g)`` subject to ``sum D_g <= N``, where ``f_g(D)`` is the group's compute on ``D``
   devices (:func:`compute_estimate`: its MetaOps at counts in proportion to their work, the larger of the area and
   the longest one) plus the group's sync on those devices as :mod:`planner.sync` prices it (:func:`sync_estimate`:
   one bucket's all-reduce, the optimizer step of a device, the ZeRO-1 all-gather; 0 for frozen groups). A bisection
   over the ``f`` values finds the smallest achievable maximum; spare nodes then go to the slowest groups while
   they shorten them.
2. **Placement.** Groups take contiguous ranges (the largest first, so sub-node ranges share nodes without splitting
   any); inside its range a group's MetaOps are list-scheduled longest first (levels in order) on the earliest-free
   blocks of whole tensor-parallel groups. Every device of a range runs whole MetaOps of its group only, so each
   layer of the group is held by the same devices: one all-reduce bucket per group, over ``D_g`` devices, node-local
   when ``D_g`` fits in a node.

The result is a placed schedule in one phase (the timeline runs each range on its own, no barrier between ranges),
priced by the same simulator and memory-checked like every other candidate (``planner.api``). Deterministic and
pure; its cost is a few passes over MetaOps x candidate sizes plus one list schedule.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_right
from collections.abc import Sequence

import numpy as np

from planner.candidates import runnable, schedule_of
from planner.costmodel import CostModel
from planner.placement import GroupFacts, PlacedSchedule, PlacedSlice, PlacedWave, group_facts
from planner.program import row_bytes
from planner.schedule import Problem, compute_makespan
from planner.simulator import Simulation, simulate
from planner.solver import SolveResult
from planner.sync import SyncBucket, bucket_time, gather_time

log = logging.getLogger(__name__)

SPLIT_METHOD = "sync-aware group split"  # solver.method of a plan that is this split

MAX_SIZES = 96  # candidate sizes per group beyond the sub-node ones: all node counts up to this, then geometric


def groups_of(problem: Problem) -> dict[str, list[int]]:
    """Parameter group -> its MetaOp ids (id order), groups in order of first appearance."""
    out: dict[str, list[int]] = {}
    for op in problem.graph.metaops:
        out.setdefault(op.param_group, []).append(op.id)
    return out


def candidate_sizes(num_devices: int, unit: int) -> list[int]:
    """Device counts a group may get: powers of two below ``unit`` that divide it (a share of one node), then whole
    units (nodes): every count up to :data:`MAX_SIZES` units, a geometric grid (ratio ~1.03) beyond."""
    small = [s for s in (2 ** i for i in range(unit.bit_length())) if s < unit and unit % s == 0]
    units = num_devices // unit
    picked = set(range(1, min(units, MAX_SIZES) + 1))
    k = float(MAX_SIZES)
    while k < units:
        k *= 1.03
        picked.add(min(units, int(round(k))))
    return small + [u * unit for u in sorted(picked)]


def proportional_counts(problem: Problem, ops: Sequence[int], size: int) -> list[int] | None:
    """Each MetaOp's count on ``size`` devices: the largest valid count within its share of them (in proportion to
    its single-device work), at least its smallest count; None when some MetaOp has no valid count <= ``size``."""
    curves = [problem.curves[m] for m in ops]
    if any(c.counts[0] > size for c in curves):
        return None
    work = [c.times[0] * c.counts[0] * problem.layers(m) for m, c in zip(ops, curves)]
    total = sum(work)
    out = []
    for c, w in zip(curves, work):
        share = min(size, max(c.counts[0], size * w / total if total > 0 else size))
        out.append(c.counts[bisect_right(c.counts, share) - 1])
    return out


def compute_estimate(problem: Problem, ops: Sequence[int], counts: Sequence[int], size: int) -> float:
    """Seconds to run ``ops`` at ``counts`` on ``size`` devices: the larger of their device-seconds spread evenly and
    the longest one (list scheduling ends within the sum of the two)."""
    times = [problem.curves[m].time(n) * problem.layers(m) for m, n in zip(ops, counts)]
    area = sum(t * n for t, n in zip(times, counts)) / size
    return max(area, max(times, default=0.0))


def group_bucket(problem: Problem, facts: GroupFacts, group: str, ops: Sequence[int], counts: Sequence[int],
                 devices: Sequence[int]) -> SyncBucket | None:
    """The one all-reduce bucket of ``group`` (its ``facts``) held by ``devices`` (None for a frozen group)."""
    if not facts.trainable:
        return None
    layers = max(problem.layers(m) for m in ops)
    tp = max(problem.curves[m].layout(n).tp_degree for m, n in zip(ops, counts))
    return SyncBucket(group, tuple(range(layers)), tuple(devices), tp, layers * facts.params_per_layer)


def sync_estimate(cost_model: CostModel, bucket: SyncBucket | None) -> float:
    """Seconds after the group's last backward: its all-reduce, one device's optimizer step (its ZeRO-1 share
    when the optimizer is sharded), then the all-gather of the updated parameters."""
    if bucket is None:
        return 0.0
    shards = max(1, len(bucket.devices) // bucket.tp_degree) if cost_model.shard_optimizer else 1
    step = cost_model.optimizer_time(bucket.num_params / bucket.tp_degree / shards)
    return bucket_time(bucket, cost_model) + step + gather_time(bucket, cost_model)


def loss_hosts(problem: Problem, cost_model: CostModel) -> set[int]:
    """Per task, the leaf MetaOp to host its loss: the one with the largest output (the fewest bytes move to it)."""
    read = {d for op in problem.graph.metaops for d in op.deps}
    best: dict[str, tuple[float, int]] = {}
    for op in problem.graph.metaops:
        if op.id not in read:
            key = (output_bytes(problem, cost_model, op.id), -op.id)
            best[op.task] = max(best.get(op.task, key), key)
    return {-m for _, m in best.values()}


def output_bytes(problem: Problem, cost_model: CostModel, m: int) -> float:
    """Bytes of MetaOp ``m``'s output over its whole batch."""
    op = problem.graph.metaops[m]
    return op.batch_size * row_bytes(op, op.num_layers, cost_model.weight_bytes)


def outbound_bytes(problem: Problem, cost_model: CostModel, ops: Sequence[int], hosts: set[int]) -> float:
    """Bytes ``ops`` send out of their group's range: the outputs of leaves that do not host their task's loss and of
    MetaOps read by another group (an upper estimate: a consumer may share devices)."""
    graph = problem.graph
    succ = graph.successors()
    out = 0.0
    for m in ops:
        group = graph.metaops[m].param_group
        leaf_moves = not succ[m] and m not in hosts
        if leaf_moves or any(graph.metaops[c].param_group != group for c in succ[m]):
            out += output_bytes(problem, cost_model, m)
    return out


def transfer_estimate(cost_model: CostModel, nbytes: float, size: int) -> float:
    """Seconds to send ``nbytes`` out of a range of ``size`` devices and their gradients back, over its nodes'
    network links."""
    nodes = max(1, size // max(1, cost_model.hw.devices_per_node))
    return 2 * nbytes / (nodes * cost_model.hw.inter_bandwidth)


def group_costs(problem: Problem, cost_model: CostModel, facts: GroupFacts, group: str, ops: Sequence[int],
                sizes: Sequence[int], nbytes: float) -> list[float]:
    """``f_g(D)`` for every size ``D`` (inf where the group cannot run): compute plus sync plus the transfers out of
    the range (``nbytes``, :func:`outbound_bytes`), the sync priced on a range of ``D`` devices starting at a node
    boundary."""
    out = []
    for size in sizes:
        counts = proportional_counts(problem, ops, size)
        if counts is None:
            out.append(math.inf)
            continue
        bucket = group_bucket(problem, facts, group, ops, counts, range(size))
        out.append(compute_estimate(problem, ops, counts, size) + sync_estimate(cost_model, bucket)
                   + transfer_estimate(cost_model, nbytes, size))
    return out


def _fits(chosen: Sequence[int], unit: int, num_devices: int) -> bool:
    """Whether ranges of these sizes pack into the cluster: whole units, and the sub-unit powers of two (which
    pack without waste) rounded up to whole units."""
    whole = sum(s for s in chosen if s >= unit)
    part = sum(s for s in chosen if s < unit)
    return whole + math.ceil(part / unit) * unit <= num_devices


def split_sizes(problem: Problem, cost_model: CostModel) -> dict[str, int] | None:
    """The devices of every parameter group (step 1 of the module docstring); None when the groups do not fit
    side by side (more groups than devices, or a MetaOp whose smallest count is larger than what is left)."""
    num_devices = problem.num_devices
    unit = max(1, min(cost_model.hw.devices_per_node, num_devices))
    sizes = candidate_sizes(num_devices, unit)
    groups = groups_of(problem)
    facts, hosts = group_facts(problem), loss_hosts(problem, cost_model)
    costs = {g: group_costs(problem, cost_model, facts[g], g, ops, sizes,
                            outbound_bytes(problem, cost_model, ops, hosts)) for g, ops in groups.items()}

    computes = {g: [compute_estimate(problem, ops, counts, size) if counts is not None else math.inf
                    for size, counts in ((size, proportional_counts(problem, ops, size)) for size in sizes)]
                for g, ops in groups.items()}

    def lowest(values: dict[str, list[float]], within: float | None) -> dict[str, int] | None:
        """Per group the smallest size whose ``values`` are <= the smallest achievable maximum of them (with every
        group's total cost within ``within``); None when no sizes fit."""
        levels = sorted({f for fs in values.values() for f in fs if math.isfinite(f)})
        lo, hi, found = 0, len(levels) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            picked = {g: next((i for i, f in enumerate(values[g])
                               if f <= levels[mid] and (within is None or costs[g][i] <= within)), None)
                      for g in groups}
            if all(i is not None for i in picked.values()) and _fits([sizes[i] for i in picked.values()], unit,
                                                                      num_devices):
                found, hi = picked, mid - 1
            else:
                lo = mid + 1
        return found

    best = lowest(costs, None)  # the smallest achievable max_g f_g
    if best is None:
        return None
    # then, within that, the spare devices shorten the longest compute (the loss waits for every group's forward)
    best = lowest(computes, max(costs[g][i] for g, i in best.items())) or best
    return {g: sizes[i] for g, i in best.items()}


def group_ranges(sizes: dict[str, int], unit: int) -> dict[str, tuple[int, ...]]:
    """Contiguous device ranges of the given sizes, largest first (ties: the given order), so every range starts at
    a multiple of its size (sub-unit sizes are powers of two dividing ``unit``) and none splits a node needlessly."""
    order = sorted(sizes, key=lambda g: (-sizes[g], list(sizes).index(g)))
    out, start = {}, 0
    for g in order:
        out[g] = tuple(range(start, start + sizes[g]))
        start += sizes[g]
    return out


def list_schedule(problem: Problem, ops: Sequence[int], counts: Sequence[int], devices: Sequence[int],
                  ready: dict[int, float]) -> list[tuple[float, int, tuple[int, ...]]]:
    """``ops`` at ``counts`` on ``devices``: longest first within each level, each on the earliest-free blocks of
    whole tensor-parallel groups (aligned within the range), after its predecessors' estimated ends (``ready``,
    updated). Returns (start, MetaOp, devices) per MetaOp."""
    free = np.zeros(len(devices))
    out = []
    levels = problem.graph.metaops
    timed = {m: (problem.curves[m].time(n) * problem.layers(m), n) for m, n in zip(ops, counts)}
    for m in sorted(ops, key=lambda m: (levels[m].level, -timed[m][0], m)):
        seconds, n = timed[m]
        tp = problem.curves[m].layout(n).tp_degree
        blocks = free[: len(free) // tp * tp].reshape(-1, tp).max(axis=1)
        picked = np.sort(np.argsort(blocks, kind="stable")[: n // tp])
        local = (picked[:, None] * tp + np.arange(tp)).ravel()
        start = max(float(free[local].max()), max((ready.get(p, 0.0) for p in levels[m].deps), default=0.0))
        free[local] = start + seconds
        ready[m] = start + seconds
        out.append((start, m, tuple(int(devices[i]) for i in local)))
    return out


def group_split_schedule(problem: Problem, cost_model: CostModel) -> PlacedSchedule | None:
    """The sync-aware split as a placed schedule (one phase), or None when the groups do not fit side by side."""
    sizes = split_sizes(problem, cost_model)
    if sizes is None:
        return None
    unit = max(1, min(cost_model.hw.devices_per_node, problem.num_devices))
    groups = groups_of(problem)
    ranges = group_ranges(sizes, unit)
    ready: dict[int, float] = {}
    runs: list[tuple[int, float, int, tuple[int, ...]]] = []  # (level, start, MetaOp, devices)
    for level in sorted({op.level for op in problem.graph.metaops}):  # a level's predecessors are all scheduled
        for g, ops in groups.items():
            members = [m for m in ops if problem.graph.metaops[m].level == level]
            if not members:
                continue
            counts = proportional_counts(problem, members, sizes[g])
            if counts is None:
                return None
            runs += [(level, s, m, d) for s, m, d in list_schedule(problem, members, counts, ranges[g], ready)]
    hosts = loss_hosts(problem, cost_model)
    last_wave = np.full(problem.num_devices, -1)
    wave_of: dict[int, int] = {}
    waves: list[list[PlacedSlice]] = []
    # each device runs its slices in wave order: the loss hosts last, so each task's loss lands on its chosen host
    # (planner.program.loss_hosts takes the leaf in the latest wave)
    floor, stage = 0, None
    for level, host, _, m, devices in sorted((r[0], r[2] in hosts, r[1], r[2], r[3]) for r in runs):
        if (level, host) != stage:  # a level's hosts after every other slice of the level
            floor, stage = len(waves), (level, host)
        op = problem.graph.metaops[m]
        k = max([floor, int(last_wave[list(devices)].max()) + 1, *(wave_of[p] + 1 for p in op.deps)])
        while len(waves) <= k:
            waves.append([])
        waves[k].append(PlacedSlice(m, 0, op.num_layers, devices, problem.curves[m].layout(len(devices))))
        wave_of[m] = k
        last_wave[list(devices)] = k
    return PlacedSchedule(tuple(PlacedWave(tuple(sorted(w, key=lambda s: s.metaop))) for w in waves))


SPLIT_CPU_S_PER_CELL = 2e-7  # CPU seconds per MetaOp x device of building, placing and simulating the split


def affordable(problem: Problem, limit_s: float, reserve_s: float) -> bool:
    """Whether the split fits the time limit: its estimated CPU time is at most half of what the limit leaves
    after the finishing work (``reserve_s``). Decided from the limit, never the clock, so the plan is the same on
    a busy machine."""
    return SPLIT_CPU_S_PER_CELL * len(problem.graph) * problem.num_devices <= (limit_s - reserve_s) / 2


def group_split_candidate(problem: Problem, cost_model: CostModel, template: SolveResult | None, bound_s: float,
                          ) -> tuple[SolveResult, PlacedSchedule, Simulation] | None:
    """The split placed, simulated and checked like the solver's candidates: None when there is none, it does not
    fit in device memory or the runtime could not run it. ``template``: the solver's result whose fields (solver
    name, bound) the candidate's result keeps."""
    placed = group_split_schedule(problem, cost_model)
    if placed is None:
        return None
    sim = simulate(problem, placed, cost_model)
    if max(sim.peak_memory_bytes, default=0.0) > cost_model.hw.memory_bytes:
        log.info("sync-aware split does not fit in device memory")
        return None
    why = runnable(problem, placed, cost_model.hw.devices_per_node)
    if why is not None:
        log.info("sync-aware split not runnable: %s", why)
        return None
    schedule = schedule_of(placed)
    makespan = compute_makespan(problem, schedule)
    bound = template.bound_s if template is not None else bound_s
    gap = (makespan - bound) / makespan if makespan > 0 else 0.0
    result = SolveResult(schedule, template.solver if template is not None else "heuristic", "heuristic", makespan,
                         bound, gap, SPLIT_METHOD)
    return result, placed, sim
