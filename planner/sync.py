"""Gradient sync and optimizer: how an iteration ends once its compute and transfers are done.

Owns :func:`finish_buckets`, with which :func:`~planner.simulator.simulate` ends its timeline, :func:`finish_iteration`
(the same over the buckets of what a :class:`~planner.placement.MemoryLedger` holds), and their parts:
:func:`sync_buckets` (the all-reduce buckets of what a ledger holds), :func:`bucket_time` / :func:`schedule_sync` / :func:`launch_orders` (the shared-parameter gradient
all-reduce overlapped with backward), :func:`optimizer_seconds` (the optimizer step) and, under ZeRO-1,
:func:`gather_time` / :func:`schedule_gather` (the all-gather of the updated parameters).

Model. Times are in seconds, bytes per iteration. The caller gives when each bucket is ready and when compute and
transfers end (``compute_end``: one time, or one per device, as the per-device timeline of :mod:`planner.timeline`
gives it).

- **sync**: gradients of trainable parameter groups only (``cost_model.grad_bytes`` per parameter: the compute
  precision, in which the runtime reduces them), all-reduced among the
  devices that hold them. Layers of a group held by the same device set (and TP degree) form one
  bucket (:func:`sync_buckets`). A bucket over ``D`` devices at TP degree ``t`` is ``t`` concurrent
  ring all-reduces of ``bytes / t`` over ``D / t`` devices, cross-node when ``D`` spans nodes. A
  layer held at mixed TP degrees is treated as if every holder used the largest one. As in PyTorch
  DDP buckets or Megatron's overlapped gradient reduce, a bucket is *ready* as soon as every
  gradient it accumulates is final: when the backward of the earliest wave (in forward order) that
  runs any of its layers has finished. It then overlaps with the rest of the backward, on a device whose collectives
  progress while it computes (a GPU); a CPU worker's gloo collectives need the core it computes on, so there a bucket
  is ready once every device holding it has stopped computing, and ZeRO-1's all-gathers end the iteration
  (:attr:`planner.devices.DeviceInfo.overlaps_collectives`). A device's
  links are the sync's resource: buckets are launched in one order, each starts at
  ``max(ready, end of every earlier-launched bucket on its devices)``, so buckets on disjoint
  devices overlap and buckets sharing a device serialise. Inter-wave transfers and sync are
  treated as independent resources (transfers are short and bursty; sync is off the critical path
  until backward ends). Two launch orders are tried and the one giving the shorter iteration is
  kept (:attr:`SyncOutcome.launch_order`, reported by the simulator as ``Simulation.sync_order``):
  ready order (what DDP does) and longest-first. Every bucket is ready by the end of backward, so
  longest-first ends no later than it would starting there: the iteration is never longer than
  compute, transfers, sync, optimizer and all-gathers run one after another.
- **optimizer**: A device steps the trainable parameters it holds (after TP sharding) when its
  compute and every bucket on its devices are done. Without ``cost_model.shard_optimizer`` it steps
  all of them and the iteration ends when the last device has stepped. With it (ZeRO-1, as
  ``runtime/zero.py`` runs it): the full gradients are all-reduced as above, each bucket's
  optimizer state is sharded over its ``D / t`` all-reduce participants, and a device steps
  ``1 / (D / t)`` of the bucket. Then the participants all-gather the updated shares
  (:func:`gather_time`: ``t`` concurrent ring all-gathers over ``D / t`` devices of the bucket's
  parameters at ``cost_model.param_bytes_moved``, the runtime's float32, each share padded to ``ceil(params / (D / t))``
  elements), so every replica ends with the full parameters. A bucket's all-gather starts once
  the slowest of its participants has stepped (its whole step: a device steps all its shares,
  then gathers); buckets sharing a device serialise on its link, launched in the order they can
  start, longest first among equals (:func:`schedule_gather`). Without ``next_use`` the iteration ends when the last
  all-gather (or step) ends. (The memory ledger shards each slice's state over that slice's
  data-parallel group; both agree when one slice holds the layers.)
- **overlapped all-gather** (``next_use``, what ``runtime/zero.py`` runs in a job whose uses all train): the holders
  launch the gathers right after their step, in the order the caller gives (:func:`planner.phases.gather_order`:
  the forward event that first needs each bucket), and the next iteration starts on each device once it has stepped;
  a device waits for a bucket's gather before its first forward event that needs it. The prediction is the
  steady-state period ``T``: the iteration repeated every ``T`` seconds is feasible when every device has stepped by
  ``T`` and every bucket's gather, ending at ``G``, ends by ``T + next_use`` (``next_use``: the earliest start, over
  the bucket's devices, of the forward work that waits for it) and by ``T`` + the earliest readiness of a bucket on
  its devices (so the next iteration's all-reduces never share a link with it). ``gather_s`` is then the part of the
  gathers that the next iteration's forward does not hide: ``T`` - the critical device's step end.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from planner.costmodel import CostModel
from planner.placement import MemoryLedger
from planner.timeline import device_index


@dataclass(frozen=True)
class SyncBucket:
    """Layers ``layers`` of trainable ``param_group`` held by exactly ``devices`` (at TP degree ``tp_degree``)."""

    param_group: str
    layers: tuple[int, ...]
    devices: tuple[int, ...]
    tp_degree: int
    num_params: float  # parameters of those layers, unsharded
    num_tensors: float = 0.0  # their parameter tensors on each holder (0: not counted; the optimizer's per-tensor term)


def sync_buckets(ledger: MemoryLedger) -> list[SyncBucket]:
    """The all-reduce buckets of every trainable group in ``ledger``, ordered by group then first layer."""
    out: list[SyncBucket] = []
    for group in sorted(ledger.held):
        facts = ledger.groups[group]
        if not facts.trainable:
            continue
        classes: dict[tuple[tuple[int, int], ...], list[int]] = {}  # devices holding the same layers at the same degrees
        union = 0
        for d, by_tp in ledger.held[group].items():
            classes.setdefault(tuple(sorted(by_tp.items())), []).append(d)
            for bits in by_tp.values():
                union |= bits
        buckets: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for j in range(union.bit_length()):
            devices: list[int] = []
            tp = 1
            for key, members in classes.items():
                degrees = [t for t, bits in key if bits >> j & 1]
                if degrees:
                    devices.extend(members)
                    tp = max(tp, min(degrees))
            if devices:
                buckets.setdefault((tuple(sorted(devices)), tp), []).append(j)
        for (devices, tp), layers in sorted(buckets.items(), key=lambda kv: kv[1][0]):
            out.append(SyncBucket(group, tuple(layers), devices, tp, len(layers) * facts.params_per_layer))
    return out


def _crosses_nodes(bucket: SyncBucket, cost_model: CostModel) -> bool:
    dpn = cost_model.hw.devices_per_node
    return bucket.devices[0] // dpn != bucket.devices[-1] // dpn


def allreduce_bytes(bucket: SyncBucket, cost_model: CostModel) -> float:
    """Bytes one ring of a bucket's all-reduce reduces: its TP shard's gradients at ``cost_model.grad_bytes`` (the
    compute precision, as the runtime reduces them)."""
    return cost_model.grad_bytes * bucket.num_params / bucket.tp_degree


def bucket_time(bucket: SyncBucket, cost_model: CostModel) -> float:
    """Seconds of one bucket's all-reduce (``tp_degree`` concurrent rings, one per shard)."""
    participants = len(bucket.devices) // bucket.tp_degree
    return cost_model.allreduce_time(allreduce_bytes(bucket, cost_model), participants,
                                     cross_node=_crosses_nodes(bucket, cost_model))


