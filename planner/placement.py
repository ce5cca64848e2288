"""Device placement: concrete device ids for every slice of a wave schedule, and the memory ledger.

Owns :class:`PlacedSlice`, :class:`PlacedWave`, :class:`PlacedSchedule`, :func:`place_schedule` and
:class:`MemoryLedger`, the one place that counts what a device holds. The simulator and the
baselines reuse the ledger, so peak memory is computed one way only.

Conventions the runtime relies on:

- device ``d`` lives on node ``d // devices_per_node``;
- a slice's ``devices`` are ascending. With layout ``dp x tp``, ``devices[i*tp:(i+1)*tp]`` is one
  tensor-parallel group (inside one node) and data-parallel rank ``i``. The batch is split into
  ``dp`` equal runs of consecutive samples, in rank order;
- layer ``j`` of every MetaOp of one ``param_group`` is the same set of parameters, so a device that
  runs layer ``j`` of two such MetaOps holds it once.

Memory model (bytes per device; the two parts of :meth:`CostModel.layer_memory`):

- parameter state of every layer the device ever runs (:meth:`CostModel.bytes_per_param`: weight,
  gradient and the optimizer state sharded over the slice's data-parallel group; 2 B/param frozen),
  divided by the TP degree. A layer held twice counts once, at its largest shard;
- activations saved for backward by every forward slice the device runs (a MetaOp without backward: one output
  for all its layers, :meth:`CostModel.activation_bytes`). Forward runs the waves in
  order and backward runs them in reverse, so all of these are live when forward ends: that is the
  peak. With phases (:mod:`planner.phases`) a phase's activations are freed by its backward before
  the next phase runs: the activation peak is the largest phase's (parameters are held throughout).

Placement is greedy, wave by wave, and deterministic:

1. A MetaOp that continues on the same device count keeps exactly its devices, so no bytes move.
   Failing that, one that continues on another count takes devices whose data-parallel ranks line
   up with its previous slice's (:mod:`planner.reshard`: the fewest rows move, inside nodes), when
   the ratio of the counts is whole. Then the same two for a first slice and its predecessor's last
   slice (same count and layout: its devices; else lined up, for the same batch).
2. The other slices go largest TP degree first, then largest count, then heaviest input. Each
   one scores every free device: a bonus where the slice's input already lies (its MetaOp's
   previous slice, or its predecessors' last slices), a bonus where the device already holds some
   of these layers of the parameter group (shared parameters co-located), minus the fraction of
   memory in use (balance), and a large penalty where the slice would not fit.
3. Strategy ``"pack"`` (the default): when one node has room, the slice goes into the single node
   whose best free devices score highest. Otherwise it spans the fewest, best-scoring nodes and
   takes a multiple of the TP degree from each node.
   Strategy ``"align"``: the slice is spread over nodes in proportion to where its input samples
   lie (per data-parallel rank of the slices it reads from), or, with no input placed yet, in
   proportion to each node's free devices; each node's share is a multiple of the TP degree, filled
   with its best-scoring free devices. Samples are split in device order, and device ids order the
   nodes, so when every node holds the same fraction of the input's and of the slice's ranks a
   re-split moves samples only inside nodes (NVLink), never over the network. It falls back to
   ``"pack"`` for a slice whose shares do not fit the free devices.
4. A tensor-parallel group never spans nodes (TP is priced on intra-node links). When the devices
   kept in step 1 leave no room for a slice's TP groups inside nodes, the wave is placed again with
   nothing kept, largest TP degree first: with TP degrees that divide each other and the node size
   (1, 2, 4, 8 on nodes of 8) every node's free count then stays a multiple of the next degree, so a
   wave that fits in N devices always packs. When it still does not fit (e.g. degree 3 on nodes of
   4), placement fails with a PlanningError naming the wave's groups, and the solver's candidate is
   dropped like one over memory.

A device over memory after placement is a :class:`PlanningError` naming the MetaOps on the worst
device.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from planner.costmodel import CostModel, Layout
from planner.errors import PlanningError
from planner.metagraph import MetaOp
from planner.phases import pipelined_in_flight
from planner.reshard import aligned_devices, can_align
from planner.rolloutlag import ahead_bytes
from planner.schedule import Problem, Schedule, ScheduleError, Slice, Wave
from planner.timeline import device_index

log = logging.getLogger(__name__)

GIB = 1024**3

# Weights in a free device's score (step 2 of the module docstring). Data locality comes first,
# because a boundary activation that moves costs a transfer forward and another backward. Shared
# parameters co-located save memory and a share of the gradient sync. Memory balance (a fraction in
# [0, 1]) breaks the remaining ties.
FLOW_WEIGHT = 4.0
SHARE_WEIGHT = 2.0
OVERFLOW_PENALTY = 100.0

STRATEGIES = ("pack", "align")  # how a slice that neither continues nor follows on its devices picks them


class TensorParallelRoomError(PlanningError):
    """A wave has no placement that keeps every tensor-parallel group inside a node (not a memory limit)."""


@dataclass(frozen=True)
class PlacedSlice:
    """``num_layers`` layers of MetaOp ``metaop``, starting at layer ``first_layer``, on ``devices``."""

    metaop: int
    first_layer: int  # index of the MetaOp's first layer run by this slice (layers run in order across waves)
    num_layers: int
    devices: tuple[int, ...]  # global device ids, ascending; node = id // devices_per_node
    layout: Layout  # the curve's layout for len(devices)


@dataclass(frozen=True)
class PlacedWave:
    slices: tuple[PlacedSlice, ...]


@dataclass(frozen=True)
class PlacedSchedule:
    waves: tuple[PlacedWave, ...]
    phases: tuple[int, ...] = (0,)  # the first wave of each phase (planner.phases); one phase by default


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class GroupFacts:
    """Per-layer facts of one parameter-sharing group."""

    params_per_layer: float
    trainable: bool
    metaops: tuple[int, ...]


def group_facts(problem: Problem) -> dict[str, GroupFacts]:
    """Facts of every parameter group of ``problem`` (a group trains when any of its MetaOps does)."""
    members: dict[str, list[MetaOp]] = {}
    for op in problem.graph.metaops:
        members.setdefault(op.param_group, []).append(op)
    out = {}
    for group, ops in members.items():
        trainable = any(not op.frozen for op in ops)
        out[group] = GroupFacts(
            params_per_layer=max(op.layer.params for op in ops),
            trainable=trainable,
            metaops=tuple(op.id for op in ops),
        )
    return out


def layer_equivalents(by_tp: dict[int, int]) -> float:
    """Layers held, counting a layer held at TP degree t as 1/t; a layer held at several degrees counts its largest shard."""
    covered, total = 0, 0.0
    for tp in sorted(by_tp):
        fresh = by_tp[tp] & ~covered
        total += fresh.bit_count() / tp
        covered |= by_tp[tp]
    return total


class MemoryLedger:
    """What every device holds: parameter layers of each sharing group and saved activations.

    ``held[group][device]`` maps a TP degree to a bit mask of the group's layers that the device runs
    at that degree. Add slices with :meth:`add` (with the phase they run in). ``param_bytes``,
    ``act_bytes`` (the largest phase's saved activations) and ``trainable_params`` (parameters after
    TP sharding) are numpy arrays indexed by device id.
    """

    def __init__(self, problem: Problem, cost_model: CostModel, strategy: str = "pack"):
        self.problem = problem
        self.strategy = strategy
        self.cost_model = cost_model
        n = problem.num_devices
        self.param_bytes = np.zeros(n)
        self.act_bytes = np.zeros(n)
        self.phase_act: dict[int, np.ndarray] = {}  # saved activations per phase (only once a phase > 0 is added)
        self.trainable_params = np.zeros(n)
        self.transient = np.zeros(n)  # the largest KV cache of a generate slice on the device (freed after it)
        # component -> the parameter group it trains (whose layers its generate uses decode), and the generate slices
        self.trained = {op.component: op.param_group for op in problem.graph.metaops if not op.frozen}
        self.decodes: list[tuple[PlacedSlice, MetaOp, float]] = []
        self.ahead = np.zeros(n)  # rollout_lag 1: the rows decoded a step ahead, kept across the step (rolloutlag)
        self.held: dict[str, dict[int, dict[int, int]]] = {}
        self.groups = group_facts(problem)
        self.slices: list[PlacedSlice] = []
        self._known: dict[int, tuple[dict[int, int], float]] = {}  # id of a holding -> (it, its layer equivalents)

    def add(self, s: PlacedSlice, phase: int = 0, in_flight: int | None = None) -> None:
        """Slice ``s``, in ``phase``, holding ``in_flight`` micro-batches' saved activations (default the cost
        model's: 1, or under GPipe's fill and drain all of them; 1F1B: planner.phases.pipelined_in_flight)."""
        op = self.problem.graph.metaops[s.metaop]
        idx = device_index(s.devices)
        saved = self.cost_model.activation_bytes(op, s.layout, in_flight) * s.num_layers
        if op.gen is not None and op.gen.decoder is not None:  # a KV cache lives while its generation runs only
            self.transient[idx] = np.maximum(self.transient[idx], saved)
            self.decodes.append((s, op, saved))  # and autocast's casts of the layers it trains (peak)
            # its rollouts of every micro-batch it decodes at once wait there to be handed on
            saved = op.layer.out_bytes * self.cost_model.local_batch(op, s.layout) * op.gen.batches
            self.ahead[idx] += ahead_bytes(self.problem.graph, op, self.cost_model.local_batch(op, s.layout))
        if phase == 0 and not self.phase_act:
            self.act_bytes[idx] += saved
        else:  # a phase's activations are freed before the next phase runs: the peak is the largest phase's
            if not self.phase_act:
                self.phase_act[0] = self.act_bytes.copy()
            mine = self.phase_act.setdefault(phase, np.zeros(self.problem.num_devices))
            mine[idx] += saved
            self.act_bytes[idx] = np.maximum(self.act_bytes[idx], mine[idx])
        facts = self.groups[op.param_group]
        tp = s.layout.tp_degree
        mask = ((1 << s.num_layers) - 1) << s.first_layer
        holders = self.held.setdefault(op.param_group, {})
        # The devices of a slice mostly hold the same layers of the group (often none): each distinct holding is
        # updated once and the new one, never mutated afterwards, is shared by the devices that had it.
        before = list(map(holders.get, s.devices))  # None: nothing of this group on the device yet
        if before.count(before[0]) == len(before):  # common: the same holding (often none) on every device
            distinct = [before[0]]
        else:
            distinct = list({id(h): h for h in before}.values())
        added: dict[int, tuple[dict[int, int], float]] = {}  # id of a holding before -> (after, layers added)
        for by_tp in distinct:
            if by_tp is None:
                after, equivalents, grown = {tp: mask}, s.num_layers / tp, s.num_layers / tp
            else:
                after = {**by_tp, tp: by_tp.get(tp, 0) | mask}
                equivalents = layer_equivalents(after)
                grown = equivalents - self._equivalents(by_tp)
            added[id(by_tp)] = (after, grown)
            self._known[id(after)] = (after, equivalents)
        if len(distinct) == 1:  # one number for every device (the same products as per device, so the same bytes)
            after, grown = added[id(distinct[0])]
            holders.update(dict.fromkeys(s.devices, after))
            params = grown * facts.params_per_layer
        else:
            hits = [added[id(h)] for h in before]
            holders.update(zip(s.devices, [hit[0] for hit in hits]))
            params = np.array([hit[1] for hit in hits]) * facts.params_per_layer
        self.param_bytes[idx] += params * self.cost_model.bytes_per_param(op, s.layout)
        if facts.trainable:
            self.trainable_params[idx] += params
        self.slices.append(s)

    def _equivalents(self, by_tp: dict[int, int]) -> float:
        """:func:`layer_equivalents` of a holding: remembered for the holdings this ledger made (each entry keeps its
        holding, never mutated, alive: an id names one holding while its entry stands)."""
        known = self._known.get(id(by_tp))
        return known[1] if known is not None else layer_equivalents(by_tp)

    def peak(self) -> np.ndarray:
        """Peak bytes per device: parameter state plus every saved activation (end of forward), plus the logits of
        the LM heads the device runs then (:meth:`head_bytes`), or, when larger, a generate slice's KV cache and
        autocast's casts of the weights it decodes with (:meth:`decode_transient`) beside those activations (a bound:
        both are freed when the generation ends); with ``rollout_lag`` 1 the
        rows a generating device decoded a step ahead (planner.rolloutlag.ahead_bytes)."""
        transient = self.decode_transient() if self.decodes else self.transient
        return self.param_bytes + self.act_bytes + self.ahead + np.maximum(self.head_bytes(), transient)

    def decode_transient(self) -> np.ndarray:
        """Per device, the largest of the transient bytes: a generate slice's KV cache plus autocast's casts of the
        layers it decodes from modules the device trains at the decode's TP degree
        (:meth:`CostModel.decode_cast_bytes`, from the holdings as they stand)."""
        out = self.transient.copy()
        for s, op, kv in self.decodes:
            group = self.trained.get(op.component)
            held = self.held.get(group, {}) if group is not None else {}
            layers = np.array([held.get(d, {}).get(s.layout.tp_degree, 0).bit_count() for d in s.devices])
            cast = self.cost_model.decode_cast_bytes(op, s.layout, layers, group is not None)
            idx = device_index(s.devices)
            out[idx] = np.maximum(out[idx], kv + cast)
        return out

    def head_bytes(self) -> np.ndarray:
        """Per device, :meth:`CostModel.head_memory` of each task with an LM head, on the first tensor-parallel
        device of each data-parallel rank of its leaf's last slice (the loss host: planner.program.loss_hosts)."""
        out = np.zeros(len(self.param_bytes))
        if not self.cost_model.heads:
            return out
        ops = self.problem.graph.metaops
        read = {d for op in ops for d in op.deps}
        host: dict[str, PlacedSlice] = {}
        for s in self.slices:  # added wave by wave: the last leaf slice of a task is its host
            if s.metaop not in read and ops[s.metaop].task in self.cost_model.heads:
                host[ops[s.metaop].task] = s
        for task, s in host.items():
            local_batch = self.cost_model.local_batch(ops[s.metaop], s.layout)  # the largest share (planner.rows)
            out[list(s.devices[::s.layout.tp_degree])] += self.cost_model.head_memory(task, local_batch)
        return out


