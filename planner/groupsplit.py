"""Sync-aware device split: every parameter group on device ranges of its own, sized against its gradient sync.

The solver ranks schedules by compute and prices the gradient sync afterwards. At scale that order fails: a
parameter group whose MetaOps are spread over thousands of devices (or whose layers are split across waves on
different device sets, so each layer range is an all-reduce bucket of its own) pays a ring all-reduce whose latency
grows with its participants (``2 (P - 1)`` steps) and a ZeRO-1 all-gather after it; at 10,240 devices that is ten
times the compute. This search step trades device counts for sync instead:

1. **Units.** Every parameter group is a unit; with ``stages`` > 1 each heavy trainable group (:data:`HEAVY_SHARE`)
   is cut into that many pipeline stages (near-equal runs of every MetaOp's layers), each a unit of its own: a
   stage's bucket holds only its layers, on its own devices, so the stages' all-reduces run side by side, each
   over fewer participants and bytes, at the price of the activations that move between stages and of a
   pipeline without micro-batches.
2. **Sizes.** Each unit ``u`` gets ``D_u`` devices, whole nodes (or a power-of-two share of one node), chosen to
   minimise ``max_u f_u(D_u)`` subject to ``sum D_u <= N``, where ``f_u(D)`` (:func:`unit_costs`) is the unit's
   compute on ``D`` devices (its slices at counts in proportion to their work, the larger of the area and the
   longest one) plus its sync on those devices as :mod:`planner.sync` prices it (:func:`sync_estimate`: one bucket's
   all-reduce, the optimizer step of a device, the ZeRO-1 all-gather; 0 for frozen groups) plus the activations it
   sends out of its range and their gradients back (:func:`transfer_estimate`). A bisection over the ``f`` values
   finds the smallest achievable maximum; a second one spends the spare devices on the longest compute within it.
3. **Placement.** Units take contiguous ranges (the largest first, so sub-node ranges share nodes without splitting
   any); inside its range a unit's slices are list-scheduled longest first (levels, then stages, in order) on the
   earliest-free blocks of whole tensor-parallel groups, after their inputs. Every device of a range runs that
   unit's layers only, so each unit is one all-reduce bucket over ``D_u`` devices, node-local when ``D_u`` fits in a
   node. Each task's loss goes to its leaf with the largest output (:func:`chosen_hosts`).

The result is a placed schedule in one phase (the timeline runs each range on its own, no barrier between ranges),
priced by the same simulator and memory-checked like every other candidate: :func:`group_split_candidate` builds it
for each of :data:`STAGES` and keeps the fastest (``planner.api``). Deterministic and pure; its cost is a few
vectorised passes over MetaOps x candidate sizes plus one list schedule and one simulation per stage count.
"""
from __future__ import annotations

import logging
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from planner.candidates import runnable, schedule_of
from planner.costmodel import CostModel
from planner.placement import GroupFacts, PlacedSchedule, PlacedSlice, PlacedWave, group_facts
from planner.program import row_bytes
from planner.schedule import Problem, compute_makespan, memory_tightened
from planner.simulator import Simulation, simulate
from planner.solver import SolveResult
from planner.sync import SyncBucket, bucket_time, gather_time

log = logging.getLogger(__name__)

SPLIT_METHOD = "sync-aware group split"  # solver.method of a plan that is this split

MAX_SIZES = 32  # candidate sizes per unit beyond the sub-node ones: all node counts up to this, then geometric
STAGES = (1, 2, 4)  # pipeline stages tried for the heavy groups (planner.api keeps the fastest simulated)
STAGE_FILL = 0.8  # of a device's memory one stage's layers may take when its layouts are chosen to fit (the rest:
# activations and the other units' slices); tried for a stage count above 1 whose split on the job's own layouts
# does not fit (building such curves visits every count of every MetaOp: not for plans that fit)
HEAVY_SHARE = 0.25  # a trainable group is heavy (split into stages) when it holds this share of the largest's params