def gather_bytes(bucket: SyncBucket, cost_model: CostModel) -> float:
    """Bytes one ring of a bucket's ZeRO-1 all-gather gathers in all: every one of the ``D / t`` participants' share,
    padded to ``ceil(params / (D / t))`` elements, at ``cost_model.param_bytes_moved`` (the runtime's float32
    parameters, whatever the precision). 0 without ``shard_optimizer`` or with one participant."""
    participants = len(bucket.devices) // bucket.tp_degree
    if not cost_model.shard_optimizer or participants <= 1:
        return 0.0
    per_share = math.ceil(bucket.num_params / bucket.tp_degree / participants)
    return cost_model.param_bytes_moved * per_share * participants


def gather_time(bucket: SyncBucket, cost_model: CostModel) -> float:
    """Seconds of one bucket's ZeRO-1 all-gather of its updated parameters (``tp_degree`` concurrent rings over the
    ``D / t`` participants, one per shard, of :func:`gather_bytes` each). 0 when it gathers nothing."""
    nbytes = gather_bytes(bucket, cost_model)
    if nbytes <= 0:
        return 0.0
    participants = len(bucket.devices) // bucket.tp_degree
    return cost_model.allgather_time(nbytes, participants, cross_node=_crosses_nodes(bucket, cost_model))


