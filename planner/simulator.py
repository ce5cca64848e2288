"""Simulator: the predicted iteration time of a placed schedule under one cost model.

Owns :func:`simulate` and the primitives the planner reuses: :class:`Phase` / :func:`backward_ends` (a
forward-then-reverse-backward timeline with barriers, for callers that want one). The bytes of the program's moves and
the time of concurrent transfers at one boundary are :mod:`planner.flows` (``move_flows``, ``boundary_time``).

Model. Times are in seconds, bytes per iteration.

- **the timeline** (:mod:`planner.timeline`): per device, as the runtime's workers run a plan, without global
  barriers. Phase by phase (:mod:`planner.phases`; one by default): the phase's waves forward in order, its tasks'
  loss stage, its waves backward in reverse. A slice starts when all its devices are free and takes its forward
  part (``1 / passes`` of :func:`slice_seconds`, :meth:`CostModel.passes`) or its backward part (the rest:
  ``backward_factor``, plus the recomputed forward under recompute). A slice takes ``curve.time(n) * layers``
  forward+backward, plus, for a MetaOp's first slice, :meth:`~planner.costmodel.CostModel.embed_time` (0 unless
  profiled). The loss stage runs every task's loss head on the first TP device of each data-parallel rank of the
  last slice of its leaf MetaOps (the runtime's loss host), :meth:`~planner.costmodel.CostModel.head_time` each.
  A device draws its rows of a task's batch once, before the first of these that reads them
  (:func:`batch_draws`, :meth:`~planner.costmodel.CostModel.data_time`; 0 unless profiled).
  With gradient accumulation (``training.grad_accum_steps`` k) every device walks it k times.
- **transfers**: exactly the moves of the program the runtime executes (:mod:`planner.program`, whose docstring
  gives the rules: which rows of which producer reach which device, forward and backward, local moves free), each
  row at the bytes of the producer boundary's activation shape in the compute precision
  (:func:`~planner.program.row_bytes`). An edge's moves happen at the boundary just before its consumer's wave (the
  loss stage's for the leaves' outputs to the loss hosts); activations cross it before the wave's forward, gradients
  cross it back after its backward, only to producers that run a backward pass, to every TP device of the producer.
  On the timeline, the devices a boundary's remote moves link form components, each starting when its last device
  arrives and lasting as long as its busiest link (:func:`planner.timeline.exchange_of`: a device's intra-node link
  per direction, a node's network link per direction for cross-node bytes; ``inter_bandwidth`` is per node).
- **sync, optimizer, all-gather**: :func:`~planner.sync.finish_buckets` (model in :mod:`planner.sync`) over the
  program's gradient buckets, each ready when its event (:mod:`planner.phases`) has passed on all its devices, and
  each device's own end of compute. Under ZeRO-1, in a job whose uses all train (no weight hand-offs), the
  all-gathers overlap the next iteration's forward (:func:`planner.phases.gather_events`, :func:`next_uses`): the
  prediction is the steady-state period; otherwise they end the iteration.
- **reported parts**, along the critical path (:func:`planner.sync.finish_buckets`): back from the device that steps
  last, through its exposed sync into the compute and transfers that led there. ``compute_s`` and ``transfer_s``
  are that path's slice and loss-head seconds and its exchange seconds; ``sync_s`` its exposed all-reduces;
  ``optimizer_s`` that device's step; ``gather_s`` the exposed all-gather after the last step (0 without
  ``shard_optimizer``). So ``iteration = compute + transfers + sync + optimizer + gather``, while ``sync_total_s``
  is what the sync alone would take (all buckets launched longest-first at once) and :class:`SyncInfo`
  ``time_s`` is one bucket's all-reduce.
- **per-wave numbers** (what a Plan records per wave): ``wave_durations`` (a wave's slowest slice), ``phases`` (each
  wave's duration split by its slowest slice's passes, its boundary's moves priced together by
  :func:`planner.flows.boundary_time`; then the loss stages' busiest device and moves), ``slice_seconds``: the waves as if each
  ended at a barrier, a description rather than the prediction.
- **peak memory** per device comes from the same :class:`~planner.placement.MemoryLedger` placement checks against
  (with phases, the largest phase's activations).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from planner.costmodel import CostModel, Layout
from planner.flows import Flows, boundary_time, edge_flows, shared_memo
from planner.generation import decode_batches
from planner.metagraph import MetaOp
from planner.phases import (
    FORWARD, LOSS, backward_positions, forward_positions, gather_events, gather_order, loss_event,
    phase_of_waves, phase_ranges, step_walk,
)
from planner.placement import PlacedSchedule, PlacedSlice, placed_ledger
from planner.program import LOSS_WAVE, Bucket, Holding, grad_buckets, holdings, loss_hosts, plan_edges
from planner.schedule import Problem
from planner.sync import SyncBucket, SyncOutcome, finish_buckets, gathers_overlap
from planner.timeline import Clocks, DeviceIndex, device_index, exchange_of
from planner.handoff import HandOff, HandOffGather, hand_off_gathers, hand_off_seconds, hand_offs
from planner.rolloutlag import lagged


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
    layers themselves are given by :func:`~planner.sync.sync_buckets`, and a runtime derives them from
    the slices too: they are the group's layers whose set of holders is exactly ``devices``.
    """

    param_group: str
    metaops: tuple[int, ...]
    devices: tuple[int, ...]
    bytes: float
    time_s: float


