"""Assignments: the part of a Plan one worker needs, and the data movement between workers.

Pure Python (no torch): everything here is a function of the Plan, so every worker derives the
same communication schedule without talking to the others, and tests can check it directly.

Conventions (the same as the planner's placement and simulator):
- a slice's devices are ascending; with layout dp x tp, ``devices[i*tp:(i+1)*tp]`` is data-parallel
  rank i, which owns samples ``[i*B/dp, (i+1)*B/dp)`` of its MetaOp's batch B;
- the input of a slice's first layer comes from the previous slice of the same MetaOp, from the
  last slice of each predecessor MetaOp (a use with several inputs: one per dependency, in the
  plan's ``deps`` order, which is MetaOp id order), or (for a root MetaOp's layer 0) from the
  component's embedding of raw data;
- a task's loss runs on the last slice (in wave order) of its leaf MetaOps, on the first TP device of
  each of that slice's data-parallel ranks; the leaves' outputs move there after the last wave;
- forward, the first TP device of a producer's dp rank sends its rows to every device that needs
  them (all TP devices of a consumer's dp rank); backward, the first TP device of the consumer's dp
  rank sends the gradient of those rows to every TP device of the producer's dp rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from planner.metagraph import MetaGraph, build_metagraph
from planner.plan import Plan, PlanSlice
from planner.spec import JobSpec
from runtime.embeddings import input_modules

LOSS_WAVE = -1  # the pseudo-wave of the loss stage, after every real wave


@dataclass(frozen=True)
class SliceRef:
    """One slice of the plan: (wave, index in the wave)."""

    wave: int
    index: int


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of a producer slice's output moving from device ``src`` to ``dst``.

    ``consumer`` is the consuming slice, or None for the loss stage of ``task``. ``input`` is which of the
    consumer's inputs the rows belong to: the index into :meth:`CommSchedule.producers` (0 for a single
    input and for the loss stage)."""

    src: int
    dst: int
    src_group: tuple[int, ...]  # the producer dp rank's TP devices (src first): all need the gradient back
    lead: bool  # dst is the first TP device of its dp rank: the one that sends the gradient back
    producer: SliceRef
    consumer: SliceRef | None
    task: str
    start: int
    stop: int
    input: int = 0


@dataclass(frozen=True)
class LossHost:
    """Where a task's loss runs: the devices (dp split) of one leaf slice, and the task's leaf slices."""

    task: str
    host: SliceRef
    leaves: tuple[SliceRef, ...]


def sample_range(batch_size: int, dp_degree: int, dp_rank: int) -> tuple[int, int]:
    per = batch_size // dp_degree
    return dp_rank * per, (dp_rank + 1) * per


def dp_rank_of(s: PlanSlice, device: int) -> int:
    return s.devices.index(device) // s.tp_degree


def tp_group_of(s: PlanSlice, dp_rank: int) -> tuple[int, ...]:
    return tuple(s.devices[dp_rank * s.tp_degree:(dp_rank + 1) * s.tp_degree])


def owners(s: PlanSlice, batch_size: int) -> list[tuple[tuple[int, ...], int, int]]:
    """(TP devices, start, stop) of every data-parallel rank; the first device sends the rows."""
    return [(tp_group_of(s, r), *sample_range(batch_size, s.dp_degree, r)) for r in range(s.dp_degree)]