def covering_slices(buckets: Sequence[SyncBucket], ledger: MemoryLedger) -> list[tuple[int, ...]]:
    """For each bucket, the indices of the ``ledger.slices`` that run at least one of its layers."""
    ops = ledger.problem.graph.metaops
    by_group: dict[str, list[int]] = {}
    for i, s in enumerate(ledger.slices):
        by_group.setdefault(ops[s.metaop].param_group, []).append(i)
    out = []
    for b in buckets:
        wanted = sum(1 << j for j in b.layers)
        out.append(tuple(
            i for i in by_group.get(b.param_group, ())
            if (((1 << ledger.slices[i].num_layers) - 1) << ledger.slices[i].first_layer) & wanted
        ))
    return out


def schedule_sync(
    buckets: Sequence[SyncBucket], times: Sequence[float], ready: Sequence[float], order: Sequence[int], num_devices: int
) -> np.ndarray:
    """Launch ``buckets`` in ``order``: each starts at ``max(ready[i], end of the earlier-launched buckets on its
    devices)`` and takes ``times[i]``. Returns per device when its last bucket ends (0 without any)."""
    return sync_spans(buckets, times, ready, order, num_devices)[0]


def sync_spans(
    buckets: Sequence[SyncBucket], times: Sequence[float], ready: Sequence[float], order: Sequence[int], num_devices: int
) -> tuple[np.ndarray, list[float]]:
    """:func:`schedule_sync`'s per-device ends, and when each bucket starts (its ready time when it takes none)."""
    free = np.zeros(num_devices)
    starts = list(ready)
    for i in order:
        if times[i] <= 0:
            continue
        idx = device_index(buckets[i].devices)
        starts[i] = max(ready[i], float(free[idx].max()))
        free[idx] = starts[i] + times[i]
    return free, starts


def sync_origin(buckets: Sequence[SyncBucket], times: Sequence[float], ready: Sequence[float],
                starts: Sequence[float], device: int, until: float) -> int | None:
    """The bucket whose readiness started the chain of all-reduces that keeps ``device`` busy until ``until``: the
    last bucket on the device ending then, followed back through the buckets it waited for (None: no bucket ends
    then)."""
    def ending(at: float, devices: Sequence[int]) -> int | None:
        found = [i for i, b in enumerate(buckets)
                 if times[i] > 0 and math.isclose(starts[i] + times[i], at, rel_tol=1e-12, abs_tol=1e-15)
                 and set(b.devices) & set(devices)]
        return found[0] if found else None

    current = ending(until, (device,))
    while current is not None and starts[current] > ready[current]:
        previous = ending(starts[current], buckets[current].devices)
        if previous is None:
            break
        current = previous
    return current