Passes = tuple[tuple[tuple[float, float], ...], ...]  # per wave, each slice's (forward, backward) seconds


@dataclass(frozen=True)
class Simulation:
    """One predicted iteration: ``iteration_time_s = compute_s + transfer_s + sync_s + optimizer_s + gather_s +
    handoff_s + reduce_s - lag_hidden_s`` (``handoff_s``: the weight hand-offs after the step, planner.handoff; 0
    without them; ``reduce_s``: the step's closing all-reduces over every device, :meth:`CostModel.step_reduce_time`;
    ``lag_hidden_s``: with ``training.rollout_lag: 1`` the generation hidden behind the previous step,
    planner.rolloutlag; the rows it decodes a step ahead are in ``peak_memory_bytes``, through the ledger).
    With gradient accumulation (``training.grad_accum_steps`` k) ``compute_s`` and ``transfer_s`` are k passes of
    the waves over one micro-batch each; ``wave_durations``, ``phases`` and ``loss_s`` are one pass.

    ``sync_s`` is the exposed part of the gradient sync (what backward did not hide); ``sync_total_s``
    is the sync alone, all buckets launched at once. ``sync_order`` gives the indices of
    ``sync_groups`` in the launch order the prediction assumes. ``gather_s`` is the exposed part of
    ZeRO-1's all-gather of updated parameters (what ends after the slowest device's optimizer step).
    """

    iteration_time_s: float
    compute_s: float
    transfer_s: float
    sync_s: float
    optimizer_s: float
    wave_durations: tuple[float, ...]  # compute time per wave (max slice time)
    transfers: tuple[TransferInfo, ...]
    sync_groups: tuple[SyncInfo, ...]
    peak_memory_bytes: tuple[float, ...]  # per device
    sync_total_s: float = 0.0
    sync_order: tuple[int, ...] = ()
    loss_s: float = 0.0  # the loss stage (part of compute_s)
    gather_s: float = 0.0
    phases: tuple[Phase, ...] = ()  # the timeline: one per wave, then the loss stage's
    slice_seconds: tuple[tuple[float, ...], ...] = ()  # per wave, each slice's compute (slice_seconds + batch_draws)
    slice_passes: Passes = ()  # the same split into (forward with the data drawn before it, backward)
    holdings: tuple[Holding, ...] = ()  # the module shards and holders the sync model priced (planner.program)
    buckets: tuple[Bucket, ...] = ()  # their gradient buckets, in launch order
    handoff_s: float = 0.0  # the weight hand-offs after the step (planner.handoff), on the critical path
    handoffs: tuple[HandOff, ...] = ()
    handoff_gathers: tuple[HandOffGather, ...] = ()  # the TP all-gathers the hand-offs' senders run first
    lag_hidden_s: float = 0.0  # rollout_lag 1: the synchronous iteration minus the pipeline's period (rolloutlag)
    reduce_s: float = 0.0  # the step's closing all-reduces over every device (the losses, the clipping norm)


# --------------------------------------------------------------------------- transfers


Decoded = list[list[tuple[Flows, int]]]  # per boundary: forward flows of rows decoded once for m micro-batches, m


