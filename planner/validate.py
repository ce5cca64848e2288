"""Semantic checks of a Plan: a plan that loads is one the runtime can execute.

The content hash (planner.plan) only proves that a file is unchanged since it was sealed; a plan edited and sealed
again could drop layers, run a MetaOp before its inputs, name devices the cluster lacks or moves of rows that do not
exist. Two levels, both raising a one-line :class:`~planner.errors.SpecError` that names the plan file, the field
path, the value, what is wrong and the fix:

- :func:`check_plan` needs only the plan: the cluster, the MetaOps' graph, every layer exactly once in wave order
  after its predecessors, devices within the cluster and not shared within a wave, ``dp x tp`` equal to each slice's
  device count with tensor-parallel groups inside one node, one TP degree per layer, finite non-negative times and
  sizes (positive where the simulator never gives 0), and pieces, holdings, buckets and process groups that refer to
  existing slices, layers, modules and ranks. ``plan_from_json`` runs it after the hash check, so ``loom run``,
  ``loom submit``, ``loom gantt`` and every worker see only plans that pass.
- :func:`check_program` needs the job's MetaOps too: the plan's MetaOps must be the job's, field by field, and its
  program (pieces, holdings, gradient buckets, process groups) exactly what :mod:`planner.program` derives from its
  waves (one derivation: the plan records it, this compares). ``runtime.checks.check_plan_matches_job`` runs it.

Pure: imports planner modules only. Nothing here loops over a count read from the file (a layer or device count of
10^12 is compared, never iterated), so a hostile plan is refused in time linear in its size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import get_args

from planner import program
from planner.costmodel import Layout
from planner.errors import SpecError
from planner.metagraph import MetaOp
from planner.phases import backward_positions, check_phase_starts, phase_of_waves
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave
from planner.plan import Plan, PlanMetaOp, PlanSlice
from planner.program import LOSS_WAVE, plan_pieces
from planner.rows import row_shares
from planner.spec import UseMode

MODES = get_args(UseMode)  # the use modes a plan's MetaOps may name (planner.spec)
FIX = "Re-run `loom plan JOB.yaml --save PLAN.json`; a plan is the planner's output, not a file to edit."


class _Checker:
    """The plan being checked, its source and its cluster's size; :meth:`fail` raises the one-line error."""

    def __init__(self, plan: Plan, source: str):
        self.plan, self.source = plan, source
        self.world = plan.cluster.num_nodes * plan.cluster.devices_per_node

    def fail(self, path: str, value: object, problem: str, expected: str) -> None:
        text = repr(value)
        text = text if len(text) <= 60 else text[:57] + "..."
        message = f"{self.source}: {path} ({text}) {problem}; {expected}. {FIX}"
        raise SpecError(" ".join(message.splitlines()))  # names from the file may hold line breaks

    def number(self, path: str, value: float, positive: bool = False) -> None:
        """A finite number, >= 0 (> 0 when ``positive``)."""
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            self.fail(path, value, "is not a finite " + ("positive" if positive else "non-negative") + " number",
                      "expected " + ("> 0" if positive else ">= 0") + " (seconds, bytes or parameters)")

    def device(self, path: str, device: int) -> None:
        if not 0 <= device < self.world:
            self.fail(path, device, "is not a device of the plan's cluster",
                      f"expected 0..{self.world - 1} ({self.plan.cluster.num_nodes} node(s) x "
                      f"{self.plan.cluster.devices_per_node} devices)")

    def devices(self, path: str, devices: Sequence[int], min_size: int = 1) -> None:
        """Distinct devices of the cluster, ascending, at least ``min_size`` of them."""
        if len(devices) < min_size:
            self.fail(path, list(devices), f"has fewer than {min_size} device(s)", f"expected at least {min_size}")
        for j, d in enumerate(devices):
            self.device(f"{path}[{j}]", d)
        if any(a >= b for a, b in zip(devices, devices[1:])):
            self.fail(path, list(devices), "is not strictly ascending", "expected distinct device ids in order")

    def slice_at(self, path: str, ref: Sequence[int]) -> PlanSlice:
        """The slice ``(wave, index)`` refers to."""
        k, i = ref
        if not (0 <= k < len(self.plan.waves) and 0 <= i < len(self.plan.waves[k].slices)):
            self.fail(path, list(ref), "is not a slice of the plan", "expected (wave, index in the wave) of one")
        return self.plan.waves[k].slices[i]