def launch_orders(buckets: Sequence[SyncBucket], times: Sequence[float], ready: Sequence[float]) -> dict[str, list[int]]:
    """The candidate launch orders (bucket indices): ready order (longest first among equals) and longest-first."""
    def tie(i: int) -> tuple[str, int]:
        return buckets[i].param_group, buckets[i].layers[0]

    ids = range(len(buckets))
    return {
        "ready": sorted(ids, key=lambda i: (ready[i], -times[i], *tie(i))),
        "longest": sorted(ids, key=lambda i: (-times[i], *tie(i))),
    }


def optimizer_seconds(buckets: Sequence[SyncBucket], cost_model: CostModel, num_devices: int) -> np.ndarray:
    """Optimizer step seconds per device (:meth:`CostModel.optimizer_time`): the TP shard of every bucket it holds,
    divided over the bucket's all-reduce participants when ``cost_model.shard_optimizer`` (ZeRO-1), and every tensor
    of those buckets (ZeRO-1 still flattens and refills each of a bucket's tensors on every holder: runtime.zero)."""
    params, tensors = np.zeros(num_devices), np.zeros(num_devices)
    if buckets:  # np.add.at adds in index order: per device, bucket by bucket, as a loop over the buckets would
        index, sizes = bucket_devices(buckets)
        shards = [max(1, len(b.devices) // b.tp_degree) if cost_model.shard_optimizer else 1 for b in buckets]
        np.add.at(params, index, np.repeat([b.num_params / b.tp_degree / n for b, n in zip(buckets, shards)], sizes))
        np.add.at(tensors, index, np.repeat([float(b.num_tensors) for b in buckets], sizes))
    return np.array([cost_model.optimizer_time(float(p), float(t)) if p > 0 else 0.0 for p, t in zip(params, tensors)])


def schedule_gather(buckets: Sequence[SyncBucket], times: Sequence[float], stepped: np.ndarray,
                    order: Sequence[int] | None = None) -> np.ndarray:
    """ZeRO-1 all-gathers after the optimizer: device ``d`` has stepped at ``stepped[d]``; bucket ``i`` gathers for
    ``times[i]`` once all its devices have stepped and are free, launched in ``order`` (default: the order they can
    start, longest first among equals). Returns per device when its last all-gather ends (``stepped[d]`` without
    any)."""
    return gather_spans(buckets, times, stepped, order)[0]


def gather_spans(buckets: Sequence[SyncBucket], times: Sequence[float], stepped: np.ndarray,
                 order: Sequence[int] | None = None) -> tuple[np.ndarray, list[float]]:
    """:func:`schedule_gather`'s per-device ends and when each bucket's gather ends (its step's end without one)."""
    free = np.array(stepped, dtype=float)
    start = _per_bucket(np.maximum, free, buckets) if buckets else []
    if order is None:
        order = sorted(range(len(buckets)),
                       key=lambda i: (start[i], -times[i], buckets[i].param_group, buckets[i].layers[0]))
    ends = list(start)
    for i in order:
        if times[i] <= 0:
            continue
        idx = device_index(buckets[i].devices)
        free[idx] = ends[i] = float(free[idx].max()) + times[i]
    return free, ends


def gathers_overlap(graph, cost_model: CostModel) -> bool:
    """Whether ZeRO-1's all-gathers overlap the next iteration (``graph``: a MetaGraph): runtime.zero defers them in a
    job whose uses all train and that hands no weights off (a hand-off or a rollout reads the weights right after the
    step, so there they end the iteration), on a device whose collectives progress beside its compute (not a CPU
    worker's: planner.devices.DeviceInfo.overlaps_collectives)."""
    return (cost_model.shard_optimizer and cost_model.hw.device.overlaps_collectives
            and all(op.mode == "train" for op in graph.metaops) and not graph.weights_from)


def gather_limits(buckets: Sequence[SyncBucket], next_use: Sequence[float], ready: Sequence[float],
                  num_devices: int) -> np.ndarray:
    """Per bucket, how long after the next iteration starts its ZeRO-1 gather may end (module docstring:
    *overlapped all-gather*): the earlier of its ``next_use`` and the earliest readiness of a bucket on its devices."""
    first_ready = np.full(num_devices, np.inf)
    if not buckets:
        return np.zeros(0)
    index, sizes = bucket_devices(buckets)
    np.minimum.at(first_ready, index, np.repeat(np.asarray(ready, dtype=float), sizes))
    return np.minimum(np.asarray(next_use, dtype=float), _per_bucket(np.minimum, first_ready, buckets))


def bucket_devices(buckets: Sequence[SyncBucket]) -> tuple[np.ndarray, np.ndarray]:
    """Every bucket's devices end to end and each bucket's number of them (each has one or more): per-bucket numpy
    reductions in one call (:func:`_per_bucket`) instead of one call per bucket. Exact: a max, a min, or sums taken in
    the buckets' order."""
    sizes = np.fromiter((len(b.devices) for b in buckets), dtype=np.int64, count=len(buckets))
    index = np.fromiter(itertools.chain.from_iterable(b.devices for b in buckets), dtype=np.int64,
                        count=int(sizes.sum()))
    return index, sizes


def _per_bucket(reduce: np.ufunc, values: np.ndarray, buckets: Sequence[SyncBucket]) -> list[float]:
    """``reduce`` (np.maximum or np.minimum) of ``values`` over each bucket's devices."""
    index, sizes = bucket_devices(buckets)
    starts = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    return reduce.reduceat(values[index], starts).tolist()


def overlapped_end(stepped: np.ndarray, gather_ends: Sequence[float], limits: np.ndarray) -> float:
    """The steady-state period of an iteration whose ZeRO-1 gathers overlap the next one's forward: every device has
    stepped, and every bucket's gather (ending at ``gather_ends``) ends by the period plus its ``limits``
    (:func:`gather_limits`)."""
    period = float(stepped.max()) if len(stepped) else 0.0
    if len(limits):
        period = max(period, float((np.asarray(gather_ends) - limits).max()))
    return period


@dataclass(frozen=True)
class SyncOutcome:
    """How an iteration ends once compute and transfers end at ``compute_end``.

    ``iteration_time_s = compute_end + sync_s + optimizer_s + gather_s`` on the critical device (the last to step):
    ``sync_s`` is its exposed sync, ``optimizer_s`` its step, ``gather_s`` the exposed ZeRO-1 all-gather. Per bucket (as
    :func:`sync_buckets` orders them): ``bucket_times`` (its all-reduce alone), ``gather_times`` (its
    all-gather alone, 0 when none) and ``covers`` (:func:`covering_slices`).
    """

    iteration_time_s: float
    sync_s: float
    optimizer_s: float
    sync_total_s: float
    buckets: tuple[SyncBucket, ...]
    bucket_times: tuple[float, ...]
    covers: tuple[tuple[int, ...], ...]
    launch_order: tuple[int, ...]
    gather_s: float = 0.0
    gather_times: tuple[float, ...] = ()
    critical_device: int = 0  # the device whose end sets the parts (finish_buckets)
    sync_origin: int | None = None  # the bucket whose readiness began the critical device's exposed sync


def finish_iteration(
    ledger: MemoryLedger, slice_ready: Sequence[float], compute_end: float, cost_model: CostModel
) -> SyncOutcome:
    """Gradient sync overlapped with backward, then the optimizer, then (ZeRO-1) the all-gathers of the updated
    parameters, of everything ``ledger`` holds (the baselines' schedules; a wave plan prices its program's buckets
    with :func:`finish_buckets`).

    ``slice_ready[i]`` is when the backward of ``ledger.slices[i]`` ends (at most ``compute_end``). A
    bucket is ready when all its covering slices are.
    """
    buckets = sync_buckets(ledger)
    covers = covering_slices(buckets, ledger)
    ready = [max((slice_ready[i] for i in cover), default=compute_end) for cover in covers]
    outcome = finish_buckets(buckets, ready, compute_end, cost_model, ledger.problem.num_devices)
    return replace(outcome, covers=tuple(covers))


def finish_buckets(
    buckets: Sequence[SyncBucket], ready: Sequence[float], compute_end: float | np.ndarray, cost_model: CostModel,
    num_devices: int, next_use: Sequence[float] | None = None, gather_order: Sequence[int] | None = None,
) -> SyncOutcome:
    """How an iteration ends once compute and transfers end at ``compute_end`` (one time, or one per device: the
    timeline's clocks): bucket ``i`` all-reduces from ``ready[i]`` (the better of :func:`launch_orders` is kept),
    each device steps once its buckets and its own compute are done, then (ZeRO-1) the all-gathers: launched in
    ``gather_order`` when given; with ``next_use`` (per bucket, seconds from the iteration's start to the first forward
    work that waits for its gather) they overlap the next iteration (module docstring), else they end it.

    The parts follow the critical path back from the *critical device* (the last to step; among equals the one whose
    compute ends last): ``optimizer_s`` is its step, ``gather_s`` what follows the last step. When its sync outlasts its
    own compute, ``sync_s`` runs from the readiness of the bucket that began the chain of all-reduces it waited for
    (:attr:`SyncOutcome.sync_origin`; the caller splits the time before it into compute and transfers); otherwise
    ``sync_s`` is 0 and compute ends at ``compute_end[critical]``. Either way the parts add up to the iteration."""
    ends_at = np.broadcast_to(np.asarray(compute_end, dtype=float), (num_devices,))
    if not cost_model.hw.device.overlaps_collectives:  # a CPU worker all-reduces once it has stopped computing
        ready = [max(r, float(ends_at[device_index(b.devices)].max())) for r, b in zip(ready, buckets)]
    times = [bucket_time(b, cost_model) for b in buckets]
    gathers = [gather_time(b, cost_model) for b in buckets]
    step = optimizer_seconds(buckets, cost_model, num_devices)
    orders = launch_orders(buckets, times, ready)
    limits = gather_limits(buckets, next_use, ready, num_devices) if next_use is not None else None
    ends = []
    for order in orders.values():
        synced, starts = sync_spans(buckets, times, ready, order, num_devices)
        stepped = np.maximum(synced, ends_at) + step
        free, gathered = gather_spans(buckets, gathers, stepped, gather_order)
        end = (overlapped_end(stepped, gathered, limits) if limits is not None
               else float(free.max()) if num_devices else 0.0)
        ends.append((end, stepped, synced, starts, order))
    iteration, stepped, synced, starts, order = min(ends, key=lambda e: e[0])  # the first (ready order) wins ties
    c = int(np.lexsort((ends_at, stepped))[-1]) if num_devices else 0
    last_step = float(stepped[c]) if num_devices else 0.0
    origin, sync_s = None, 0.0
    if num_devices and synced[c] > ends_at[c]:  # the device waited for its sync: the parts follow the sync's chain
        origin = sync_origin(buckets, times, ready, starts, c, float(synced[c]))
        sync_s = float(synced[c] - (ready[origin] if origin is not None else ends_at[c]))
    alone = schedule_sync(buckets, times, [0.0] * len(buckets), orders["longest"], num_devices)
    return SyncOutcome(
        iteration_time_s=iteration,
        sync_s=sync_s,
        optimizer_s=float(step[c]) if num_devices else 0.0,
        sync_total_s=float(alone.max()) if num_devices else 0.0,
        buckets=tuple(buckets),
        bucket_times=tuple(times),
        covers=(),
        launch_order=tuple(order),
        gather_s=iteration - last_step,
        gather_times=tuple(gathers),
        critical_device=c,
        sync_origin=origin,
    )