def build_ledger(problem: Problem, slices: Iterable[PlacedSlice], cost_model: CostModel) -> MemoryLedger:
    """A ledger holding ``slices`` (added in order; per device the result does not depend on the order within a wave)."""
    ledger = MemoryLedger(problem, cost_model)
    for s in slices:
        ledger.add(s)
    return ledger


def placed_ledger(problem: Problem, placed: PlacedSchedule, cost_model: CostModel) -> MemoryLedger:
    """The ledger of ``placed``, each slice in its phase (the activation peak is the largest phase's), each wave
    holding the micro-batches its walk keeps in flight (all of them under GPipe's fill and drain, fewer under 1F1B:
    :attr:`CostModel.one_f_one_b`)."""
    ledger = MemoryLedger(problem, cost_model)
    starts = placed.phases
    one_f_one_b = cost_model.one_f_one_b and cost_model.in_flight > 1
    p = 0
    for k, wave in enumerate(placed.waves):
        while p + 1 < len(starts) and starts[p + 1] <= k:
            p += 1
        held = pipelined_in_flight(starts, len(placed.waves), cost_model.in_flight, k) if one_f_one_b else None
        for s in wave.slices:
            ledger.add(s, p, held)
    return ledger


def all_slices(placed: PlacedSchedule) -> list[PlacedSlice]:
    return [s for wave in placed.waves for s in wave.slices]