def check_plan(plan: Plan, source: str = "plan") -> None:
    """Raise a SpecError naming ``source`` unless ``plan`` makes sense on its own (module docstring)."""
    c = _Checker(plan, source)
    _check_cluster(c)
    _check_metaops(c)
    _check_waves(c)
    _check_phases(c)
    _check_layer_order(c)
    _check_tp_per_layer(c)
    _check_pieces(c)
    _check_holdings(c)
    _check_buckets(c)
    _check_groups_and_transfers(c)
    _check_prediction(c)


def _check_cluster(c: _Checker) -> None:
    cluster = c.plan.cluster
    if cluster.num_nodes < 1:
        c.fail("cluster.num_nodes", cluster.num_nodes, "is not a node count", "expected >= 1")
    if cluster.devices_per_node < 1:
        c.fail("cluster.devices_per_node", cluster.devices_per_node, "is not a device count", "expected >= 1")
    c.number("cluster.memory_bytes", cluster.memory_bytes, positive=True)
    if c.plan.rank is not None:
        c.device("rank", c.plan.rank)


def _check_metaops(c: _Checker) -> None:
    """Ids in order, a DAG whose edges point back (the MetaGraph's topological ids), positive sizes."""
    if not c.plan.metaops:
        c.fail("metaops", [], "is empty", "expected the job's MetaOps")
    names = set()
    for m, op in enumerate(c.plan.metaops):
        path = f"metaops[{m}]"
        if op.id != m:
            c.fail(f"{path}.id", op.id, "is not the MetaOp's position", f"expected {m}")
        if op.name in names:
            c.fail(f"{path}.name", op.name, "names two MetaOps", "expected unique names")
        names.add(op.name)
        if len(set(op.deps)) != len(op.deps) or any(not 0 <= d < m for d in op.deps):
            c.fail(f"{path}.deps", op.deps, "are not distinct earlier MetaOps", f"expected ids in 0..{m - 1}")
        for field in ("num_layers", "batch_size"):
            if getattr(op, field) < 1:
                c.fail(f"{path}.{field}", getattr(op, field), "is not positive", "expected >= 1")
        c.number(f"{path}.params_per_layer", op.params_per_layer)
        c.number(f"{path}.out_bytes_per_sample", op.out_bytes_per_sample)
        if op.mode not in MODES:
            c.fail(f"{path}.mode", op.mode, "is not a use mode", f"expected one of {', '.join(MODES)}")
        if op.mode in ("generate", "sample") and op.num_layers != 1:
            c.fail(f"{path}.num_layers", op.num_layers, f"is not 1 for a {op.mode} MetaOp",
                   "expected 1 (a generate or sample use is one MetaOp of one layer)")


def _check_waves(c: _Checker) -> None:
    """Each wave: its index, finite times, at least one slice, slices on disjoint devices, one per MetaOp."""
    if not c.plan.waves:
        c.fail("waves", [], "is empty", "expected at least one wave")
    for k, wave in enumerate(c.plan.waves):
        path = f"waves[{k}]"
        if wave.index != k:
            c.fail(f"{path}.index", wave.index, "is not the wave's position", f"expected {k}")
        c.number(f"{path}.duration_s", wave.duration_s, positive=True)
        for field in ("start_s", "forward_s", "transfer_in_s", "transfer_back_s"):
            c.number(f"{path}.{field}", getattr(wave, field))
        if not wave.slices:
            c.fail(f"{path}.slices", [], "is empty", "expected at least one slice per wave")
        used: dict[int, int] = {}
        ops: set[int] = set()
        for i, s in enumerate(wave.slices):
            _check_slice(c, f"{path}.slices[{i}]", s)
            if s.metaop in ops:
                c.fail(f"{path}.slices[{i}].metaop", s.metaop, "has a second slice in this wave",
                       "expected at most one slice of a MetaOp per wave")
            ops.add(s.metaop)
            for d in s.devices:
                if d in used:
                    c.fail(f"{path}.slices[{i}].devices", s.devices, f"shares device {d} with slice {used[d]}",
                           "expected the slices of a wave on disjoint devices")
                used[d] = i