def boundary_transfers(
    problem: Problem, placed: PlacedSchedule, cost_model: CostModel
) -> tuple[list[TransferInfo], list[list[Flows]], list[list[Flows]], Decoded]:
    """Every transfer of ``placed``'s program (:func:`planner.program.plan_edges`), and per boundary its flows of
    activations forward (before wave ``k``'s forward) and of gradients back (after its backward), one micro-batch's.
    Boundaries are numbered like backward events (:mod:`planner.phases`): ``k`` before wave ``k``, ``len(waves) + p``
    the loss stage of phase ``p`` (the leaves' outputs to the loss hosts and their gradients). Last, per boundary, those
    of its forward flows whose producer decodes ``m > 1`` micro-batches' rows at once
    (:func:`planner.generation.decode_batches`), with ``m``: they all cross in the first micro-batch (:func:`walk`)."""
    num_waves = len(placed.waves)
    phase = phase_of_waves(placed.phases, num_waves)
    forward: list[list[Flows]] = [[] for _ in range(num_waves + len(placed.phases))]
    backward: list[list[Flows]] = [[] for _ in range(num_waves + len(placed.phases))]
    decoded: Decoded = [[] for _ in range(num_waves + len(placed.phases))]
    infos: list[TransferInfo] = []
    for edge in plan_edges(problem.graph.metaops, placed):
        fwd, bwd = edge_flows(problem, placed, edge, cost_model)
        if not len(fwd.nbytes) and not len(bwd.nbytes):
            continue
        k = loss_event(num_waves, phase[edge.target[0]]) if edge.wave == LOSS_WAVE else edge.wave
        forward[k].append(fwd)
        backward[k].append(bwd)
        once = decode_batches(problem.graph.metaops[placed.waves[edge.producer[0]].slices[edge.producer[1]].metaop])
        if once > 1 and len(fwd.nbytes):
            decoded[k].append((fwd, once))
        src = placed.waves[edge.producer[0]].slices[edge.producer[1]]
        dst = placed.waves[edge.target[0]].slices[edge.target[1]]
        alone = boundary_time([fwd], cost_model) + boundary_time([bwd], cost_model)
        after = phase_ranges(placed.phases, num_waves)[phase[edge.target[0]]][1] - 1 if edge.wave == LOSS_WAVE else k - 1
        infos.append(TransferInfo(after, src.metaop, dst.metaop, src.devices, dst.devices, fwd.total_bytes, alone))
    return infos, forward, backward, decoded


def simulate_transfers(
    problem: Problem, placed: PlacedSchedule, cost_model: CostModel
) -> tuple[list[TransferInfo], float]:
    """Every inter-wave transfer of ``placed`` and the total transfer seconds (forward + backward)."""
    infos, forward, backward, _ = boundary_transfers(problem, placed, cost_model)
    return infos, sum(boundary_time(f, cost_model) for f in forward + backward)


# --------------------------------------------------------------------------- the forward/backward timeline


@dataclass(frozen=True)
class Phase:
    """One step of the timeline: a wave, or a stage of a baseline.

    ``forward_s + backward_s`` is its compute. ``transfer_in_s`` is the activations arriving just
    before its forward; ``transfer_back_s`` the gradients sent back across the same boundary just
    after its backward.
    """

    forward_s: float
    backward_s: float
    transfer_in_s: float = 0.0
    transfer_back_s: float = 0.0


def split_passes(op: MetaOp, seconds: float, cost_model: CostModel | None = None,
                 layout: Layout | None = None) -> tuple[float, float]:
    """(forward, backward) parts of ``seconds`` of ``op``'s compute on ``layout``: ``cost_model``'s forward share
    (CostModel.forward_fraction: measured by a profile); without a cost model ``1 / passes`` of it (every denoising
    step of a sample use, all of a generate use: CostModel.passes_fraction)."""
    share = cost_model.forward_fraction(op, layout) if cost_model is not None else CostModel.passes_fraction(op)
    forward = seconds * share
    return forward, seconds - forward


def backward_ends(phases: Sequence[Phase], start: float = 0.0) -> tuple[list[float], float]:
    """When the backward of each phase ends, and when the whole timeline ends (both absolute seconds).

    From ``start``, forward runs the phases in order, each after its incoming activations; backward
    then runs them in reverse, each followed by its gradients sent back.
    """
    t = start + sum(p.transfer_in_s + p.forward_s for p in phases)
    ends = [0.0] * len(phases)
    for k in reversed(range(len(phases))):
        t += phases[k].backward_s
        ends[k] = t
        t += phases[k].transfer_back_s
    return ends, t