def check_memory(ledger: MemoryLedger, memory_bytes: float, devices_per_node: int) -> None:
    """Raise PlanningError when a device needs more than ``memory_bytes``; the message names the worst device's MetaOps."""
    peak = ledger.peak()
    if len(peak) == 0 or peak.max() <= memory_bytes:
        return
    worst = int(np.argmax(peak))
    num_over = int((peak > memory_bytes).sum())
    ops = ledger.problem.graph.metaops
    usage: dict[int, float] = {}
    for s in ledger.slices:
        if worst in s.devices:
            op = ops[s.metaop]
            per_layer = ledger.cost_model.layer_memory(op, s.layout)
            usage[s.metaop] = usage.get(s.metaop, 0.0) + per_layer * s.num_layers
    ranked = sorted(usage, key=lambda m: (-usage[m], m))
    names = ", ".join(ops[m].name for m in ranked[:3]) + (f" and {len(ranked) - 3} more" if len(ranked) > 3 else "")
    top = ops[ranked[0]]
    head = ledger.head_bytes()[worst]
    logits = (f" + {head / GIB:.2f} GiB LM-head logits (training.kernels: {ledger.cost_model.kernels})"
              if head else "")
    levers = ""  # where saved activations weigh most, the levers that shrink them and keep the batch
    if ledger.act_bytes[worst] > ledger.param_bytes[worst]:
        k = ledger.problem.graph.num_micro_batches
        levers = (("" if top.recompute else f"set recompute: true on component '{top.component}', ")
                  + f"split each step into more micro-batches (training.grad_accum_steps, now {k}), ")
    raise PlanningError(
        f"device {worst} (node {worst // devices_per_node}) needs {peak[worst] / GIB:.2f} GiB "
        f"({ledger.param_bytes[worst] / GIB:.2f} GiB parameter state + {ledger.act_bytes[worst] / GIB:.2f} GiB saved "
        f"activations{logits}) for MetaOps {names}, but a device has {memory_bytes / GIB:.2f} GiB "
        f"({num_over} device{'s' if num_over > 1 else ''} over). Use more devices, allow a larger tensor_parallel "
        f"degree for component '{top.component}', {levers}or lower the batch size of task '{top.task}'."
    )