def receivers(s: PlanSlice, batch_size: int, leads_only: bool = False) -> list[tuple[int, bool, int, int]]:
    """(device, is first TP device, start, stop) for the devices of the slice that need input rows (all of
    them: TP ranks of one dp rank compute on the same rows; only the first ones with ``leads_only``)."""
    out = []
    for i, device in enumerate(s.devices):
        lead = i % s.tp_degree == 0
        if lead or not leads_only:
            out.append((device, lead, *sample_range(batch_size, s.dp_degree, i // s.tp_degree)))
    return out


def is_lead(s: PlanSlice, device: int) -> bool:
    return s.devices.index(device) % s.tp_degree == 0


class CommSchedule:
    """Producers of every slice, the loss hosts, and the pieces that move at every boundary."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.slices = {SliceRef(k, i): s for k, w in enumerate(plan.waves) for i, s in enumerate(w.slices)}
        self.by_metaop: dict[int, list[SliceRef]] = {}
        for ref in sorted(self.slices, key=lambda r: (r.wave, r.index)):
            self.by_metaop.setdefault(self.slices[ref].metaop, []).append(ref)
        self.successors: dict[int, list[int]] = {op.id: [] for op in plan.metaops}
        for op in plan.metaops:
            for d in op.deps:
                self.successors[d].append(op.id)
        self.loss_hosts = [self._loss_host(task) for task in dict.fromkeys(op.task for op in plan.metaops)]
        self.forward_pieces: dict[int, list[Piece]] = {}
        for ref in sorted(self.slices, key=lambda r: (r.wave, r.index)):
            for i, producer in enumerate(self.producers(ref)):
                self.forward_pieces.setdefault(ref.wave, []).extend(self._pieces(producer, ref, ref, i))
        for host in self.loss_hosts:
            for leaf in host.leaves:
                self.forward_pieces.setdefault(LOSS_WAVE, []).extend(self._pieces(leaf, host.host, None))

    def batch(self, metaop: int) -> int:
        return self.plan.metaops[metaop].batch_size

    def producer(self, ref: SliceRef) -> SliceRef | None:
        """The slice whose output feeds ``ref``'s first layer (the first of :meth:`producers`); None for a root
        MetaOp's layer 0 (embedding)."""
        producers = self.producers(ref)
        return producers[0] if producers else None

    def producers(self, ref: SliceRef) -> list[SliceRef]:
        """The slices whose outputs feed ``ref``'s first layer, one per input: the previous slice of the same
        MetaOp, or the last slice of every dependency in the plan's ``deps`` order; [] for a root MetaOp's
        layer 0 (embedding)."""
        s = self.slices[ref]
        if s.first_layer > 0:
            return [next(r for r in self.by_metaop[s.metaop]
                         if self.slices[r].first_layer + self.slices[r].num_layers == s.first_layer)]
        return [self.last_slice(d) for d in self.plan.metaops[s.metaop].deps]

    def last_slice(self, metaop: int) -> SliceRef:
        return self.by_metaop[metaop][-1]

    def _loss_host(self, task: str) -> LossHost:
        leaves = [op.id for op in self.plan.metaops if op.task == task and not self.successors[op.id]]
        refs = tuple(self.last_slice(m) for m in leaves)
        host = max(refs, key=lambda r: (r.wave, self.slices[r].metaop))
        return LossHost(task, host, refs)

    def _pieces(self, producer: SliceRef, target: SliceRef, consumer: SliceRef | None, input: int = 0) -> list[Piece]:
        """Rows of ``producer``'s output (``consumer``'s input number ``input``) that each device of ``target``
        needs (its dp range), by owner."""
        src, dst = self.slices[producer], self.slices[target]
        task = self.plan.metaops[src.metaop].task
        batch = self.batch(src.metaop)
        out = []
        for device, lead, lo, hi in receivers(dst, batch, leads_only=consumer is None):
            for group, a, b in owners(src, batch):
                start, stop = max(lo, a), min(hi, b)
                if start < stop:
                    out.append(Piece(group[0], device, group, lead, producer, consumer, task, start, stop, input))
        return out

    def pieces_for(self, wave: int, device: int) -> tuple[list[Piece], list[Piece]]:
        """(pieces ``device`` sends, pieces it receives) at the forward boundary before ``wave``
        (LOSS_WAVE: before the loss stage). Backward moves the same pieces the other way."""
        pieces = self.forward_pieces.get(wave, [])
        return [p for p in pieces if p.src == device], [p for p in pieces if p.dst == device]

    def backward_pieces_for(self, wave: int, device: int) -> tuple[list[tuple[Piece, int]], list[Piece]]:
        """Backward at the boundary before ``wave``: ([(piece, target device)] whose input gradient
        ``device`` sends, [pieces whose gradient it receives]). Only a consumer's first TP device sends."""
        pieces = [p for p in self.forward_pieces.get(wave, []) if p.lead]
        sends = [(p, target) for p in pieces if p.dst == device for target in p.src_group]
        return sends, [p for p in pieces if device in p.src_group]

    def my_slices(self, device: int) -> list[SliceRef]:
        """The slices ``device`` runs, in wave order (at most one per wave)."""
        return [r for r in sorted(self.slices, key=lambda r: (r.wave, r.index)) if device in self.slices[r].devices]


def input_order(job: JobSpec, graph: MetaGraph, metaop: int) -> list[int]:
    """Positions in MetaOp ``metaop``'s ``deps`` (sorted by id) of its inputs in the order their outputs are
    concatenated along the sequence axis: the order of its use's ``after:`` list. ``[0]`` or ``[]`` for a
    MetaOp with one input or none."""
    op = graph.metaops[metaop]
    if len(op.deps) < 2:
        return list(range(len(op.deps)))
    task = next(t for t in job.tasks if t.name == op.task)
    use = next(u for u in task.components if u.use_name == op.use)
    position = {graph.metaops[d].use: i for i, d in enumerate(op.deps)}
    return [position[name] for name in use.after]


def layer_tp_degrees(plan: Plan, schedule: CommSchedule) -> dict[tuple[str, int], int]:
    """The TP degree of every (param_group, layer); a layer must keep one degree over the whole plan."""
    degrees: dict[tuple[str, int], int] = {}
    for s in schedule.slices.values():
        op = plan.metaops[s.metaop]
        for layer in range(s.first_layer, s.first_layer + s.num_layers):
            if degrees.setdefault((op.param_group, layer), s.tp_degree) != s.tp_degree:
                raise NotImplementedError(
                    f"layer {layer} of {op.param_group} runs at tensor-parallel degrees {degrees[(op.param_group, layer)]} "
                    f"and {s.tp_degree}; the runtime needs one degree per layer."
                )
    return degrees


def device_sets_for_sync(job: JobSpec, plan: Plan, schedule: CommSchedule
                         ) -> dict[tuple[str, int, int], tuple[int, ...]]:
    """For every parameter shard: the devices whose gradients of it are summed.

    Keys ``(name, layer, shard)``: ``(param_group, layer, tp rank)`` for layers (each TP rank holds its own
    shard; summing over one TP rank's devices adds one contribution per data-parallel rank),
    ``("embed:" + component, 0, 0)`` and ``("adapt:" + component, 0, 0)`` for input modules (held where the layer 0
    of a MetaOp that runs them runs: runtime.embeddings.input_modules) and
    ``("head:" + task, 0, 0)`` for task heads (held by the loss host's first TP devices). An embedding
    on a device that is not the first of its TP group takes no gradient (see the executor)."""
    graph = build_metagraph(job)
    holders: dict[tuple[str, int, int], set[int]] = {}
    for s in schedule.slices.values():
        op = plan.metaops[s.metaop]
        for i, device in enumerate(s.devices):
            for layer in range(s.first_layer, s.first_layer + s.num_layers):
                holders.setdefault((op.param_group, layer, i % s.tp_degree), set()).add(device)
        for name in input_modules(job, graph, graph.metaops[s.metaop]) if s.first_layer == 0 else []:
            holders.setdefault((name, 0, 0), set()).update(s.devices)
    for host in schedule.loss_hosts:
        s = schedule.slices[host.host]
        holders.setdefault(("head:" + host.task, 0, 0), set()).update(d for d in s.devices if is_lead(s, d))
    return {key: tuple(sorted(devs)) for key, devs in sorted(holders.items())}


def loss_groups(schedule: CommSchedule) -> dict[str, tuple[int, ...]]:
    """Per task: the devices that compute its loss, one per data-parallel rank of its loss host (the first of each
    TP group), where a loss over the whole batch gathers its rows (runtime.data.TaskBatch.every_row)."""
    out = {}
    for host in schedule.loss_hosts:
        s = schedule.slices[host.host]
        out[host.task] = tuple(d for d in s.devices if is_lead(s, d))
    return out


def tp_groups(schedule: CommSchedule) -> list[tuple[int, ...]]:
    """The device sets of every data-parallel rank of every slice with tensor parallelism."""
    return sorted({tp_group_of(s, r) for s in schedule.slices.values() if s.tp_degree > 1 for r in range(s.dp_degree)})


def distinct_groups(sets: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Device sets with more than one member, deduplicated and sorted: every rank creates these groups in
    this order (torch.distributed.new_group must be called by all ranks)."""
    return sorted({s for s in sets if len(s) > 1})
