"""Assignments: the part of a Plan one worker needs, read from the Plan.

The planner decides every move between workers once (planner.program) and writes it into the Plan as
pieces; this module only selects and indexes them (nothing here re-derives who sends what), plus the
process-group facts the workers build their groups from. Pure Python (no torch): it imports the planner's plan
types, never its builders.

Conventions (planner.program's): a slice's devices are ascending; with layout dp x tp,
``devices[i*tp:(i+1)*tp]`` is data-parallel rank i, which owns samples ``[i*B/dp, (i+1)*B/dp)`` of its
MetaOp's batch B. A task's loss runs on the first TP device of each data-parallel rank of its loss host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from planner.phases import LOSS_WAVE, loss_event, phase_of_waves, phase_ranges, step_walk
from planner.plan import Plan, PlanPiece, PlanSlice
from planner.rows import rank_rows
from planner.spec import JobSpec

if TYPE_CHECKING:  # a worker reads the plan's MetaOps; it never loads the MetaGraph builder
    from planner.metagraph import MetaGraph

__all__ = ["LOSS_WAVE", "CommSchedule", "LossHost", "Piece", "SliceRef"]

Piece = PlanPiece  # one move of the program: rows of a producer's output (or their gradient) between two devices


class SliceRef(NamedTuple):
    """One slice of the plan: (wave, index in the wave); equal to the plain tuples pieces carry."""

    wave: int
    index: int


class LossHost(NamedTuple):
    """Where a task's loss runs: the devices (dp split) of one leaf slice, and the task's leaf slices."""

    task: str
    host: SliceRef
    leaves: tuple[SliceRef, ...]


def sample_range(batch_size: int, dp_degree: int, dp_rank: int) -> tuple[int, int]:
    """``(start, stop)``: the rows data-parallel rank ``dp_rank`` of ``dp_degree`` owns (planner.rows, the shares the
    plan's slices record and its pieces move; uneven by one row where the degree does not divide the batch)."""
    return rank_rows(batch_size, dp_degree, dp_rank)


def dp_rank_of(s: PlanSlice, device: int) -> int:
    return s.devices.index(device) // s.tp_degree


def tp_group_of(s: PlanSlice, dp_rank: int) -> tuple[int, ...]:
    return tuple(s.devices[dp_rank * s.tp_degree:(dp_rank + 1) * s.tp_degree])


def layer_tp_groups(plan: Plan, decoded: Callable[[int], Sequence[tuple[str, int]] | None],
                    device: int | None = None) -> dict[tuple[tuple[str, int], int], tuple[int, ...]]:
    """(layer key, device) -> the TP group (devices) in which the device runs that layer, for every slice of ``plan``
    at tensor_parallel > 1 (only ``device``'s slices when given): a slice runs its MetaOp's layers, or, where
    ``decoded(metaop)`` names keys (a generate use), the component's layers it decodes with (runtime.tp_decode), not
    its one-layer stand-in. The executor builds its megatron-core blocks in these groups and runtime.rollout.Roles
    cuts each hand-off for them. NotImplementedError when a device would run one layer in two TP groups."""
    out: dict[tuple[tuple[str, int], int], tuple[int, ...]] = {}
    for wave in plan.waves:
        for s in wave.slices:
            if s.tp_degree == 1 or (device is not None and device not in s.devices):
                continue
            op = plan.metaops[s.metaop]
            keys = decoded(s.metaop) or [(op.param_group, j) for j in range(s.first_layer,
                                                                             s.first_layer + s.num_layers)]
            for i in range(0, len(s.devices), s.tp_degree):
                group = tuple(s.devices[i:i + s.tp_degree])
                for d in group if device is None else [device] if device in group else []:
                    for key in keys:
                        if out.setdefault((key, d), group) != group:
                            raise NotImplementedError(
                                f"device {d} runs layer {key[1]} of {key[0]} in two TP groups {out[key, d]} and "
                                f"{group}; the runtime needs one.")
    return out


def is_lead(s: PlanSlice, device: int) -> bool:
    return s.devices.index(device) % s.tp_degree == 0


class CommSchedule:
    """The plan's slices and pieces, indexed: the pieces at every boundary in the plan's order, the number of
    inputs of every slice, the loss hosts (all read from the pieces), and the phases (planner.phases): a loss
    stage's pieces and hosts belong to the phase of the host's wave; ``walk``, the order of one step's events over
    its ``num_micro`` micro-batches (planner.phases.step_walk, ``pipelined`` or in order, pipelined 1F1B with
    ``one_f_one_b``)."""

    def __init__(self, plan: Plan, num_micro: int = 1, pipelined: bool = False, one_f_one_b: bool = False):
        self.plan = plan
        self.phases = phase_ranges(plan.phases, len(plan.waves))  # [first, end) waves of each phase
        self.walk = step_walk(tuple(plan.phases), len(plan.waves), num_micro, pipelined, one_f_one_b)
        self.phase_of = phase_of_waves(plan.phases, len(plan.waves))
        self.slices = {SliceRef(k, i): s for k, w in enumerate(plan.waves) for i, s in enumerate(w.slices)}
        self.by_metaop: dict[int, list[SliceRef]] = {}
        for ref in sorted(self.slices):
            self.by_metaop.setdefault(self.slices[ref].metaop, []).append(ref)
        self.forward_pieces: dict[int, list[Piece]] = {}
        self.backward_pieces: dict[int, list[Piece]] = {}
        self.inputs: dict[SliceRef, int] = {}
        leaves: dict[str, tuple[SliceRef, dict[SliceRef, None]]] = {}
        for p in plan.pieces:
            (self.backward_pieces if p.backward else self.forward_pieces).setdefault(p.wave, []).append(p)
            if p.backward:
                continue
            if p.consumer is not None:
                ref = SliceRef(*p.consumer)
                self.inputs[ref] = max(self.inputs.get(ref, 0), p.input + 1)
            else:
                leaves.setdefault(p.task, (SliceRef(*p.target), {}))[1][SliceRef(*p.producer)] = None
        self.loss_hosts = [LossHost(task, host, tuple(refs)) for task, (host, refs) in leaves.items()]

    def batch(self, metaop: int) -> int:
        return self.plan.metaops[metaop].batch_size

    def num_inputs(self, ref: SliceRef) -> int:
        """How many inputs feed ``ref``'s first layer (0: a root MetaOp's layer 0, which reads raw data)."""
        return self.inputs.get(ref, 0)

    def pieces_at(self, wave: int, backward: bool, phase: int | None = None) -> list[Piece]:
        """The pieces of the boundary before ``wave`` (LOSS_WAVE: the loss stage's, of phase ``phase`` when given), in
        the plan's order."""
        pieces = (self.backward_pieces if backward else self.forward_pieces).get(wave, [])
        if wave == LOSS_WAVE and phase is not None and len(self.phases) > 1:
            pieces = [p for p in pieces if self.phase_of[p.target[0]] == phase]
        return pieces

    def loss_hosts_of(self, phase: int) -> list[LossHost]:
        """The loss hosts whose loss runs in ``phase``."""
        return [h for h in self.loss_hosts if self.phase_of[h.host.wave] == phase]

    def loss_event(self, phase: int) -> int:
        """The ready code of ``phase``'s loss stage (buckets of heads whose loss runs there)."""
        return loss_event(len(self.plan.waves), phase)

    def my_slices(self, device: int) -> list[SliceRef]:
        """The slices ``device`` runs, in wave order (at most one per wave)."""
        return [r for r in sorted(self.slices) if device in self.slices[r].devices]


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


def holders(plan: Plan) -> dict[tuple[str, int, int], tuple[int, ...]]:
    """For every module shard of the plan (planner.program.holdings): the devices that hold it, whose gradients of
    it are summed. Keys ``(name, layer, shard)``: ``(param_group, layer, tp rank)`` for layers,
    ``("embed:" | "adapt:" + component, 0, 0)`` for input modules, ``("head:" + task, 0, 0)`` for task heads. An input
    module on a device that is not the first of its TP group takes no gradient (see the executor)."""
    return {(h.name, h.layer, h.shard): tuple(h.devices) for h in plan.holdings}


def loss_groups(schedule: CommSchedule) -> dict[str, tuple[int, ...]]:
    """Per task: the devices that compute its loss, one per data-parallel rank of its loss host (the first of each
    TP group), where a loss over the whole batch gathers its rows (runtime.data.TaskBatch.every_row)."""
    out = {}
    for host in schedule.loss_hosts:
        s = schedule.slices[host.host]
        out[host.task] = tuple(d for d in s.devices if is_lead(s, d))
    return out