# --------------------------------------------------------------------------- placement


def place_schedule(
    problem: Problem, schedule: Schedule, cost_model: CostModel, *, check_memory_limit: bool = True,
    strategy: str = "pack", tp_within_nodes: bool = True,
) -> PlacedSchedule:
    """Give every slice of ``schedule`` concrete device ids (see the module docstring for the rules and
    the ``strategy``, one of :data:`STRATEGIES`).

    Raises PlanningError when ``check_memory_limit`` and a device's peak exceeds the device memory, and
    when a wave's tensor-parallel groups cannot all be placed inside nodes (rule 4 of the module
    docstring); with ``tp_within_nodes=False`` such a wave spans nodes instead, with a warning (a
    baseline's schedule priced as it is).
    """
    return place_traced(problem, schedule, cost_model, check_memory_limit=check_memory_limit, strategy=strategy,
                        tp_within_nodes=tp_within_nodes)[0]


@dataclass(frozen=True)
class PlacementTrace:
    """How :func:`place_traced` placed a schedule: its waves, the placed waves, and the ledger's slices in the order
    they were committed with the count committed after each wave. Placement is greedy wave by wave, so a schedule that
    starts with the same waves is placed the same way up to its first different wave: placing it can resume there."""

    strategy: str
    waves: tuple[Wave, ...]
    placed: tuple[PlacedWave, ...]
    committed: tuple[PlacedSlice, ...]
    marks: tuple[int, ...]  # len(committed) after each wave