@dataclass(frozen=True)
class Unit:
    """Stage ``stage`` of ``stages`` of parameter group ``group``: layers ``[first(m), first(m) + count(m))`` of each
    of its MetaOps ``ops``, on a device range of its own."""

    group: str
    stage: int
    stages: int
    ops: tuple[int, ...]
    # the stages' shares of the layers (every stage of the group the same tuple); None: near-equal runs
    weights: tuple[float, ...] | None = None

    def layers(self, problem: Problem, m: int) -> tuple[int, int]:
        """(first layer, layer count) of MetaOp ``m`` in this stage: its layers cut into ``stages`` runs, near-equal or
        in proportion to ``weights`` (each stage at least one layer)."""
        total = problem.layers(m)
        if self.weights is None:
            first = total * self.stage // self.stages
            return first, total * (self.stage + 1) // self.stages - first
        cuts = np.cumsum((0.0, *self.weights)) / sum(self.weights) * (total - self.stages)
        first, end = (int(round(cuts[i])) + i for i in (self.stage, self.stage + 1))
        return first, end - first


def balanced_units(problem: Problem, units: Sequence[Unit], sizes: Sequence[int]) -> list[Unit] | None:
    """``units`` with each staged group's layers cut in proportion to what its stages' ranges run per second (a layer of
    every MetaOp, level by level at their :func:`proportional_counts` on the range, each level the larger of its
    device-seconds spread over the range and its longest, as :func:`unit_costs` prices compute), so that a
    stage on fewer devices gets fewer layers and the pipeline's slowest stage shortens; None when every staged
    group's ranges are alike (the near-equal cut is that already)."""
    rates: dict[str, list[float]] = {}
    levels = sorted({op.level for op in problem.graph.metaops})
    for u, size in zip(units, sizes):
        if u.stages == 1:
            continue
        per_layer = 0.0  # a layer of every MetaOp, level after level as group_split_schedule runs them
        for level in levels:
            members = tuple(m for m in u.ops if problem.graph.metaops[m].level == level)
            counts = proportional_counts(problem, replace(u, ops=members), size) if members else []
            if counts is None:
                return None
            times = [problem.curves[m].time(n) for m, n in zip(members, counts)]
            if times:  # as unit_costs prices compute: the larger of the area and the longest
                per_layer += max(sum(t * n for t, n in zip(times, counts)) / size, max(times))
        rates.setdefault(u.group, []).append(1.0 / per_layer)
    if all(max(r) <= min(r) * (1 + 1e-9) for r in rates.values()):
        return None
    return [replace(u, weights=tuple(rates[u.group])) if u.stages > 1 else u for u in units]


def groups_of(problem: Problem) -> dict[str, list[int]]:
    """Parameter group -> its MetaOp ids (id order), groups in order of first appearance."""
    out: dict[str, list[int]] = {}
    for op in problem.graph.metaops:
        out.setdefault(op.param_group, []).append(op.id)
    return out


def units_of(problem: Problem, stages: int) -> list[Unit]:
    """Every group as one unit, the heavy trainable ones (:data:`HEAVY_SHARE`) cut into ``stages`` stages when every
    MetaOp of theirs has that many layers."""
    facts = group_facts(problem)
    params = {g: f.params_per_layer * max(problem.layers(m) for m in f.metaops) for g, f in facts.items()
              if f.trainable}
    heaviest = max(params.values(), default=0.0)
    out = []
    for g, ops in groups_of(problem).items():
        k = stages if (params.get(g, 0.0) >= HEAVY_SHARE * heaviest > 0
                       and min(problem.layers(m) for m in ops) >= stages) else 1
        out += [Unit(g, s, k, tuple(ops)) for s in range(k)]
    return out


def candidate_sizes(num_devices: int, unit: int) -> list[int]:
    """Device counts a unit may get: powers of two below ``unit`` that divide it (a share of one node), then whole
    units (nodes): every count up to :data:`MAX_SIZES` units, a geometric grid (ratio ~1.04) beyond."""
    small = [s for s in (2 ** i for i in range(unit.bit_length())) if s < unit and unit % s == 0]
    units = num_devices // unit
    picked = set(range(1, min(units, MAX_SIZES) + 1))
    k = float(MAX_SIZES)
    while k < units:
        k *= 1.04
        picked.add(min(units, int(round(k))))
    return small + [u * unit for u in sorted(picked)]


