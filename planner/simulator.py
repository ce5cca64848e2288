"""Simulator: the predicted iteration time of a placed wave schedule under one cost model.

Owns :func:`simulate` and the primitives the baselines reuse: :func:`resplit_flows` (which samples
move when a batch changes device group), :func:`boundary_time` (concurrent transfers at one
boundary), :func:`sync_buckets` / :func:`schedule_sync` (shared-parameter gradient all-reduce) and
:func:`optimizer_seconds`.

Model. Times are in seconds, bytes per iteration, and the four parts add up with no overlap:

- **compute**: waves run one after another. A wave lasts as long as its slowest slice, and a slice
  takes ``curve.time(n) * layers`` (forward+backward).
- **transfers**: a slice's input is the output of its MetaOp's previous slice or, for a MetaOp's
  first slice, the output of each predecessor's last slice: ``batch_size * layer.out_bytes``. When
  it lies elsewhere the batch is re-split (:func:`resplit_flows`). Samples are spread contiguously
  over data-parallel ranks in device order, and only samples whose owner changes move; every
  device of a TP group needs its rank's samples. A flow is attributed to the boundary just before
  the consumer's wave, however many waves earlier the producer ran. All flows at one boundary run
  concurrently. The boundary lasts as long as its busiest link (:func:`boundary_time`): a device's
  intra-node link in each direction, or a node's network link in each direction for cross-node
  bytes (``inter_bandwidth`` is per node). Backward sends the same bytes of gradients the other
  way, but only to producers that run a backward pass (``backward_factor > 0``). Boundaries add up.
- **sync**: gradients of trainable parameter groups only (2 bytes/param), all-reduced among the
  devices that hold them. Layers of a group held by the same device set (and TP degree) form one
  bucket. A bucket over ``D`` devices at TP degree ``t`` is ``t`` concurrent ring all-reduces of
  ``bytes / t`` over ``D / t`` devices, cross-node when ``D`` spans nodes. A layer held at mixed TP
  degrees is treated as if every holder used the largest one. Buckets are list-scheduled
  longest-first: a bucket starts when all its devices are done with earlier ones, so buckets on
  disjoint devices overlap and buckets sharing a device serialise. ``sync_s`` is the makespan.
- **optimizer**: after sync, every device steps the trainable parameters it holds (after TP
  sharding). The slowest device sets ``optimizer_s``.
- **peak memory** per device comes from the same :class:`~planner.placement.MemoryLedger`
  placement checks against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from planner.costmodel import CostModel, Layout
from planner.placement import MemoryLedger, PlacedSchedule, PlacedSlice, all_slices, build_ledger
from planner.schedule import Problem

GRAD_BYTES_PER_PARAM = 2  # bf16 gradients are all-reduced


@dataclass(frozen=True)
class TransferInfo:
    """Activations moving into ``dst_metaop`` at the boundary after wave ``after_wave``.

    ``bytes`` is what crosses devices forward; ``time_s`` is this transfer alone, forward plus the
    gradients sent back when the producer trains.
    """

    after_wave: int
    src_metaop: int
    dst_metaop: int
    src_devices: tuple[int, ...]
    dst_devices: tuple[int, ...]
    bytes: float
    time_s: float


@dataclass(frozen=True)
class SyncInfo:
    """One all-reduce bucket: the layers of ``param_group`` held by exactly ``devices``.

    ``bytes`` is the gradient size of those layers (each device reduces ``bytes / tp_degree``). The
    layers themselves are given by :func:`sync_buckets`, and a runtime derives them from the slices
    too: they are the group's layers whose set of holders is exactly ``devices``.
    """

    param_group: str
    metaops: tuple[int, ...]
    devices: tuple[int, ...]
    bytes: float
    time_s: float


@dataclass(frozen=True)
class Simulation:
    iteration_time_s: float
    compute_s: float
    transfer_s: float
    sync_s: float
    optimizer_s: float
    wave_durations: tuple[float, ...]  # compute time per wave (max slice time)
    transfers: tuple[TransferInfo, ...]
    sync_groups: tuple[SyncInfo, ...]
    peak_memory_bytes: tuple[float, ...]  # per device


# --------------------------------------------------------------------------- transfers


@dataclass(frozen=True)
class Flows:
    """Point-to-point messages: ``senders[i]`` sends ``nbytes[i]`` bytes to ``receivers[i]``."""

    senders: np.ndarray
    receivers: np.ndarray
    nbytes: np.ndarray

    @property
    def total_bytes(self) -> float:
        return float(self.nbytes.sum())

    def reversed(self) -> Flows:
        return Flows(self.receivers, self.senders, self.nbytes)


def resplit_flows(
    src: Sequence[int], src_layout: Layout, dst: Sequence[int], dst_layout: Layout, total_bytes: float
) -> Flows:
    """Messages that move a batch of ``total_bytes`` from the ``src`` to the ``dst`` split.

    Rank ``i`` of a ``dp x tp`` group owns the ``i``-th of ``dp`` equal contiguous runs of samples, and
    all ``tp`` devices of its TP group hold them. A receiver that already holds a sample gets nothing.
    Otherwise the sample comes from the owning source group's device at position ``j % tp_src``, where
    ``j`` is the receiver's position in its own TP group (a source TP group sits inside one node).
    """
    if tuple(src) == tuple(dst) and src_layout == dst_layout or total_bytes <= 0:
        return _no_flows()
    dp_s, tp_s, dp_d, tp_d = src_layout.dp_degree, src_layout.tp_degree, dst_layout.dp_degree, dst_layout.tp_degree
    units = math.lcm(dp_s, dp_d)  # the batch in units of 1/units: every rank boundary is a whole unit
    bounds = np.union1d(np.arange(dp_s + 1) * (units // dp_s), np.arange(dp_d + 1) * (units // dp_d))
    starts, lengths = bounds[:-1], np.diff(bounds)
    src_rank = starts // (units // dp_s)
    dst_rank = starts // (units // dp_d)
    holders = np.asarray(src, dtype=np.int64).reshape(dp_s, tp_s)[src_rank]  # (segments, tp_s)
    receivers = np.asarray(dst, dtype=np.int64).reshape(dp_d, tp_d)[dst_rank]  # (segments, tp_d)
    senders = holders[:, np.arange(tp_d) % tp_s]
    needs = ~(receivers[:, :, None] == holders[:, None, :]).any(axis=2)
    seg_bytes = np.broadcast_to((lengths * (total_bytes / units))[:, None], needs.shape)
    return Flows(senders[needs], receivers[needs], np.asarray(seg_bytes[needs], dtype=float))


def _no_flows() -> Flows:
    empty = np.zeros(0, dtype=np.int64)
    return Flows(empty, empty, np.zeros(0))


def boundary_time(flows: Sequence[Flows], cost_model: CostModel) -> float:
    """Seconds for ``flows`` running concurrently: the busiest link (device intra-node, node network) per direction."""
    flows = [f for f in flows if len(f.nbytes)]
    if not flows:
        return 0.0
    dpn = cost_model.hw.devices_per_node
    snd = np.concatenate([f.senders for f in flows])
    rcv = np.concatenate([f.receivers for f in flows])
    nbytes = np.concatenate([f.nbytes for f in flows])
    cross = snd // dpn != rcv // dpn
    worst = 0.0
    for endpoints, divisor in ((snd, 1), (rcv, 1), (snd, dpn), (rcv, dpn)):
        on_link = cross if divisor > 1 else ~cross
        if on_link.any():
            per_link = np.bincount(endpoints[on_link] // divisor, weights=nbytes[on_link])
            worst = max(worst, cost_model.p2p_time(float(per_link.max()), cross_node=divisor > 1))
    return worst


def _slice_input_sources(problem: Problem, s: PlacedSlice, last: dict[int, PlacedSlice]) -> list[PlacedSlice]:
    if s.metaop in last:
        return [last[s.metaop]]
    return [last[d] for d in problem.graph.metaops[s.metaop].deps if d in last]


def simulate_transfers(
    problem: Problem, placed: PlacedSchedule, cost_model: CostModel
) -> tuple[list[TransferInfo], float]:
    """Every inter-wave transfer of ``placed`` and the total transfer seconds (forward + backward)."""
    ops = problem.graph.metaops
    last: dict[int, PlacedSlice] = {}
    infos: list[TransferInfo] = []
    total = 0.0
    for k, wave in enumerate(placed.waves):
        forward: list[Flows] = []
        backward: list[Flows] = []
        for s in wave.slices:
            for src in _slice_input_sources(problem, s, last):
                producer = ops[src.metaop]
                nbytes = producer.batch_size * producer.layer.out_bytes
                flows = resplit_flows(src.devices, src.layout, s.devices, s.layout, nbytes)
                if not len(flows.nbytes):
                    continue
                back = [flows.reversed()] if producer.backward_factor > 0 else []
                forward.append(flows)
                backward.extend(back)
                alone = boundary_time([flows], cost_model) + boundary_time(back, cost_model)
                infos.append(TransferInfo(k - 1, src.metaop, s.metaop, src.devices, s.devices, flows.total_bytes, alone))
        total += boundary_time(forward, cost_model) + boundary_time(backward, cost_model)
        for s in wave.slices:
            last[s.metaop] = s
    return infos, total


# --------------------------------------------------------------------------- gradient sync and optimizer


@dataclass(frozen=True)
class SyncBucket:
    """Layers ``layers`` of trainable ``param_group`` held by exactly ``devices`` (at TP degree ``tp_degree``)."""

    param_group: str
    layers: tuple[int, ...]
    devices: tuple[int, ...]
    tp_degree: int
    num_params: float  # parameters of those layers, unsharded


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


def bucket_time(bucket: SyncBucket, cost_model: CostModel) -> float:
    """Seconds of one bucket's all-reduce (``tp_degree`` concurrent rings, one per shard)."""
    participants = len(bucket.devices) // bucket.tp_degree
    dpn = cost_model.hw.devices_per_node
    cross = bucket.devices[0] // dpn != bucket.devices[-1] // dpn
    nbytes = GRAD_BYTES_PER_PARAM * bucket.num_params / bucket.tp_degree
    return cost_model.allreduce_time(nbytes, participants, cross_node=cross)