def place_traced(
    problem: Problem, schedule: Schedule, cost_model: CostModel, *, check_memory_limit: bool = True,
    strategy: str = "pack", tp_within_nodes: bool = True, resume: PlacementTrace | None = None,
) -> tuple[PlacedSchedule, PlacementTrace]:
    """:func:`place_schedule` and its :class:`PlacementTrace`. With ``resume`` (a trace of the same strategy and rules)
    the waves ``schedule`` shares with it at the start are taken from it, not placed again: the result is the same as
    placing from scratch (the ledger is rebuilt from the committed slices in their order, as a wave's undo does)."""
    assert strategy in STRATEGIES, strategy
    placer = _Placer(problem, cost_model, strategy, tp_within_nodes)
    same = 0
    if resume is not None:
        assert resume.strategy == strategy, (resume.strategy, strategy)
        limit = min(len(resume.waves), len(schedule.waves))
        while same < limit and resume.waves[same] == schedule.waves[same]:
            same += 1
    placed = list(resume.placed[:same]) if same else []
    if same:
        placer.ledger = build_ledger(problem, resume.committed[:resume.marks[same - 1]], cost_model)
        for wave in placed:
            for p in wave.slices:
                placer.layers_done[p.metaop] += p.num_layers
                placer.last[p.metaop] = p
    marks = list(resume.marks[:same]) if same else []
    for k in range(same, len(schedule.waves)):
        placed.append(placer.place_wave(k, schedule.waves[k]))
        marks.append(len(placer.ledger.slices))
    if check_memory_limit:
        check_memory(placer.ledger, cost_model.hw.memory_bytes, placer.dpn)
    trace = PlacementTrace(strategy, schedule.waves, tuple(placed), tuple(placer.ledger.slices), tuple(marks))
    return PlacedSchedule(tuple(placed)), trace