def slice_seconds(problem: Problem, s: PlacedSlice, cost_model: CostModel | None = None) -> float:
    """Compute seconds of one slice: ``curve.time(n) * layers``, plus, when ``cost_model`` is given, what a MetaOp's
    first slice runs before its layers on each of its devices (:meth:`CostModel.embed_time`: a root's data and
    embedding, a bridge's or connector's input modules; 0 where not measured). A count the curve leaves out (no
    faster than a smaller one under this model: a plan placed under another profile, re-predicted) or a layout the
    curve does not pick (a memory-tightened baseline) is priced at its own layout, ``cost_model.layout_time``."""
    op = problem.graph.metaops[s.metaop]
    curve = problem.curves[s.metaop]
    n = len(s.devices)
    if cost_model is None or (n in curve.counts and curve.layout(n) == s.layout):
        per_layer = curve.time(n)
    else:
        per_layer = cost_model.layout_time(op, s.layout)
    seconds = per_layer * s.num_layers
    if cost_model is not None and s.first_layer == 0:
        seconds += cost_model.embed_time(op, cost_model.local_batch(op, s.layout))
    return seconds


def wave_phases(problem: Problem, placed: PlacedSchedule, cost_model: CostModel, forward: list[list[Flows]],
                backward: list[list[Flows]], passes: Passes, draws: dict[str, float] | None = None) -> list[Phase]:
    """Per wave the numbers a plan records (each wave split by its slowest slice's passes, its boundary's flows
    priced together as if at a barrier), then the loss stages' (forward only: :func:`loss_stage_seconds`, with the
    leaves' transfers of every phase). ``passes``: each slice's (:func:`slice_passes`), wave by wave. Descriptive:
    the iteration is priced by the timeline (:mod:`planner.timeline`)."""
    phases = []
    for k, wave in enumerate(placed.waves):
        fwd, bwd = max(passes[k], key=sum, default=(0.0, 0.0))  # the first slowest slice sets the split
        phases.append(Phase(fwd, bwd, boundary_time(forward[k], cost_model), boundary_time(backward[k], cost_model)))
    k = len(placed.waves)
    phases.append(Phase(loss_stage_seconds(problem, placed, cost_model, draws),
                        0.0, sum(boundary_time(f, cost_model) for f in forward[k:]),
                        sum(boundary_time(b, cost_model) for b in backward[k:])))
    return phases


def loss_stage_seconds(problem: Problem, placed: PlacedSchedule, cost_model: CostModel,
                       draws: dict[str, float] | None = None) -> float:
    """Seconds of the loss stage: on each device the loss heads it hosts (:func:`loss_heads`), the busiest device."""
    per_device: dict[int, float] = {}
    for _, devices, seconds in loss_heads(problem, placed, cost_model, draws):
        for d in devices:
            per_device[int(d)] = per_device.get(int(d), 0.0) + seconds
    return max(per_device.values(), default=0.0)


def loss_heads(problem: Problem, placed: PlacedSchedule, cost_model: CostModel, draws: dict[str, float] | None = None
               ) -> list[tuple[int, np.ndarray, float]]:
    """Per task with a loss: (the host's wave, the devices its head runs on, seconds): the head runs on the first TP
    device of each data-parallel rank of its host slice (:func:`planner.program.loss_hosts`) for
    :meth:`CostModel.head_time`, plus ``draws[task]`` (:func:`batch_draws`: the rows it draws itself)."""
    ops = problem.graph.metaops
    out = []
    for task, (ref, _) in loss_hosts(ops, placed).items():
        host = placed.waves[ref[0]].slices[ref[1]]
        seconds = cost_model.head_time(task, cost_model.local_batch(ops[host.metaop], host.layout))
        out.append((ref[0], np.asarray(host.devices[::host.layout.tp_degree]), seconds + (draws or {}).get(task, 0.0)))
    return out


@dataclass(frozen=True)
class Draws:
    """Seconds of drawing data (:func:`batch_draws`): per wave each slice's (before its forward), per task its loss
    head's."""

    slices: tuple[tuple[float, ...], ...]
    heads: dict[str, float]