def schedule_sync(buckets: Sequence[SyncBucket], cost_model: CostModel, num_devices: int) -> tuple[float, list[float]]:
    """List-schedule the buckets longest-first; returns the makespan and each bucket's own time."""
    times = [bucket_time(b, cost_model) for b in buckets]
    ready = np.zeros(num_devices)
    makespan = 0.0
    for i in sorted(range(len(buckets)), key=lambda i: (-times[i], buckets[i].param_group, buckets[i].layers[0])):
        if times[i] <= 0:
            continue
        idx = np.asarray(buckets[i].devices, dtype=np.int64)
        end = float(ready[idx].max()) + times[i]
        ready[idx] = end
        makespan = max(makespan, end)
    return makespan, times


def optimizer_seconds(ledger: MemoryLedger, cost_model: CostModel) -> float:
    """Optimizer step time of the slowest device (the one holding the most trainable parameters)."""
    if not len(ledger.trainable_params):
        return 0.0
    return cost_model.optimizer_time(float(ledger.trainable_params.max()))


def sync_and_optimizer(ledger: MemoryLedger, cost_model: CostModel) -> tuple[float, float]:
    """(sync seconds, optimizer seconds) of everything ``ledger`` holds."""
    sync_s, _ = schedule_sync(sync_buckets(ledger), cost_model, ledger.problem.num_devices)
    return sync_s, optimizer_seconds(ledger, cost_model)