def proportional_counts(problem: Problem, u: Unit, size: int) -> list[int] | None:
    """Each MetaOp's count on ``size`` devices: the largest valid count within its share of them (in proportion to
    its single-device work), at least its smallest count; None when some MetaOp has no valid count <= ``size``."""
    curves = [problem.curves[m] for m in u.ops]
    if any(c.counts[0] > size for c in curves):
        return None
    work = [c.times[0] * c.counts[0] * u.layers(problem, m)[1] for m, c in zip(u.ops, curves)]
    total = sum(work)
    out = []
    for c, w in zip(curves, work):
        share = min(size, max(c.counts[0], size * w / total if total > 0 else size))
        out.append(c.counts[bisect_right(c.counts, share) - 1])
    return out


def sync_estimate(cost_model: CostModel, bucket: SyncBucket | None) -> float:
    """Seconds after the unit's last backward: its all-reduce, one device's optimizer step (its ZeRO-1 share
    when the optimizer is sharded), then the all-gather of the updated parameters."""
    if bucket is None:
        return 0.0
    shards = max(1, len(bucket.devices) // bucket.tp_degree) if cost_model.shard_optimizer else 1
    step = cost_model.optimizer_time(bucket.num_params / bucket.tp_degree / shards)
    return bucket_time(bucket, cost_model) + step + gather_time(bucket, cost_model)


def chosen_hosts(problem: Problem, cost_model: CostModel) -> set[int]:
    """Per task, the leaf MetaOp to host its loss: the one with the largest output (the fewest bytes move to it)."""
    read = {d for op in problem.graph.metaops for d in op.deps}
    best: dict[str, tuple[float, int]] = {}
    for op in problem.graph.metaops:
        if op.id not in read:
            key = (output_bytes(problem, cost_model, op.id, op.num_layers), -op.id)
            best[op.task] = max(best.get(op.task, key), key)
    return {-m for _, m in best.values()}


def output_bytes(problem: Problem, cost_model: CostModel, m: int, boundary: int) -> float:
    """Bytes of MetaOp ``m``'s activation after ``boundary`` layers, over its whole batch."""
    op = problem.graph.metaops[m]
    return op.batch_size * row_bytes(op, boundary, cost_model.weight_bytes)


def outbound_bytes(problem: Problem, cost_model: CostModel, u: Unit, hosts: set[int]) -> float:
    """Bytes the unit sends out of its range: to its next stage, or from its last one the outputs of leaves that
    do not host their task's loss and of MetaOps read by another group (an upper estimate: a consumer may share
    devices)."""
    graph = problem.graph
    succ = graph.successors()
    out = 0.0
    for m in u.ops:
        first, count = u.layers(problem, m)
        if u.stage + 1 < u.stages:
            out += output_bytes(problem, cost_model, m, first + count)
            continue
        leaf_moves = not succ[m] and m not in hosts
        if leaf_moves or any(graph.metaops[c].param_group != u.group for c in succ[m]):
            out += output_bytes(problem, cost_model, m, first + count)
    return out


def transfer_estimate(cost_model: CostModel, nbytes: float, size: int) -> float:
    """Seconds to send ``nbytes`` out of a range of ``size`` devices and their gradients back, over its nodes'
    network links."""
    nodes = max(1, size // max(1, cost_model.hw.devices_per_node))
    return 2 * nbytes / (nodes * cost_model.hw.inter_bandwidth)


def unit_costs(problem: Problem, cost_model: CostModel, facts: GroupFacts, u: Unit, sizes: Sequence[int],
               nbytes: float) -> tuple[list[float], list[float]]:
    """Per size ``D`` (inf where the unit cannot run): its compute, vectorised over the sizes (its slices at
    :func:`proportional_counts`: the larger of their device-seconds spread evenly and the longest one, since list
    scheduling ends within the sum of the two), and ``f(D)``: that plus its sync on a range of ``D`` devices from a
    node boundary plus the transfers out of the range (``nbytes``)."""
    size = np.asarray(sizes, dtype=float)
    curves = [problem.curves[m] for m in u.ops]
    work = [c.times[0] * c.counts[0] * u.layers(problem, m)[1] for m, c in zip(u.ops, curves)]
    total_work = sum(work)
    runnable_at = size >= max(c.counts[0] for c in curves)
    area, longest, tp = np.zeros(len(size)), np.zeros(len(size)), np.ones(len(size), dtype=np.int64)
    for m, c, w in zip(u.ops, curves, work):
        share = np.minimum(size, np.maximum(c.counts[0], size * w / total_work if total_work > 0 else size))
        idx = np.maximum(np.searchsorted(np.asarray(c.counts, dtype=float), share, side="right") - 1, 0)
        seconds = np.asarray(c.times)[idx] * u.layers(problem, m)[1]
        area += seconds * np.asarray(c.counts)[idx]
        longest = np.maximum(longest, seconds)
        tp = np.maximum(tp, np.asarray([layout.tp_degree for layout in c.layouts])[idx])
    compute = np.where(runnable_at, np.maximum(area / size, longest), np.inf)
    first, count = max((u.layers(problem, m) for m in u.ops), key=lambda fc: fc[1])
    total = []
    for j, d in enumerate(sizes):
        if not runnable_at[j]:
            total.append(math.inf)
            continue
        bucket = (SyncBucket(u.group, tuple(range(first, first + count)), tuple(range(d)), int(tp[j]),
                             count * facts.params_per_layer) if facts.trainable else None)
        total.append(float(compute[j]) + sync_estimate(cost_model, bucket) + transfer_estimate(cost_model, nbytes, d))
    return [float(x) for x in compute], total


def _fits(chosen: Sequence[int], unit: int, num_devices: int) -> bool:
    """Whether ranges of these sizes pack into the cluster: whole units, and the sub-unit powers of two (which
    pack without waste) rounded up to whole units."""
    whole = sum(s for s in chosen if s >= unit)
    part = sum(s for s in chosen if s < unit)
    return whole + math.ceil(part / unit) * unit <= num_devices


def split_sizes(problem: Problem, cost_model: CostModel, units: Sequence[Unit]) -> list[int] | None:
    """The devices of every unit (step 1 of the module docstring); None when the units do not fit side by side
    (more of them than devices, or a MetaOp whose smallest count is larger than what is left)."""
    num_devices = problem.num_devices
    node = max(1, min(cost_model.hw.devices_per_node, num_devices))
    sizes = candidate_sizes(num_devices, node)
    facts, hosts = group_facts(problem), chosen_hosts(problem, cost_model)
    costs, computes = [], []
    for u in units:
        compute, total = unit_costs(problem, cost_model, facts[u.group], u, sizes,
                                    outbound_bytes(problem, cost_model, u, hosts))
        costs.append(total)
        computes.append(compute)

    def lowest(values: list[list[float]], within: float | None) -> list[int] | None:
        """Per unit the smallest size whose ``values`` are <= the smallest achievable maximum of them (with every
        unit's total cost within ``within``); None when no sizes fit."""
        levels = sorted({f for fs in values for f in fs if math.isfinite(f)})
        lo, hi, found = 0, len(levels) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            picked = [next((i for i, f in enumerate(values[j])
                            if f <= levels[mid] and (within is None or costs[j][i] <= within)), None)
                      for j in range(len(units))]
            if all(i is not None for i in picked) and _fits([sizes[i] for i in picked], node, num_devices):
                found, hi = picked, mid - 1
            else:
                lo = mid + 1
        return found

    best = lowest(costs, None)  # the smallest achievable max f
    if best is None:
        return None
    # then, within that, the spare devices shorten the longest compute (the loss waits for every unit's forward)
    best = lowest(computes, max(costs[j][i] for j, i in enumerate(best))) or best
    return [sizes[i] for i in best]


def unit_ranges(sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """Contiguous device ranges of the given sizes, largest first (ties: the given order), so every range starts at
    a multiple of its size (sub-node sizes are powers of two dividing the node) and none splits a node needlessly."""
    out: list[tuple[int, ...]] = [()] * len(sizes)
    start = 0
    for j in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        out[j] = tuple(range(start, start + sizes[j]))
        start += sizes[j]
    return out


Run = tuple[int, float, int, int, int, tuple[int, ...]]  # (level, start, MetaOp, first layer, layers, devices)


def list_schedule(problem: Problem, u: Unit, members: Sequence[int], counts: Sequence[int], devices: Sequence[int],
                  ready: dict[int, float], level: int) -> list[Run]:
    """The unit's slices of ``members`` at ``counts`` on ``devices``: longest first, each on the earliest-free blocks
    of whole tensor-parallel groups (aligned within the range), after its input's estimated end (``ready``: per
    MetaOp, when its last scheduled slice ends; updated)."""
    free = np.zeros(len(devices))
    out = []
    ops = problem.graph.metaops
    timed = {m: (problem.curves[m].time(n) * u.layers(problem, m)[1], n) for m, n in zip(members, counts)}
    for m in sorted(members, key=lambda m: (-timed[m][0], m)):
        seconds, n = timed[m]
        tp = problem.curves[m].layout(n).tp_degree
        blocks = free[: len(free) // tp * tp].reshape(-1, tp).max(axis=1)
        picked = np.sort(np.argsort(blocks, kind="stable")[: n // tp])
        local = (picked[:, None] * tp + np.arange(tp)).ravel()
        inputs = [ready.get(m, 0.0)] if u.stage else [ready.get(p, 0.0) for p in ops[m].deps]
        start = max(float(free[local].max()), max(inputs, default=0.0))
        free[local] = start + seconds
        ready[m] = start + seconds
        first, count = u.layers(problem, m)
        out.append((level, start, m, first, count, tuple(int(devices[i]) for i in local)))
    return out


def group_split_schedule(problem: Problem, cost_model: CostModel, stages: int = 1,
                         balanced: bool = False) -> PlacedSchedule | None:
    """The sync-aware split (heavy groups in ``stages`` stages) as a placed schedule (one phase), or None when the
    units do not fit side by side; ``balanced``: the stages' layers cut by :func:`balanced_units` (None when that
    changes nothing)."""
    units = units_of(problem, stages)
    sizes = split_sizes(problem, cost_model, units)
    if sizes is None:
        return None
    if balanced:
        units = balanced_units(problem, units, sizes)
        if units is None:
            return None
    ranges = unit_ranges(sizes)
    ready: dict[int, float] = {}
    runs: list[Run] = []
    for level in sorted({op.level for op in problem.graph.metaops}):  # a level's predecessors are all scheduled
        for step in range(max(u.stages for u in units)):
            for u, size, devices in zip(units, sizes, ranges):
                members = [m for m in u.ops if problem.graph.metaops[m].level == level]
                if u.stage != step or not members:
                    continue
                counts = proportional_counts(problem, replace(u, ops=tuple(members)), size)
                if counts is None:
                    return None
                runs += list_schedule(problem, u, members, counts, devices, ready, level)
    return _waves(problem, cost_model, runs)


def _waves(problem: Problem, cost_model: CostModel, runs: Sequence[Run]) -> PlacedSchedule:
    """Waves from the list schedule's runs: each device runs its slices in start order, a MetaOp's slices in layer
    order, and per level the loss hosts' last slices after every other slice, so each task's loss lands on its chosen
    host (planner.program.loss_hosts takes the leaf in the latest wave)."""
    hosts = chosen_hosts(problem, cost_model)
    last_wave = np.full(problem.num_devices, -1)
    wave_of: dict[int, int] = {}  # MetaOp -> the wave of its latest slice so far
    waves: list[list[PlacedSlice]] = []
    floor, batch = 0, None
    ops = problem.graph.metaops
    keyed = sorted((r[0], r[2] in hosts and r[3] + r[4] == ops[r[2]].num_layers, r[1], r[2], r[3], r[4], r[5])
                   for r in runs)
    for level, host, _, m, first, count, devices in keyed:
        if (level, host) != batch:
            floor, batch = len(waves), (level, host)
        inputs = [wave_of[m]] if first else [wave_of[p] for p in ops[m].deps]
        k = max([floor, int(last_wave[list(devices)].max()) + 1, *(w + 1 for w in inputs)])
        while len(waves) <= k:
            waves.append([])
        waves[k].append(PlacedSlice(m, first, count, devices, problem.curves[m].layout(len(devices))))
        wave_of[m] = k
        last_wave[list(devices)] = k
    return PlacedSchedule(tuple(PlacedWave(tuple(sorted(w, key=lambda s: s.metaop))) for w in waves))


SPLIT_CPU_S_PER_CELL = 3e-7  # CPU seconds per MetaOp x device of building, placing and simulating the split


def affordable(problem: Problem, limit_s: float, reserve_s: float) -> bool:
    """Whether the split fits the time limit: its estimated CPU time is at most half of what the limit leaves
    after the finishing work (``reserve_s``). Decided from the limit, never the clock, so the plan is the same on
    a busy machine."""
    return SPLIT_CPU_S_PER_CELL * len(problem.graph) * problem.num_devices <= (limit_s - reserve_s) / 2


def _try_splits(problem: Problem, laid: Problem, cost_model: CostModel, stages: int, found: list[tuple]) -> bool:
    """Build the split in ``stages`` stages on ``laid``'s curves (the job's, or layouts fitted to a stage), evenly cut
    and, with stages, balanced; append each new one that fits and runs to ``found`` as (iteration, placed, simulation,
    stages, laid, balanced). Whether any did."""
    added = False
    for balanced in (False, True) if stages > 1 else (False,):
        placed = group_split_schedule(laid, cost_model, stages, balanced)
        if placed is None or any(placed == f[1] for f in found):
            continue
        sim = simulate(problem, placed, cost_model)
        why = runnable(problem, placed, cost_model.hw.devices_per_node)
        if max(sim.peak_memory_bytes, default=0.0) > cost_model.hw.memory_bytes:
            why = "it does not fit in device memory"
        if why is not None:
            log.info("sync-aware split in %d stages%s not used: %s", stages, ", balanced" * balanced, why)
            continue
        found.append((sim.iteration_time_s, placed, sim, stages, laid, balanced))
        added = True
    return added


def group_split_candidate(problem: Problem, cost_model: CostModel, template: SolveResult | None, bound_s: float,
                          ) -> tuple[SolveResult, PlacedSchedule, Simulation] | None:
    """The split placed, simulated and checked like the solver's candidates: None when there is none, it does not
    fit in device memory or the runtime could not run it. ``template``: the solver's result whose fields (solver
    name, bound) the candidate's result keeps."""
    found: list[tuple] = []
    for stages in STAGES:
        if not _try_splits(problem, problem, cost_model, stages, found) and stages > 1:
            # a stage holds 1/stages of each heavy group's layers: layouts that fit that share may run a model no
            # layout holds whole (70B on 64 H100s: tensor parallel 8 within each stage's range)
            fitted = memory_tightened(problem, cost_model, STAGE_FILL * stages)
            if fitted is not None:
                _try_splits(problem, fitted, cost_model, stages, found)
    if not found:
        return None
    _, placed, sim, stages, laid, balanced = min(found, key=lambda f: (f[0], f[3], f[5]))
    schedule = schedule_of(placed)
    makespan = compute_makespan(laid, schedule)
    bound = template.bound_s if template is not None else bound_s
    gap = (makespan - bound) / makespan if makespan > 0 else 0.0
    method = SPLIT_METHOD + ("" if stages == 1 else f", {stages} stages") + ", balanced" * balanced
    result = SolveResult(schedule, template.solver if template is not None else "heuristic", "heuristic", makespan,
                         bound, gap, method)
    return result, placed, sim