def slice_passes(problem: Problem, placed: PlacedSchedule, seconds: Sequence[Sequence[float]], draws: Draws,
                 cost_model: CostModel) -> Passes:
    """Per wave, each slice's (forward, backward) seconds: its :func:`slice_seconds` split by its passes
    (:func:`split_passes`), the data it draws (``draws``, :func:`batch_draws`) before its forward, as the runtime
    draws it."""
    ops = problem.graph.metaops

    def one(s: PlacedSlice, t: float, d: float) -> tuple[float, float]:
        fwd, bwd = split_passes(ops[s.metaop], t, cost_model, s.layout)
        return fwd + d, bwd

    return tuple(tuple(map(one, wave.slices, times, drawn)) for wave, times, drawn in zip(placed.waves, seconds,
                                                                                             draws.slices))


def batch_draws(problem: Problem, placed: PlacedSchedule, cost_model: CostModel) -> Draws:
    """Seconds of drawing data (:meth:`CostModel.data_time`) that each slice, wave by wave, and each task's loss head
    add. A device draws its rows of a task's batch once a step (runtime.steps.StepState.batch keeps them), at the
    first of its events that reads them: the first slice of a MetaOp with input modules (its embedding or a
    connector's text reads the batch; every TP device of the slice draws), then the task's loss head (its labels;
    on the heads' devices). A slice or head pays when one of its devices has not drawn those rows (the task's rows
    at that data-parallel degree and rank) yet."""
    ops = problem.graph.metaops
    drawn: set[tuple[int, str, int, int]] = set()

    def draw(s: PlacedSlice, leads_only: bool) -> float:
        op, tp = ops[s.metaop], s.layout.tp_degree
        keys = {(d, op.task, s.layout.dp_degree, i // tp) for i, d in enumerate(s.devices) if not leads_only or i % tp == 0}
        if keys <= drawn:
            return 0.0
        drawn.update(keys)
        return cost_model.data_time(op.task, cost_model.local_batch(op, s.layout))

    slices = tuple(tuple(draw(s, False) if s.first_layer == 0 and ops[s.metaop].input_modules and ops[s.metaop].gen
                         is None else 0.0 for s in wave.slices) for wave in placed.waves)
    heads = {task: draw(placed.waves[ref[0]].slices[ref[1]], True) for task, (ref, _) in loss_hosts(ops, placed).items()}
    return Draws(slices, heads)


# --------------------------------------------------------------------------- the whole iteration


def _sync_infos(ops: Sequence[MetaOp], program: Sequence[Bucket], outcome: SyncOutcome, grad_bytes: float
                ) -> tuple[list[SyncInfo], tuple[int, ...]]:
    """The buckets with something to all-reduce that the planner sizes, and their indices in launch order."""
    infos: list[SyncInfo] = []
    index: dict[int, int] = {}
    for i, (bucket, b, t) in enumerate(zip(outcome.buckets, program, outcome.bucket_times)):
        if len(b.devices) <= 1 or b.params <= 0:
            continue  # one holder: nothing to all-reduce; or nothing sized (input modules and heads without a profile)
        index[i] = len(infos)
        names = {name for name, _, _ in b.members}
        metaops = tuple(op.id for op in ops if op.param_group in names)
        infos.append(SyncInfo(bucket.param_group, metaops, b.devices, grad_bytes * b.params, t))
    return infos, tuple(index[i] for i in outcome.launch_order if i in index)


def sync_of(program: Sequence[Bucket]) -> list[SyncBucket]:
    """The program's buckets as the sync model's (one all-reduce each over its devices, tp degree 1: a layer's TP
    shards are separate buckets), labelled by the parameter groups and modules they hold."""
    return [SyncBucket("+".join(dict.fromkeys(name for name, _, _ in b.members)), (b.members[0][1],), b.devices, 1,
                       b.params, b.tensors) for b in program]


def wave_durations(problem: Problem, placed: PlacedSchedule, cost_model: CostModel | None = None) -> tuple[float, ...]:
    """Compute seconds of each wave: its slowest slice (:func:`slice_seconds`)."""
    return tuple(
        max((slice_seconds(problem, s, cost_model) for s in wave.slices), default=0.0)
        for wave in placed.waves
    )


@dataclass(frozen=True)
class Walk:
    """Where the timeline ends: per device when its compute and transfers end (``clocks.t``, with the critical
    path's parts), and when each gradient bucket is ready."""

    clocks: Clocks
    ready: list[float]
    ready_parts: list[tuple[float, float]]  # per bucket, the (compute, transfer) path of the device it waited for
    # the first micro-batch's forward events: (code, devices, start) of every slice's forward and every loss head
    starts: tuple[tuple[int, DeviceIndex, float], ...] = ()  # devices: planner.timeline.device_index


def walk(problem: Problem, placed: PlacedSchedule, cost_model: CostModel, forward: list[list[Flows]],
         backward: list[list[Flows]], program: Sequence[Bucket], passes: Passes, draws: Draws,
         decoded: Decoded | None = None) -> Walk:
    """Run the timeline (:mod:`planner.timeline`) of ``placed``: every micro-batch walks the phases; ``program``'s
    buckets are ready when their event has passed on all their devices in the last one. ``passes``: each slice's
    forward and backward seconds (:func:`slice_passes`), wave by wave; ``draws`` (:func:`batch_draws`): the data each
    loss head draws before its loss. ``decoded`` (:func:`boundary_transfers`): rows decoded once for several
    micro-batches cross, all of them, at their boundary in the first micro-batch (runtime.transfers does the same), so
    a later micro-batch's forward there waits for no decoding device: pipelined, the stages that read the rollouts
    would otherwise meet every decode replica once per micro-batch (the 70B GRPO cell: 44.10 -> 41.00 s)."""
    num_waves = len(placed.waves)

    def exchange(flows: list[Flows]):
        flows = [f for f in flows if len(f.nbytes)]
        if not flows:
            return None
        together, ids = shared_memo(cost_model, "exchange", flows)
        if ids is not None and ids in together:
            return together[ids][1]
        found = exchange_of(*(np.concatenate([getattr(f, a) for f in flows]) for a in ("senders", "receivers", "nbytes")),
                            cost_model)
        if ids is not None:
            together[ids] = (tuple(flows), found)
        return found

    ex_fwd, ex_bwd = [exchange(f) for f in forward], [exchange(b) for b in backward]
    ex_first = list(ex_fwd)  # the first micro-batch's forward exchanges: with every micro-batch's decoded rows
    for k, once in enumerate(decoded or ()):
        if once:
            rest = [f for f in forward[k] if all(f is not g for g, _ in once)]
            ex_first[k] = exchange(rest + [Flows(f.senders, f.receivers, f.nbytes * m) for f, m in once])
            ex_fwd[k] = exchange(rest)
    # per wave: (devices, forward seconds, backward seconds, micro-batches decoded at once) of each slice; a generate
    # slice decoding m micro-batches' rows at once runs all m passes' forward in the first (planner.generation)
    ops = problem.graph.metaops
    runs = [[(device_index(s.devices), *p, decode_batches(ops[s.metaop])) for s, p in zip(wave.slices, ps)]
            for wave, ps in zip(placed.waves, passes)]
    heads: dict[int, list[tuple[DeviceIndex, float]]] = {}
    phase = phase_of_waves(placed.phases, num_waves)
    for wave, devices, seconds in loss_heads(problem, placed, cost_model, draws.heads):
        heads.setdefault(phase[wave], []).append((device_index(devices.tolist()), seconds))
    waiting: dict[int, list[int]] = {}
    for i, b in enumerate(program):
        waiting.setdefault(b.ready_wave, []).append(i)
    clocks, ready = Clocks(problem.num_devices), [0.0] * len(program)
    parts = [(0.0, 0.0)] * len(program)
    starts: list[tuple[int, DeviceIndex, float]] = []
    micro = problem.graph.num_micro_batches

    def passed(code: int, j: int) -> None:  # buckets start in the last micro-batch
        for i in waiting.get(code, ()) if j == micro - 1 else ():
            ready[i], parts[i] = clocks.latest(program[i].devices)

    for kind, j, at in step_walk(tuple(placed.phases), num_waves, micro, cost_model.in_flight > 1,
                                 cost_model.one_f_one_b):
        if kind == FORWARD:
            clocks.exchange(ex_first[at] if j == 0 else ex_fwd[at])
            for devices, fwd, _, once in runs[at]:
                started = clocks.run(devices, fwd if once == 1 else fwd * once if j == 0 else 0.0)
                if j == 0:
                    starts.append((at, devices, started))
        elif kind == LOSS:
            code = loss_event(num_waves, at)
            clocks.exchange(ex_fwd[code])
            for devices, seconds in heads.get(at, ()):
                started = clocks.run(devices, seconds)
                if j == 0:
                    starts.append((code, devices, started))
            passed(code, j)
            clocks.exchange(ex_bwd[code])
        else:
            for devices, _, bwd, _ in runs[at]:
                clocks.run(devices, bwd)
            passed(at, j)
            clocks.exchange(ex_bwd[at])
    return Walk(clocks, ready, parts, tuple(starts))


def next_uses(starts: Sequence[tuple[int, DeviceIndex, float]], events: Sequence[int], program: Sequence[Bucket],
              position: dict[int, int], num_devices: int) -> list[float]:
    """Per bucket of ``program``, when the next iteration's forward first waits for its ZeRO-1 all-gather (seconds
    from the iteration's start): each holder waits before its own first forward event at or after the bucket's
    :func:`~planner.phases.gather_events` event (``events``), so the earliest start of such an event over its
    devices (``starts``: :attr:`Walk.starts`; ``position``: :func:`~planner.phases.forward_positions`)."""
    at: dict[int, list[tuple[DeviceIndex, float]]] = {}
    for code, devices, start in starts:
        at.setdefault(position[code], []).append((devices, start))
    wanted: dict[int, list[int]] = {}
    for i, code in enumerate(events):
        wanted.setdefault(position[code], []).append(i)
    upcoming = np.full(num_devices, np.inf)  # per device, the start of its first forward event at or after q
    out = [math.inf] * len(program)
    for q in sorted(set(at) | set(wanted), reverse=True):
        for devices, start in at.get(q, ()):
            upcoming[devices] = np.minimum(upcoming[devices], start)
        for i in wanted.get(q, ()):
            out[i] = float(upcoming[device_index(program[i].devices)].min())
    return out


SIM_MEMO_SIZE = 16  # the most recent simulations kept beside the cost model (:func:`simulate`)
SIM_MEMO_MAX_SLOTS = 4096  # placements of at most this many slice x device slots are remembered


def simulate(problem: Problem, placed: PlacedSchedule, cost_model: CostModel) -> Simulation:
    """Predicted iteration time of ``placed`` (model in the module docstring). Remembered: the last
    :data:`SIM_MEMO_SIZE` simulations are kept beside the cost model (one per ``plan_job``, as
    :func:`planner.timeline.flow_memo`'s prices), since a search prices the same placement again within a few steps
    (a bucket split's fractions that round to the same cut, a candidate placed by two paths): 5-15% of a grid cell's
    simulations. Keyed by the problem object (a memory-tightened problem has other curves) and the placement; only
    placements of at most :data:`SIM_MEMO_MAX_SLOTS` slice x device slots (the grid's are under 2,000): at 10,240 devices
    hashing a placement is work that its rare repeat would not repay, and its simulations are large to keep."""
    if sum(len(s.devices) for w in placed.waves for s in w.slices) > SIM_MEMO_MAX_SLOTS:
        return _simulate(problem, placed, cost_model)
    memo = cost_model.__dict__.setdefault("_sim_memo", OrderedDict())
    key = (id(problem), placed)
    hit = memo.get(key)
    if hit is not None and hit[0] is problem:
        memo.move_to_end(key)
        return hit[1]
    sim = _simulate(problem, placed, cost_model)
    memo[key] = (problem, sim)
    if len(memo) > SIM_MEMO_SIZE:
        memo.popitem(last=False)
    return sim


def one_f_one_b_if_no_slower(problem: Problem, cost_model: CostModel, placed: PlacedSchedule, sim: Simulation
                             ) -> tuple[CostModel, Simulation]:
    """``placed``'s pipelined micro-batches walked 1F1B (:meth:`CostModel.with_one_f_one_b`) when that fits and is
    predicted no slower than GPipe's fill and drain (``sim``), or fits where GPipe's does not: the same bubble on
    pipeline stages of their own, each wave holding fewer micro-batches' activations; else ``cost_model`` and ``sim``
    as given. On waves that share devices the walks differ in time (the 70B GRPO cell's colocated stages: 43.83 s
    1F1B against 41.00 s GPipe)."""
    one = cost_model.with_one_f_one_b(True)
    found = simulate(problem, placed, one)
    memory = cost_model.hw.memory_bytes
    if max(found.peak_memory_bytes, default=0.0) > memory:
        return cost_model, sim
    gpipe_fits = max(sim.peak_memory_bytes, default=0.0) <= memory
    return (one, found) if not gpipe_fits or found.iteration_time_s <= sim.iteration_time_s * (1 + 1e-9) else (
        cost_model, sim)


def _simulate(problem: Problem, placed: PlacedSchedule, cost_model: CostModel) -> Simulation:
    draws = batch_draws(problem, placed, cost_model)
    seconds = tuple(tuple(slice_seconds(problem, s, cost_model) for s in w.slices) for w in placed.waves)
    drawn = tuple(tuple(t + d for t, d in zip(times, extra)) for times, extra in zip(seconds, draws.slices))
    durations = tuple(max(times, default=0.0) for times in drawn)  # as wave_durations, with the data drawn
    transfers, forward, backward, decoded = boundary_transfers(problem, placed, cost_model)
    passes = slice_passes(problem, placed, seconds, draws, cost_model)
    phases = wave_phases(problem, placed, cost_model, forward, backward, passes, draws.heads)
    held = holdings(problem.graph.metaops, placed, cost_model.module_size)
    program = grad_buckets(held, backward_positions(placed.phases, len(placed.waves)))  # what the runtime all-reduces
    done = walk(problem, placed, cost_model, forward, backward, program, passes, draws, decoded)
    ledger = placed_ledger(problem, placed, cost_model)
    clocks = done.clocks
    events = gather_events(problem.graph.metaops, placed.waves, placed.phases, program)
    order = gather_order(events, placed.phases, len(placed.waves))
    uses = (next_uses(done.starts, events, program, forward_positions(placed.phases, len(placed.waves)),
                      problem.num_devices) if gathers_overlap(problem.graph, cost_model) else None)
    outcome = finish_buckets(sync_of(program), done.ready, clocks.t, cost_model, problem.num_devices, uses, order)
    c = outcome.critical_device
    # the critical path: the critical device's own compute, or the device whose readiness began its exposed sync
    # (where collectives wait for compute, planner.sync.finish_buckets, the last of its bucket's devices to stop)
    origin = outcome.sync_origin
    if origin is not None and cost_model.hw.device.overlaps_collectives:
        compute_s, transfer_s = done.ready_parts[origin]
    else:
        d = c if origin is None else max(outcome.buckets[origin].devices, key=lambda i: clocks.t[i])
        compute_s, transfer_s = float(clocks.compute[d]), float(clocks.transfer[d])
    sync_infos, sync_order = _sync_infos(problem.graph.metaops, program, outcome, cost_model.grad_bytes)
    dpn = max(1, cost_model.hw.devices_per_node)
    offs = hand_offs(problem.graph.metaops, placed, problem.graph.weights_from, cost_model.param_bytes_moved, dpn,
                     cost_model.module_size, held, problem.graph.tp_whole_params, cost_model.decode_matrix_bytes,
                     cost_model.module_matrices)
    gathers = hand_off_gathers(problem.graph.metaops, placed, problem.graph.weights_from, cost_model.param_bytes_moved,
                               dpn, problem.graph.tp_whole_params, cost_model.module_size, held)
    handoff_s = hand_off_seconds(offs, cost_model, dpn, gathers)
    peak = [float(x) for x in ledger.peak()]
    lag = lagged(problem.graph, placed, durations, outcome.iteration_time_s, handoff_s)
    reduce_s = cost_model.step_reduce_time(problem.num_devices)
    return Simulation(
        iteration_time_s=(lag.period_s if lag else outcome.iteration_time_s + handoff_s) + reduce_s,
        compute_s=compute_s,
        transfer_s=transfer_s,
        sync_s=outcome.sync_s,
        optimizer_s=outcome.optimizer_s,
        wave_durations=durations,
        transfers=tuple(transfers),
        sync_groups=tuple(sync_infos),
        peak_memory_bytes=tuple(peak),
        sync_total_s=outcome.sync_total_s,
        sync_order=sync_order,
        loss_s=phases[-1].forward_s,
        gather_s=outcome.gather_s,
        phases=tuple(phases),
        slice_seconds=drawn,
        slice_passes=passes,
        holdings=tuple(held),
        buckets=tuple(program),
        handoff_s=handoff_s,
        reduce_s=reduce_s,
        handoffs=tuple(offs),
        handoff_gathers=tuple(gathers),
        lag_hidden_s=lag.hidden_s if lag else 0.0,
    )