def _sync_infos(ledger: MemoryLedger, cost_model: CostModel) -> tuple[list[SyncInfo], float]:
    buckets = sync_buckets(ledger)
    sync_s, times = schedule_sync(buckets, cost_model, ledger.problem.num_devices)
    ops = ledger.problem.graph.metaops
    infos = []
    for bucket, t in zip(buckets, times):
        if len(bucket.devices) // bucket.tp_degree <= 1:
            continue  # one replica per shard: nothing to all-reduce
        wanted = set(bucket.layers)
        metaops = sorted({
            s.metaop for s in ledger.slices
            if ops[s.metaop].param_group == bucket.param_group
            and wanted.intersection(range(s.first_layer, s.first_layer + s.num_layers))
        })
        infos.append(SyncInfo(bucket.param_group, tuple(metaops), bucket.devices,
                              GRAD_BYTES_PER_PARAM * bucket.num_params, t))
    return infos, sync_s


# --------------------------------------------------------------------------- the whole iteration


def wave_durations(problem: Problem, placed: PlacedSchedule) -> tuple[float, ...]:
    """Compute seconds of each wave: its slowest slice, ``curve.time(n) * layers``."""
    return tuple(
        max((problem.curves[s.metaop].time(len(s.devices)) * s.num_layers for s in wave.slices), default=0.0)
        for wave in placed.waves
    )


def simulate(problem: Problem, placed: PlacedSchedule, cost_model: CostModel) -> Simulation:
    """Predicted iteration time of ``placed`` (model in the module docstring)."""
    durations = wave_durations(problem, placed)
    transfers, transfer_s = simulate_transfers(problem, placed, cost_model)
    ledger = build_ledger(problem, all_slices(placed), cost_model)
    sync_infos, sync_s = _sync_infos(ledger, cost_model)
    optimizer_s = optimizer_seconds(ledger, cost_model)
    compute_s = sum(durations)
    return Simulation(
        iteration_time_s=compute_s + transfer_s + sync_s + optimizer_s,
        compute_s=compute_s,
        transfer_s=transfer_s,
        sync_s=sync_s,
        optimizer_s=optimizer_s,
        wave_durations=durations,
        transfers=tuple(transfers),
        sync_groups=tuple(sync_infos),
        peak_memory_bytes=tuple(float(x) for x in ledger.peak()),
    )
