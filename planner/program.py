"""Every worker's program: which rows of which activation move between which devices at each wave boundary.

One derivation for the whole system: :func:`plan_edges` lists the producer -> consumer edges of a placed
schedule and :func:`forward_moves` / :func:`backward_moves` the rows each edge moves. The simulator prices
exactly these moves, :func:`plan_pieces` writes them into the Plan as pieces (with tensor shapes and bytes),
and the runtime executes the Plan's pieces without deriving anything (runtime.assignment).

Conventions (pure Python + numpy):

- **rows**: a slice with layout ``dp x tp`` on devices ``d_0 < d_1 < ...``: ``devices[i*tp:(i+1)*tp]`` is
  data-parallel rank ``i``, which owns its share of its MetaOp's batch ``B`` (planner.rows: ``B // dp`` rows
  each when dp divides ``B``, else one more for the first ``B % dp`` ranks). Every TP device of a rank holds
  the rank's rows, in and out (a tensor-parallel layer's output is replicated over its TP group).
- **edges**: a slice's first layer reads the previous slice of its MetaOp or, for a MetaOp's first slice,
  the last slice (in wave order) of every dependency, in ``deps`` order (``input`` is that position); a
  root MetaOp's layer 0 reads raw data (no edge). A task's loss runs on the last slice, in wave order, of
  its leaf MetaOps (the latest wave, ties to the higher MetaOp id), on the first TP device of each of that
  slice's data-parallel ranks; every leaf's last slice feeds it (``consumer`` None, wave :data:`LOSS_WAVE`).
  An edge's moves happen at the boundary just before its consumer's wave, however early the producer ran. With
  phases (:mod:`planner.phases`) a loss stage's moves happen in the phase of its host, and no edge crosses phases.
- **forward**: every receiving device needs its rank's rows. A device that already holds them (it is in the
  producer rank that owns them) takes them from its own output: a *local* move (sender == receiver, no
  bytes). Otherwise they come from the producer's TP device at position ``j % tp_producer``, where ``j`` is
  the receiver's position in its own TP group (spreading the sends over the producer's group).
- **backward** (only when the producer runs a backward pass, ``backward_factor > 0``): every device of the
  producer needs the gradient of its rank's rows; the first TP device of the consumer rank that read them
  sends it (only it holds the input gradient); local when it is that device. Gradients of one output read
  by several consumers are summed where they land.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from planner.costmodel import Layout
from planner.metagraph import MetaOp
from planner.phases import LOSS_WAVE, backward_positions, loss_event, phase_of_waves
from planner.placement import PlacedSchedule, PlacedSlice
from planner.plan import Plan, PlanBucket, PlanHolding, PlanPiece
from planner.rows import row_bounds


SliceId = tuple[int, int]  # (wave, index of the slice in its wave)


@dataclass(frozen=True)
class Moves:
    """Row ranges ``[starts[i], stops[i])`` moving from ``senders[i]`` to ``receivers[i]`` (sender == receiver:
    a local move, which costs nothing)."""

    senders: np.ndarray
    receivers: np.ndarray
    starts: np.ndarray
    stops: np.ndarray

    @property
    def rows(self) -> np.ndarray:
        return self.stops - self.starts

    @property
    def remote(self) -> np.ndarray:
        return self.senders != self.receivers

    def __len__(self) -> int:
        return len(self.senders)


@dataclass(frozen=True)
class Edge:
    """A producer slice's output feeding a consumer slice's input number ``input`` (or the loss stage of ``task``)."""

    wave: int  # the consumer's wave: the moves happen at the boundary before it (LOSS_WAVE: before the loss stage)
    producer: SliceId
    consumer: SliceId | None  # None: the loss stage of ``task``
    target: SliceId  # the slice whose devices receive: the consumer, or the loss host
    task: str
    input: int
    forward: Moves
    backward: Moves  # empty when the producer runs no backward pass


def _segments(batch: int, dp_src: int, dp_dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The row ranges on which both splits agree: (starts, stops, source dp rank, destination dp rank). Each split
    is planner.rows' (whole rows, uneven where a degree does not divide ``batch``); a degree above ``batch``
    (synthetic problems only) splits it in equal fractional shares."""
    if batch >= max(dp_src, dp_dst):
        src, dst = np.asarray(row_bounds(batch, dp_src)), np.asarray(row_bounds(batch, dp_dst))
        rows = np.union1d(src, dst)
        src_rank = np.searchsorted(src, rows[:-1], side="right") - 1
        dst_rank = np.searchsorted(dst, rows[:-1], side="right") - 1
        return rows[:-1], rows[1:], src_rank, dst_rank
    units = math.lcm(dp_src, dp_dst)  # rank boundaries of both splits are whole multiples of batch / units
    bounds = np.union1d(np.arange(dp_src + 1) * (units // dp_src), np.arange(dp_dst + 1) * (units // dp_dst))
    src_rank, dst_rank = bounds[:-1] // (units // dp_src), bounds[:-1] // (units // dp_dst)
    rows = bounds * (batch / units)
    return rows[:-1], rows[1:], src_rank, dst_rank


def _empty() -> Moves:
    none = np.zeros(0, dtype=np.int64)
    return Moves(none, none, none, none)


def forward_moves(src: Sequence[int], src_layout: Layout, dst: Sequence[int], dst_layout: Layout, batch: int,
                  leads_only: bool = False) -> Moves:
    """The rows of a batch of ``batch`` samples each device of ``dst`` (only the first of each TP group with
    ``leads_only``: the loss stage) receives from ``src`` (module docstring)."""
    return _forward_moves(tuple(src), src_layout, tuple(dst), dst_layout, batch, leads_only)


def backward_moves(src: Sequence[int], src_layout: Layout, dst: Sequence[int], dst_layout: Layout,
                   batch: int) -> Moves:
    """The gradient rows every device of the producer ``src`` receives from the consumer ``dst`` (the first TP
    device of the consumer rank that read them sends; module docstring)."""
    return _backward_moves(tuple(src), src_layout, tuple(dst), dst_layout, batch)


# the planner's search prices the same (devices, layout) pairs over and over: the moves are pure, so cache them
@functools.lru_cache(maxsize=1 << 16)
def _forward_moves(src: tuple[int, ...], src_layout: Layout, dst: tuple[int, ...], dst_layout: Layout, batch: int,
                   leads_only: bool) -> Moves:
    starts, stops, src_rank, dst_rank = _segments(batch, src_layout.dp_degree, dst_layout.dp_degree)
    tp_s, tp_d = src_layout.tp_degree, dst_layout.tp_degree
    holders = np.asarray(src, dtype=np.int64).reshape(-1, tp_s)[src_rank]  # (segments, tp_s)
    receivers = np.asarray(dst, dtype=np.int64).reshape(-1, tp_d)[dst_rank]  # (segments, tp_d)
    if leads_only:
        receivers = receivers[:, :1]
    senders = holders[:, np.arange(receivers.shape[1]) % tp_s]
    holds = (receivers[:, :, None] == holders[:, None, :]).any(axis=2)
    senders = np.where(holds, receivers, senders)
    shape = receivers.shape
    return _frozen(senders.reshape(-1), receivers.reshape(-1), np.broadcast_to(starts[:, None], shape).reshape(-1),
                   np.broadcast_to(stops[:, None], shape).reshape(-1))


@functools.lru_cache(maxsize=1 << 16)
def _backward_moves(src: tuple[int, ...], src_layout: Layout, dst: tuple[int, ...], dst_layout: Layout,
                    batch: int) -> Moves:
    starts, stops, src_rank, dst_rank = _segments(batch, src_layout.dp_degree, dst_layout.dp_degree)
    tp_s = src_layout.tp_degree
    receivers = np.asarray(src, dtype=np.int64).reshape(-1, tp_s)[src_rank]  # (segments, tp_s)
    leads = np.asarray(dst, dtype=np.int64).reshape(-1, dst_layout.tp_degree)[dst_rank, 0]
    shape = receivers.shape
    return _frozen(np.broadcast_to(leads[:, None], shape).reshape(-1), receivers.reshape(-1),
                   np.broadcast_to(starts[:, None], shape).reshape(-1), np.broadcast_to(stops[:, None], shape).reshape(-1))


def _frozen(*arrays: np.ndarray) -> Moves:
    """Moves over read-only copies of ``arrays`` (cached moves are shared by every caller)."""
    out = [np.array(a) for a in arrays]
    for a in out:
        a.flags.writeable = False
    return Moves(*out)


def _edge(ops: Sequence[MetaOp], wave: int, producer: SliceId, src: PlacedSlice, consumer: SliceId | None,
          target: SliceId, dst: PlacedSlice, task: str, input: int) -> Edge:
    batch = ops[src.metaop].batch_size
    fwd = forward_moves(src.devices, src.layout, dst.devices, dst.layout, batch, leads_only=consumer is None)
    trains = ops[src.metaop].backward_factor > 0
    bwd = backward_moves(src.devices, src.layout, dst.devices, dst.layout, batch) if trains else _empty()
    return Edge(wave, producer, consumer, target, task, input, fwd, bwd)


def loss_hosts(ops: Sequence[MetaOp], placed: PlacedSchedule) -> Mapping[str, tuple[SliceId, tuple[SliceId, ...]]]:
    """Per task (in MetaOp order): the slice hosting its loss and its leaves' last slices (module docstring).
    Read-only; the last call's answer is kept: one simulation asks five times (edges, holdings, data draws, timeline,
    loss stage) for the same ``ops`` and ``placed``, which the entry holds, so they are the same objects when it
    answers."""
    last_ops, last_placed, found = _LAST_HOSTS[0]
    if last_ops is ops and last_placed is placed:
        return found
    found = MappingProxyType(_loss_hosts(ops, placed))
    _LAST_HOSTS[0] = (ops, placed, found)  # one assignment: a reader sees the old entry or the new one whole
    return found


_LAST_HOSTS: list[tuple] = [(None, None, None)]  # (ops, placed, loss_hosts(ops, placed)) of the last call


def _loss_hosts(ops: Sequence[MetaOp], placed: PlacedSchedule) -> dict[str, tuple[SliceId, tuple[SliceId, ...]]]:
    last: dict[int, SliceId] = {}
    for k, wave in enumerate(placed.waves):
        for i, s in enumerate(wave.slices):
            last[s.metaop] = (k, i)
    read = {d for op in ops for d in op.deps}
    out: dict[str, tuple[SliceId, tuple[SliceId, ...]]] = {}
    for task in dict.fromkeys(op.task for op in ops):
        leaves = tuple(last[op.id] for op in ops if op.task == task and op.id not in read and op.id in last)
        if leaves:
            host = max(leaves, key=lambda ref: (ref[0], placed.waves[ref[0]].slices[ref[1]].metaop))
            out[task] = (host, leaves)
    return out


def plan_edges(ops: Sequence[MetaOp], placed: PlacedSchedule) -> list[Edge]:
    """Every edge of ``placed`` in execution order: by consumer wave and slice, inputs in ``deps`` order, then the
    loss stage's, task by task (every rank walks them in this order, so point-to-point calls pair up)."""
    def at(ref: SliceId) -> PlacedSlice:
        return placed.waves[ref[0]].slices[ref[1]]

    edges: list[Edge] = []
    last: dict[int, SliceId] = {}
    for k, wave in enumerate(placed.waves):
        for i, s in enumerate(wave.slices):
            op = ops[s.metaop]
            sources = [last[s.metaop]] if s.metaop in last else [last[d] for d in op.deps if d in last]
            for j, ref in enumerate(sources):
                edges.append(_edge(ops, k, ref, at(ref), (k, i), (k, i), s, op.task, j))
        for i, s in enumerate(wave.slices):
            last[s.metaop] = (k, i)
    for task, (host, leaves) in loss_hosts(ops, placed).items():
        for ref in leaves:
            edges.append(_edge(ops, LOSS_WAVE, ref, at(ref), None, host, at(host), task, 0))
    return edges


def out_shape(op: MetaOp, boundary: int) -> tuple[int, ...]:
    """Per-sample shape of ``op``'s activation after ``boundary`` of its layers (1..num_layers); () when the MetaOp
    was built without shapes (tests' synthetic MetaOps)."""
    return op.out_shapes[boundary - 1] if op.out_shapes else ()


def row_bytes(op: MetaOp, boundary: int, element_bytes: int) -> float:
    """Bytes of one sample's activation after ``boundary`` layers of ``op``: its shape's elements at
    ``element_bytes`` each, or the layer's modelled ``out_bytes`` for a MetaOp without shapes. A generate use's
    output is its packed rollout rows, whatever the precision: the segment's ``out_bytes``
    (planner.generation.rollout_width float32 elements; detached: no gradient comes back)."""
    shape = out_shape(op, boundary)
    if op.mode == "generate":
        return float(op.layer.out_bytes)
    return float(math.prod(shape) * element_bytes) if shape else op.layer.out_bytes




def plan_pieces(ops: Sequence[MetaOp], placed: PlacedSchedule, element_bytes: int) -> list[PlanPiece]:
    """The program of ``placed`` as the Plan's pieces: every edge's forward moves in :func:`plan_edges` order, then
    every edge's backward moves in the same order, each with its rows' per-sample shape and the bytes it moves."""
    edges = plan_edges(ops, placed)
    out = []
    for backward in (False, True):
        for edge in edges:
            src = placed.waves[edge.producer[0]].slices[edge.producer[1]]
            op, boundary = ops[src.metaop], src.first_layer + src.num_layers
            shape, per_row = out_shape(op, boundary), row_bytes(op, boundary, element_bytes)
            moves = edge.backward if backward else edge.forward
            for a, b, start, stop in zip(moves.senders.tolist(), moves.receivers.tolist(), moves.starts.tolist(),
                                         moves.stops.tolist()):
                out.append(PlanPiece(wave=edge.wave, backward=backward, src=a, dst=b, producer=edge.producer,
                                     consumer=edge.consumer, target=edge.target, task=edge.task, input=edge.input,
                                     start=start, stop=stop, shape=shape,
                                     bytes=0.0 if a == b else (stop - start) * per_row))
    return out


ModuleKey = tuple[str, int, int]  # (param group | "embed:<component>" | "adapt:<component>" | "head:<task>", layer, TP rank)


@dataclass(frozen=True)
class Holding:
    """One module shard of the plan and the devices that hold it.

    Layers: ``(param_group, layer, TP rank)``, held by every device that runs the layer at that TP position (each TP
    rank holds its own shard). A MetaOp's input modules (``op.input_modules``: embeddings, bridges, connectors):
    ``(name, 0, 0)``, held by every device of the MetaOp's first slice. A task's loss head ``("head:<task>", 0, 0)``:
    held by the first TP device of each data-parallel rank of its loss host. ``ready_wave``: the wave after whose
    backward the shard's gradient is final everywhere (the earliest wave that runs it, since backward runs the waves
    in reverse; ``len(waves)`` for heads: the loss stage). With phases (:mod:`planner.phases`) it is the backward event,
    in execution order, after which no later one runs the shard: the earliest wave of the last phase that runs it,
    ``len(waves) + p`` for a head whose loss runs in phase ``p``. ``params``: the shard's parameters as the planner models
    them: a layer's ``/ tp`` of its parameters as ``size`` counts them, else of ``layer.params``; an input module's or
    head's from ``size`` (:func:`holdings`: the cost
    model's :meth:`~planner.costmodel.CostModel.module_size`, what ``loom profile`` counted as the runtime builds it; 0
    when unknown). ``tensors``: the shard's parameter tensors, from the same source (0 when unknown): the optimizer's
    per-tensor cost."""

    key: ModuleKey
    devices: tuple[int, ...]
    trainable: bool
    ready_wave: int
    params: float
    tensors: float = 0.0


@dataclass(frozen=True)
class Bucket:
    """Trainable shards held by exactly ``devices`` whose gradients are final after ``ready_wave``: one all-reduce
    (when ``devices`` has several members), and under ZeRO-1 one optimizer state sharded over ``devices``."""

    ready_wave: int
    devices: tuple[int, ...]
    members: tuple[ModuleKey, ...]
    params: float
    tensors: float = 0.0  # the members' parameter tensors (Holding.tensors)


ModuleSize = Callable[[str], tuple[float, float]]  # module name -> (parameters, tensors): CostModel.module_size


def holdings(ops: Sequence[MetaOp], placed: PlacedSchedule, size: ModuleSize | None = None) -> list[Holding]:
    """Every module shard of ``placed`` (frozen ones too: their holders build them), sorted by key. ``size`` gives the
    parameters and tensors of the modules the MetaOps do not size (input modules and heads whole; per layer of a
    parameter group, its tensors) (:class:`Holding`); without it they count 0."""
    size = size or (lambda name: (0.0, 0.0))
    num_waves = len(placed.waves)
    position = backward_positions(placed.phases, num_waves)
    # Per module (a parameter group's TP shard, or an input module): what runs it, in execution order, as
    # (first layer, end, holders, wave, trains, params, tensors). A layer's holders are the union over the runs that
    # cover it; its ready_wave the last backward event (in execution order) among them; trainable when any use trains
    # it (a ``mode: forward`` use of a trained component shares its modules, frozen in that use only); params and
    # tensors as the last run counts them. Runs cover layer ranges, so each stretch between their ends is priced
    # once (a 80-layer group held by a few slices is a few stretches, not 80 layers).
    runs: dict[tuple[str, int], list[tuple]] = {}
    for k, wave in enumerate(placed.waves):
        for s in wave.slices:
            op, tp = ops[s.metaop], s.layout.tp_degree
            params, tensors = size(op.param_group)  # as the runtime builds a layer (0: unknown, the modelled params)
            trains, per_shard = not op.frozen, (params or op.layer.params) / tp
            end = s.first_layer + s.num_layers
            for shard in range(tp):  # TP rank ``shard`` of every data-parallel rank holds the layer's shard
                runs.setdefault((op.param_group, shard), []).append(
                    (s.first_layer, end, s.devices[shard::tp], k, trains, per_shard, tensors))
            for name in op.input_modules if s.first_layer == 0 else ():
                runs.setdefault((name, 0), []).append((0, 1, s.devices, k, trains, *size(name)))
    table: dict[ModuleKey, tuple] = {}  # key -> the Holding's fields after its key
    for (name, shard), covering in runs.items():
        cuts = sorted({x for run in covering for x in run[:2]})
        for a, b in zip(cuts, cuts[1:]):
            here = [run for run in covering if run[0] <= a and run[1] >= b]
            if not here:
                continue
            holders: set[int] = set()
            ready = here[0][3]
            for run in here:
                holders.update(run[2])
                if position[run[3]] > position[ready]:
                    ready = run[3]
            entry = (tuple(sorted(holders)), any(run[4] for run in here), ready, here[-1][5], here[-1][6])
            for layer in range(a, b):
                table[(name, layer, shard)] = entry
    phase = phase_of_waves(placed.phases, num_waves)
    for task, (ref, _) in loss_hosts(ops, placed).items():
        host = placed.waves[ref[0]].slices[ref[1]]
        key = ("head:" + task, 0, 0)
        table[key] = (tuple(sorted(set(host.devices[::host.layout.tp_degree]))), True,
                      loss_event(num_waves, phase[ref[0]]), *size(key[0]))
    return [Holding(key, *table[key]) for key in sorted(table)]


def grad_buckets(held: Sequence[Holding], position: Mapping[int, int] | None = None) -> list[Bucket]:
    """The trainable shards grouped by (ready event, devices), in launch order: the event that runs first in backward
    first (``position``: :func:`planner.phases.backward_positions`; by default one phase, where the latest wave's
    backward ends first), then by devices. Every rank of a device set walks its buckets in this order, so collectives
    pair."""
    groups: dict[tuple[int, tuple[int, ...]], list[Holding]] = {}
    for h in held:
        if h.trainable:
            groups.setdefault((h.ready_wave, h.devices), []).append(h)
    rank = (lambda code: position[code]) if position is not None else (lambda code: -code)
    return [Bucket(wave, devs, tuple(h.key for h in groups[(wave, devs)]), sum(h.params for h in groups[(wave, devs)]),
                   sum(h.tensors for h in groups[(wave, devs)]))
            for wave, devs in sorted(groups, key=lambda g: (rank(g[0]), g[1]))]


def plan_holdings(held: Sequence[Holding]) -> list[PlanHolding]:
    return [PlanHolding(name=h.key[0], layer=h.key[1], shard=h.key[2], devices=list(h.devices), trainable=h.trainable,
                        ready_wave=h.ready_wave, params=h.params) for h in held]


def optimizer_shards(bucket: Bucket) -> list[int]:
    """ZeRO-1's owners of a bucket's shares (:attr:`planner.plan.PlanBucket.shards`): share ``i`` to the ``i``-th
    holder in rank order, the order of the all-gather's parts (a process group orders its ranks ascending)."""
    return list(bucket.devices)


def plan_buckets(buckets: Sequence[Bucket]) -> list[PlanBucket]:
    return [PlanBucket(ready_wave=b.ready_wave, devices=list(b.devices), members=list(b.members), params=b.params,
                       shards=optimizer_shards(b)) for b in buckets]


def process_groups(held: Sequence[Holding], placed: PlacedSchedule) -> list[list[int]]:
    """Every device set with several members that runs a collective: a module shard's holders (gradient all-reduce,
    ZeRO-1 all-gather), each data-parallel rank's TP group of a tensor-parallel slice, and the loss shards (a task's
    loss-head holders). Sorted, so every rank creates the groups in the same order."""
    sets = {h.devices for h in held}
    for wave in placed.waves:
        for s in wave.slices:
            tp = s.layout.tp_degree
            sets.update(tuple(s.devices[i:i + tp]) for i in range(0, len(s.devices), tp) if tp > 1)
    return [list(devices) for devices in sorted(d for d in sets if len(d) > 1)]


def assignment(plan: Plan, rank: int) -> Plan:
    """The part of ``plan`` one worker needs (its Assignment): every slice and MetaOp (a worker reads the layout of
    the slices it exchanges with), but only the pieces it sends or receives, the module shards it holds and the
    buckets it takes part in; the process groups stay whole (creating a group is collective). Sealed, so it
    round-trips through JSON like a plan."""
    return plan.model_copy(update={
        "rank": rank,
        "pieces": [p for p in plan.pieces if rank in (p.src, p.dst)],
        "holdings": [h for h in plan.holdings if rank in h.devices],
        "grad_buckets": [b for b in plan.grad_buckets if rank in b.devices],
        "transfers": [], "sync_groups": [],
    }).sealed()