class _Placer:
    """State of the greedy placement across waves."""

    def __init__(self, problem: Problem, cost_model: CostModel, strategy: str = "pack", tp_within_nodes: bool = True):
        self.problem = problem
        self.strategy = strategy
        self.tp_within_nodes = tp_within_nodes
        self.cost_model = cost_model
        self.num_devices = problem.num_devices
        self.dpn = max(1, min(cost_model.hw.devices_per_node, self.num_devices))
        self.num_nodes = math.ceil(self.num_devices / self.dpn)
        self.capacity = cost_model.hw.memory_bytes
        self.ledger = MemoryLedger(problem, cost_model)
        self.layers_done = [0] * len(problem.graph)
        self.last: dict[int, PlacedSlice] = {}

    def place_wave(self, k: int, wave: Wave) -> PlacedWave:
        """Devices for every slice of wave ``k``: kept devices first (rules 1-3); when that leaves no room for a
        tensor-parallel group inside a node, the wave again with none kept, largest TP degree first (rule 4)."""
        if wave.num_devices > self.num_devices:
            raise ScheduleError(f"wave {k} uses {wave.num_devices} devices > N={self.num_devices}")
        mark = len(self.ledger.slices)
        chosen: dict[int, tuple[int, ...]] | None = None
        for keep in (True, False):
            try:
                chosen = self._choose_wave(wave, keep, spill=False)
                break
            except _NoRoom as exc:
                refused = exc.slice
                self.ledger = build_ledger(self.problem, self.ledger.slices[:mark], self.cost_model)  # undo the wave
        if chosen is None:
            if self.tp_within_nodes:
                raise TensorParallelRoomError(self._no_room_message(k, wave, refused))
            log.warning("wave %d: no room for every tensor-parallel group inside nodes; a group spans nodes", k)
            chosen = self._choose_wave(wave, keep=False, spill=True)
        placed = []
        for s in wave.slices:  # the schedule's order; per device the ledger does not depend on it
            devices = chosen[s.metaop]
            placed.append(PlacedSlice(s.metaop, self.layers_done[s.metaop], s.num_layers, devices, self._layout(s)))
        for p in placed:
            self.layers_done[p.metaop] += p.num_layers
            self.last[p.metaop] = p
        return PlacedWave(tuple(placed))

    def _choose_wave(self, wave: Wave, keep: bool, spill: bool) -> dict[int, tuple[int, ...]]:
        """Devices per MetaOp of ``wave``, committed to the ledger; raises _NoRoom (unless ``spill``) when a
        slice's TP groups do not fit inside nodes."""
        free = np.zeros(self.num_nodes * self.dpn, dtype=bool)  # padded to whole nodes; padding never free
        free[: self.num_devices] = True
        chosen: dict[int, tuple[int, ...]] = {}
        # exact keeps first (no bytes move), then lined-up ranks (the fewest move), each continuing before following
        # (lined up: the heaviest input first, as for the other slices below, since two may want the same devices)
        heaviest = sorted(wave.slices, key=lambda s: (-self._input_bytes(s.metaop), s.metaop))
        by_id = sorted(wave.slices, key=lambda s: s.metaop)
        passes = itertools.product(((self._kept_devices, by_id), (self._aligned_devices, heaviest)), (True, False))
        for (find, order), continuing in passes if keep else ():
            for s in order:
                if s.metaop not in chosen:
                    devices = find(s, free, continuing)
                    if devices is not None:
                        self._commit(s, devices, free, chosen)
        rest = [s for s in wave.slices if s.metaop not in chosen]
        # Largest first packs nodes well (with TP degrees that divide each other and the node, it always packs);
        # among equals, the heaviest input flow claims its devices first.
        rest.sort(key=lambda s: (-self._layout(s).tp_degree, -s.num_devices, -self._input_bytes(s.metaop), s.metaop))
        for s in rest:
            self._commit(s, self._choose(s, free, spill), free, chosen)
        return chosen

    def _no_room_message(self, k: int, wave: Wave, s: Slice) -> str:
        op = self.problem.graph.metaops[s.metaop]
        tp = self._layout(s).tp_degree
        groups = ", ".join(f"{self.problem.graph.metaops[w.metaop].name} {w.num_devices // self._layout(w).tp_degree}"
                           f"x{self._layout(w).tp_degree}" for w in wave.slices)
        return (f"wave {k}: MetaOp {op.name} needs {s.num_devices // tp} tensor-parallel groups of {tp} devices, and "
                f"beside the wave's other slices ({groups}; groups x TP degree) no placement keeps every group inside "
                f"a node of {self.dpn} devices; a tensor-parallel group never spans nodes. Allow tensor_parallel "
                f"degrees of component '{op.component}' that divide {self.dpn}.")

    def _layout(self, s: Slice) -> Layout:
        return self.problem.curves[s.metaop].layout(s.num_devices)

    def _commit(self, s: Slice, devices: tuple[int, ...], free: np.ndarray, chosen: dict) -> None:
        free[list(devices)] = False
        chosen[s.metaop] = devices
        self.ledger.add(PlacedSlice(s.metaop, self.layers_done[s.metaop], s.num_layers, devices, self._layout(s)))

    def _kept_devices(self, s: Slice, free: np.ndarray, continuing: bool) -> tuple[int, ...] | None:
        """The devices of the MetaOp's previous slice (``continuing``) or of a predecessor's last slice, when
        the count and layout match and all of them are free."""
        if continuing:
            candidates = [self.last[s.metaop]] if s.metaop in self.last else []
        elif s.metaop in self.last:
            candidates = []
        else:
            deps = self.problem.graph.metaops[s.metaop].deps
            candidates = [self.last[d] for d in deps if d in self.last]
        layout = self._layout(s)
        for c in candidates:
            if len(c.devices) == s.num_devices and c.layout == layout and free[list(c.devices)].all():
                return c.devices
        return None

    def _aligned_devices(self, s: Slice, free: np.ndarray, continuing: bool) -> tuple[int, ...] | None:
        """Devices whose data-parallel ranks line up with the input's (:func:`planner.reshard.aligned_devices`):
        the MetaOp's previous slice (``continuing``), or the heaviest predecessor's last slice with the same batch."""
        ops = self.problem.graph.metaops
        if continuing != (s.metaop in self.last):
            return None
        if continuing:
            src = self.last[s.metaop]
        else:
            sources = [self.last[d] for d in ops[s.metaop].deps
                       if d in self.last and ops[d].batch_size == ops[s.metaop].batch_size]
            if not sources:
                return None
            src = max(sources, key=lambda p: (ops[p.metaop].layer.out_bytes, -p.metaop))
        if not can_align(src.layout, self._layout(s)):
            return None  # before scoring the devices: most slices have no whole ratio to their input
        score = self._score(s, free)
        usable = free & (score > -OVERFLOW_PENALTY / 2)
        return aligned_devices(src.devices, src.layout, self._layout(s), usable, score, self.dpn)

    def _input_devices(self, m: int) -> list[int]:
        """Devices that hold the slice's input: the MetaOp's previous slice, else its predecessors' last slices."""
        if m in self.last:
            return list(self.last[m].devices)
        out: list[int] = []
        for d in self.problem.graph.metaops[m].deps:
            if d in self.last:
                out.extend(self.last[d].devices)
        return out

    def _input_bytes(self, m: int) -> float:
        ops = self.problem.graph.metaops
        sources = [m] if m in self.last else [d for d in ops[m].deps if d in self.last]
        return sum(ops[d].batch_size * ops[d].layer.out_bytes for d in sources)

    def _score(self, s: Slice, free: np.ndarray) -> np.ndarray:
        op = self.problem.graph.metaops[s.metaop]
        layout = self._layout(s)
        score = np.full(len(free), -np.inf)
        peak = self.ledger.peak()
        adds = s.num_layers * self.cost_model.layer_memory(op, layout)
        score[: self.num_devices] = -peak / self.capacity - OVERFLOW_PENALTY * (peak + adds > self.capacity)
        inputs = self._input_devices(s.metaop)
        if inputs:
            score[inputs] += FLOW_WEIGHT
        holders = self.ledger.held.get(op.param_group)
        if holders:
            mask = ((1 << s.num_layers) - 1) << self.layers_done[s.metaop]
            overlaps: dict[int, int] = {}  # per holding (devices share them, see MemoryLedger.add): layers in common
            sharing: dict[int, list[int]] = {}  # layers in common -> devices
            for d, by_tp in holders.items():
                overlap = overlaps.get(id(by_tp))
                if overlap is None:
                    any_mask = 0
                    for bits in by_tp.values():
                        any_mask |= bits
                    overlap = overlaps[id(by_tp)] = (any_mask & mask).bit_count()
                if overlap:
                    sharing.setdefault(overlap, []).append(d)
            for overlap, devices in sharing.items():
                score[devices] += SHARE_WEIGHT * overlap / s.num_layers
        score[~free] = -np.inf
        return score

    def _input_shares(self, m: int) -> np.ndarray:
        """Bytes of the slice's input per node: each source slice's batch split over its data-parallel ranks."""
        ops = self.problem.graph.metaops
        sources = [self.last[m]] if m in self.last else [self.last[d] for d in ops[m].deps if d in self.last]
        share = np.zeros(self.num_nodes)
        for src in sources:
            dp, tp = src.layout.dp_degree, src.layout.tp_degree
            rank_nodes = np.asarray(src.devices[::tp], dtype=np.int64) // self.dpn
            per_rank = ops[src.metaop].batch_size * ops[src.metaop].layer.out_bytes / dp
            share += np.bincount(rank_nodes, minlength=self.num_nodes) * per_rank
        return share

    def _node_quotas(self, n: int, tp: int, target: np.ndarray, usable: np.ndarray) -> np.ndarray | None:
        """Devices per node, multiples of ``tp`` within ``usable``, summing to ``n``, close to ``target``.

        The cumulative target is rounded, so the ranks' cumulative split over nodes (which decides the samples
        each node holds) stays within half a TP group of the input's; what a node cannot take goes to the nodes
        furthest below target. None when the free devices cannot hold ``n`` in whole TP groups."""
        cumulative = np.floor(np.concatenate([[0.0], np.cumsum(target)]) / tp + 0.5 + 1e-9).astype(np.int64) * tp
        quota = np.minimum(np.diff(cumulative), usable)
        left = n - int(quota.sum())
        while left > 0:
            room = usable - quota
            nodes = np.flatnonzero(room >= tp)
            if not len(nodes):
                return None
            deficit = target[nodes] - quota[nodes]
            for v in nodes[np.lexsort((nodes, -room[nodes], -np.round(deficit, 9)))][: left // tp]:
                quota[v] += tp
            left = n - int(quota.sum())
        return quota

    def _choose_aligned(self, s: Slice, score: np.ndarray, free: np.ndarray) -> tuple[int, ...] | None:
        """Strategy "align": nodes in proportion to the input's samples (else to free devices), best devices
        inside each; None when those shares do not fit."""
        n, tp = s.num_devices, self._layout(s).tp_degree
        usable = free.reshape(self.num_nodes, self.dpn).sum(axis=1) // tp * tp
        share = self._input_shares(s.metaop)
        if share.sum() <= 0:
            share = usable.astype(float)
        if share.sum() <= 0:
            return None
        quota = self._node_quotas(n, tp, n * share / share.sum(), usable)
        if quota is None:
            return None
        order = np.argsort(-score, axis=1, kind="stable")
        picked = [int(v * self.dpn + j) for v in np.flatnonzero(quota) for j in order[v, : quota[v]]]
        if score.ravel()[picked].min() < -OVERFLOW_PENALTY / 2:
            return None  # a share lands on a device without room: packing may find one with room
        return tuple(sorted(picked))

    def _choose(self, s: Slice, free: np.ndarray, spill: bool = False) -> tuple[int, ...]:
        """Pick ``s.num_devices`` free devices: aligned with the input under "align" when the shares fit; else
        one node when one has room, else the fewest best nodes, whole TP groups in each. When the free devices
        hold no such choice: _NoRoom, or with ``spill`` the best free devices, a TP group across nodes."""
        n, tp = s.num_devices, self._layout(s).tp_degree
        score = self._score(s, free).reshape(self.num_nodes, self.dpn)
        if self.strategy == "align" and self.num_nodes > 1:
            aligned = self._choose_aligned(s, score, free)
            if aligned is not None:
                return aligned
        order = np.argsort(-score, axis=1, kind="stable")  # best first; busy devices (-inf) last
        ranked = np.take_along_axis(score, order, axis=1)
        num_free = free.reshape(self.num_nodes, self.dpn).sum(axis=1)
        # prefix[v, j]: the summed score of node v's j best free devices
        finite = np.where(np.isfinite(ranked), ranked, 0.0)
        prefix = np.concatenate([np.zeros((self.num_nodes, 1)), np.cumsum(finite, axis=1)], axis=1)
        if n <= self.dpn and (num_free >= n).any():
            node = int(np.argmax(np.where(num_free >= n, prefix[:, n], -np.inf)))
            return tuple(sorted(int(node * self.dpn + j) for j in order[node, :n]))
        usable = num_free // tp * tp
        take = np.minimum(usable, n)
        value = prefix[np.arange(self.num_nodes), take]
        picked: list[int] = []
        for node in sorted(range(self.num_nodes), key=lambda v: (-take[v], -value[v], v)):
            count = min(int(usable[node]), n - len(picked))
            picked.extend(int(node * self.dpn + j) for j in order[node, :count])
            if len(picked) == n:
                return tuple(sorted(picked))
        if not spill:
            raise _NoRoom(s)
        flat = np.argsort(-score.ravel(), kind="stable")[:n]
        if not free.ravel()[flat].all():
            op = self.problem.graph.metaops[s.metaop]
            raise ScheduleError(f"MetaOp {op.name}: {n} devices requested but fewer are free in its wave")
        return tuple(sorted(int(d) for d in flat))


class _NoRoom(Exception):
    """The free devices of a wave hold no placement of ``slice`` with each TP group inside one node."""

    def __init__(self, s: Slice):
        super().__init__(s)
        self.slice = s