def _check_phases(c: _Checker) -> None:
    """Phase starts: wave 0 first, ascending, within the waves (planner.phases)."""
    why = check_phase_starts(c.plan.phases, len(c.plan.waves))
    if why is not None:
        c.fail("phases", c.plan.phases, why, f"expected ascending first waves of phases, from 0, below "
               f"{len(c.plan.waves)}")


def _check_slice(c: _Checker, path: str, s: PlanSlice) -> None:
    """One slice: an existing MetaOp, valid devices, ``dp x tp`` of them with dp at most the batch (its rows, when
    recorded, planner.rows' shares), tensor-parallel groups within one node, a layer range inside the MetaOp, finite
    times (the slice's own > 0)."""
    if not 0 <= s.metaop < len(c.plan.metaops):
        c.fail(f"{path}.metaop", s.metaop, "is not a MetaOp of the plan", f"expected 0..{len(c.plan.metaops) - 1}")
    op = c.plan.metaops[s.metaop]
    c.devices(f"{path}.devices", s.devices)
    if s.dp_degree < 1 or s.tp_degree < 1 or s.dp_degree * s.tp_degree != len(s.devices):
        c.fail(f"{path}", f"dp {s.dp_degree} x tp {s.tp_degree}", f"does not match its {len(s.devices)} devices",
               "expected dp_degree x tp_degree = the number of devices, both >= 1")
    if s.dp_degree > op.batch_size:
        c.fail(f"{path}.dp_degree", s.dp_degree, f"exceeds MetaOp {op.name}'s batch of {op.batch_size}",
               "expected at most the batch (every data-parallel rank owns at least one row)")
    elif s.rows and s.rows != list(row_shares(op.batch_size, s.dp_degree)):
        c.fail(f"{path}.rows", s.rows, f"are not the shares of MetaOp {op.name}'s batch the program moves",
               f"expected {list(row_shares(op.batch_size, s.dp_degree))} (planner.rows) or none")
    per_node = c.plan.cluster.devices_per_node
    for r in range(s.dp_degree):
        group = s.devices[r * s.tp_degree:(r + 1) * s.tp_degree]
        if len({d // per_node for d in group}) > 1:
            c.fail(f"{path}.devices", group, "form a tensor-parallel group across nodes",
                   f"expected each group of tp_degree ({s.tp_degree}) devices inside one node of {per_node}")
    if s.first_layer < 0 or s.num_layers < 1 or s.first_layer + s.num_layers > op.num_layers:
        c.fail(path, f"layers {s.first_layer}..{s.first_layer + s.num_layers - 1}",
               f"are not layers of MetaOp {op.name}", f"expected a range within 0..{op.num_layers - 1}")
    c.number(f"{path}.time_s", s.time_s, positive=True)
    c.number(f"{path}.forward_s", s.forward_s)
    if s.forward_s > s.time_s:
        c.fail(f"{path}.forward_s", s.forward_s, f"exceeds the slice's time_s ({s.time_s})",
               "expected the forward part of time_s")
    c.number(f"{path}.memory_bytes", s.memory_bytes)


def _check_layer_order(c: _Checker) -> None:
    """Every layer exactly once: each MetaOp's slices, in wave order, continue where the previous one stopped; its
    first slice runs in a wave after all its predecessors have finished."""
    done = [0] * len(c.plan.metaops)
    finished: list[int | None] = [None] * len(c.plan.metaops)  # the wave whose end a MetaOp's last layer ran
    for k, wave in enumerate(c.plan.waves):
        for i, s in enumerate(wave.slices):
            op = c.plan.metaops[s.metaop]
            path = f"waves[{k}].slices[{i}]"
            if s.first_layer != done[s.metaop]:
                c.fail(f"{path}.first_layer", s.first_layer, f"is not where MetaOp {op.name} continues",
                       f"expected {done[s.metaop]} (each layer runs once, in order over the waves)")
            for d in op.deps if s.first_layer == 0 else ():
                if finished[d] is None:
                    c.fail(f"{path}.metaop", f"{s.metaop}: {op.name}", f"runs in wave {k} before its predecessor "
                           f"{c.plan.metaops[d].name} has finished", "expected every predecessor in an earlier wave")
        for s in wave.slices:
            done[s.metaop] += s.num_layers
        for s in wave.slices:
            if done[s.metaop] == c.plan.metaops[s.metaop].num_layers:
                finished[s.metaop] = k
    for m, op in enumerate(c.plan.metaops):
        if done[m] != op.num_layers:
            c.fail(f"metaops[{m}]", op.name, f"runs {done[m]} of its {op.num_layers} layers in the waves",
                   "expected every layer exactly once")


def _check_tp_per_layer(c: _Checker) -> None:
    """A layer of a parameter group (shared by several MetaOps) keeps one tensor-parallel degree over the plan (its
    shards are built once; runtime.assignment.layer_tp_degrees). Compared as layer ranges, never layer by layer."""
    ranges: dict[str, list[tuple[int, int, int, str]]] = {}
    for k, wave in enumerate(c.plan.waves):
        for i, s in enumerate(wave.slices):
            group = c.plan.metaops[s.metaop].param_group
            ranges.setdefault(group, []).append((s.first_layer, s.first_layer + s.num_layers, s.tp_degree,
                                                 f"waves[{k}].slices[{i}]"))
    for group, spans in ranges.items():
        reach: dict[int, int] = {}  # TP degree -> the furthest layer (exclusive) a slice at that degree reaches
        for start, stop, tp, path in sorted(spans):
            other = next((t for t, end in reach.items() if t != tp and end > start), None)
            if other is not None:
                c.fail(f"{path}.tp_degree", tp, f"differs from another slice's degree {other} on layers of parameter "
                       f"group {group}", "expected one tensor-parallel degree per layer")
            reach[tp] = max(reach.get(tp, 0), stop)


def _check_pieces(c: _Checker) -> None:
    """Every piece moves rows that exist (``0 <= start < stop <=`` the producer's batch) of an existing slice to an
    existing slice (or the loss stage, wave -1) at the boundary before the consumer's wave, within one phase, from a
    device of the sending slice to a device of the receiving one (forward: producer -> target; backward: back)."""
    tasks = {op.task for op in c.plan.metaops}
    phase = phase_of_waves(c.plan.phases, len(c.plan.waves))
    for j, p in enumerate(c.plan.pieces):
        path = f"pieces[{j}]"
        producer, target = c.slice_at(f"{path}.producer", p.producer), c.slice_at(f"{path}.target", p.target)
        if phase[p.producer[0]] != phase[p.target[0]]:
            c.fail(path, f"producer {list(p.producer)}, target {list(p.target)}",
                   f"crosses from phase {phase[p.producer[0]]} to phase {phase[p.target[0]]}",
                   "expected every edge inside one phase (a phase's activations are freed before the next one)")
        inputs = 1
        if p.consumer is None:
            if p.wave != LOSS_WAVE:
                c.fail(f"{path}.wave", p.wave, "is not the loss stage's boundary for a piece without a consumer",
                       f"expected {LOSS_WAVE}")
        else:
            consumer = c.slice_at(f"{path}.consumer", p.consumer)
            if tuple(p.consumer) != tuple(p.target) or p.wave != p.consumer[0] or p.producer[0] >= p.wave:
                c.fail(path, f"wave {p.wave}, producer {list(p.producer)}, consumer {list(p.consumer)}",
                       "is not a move at the boundary before its consumer's wave",
                       "expected wave = the consumer's wave > the producer's, and target = consumer")
            if consumer.first_layer == 0:
                inputs = max(1, len(c.plan.metaops[consumer.metaop].deps))
        if p.task not in tasks:
            c.fail(f"{path}.task", p.task, "is not a task of the plan's MetaOps", f"expected one of {sorted(tasks)}")
        if not 0 <= p.input < inputs:
            c.fail(f"{path}.input", p.input, "is not an input of its consumer", f"expected 0..{inputs - 1}")
        batch = c.plan.metaops[producer.metaop].batch_size
        if not 0 <= p.start < p.stop <= batch:
            c.fail(path, f"rows {p.start}..{p.stop}", "are not rows of the producer's batch",
                   f"expected 0 <= start < stop <= {batch}")
        if any(n < 1 for n in p.shape):
            c.fail(f"{path}.shape", list(p.shape), "has a dimension below 1", "expected positive sizes")
        c.number(f"{path}.bytes", p.bytes)
        senders, receivers = (target, producer) if p.backward else (producer, target)
        c.device(f"{path}.src", p.src)
        c.device(f"{path}.dst", p.dst)
        if p.src not in senders.devices or p.dst not in receivers.devices:
            c.fail(path, f"src {p.src} -> dst {p.dst}", "is not a move between the two slices' devices",
                   f"expected src in {senders.devices} and dst in {receivers.devices}")


def _module_names(c: _Checker) -> tuple[dict[str, int], set[str]]:
    """(parameter group -> its layer count, names of the other modules: input modules and task heads)."""
    groups: dict[str, int] = {}
    others = {"head:" + op.task for op in c.plan.metaops}
    for op in c.plan.metaops:
        groups[op.param_group] = max(groups.get(op.param_group, 0), op.num_layers)
        others.update(op.input_modules)
    return groups, others


def _check_holdings(c: _Checker) -> None:
    """Every holding is a shard of an existing module (a layer of a parameter group, an input module or a head), held
    by devices of the cluster, final after an existing wave's backward (or the loss stage: ``len(waves)``)."""
    groups, others = _module_names(c)
    keys = set()
    for j, h in enumerate(c.plan.holdings):
        path = f"holdings[{j}]"
        if h.name in groups:
            if not 0 <= h.layer < groups[h.name]:
                c.fail(f"{path}.layer", h.layer, f"is not a layer of parameter group {h.name}",
                       f"expected 0..{groups[h.name] - 1}")
            if not 0 <= h.shard < c.world:
                c.fail(f"{path}.shard", h.shard, "is not a tensor-parallel rank", f"expected 0..{c.world - 1}")
        elif h.name in others:
            if (h.layer, h.shard) != (0, 0):
                c.fail(path, f"layer {h.layer}, shard {h.shard}", f"is not the one shard of module {h.name}",
                       "expected layer 0, shard 0")
        else:
            c.fail(f"{path}.name", h.name, "is not a module of the plan",
                   "expected a MetaOp's param_group, one of its input_modules or head:<task>")
        if (h.name, h.layer, h.shard) in keys:
            c.fail(path, (h.name, h.layer, h.shard), "is held twice", "expected one holding per shard")
        keys.add((h.name, h.layer, h.shard))
        c.devices(f"{path}.devices", h.devices)
        last = len(c.plan.waves) + len(c.plan.phases) - 1
        if not 0 <= h.ready_wave <= last:
            c.fail(f"{path}.ready_wave", h.ready_wave, "is not a wave or loss stage of the plan",
                   f"expected 0..{last} ({len(c.plan.waves)}..: the phases' loss stages)")
        c.number(f"{path}.params", h.params)


def _check_buckets(c: _Checker) -> None:
    """Every bucket's members are trainable holdings held by exactly its devices and final after its wave, and every
    trainable holding is in exactly one bucket (else its gradient is never all-reduced)."""
    held = {(h.name, h.layer, h.shard): h for h in c.plan.holdings}
    bucketed: set[tuple[str, int, int]] = set()
    for j, b in enumerate(c.plan.grad_buckets):
        path = f"grad_buckets[{j}]"
        c.devices(f"{path}.devices", b.devices)
        c.number(f"{path}.params", b.params)
        for n, member in enumerate(b.members):
            h = held.get(tuple(member))
            if h is None or not h.trainable or h.devices != b.devices or h.ready_wave != b.ready_wave:
                c.fail(f"{path}.members[{n}]", list(member), "is not a trainable holding of exactly this bucket's "
                       f"devices {b.devices}, final after wave {b.ready_wave}", "expected one of the plan's holdings")
            if tuple(member) in bucketed:
                c.fail(f"{path}.members[{n}]", list(member), "is in two buckets", "expected each shard in one bucket")
            bucketed.add(tuple(member))
        if sorted(b.shards) != sorted(b.devices):
            c.fail(f"{path}.shards", b.shards, "is not one optimizer share per device of the bucket",
                   f"expected its devices {b.devices} in the order their shares are stepped")
    for j, h in enumerate(c.plan.holdings):
        if h.trainable and (h.name, h.layer, h.shard) not in bucketed:
            c.fail(f"holdings[{j}]", (h.name, h.layer, h.shard), "is trainable but in no gradient bucket",
                   "expected every trainable shard in one of grad_buckets")


def _check_groups_and_transfers(c: _Checker) -> None:
    """Process groups: distinct sets of several devices of the cluster. Transfers and sync groups (what the simulator
    priced): existing waves, MetaOps and devices, finite non-negative sizes and times."""
    seen = set()
    for j, group in enumerate(c.plan.process_groups):
        c.devices(f"process_groups[{j}]", group, min_size=2)
        if tuple(group) in seen:
            c.fail(f"process_groups[{j}]", group, "is listed twice", "expected each device set once")
        seen.add(tuple(group))
    num_ops = len(c.plan.metaops)
    for j, t in enumerate(c.plan.transfers):
        path = f"transfers[{j}]"
        if not 0 <= t.after_wave < len(c.plan.waves):
            c.fail(f"{path}.after_wave", t.after_wave, "is not a wave of the plan",
                   f"expected 0..{len(c.plan.waves) - 1}")
        for field in ("src_metaop", "dst_metaop"):
            if not 0 <= getattr(t, field) < num_ops:
                c.fail(f"{path}.{field}", getattr(t, field), "is not a MetaOp of the plan",
                       f"expected 0..{num_ops - 1}")
        c.devices(f"{path}.src_devices", t.src_devices)
        c.devices(f"{path}.dst_devices", t.dst_devices)
        c.number(f"{path}.bytes", t.bytes)
        c.number(f"{path}.time_s", t.time_s)
    for j, h in enumerate(c.plan.handoffs):
        path = f"handoffs[{j}]"
        if not 0 <= h.metaop < num_ops:
            c.fail(f"{path}.metaop", h.metaop, "is not a MetaOp of the plan", f"expected 0..{num_ops - 1}")
        c.device(f"{path}.device", h.device)
        c.number(f"{path}.bytes", h.bytes)
        c.number(f"{path}.network_bytes", h.network_bytes)
    for j, g in enumerate(c.plan.handoff_gathers):
        c.devices(f"handoff_gathers[{j}].devices", g.devices)
        c.number(f"handoff_gathers[{j}].bytes", g.bytes)
    for j, g in enumerate(c.plan.sync_groups):
        path = f"sync_groups[{j}]"
        if any(not 0 <= m < num_ops for m in g.metaops):
            c.fail(f"{path}.metaops", g.metaops, "are not MetaOps of the plan", f"expected ids in 0..{num_ops - 1}")
        c.devices(f"{path}.devices", g.devices)
        c.number(f"{path}.bytes", g.bytes)
        c.number(f"{path}.time_s", g.time_s)


def _check_prediction(c: _Checker) -> None:
    """The predicted iteration (> 0) and its parts, and one finite peak memory per device of the cluster."""
    predicted = c.plan.predicted
    c.number("predicted.iteration_time_s", predicted.iteration_time_s, positive=True)
    for field, value in predicted:
        c.number(f"predicted.{field}", value)
    if len(c.plan.peak_memory_bytes) != c.world:
        c.fail("peak_memory_bytes", f"{len(c.plan.peak_memory_bytes)} values", "is not one per device",
               f"expected {c.world} (the cluster's devices)")
    for d, value in enumerate(c.plan.peak_memory_bytes):
        c.number(f"peak_memory_bytes[{d}]", value)


def placed_schedule(plan: Plan) -> PlacedSchedule:
    """The placed schedule a plan's waves and phases describe (what planner.program derives the program from)."""
    return PlacedSchedule(tuple(PlacedWave(tuple(
        PlacedSlice(s.metaop, s.first_layer, s.num_layers, tuple(s.devices), Layout(s.dp_degree, s.tp_degree))
        for s in wave.slices)) for wave in plan.waves), tuple(plan.phases))


def check_program(plan: Plan, ops: Sequence[MetaOp], source: str = "plan") -> None:
    """Raise a SpecError naming ``source`` unless the plan's pieces, holdings, gradient buckets and process groups are
    exactly what :mod:`planner.program` derives from its waves for ``ops`` (the job's MetaOps, which
    ``runtime.checks.check_plan_matches_job`` has matched to the plan's). A worker's Assignment (``plan.rank`` set)
    is compared with the derivation cut to its rank. Bytes are left out (they follow the job's precision, which a
    run may change); the rows, devices and shapes are compared. Run :func:`check_plan` first."""
    _compare_metaops(plan, ops, source)
    placed = placed_schedule(plan)
    rank = plan.rank
    pieces = [p for p in plan_pieces(ops, placed, element_bytes=4) if rank is None or rank in (p.src, p.dst)]
    held = program.holdings(ops, placed)
    buckets = program.grad_buckets(held, backward_positions(placed.phases, len(placed.waves)))
    held_keys = [_holding_key(h.key, h.devices, h.trainable, h.ready_wave) for h in held
                 if rank is None or rank in h.devices]
    bucket_keys = [(b.ready_wave, tuple(b.devices), tuple(b.members), tuple(program.optimizer_shards(b)))
                   for b in buckets if rank is None or rank in b.devices]
    _compare(source, "pieces", [p.model_dump(exclude={"bytes"}) for p in plan.pieces],
             [p.model_dump(exclude={"bytes"}) for p in pieces])
    _compare(source, "holdings", [_holding_key((h.name, h.layer, h.shard), h.devices, h.trainable, h.ready_wave)
                                  for h in plan.holdings], held_keys)
    _compare(source, "grad_buckets", [(b.ready_wave, tuple(b.devices), tuple(tuple(m) for m in b.members),
                                       tuple(b.shards)) for b in plan.grad_buckets], bucket_keys)
    _compare(source, "process_groups", plan.process_groups, program.process_groups(held, placed))


def metaop_record(op: MetaOp) -> PlanMetaOp:
    """The Plan's record of a MetaOp, as planner.api.build_plan writes it (a test checks they agree)."""
    return PlanMetaOp(
        id=op.id, name=op.name, task=op.task, component=op.component, layer_key=op.key, num_layers=op.num_layers,
        batch_size=op.batch_size, deps=list(op.deps), level=op.level, param_group=op.param_group, frozen=op.frozen,
        params_per_layer=op.layer.params, out_bytes_per_sample=op.layer.out_bytes, use=op.use, segment=op.segment,
        recompute=op.recompute, input_modules=list(op.input_modules), mode=op.mode,
    )


def _compare_metaops(plan: Plan, ops: Sequence[MetaOp], source: str) -> None:
    """Every field of the plan's MetaOps is the job's (the workers read the task, use, parameter group, input
    modules, recompute and frozen flags from the plan): a SpecError at the first field that differs."""
    if len(plan.metaops) != len(ops):
        raise SpecError(f"{source}: metaops ({len(plan.metaops)} MetaOps) are not the job's {len(ops)}. {FIX}")
    for m, (have, op) in enumerate(zip(plan.metaops, ops)):
        want = metaop_record(op)
        for field in PlanMetaOp.model_fields:
            if getattr(have, field) != getattr(want, field):
                raise SpecError(f"{source}: metaops[{m}].{field} ({getattr(have, field)!r}) is not the job's "
                                f"({getattr(want, field)!r}); the plan was made for another job. {FIX}")


def _holding_key(key: Iterable, devices: Iterable[int], trainable: bool, ready_wave: int) -> tuple:
    return tuple(key), tuple(devices), trainable, ready_wave


def _compare(source: str, field: str, have: Sequence, want: Sequence) -> None:
    """A SpecError at the first entry where the plan's ``field`` differs from the derived one."""
    if list(have) == list(want):
        return
    j = next((j for j, (h, w) in enumerate(zip(have, want)) if h != w), min(len(have), len(want)))
    got = have[j] if j < len(have) else "nothing"
    expected = want[j] if j < len(want) else "nothing"
    text = f"{got!r}" if len(repr(got)) <= 80 else repr(got)[:77] + "..."
    exp = f"{expected!r}" if len(repr(expected)) <= 80 else repr(expected)[:77] + "..."
    raise SpecError(
        f"{source}: {field}[{j}] ({text}) is not what planner.program derives from the plan's waves for this job "
        f"({len(have)} entries vs {len(want)}; expected {exp} there). {FIX}"
    )
