"""Weight hand-offs: the updated weights that devices running a component without gradient receive after each step.

The rule (docs/planner.md, Weight hand-off; the runtime derives the same transfers from the plan's MetaOps and
slices). A component C *trains* when some MetaOp of C computes weight gradients (``frozen`` false). A *receiver*
is every slice of

- a MetaOp of C that computes no weight gradient (a ``forward``, ``generate`` or ``sample`` use without
  ``grad_last_step``) while C trains (the implicit hand-off), and
- every MetaOp of a component D with ``weights_from: C`` (the explicit one; C is its *source*).

A receiver needs C's trained modules that it runs: a whole-use MetaOp (generate/sample, one layer) needs every
trained layer of C (at tensor_parallel t its TP rank's shard of each, runtime.tp_decode: the norms whole, the rest
/ t, planner.generation.decode_shard_params), C's input module and its task's head (whole); a layered MetaOp (a
forward use) needs layers ``first_layer .. first_layer + num_layers`` of its parameter group (D's groups name C's
with D's name in place of C's) and, running layer 0 with its own input module, C's. The plan's holders of a module (planner.program.holdings) step
it; after the optimizer step (and ZeRO-1's all-gather) a holder sends it to every device of the receiver's slice that
does not hold it (:func:`sender`: the lowest holder in the receiving device's node, else the lowest), and for
``weights_from`` the lowest holder to every device of it but itself: what runtime.rollout.Roles
sends (tests/integration/test_byte_contract.py counts it). A module moves its parameters as the runtime builds it
(``size``: the cost model's module sizes, from ``loom profile``; else a layer's modelled ``params`` and 0 for an
input module or head) x ``weight_bytes`` (the simulator passes ``CostModel.param_bytes_moved``: 4, the runtime's
float32 parameters in every precision) / the receiver's TP degree, except the matrices of the layers and LM head a
decode receives: a copy only to decode with holds them in the compute precision (runtime.rollout.lower_matrices) and
receives them so (``matrix_bytes``, ``CostModel.decode_matrix_bytes``: 2 under bf16/fp16; the module's matrices from
``CostModel.module_matrices``, else a layer's modelled ``params``). A module some holder keeps in the receiving
device's node comes over NVLink, otherwise over the network. Devices that hold every module they need receive
nothing (verl's colocated shape: the weights are already there).

Gathers (:func:`hand_off_gathers`): a sender holding a TP shard of a layer other than the one its receiver takes
(runtime.tp_decode.needs_gather: a whole-layer receiver, or another degree or rank) first all-gathers the whole layer
in its TP group, once per layer and group, every device of the group gathering the layer's split parameters (all
but ``tp_whole_params``: norms and row-parallel biases, planner.kinds) x ``weight_bytes``. The runtime's sender is
the one :func:`sender` picks among the layer's holders, or, for a decode at the trainers' degree, among the trainers
of its own shard (no gather), and for ``weights_from`` the lowest holder.

Price (:func:`hand_off_seconds`): the gathers first (each device's all-gathers one after another,
``CostModel.allgather_time``; the busiest device's), then each receiving device's NVLink bytes at the intra-node
bandwidth, each node's network bytes at the node's bandwidth, plus one latency; the sends take the longest of these.
It ends the iteration: the next iteration's first use of the weights waits for it, so the simulator adds it to the
iteration (``handoff_s``). Senders' links are not modelled (a layer usually has many holders).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from planner.generation import decode_shard_params, layer_tp_groups
from planner.metagraph import MetaOp
from planner.placement import PlacedSchedule
from planner.program import Holding, ModuleSize, holdings


@dataclass(frozen=True)
class HandOff:
    """The updated weights of ``source``'s trained layers that ``device`` receives to run MetaOp ``metaop``."""

    component: str  # the receiving MetaOp's component (``source`` itself for an implicit hand-off)
    source: str  # the trained component whose weights move
    metaop: int
    device: int
    bytes: float
    cross_node: bool  # some of the bytes come over the network (no trainer of them in the device's node)
    network_bytes: float = 0.0  # the part of ``bytes`` that crosses nodes


@dataclass(frozen=True)
class HandOffGather:
    """The all-gather that TP group ``devices`` runs after the optimizer step to rebuild layer ``layer`` of
    ``param_group`` whole before one of them cuts a hand-off from it (module docstring): each device gathers
    ``bytes`` in all (every member's part of the split parameters, as the runtime holds them)."""

    param_group: str
    layer: int
    devices: tuple[int, ...]
    bytes: float


def sender(holders, device: int, devices_per_node: int) -> int:
    """The holder that sends a module to ``device`` in an implicit hand-off: the lowest of ``holders`` in ``device``'s
    node (NVLink), else the lowest (the network). runtime.rollout.Roles sends from it; :func:`hand_offs` prices the
    bytes over NVLink exactly when it is in the node."""
    node = device // devices_per_node
    return min((h for h in holders if h // devices_per_node == node), default=min(holders))


def _source_group(group: str, component: str, source: str) -> str:
    """The trained group of ``source`` whose weights a group of ``component`` runs (``D#1`` -> ``C#1``)."""
    return source + group[len(component):] if group.startswith(component) else group


def _receives(ops: Sequence[MetaOp], weights_from: Mapping[str, str]) -> bool:
    """Whether any MetaOp of ``ops`` receives weights (module docstring); every job without modes or weights_from
    has none, and nothing to walk."""
    return any((op.frozen and op.mode != "train") or op.component in weights_from for op in ops)


def _trained(ops: Sequence[MetaOp], size: ModuleSize) -> tuple[dict[str, dict[str, float]], dict[str, int],
                                                                 dict[str, float]]:
    """(component -> its trained groups' parameters per layer, trained group -> its layer count, trained group ->
    the modelled parameters of one of its layers: its matrices, the kind's ``params`` leaving norms and biases out)."""
    trained_groups: dict[str, dict[str, float]] = {}
    layers_of: dict[str, int] = {}
    modelled: dict[str, float] = {}
    for op in ops:
        if not op.frozen:
            params = size(op.param_group)[0] or op.layer.params
            trained_groups.setdefault(op.component, {})[op.param_group] = max(
                params, trained_groups.get(op.component, {}).get(op.param_group, 0.0))
            layers_of[op.param_group] = max(layers_of.get(op.param_group, 0), op.num_layers)
            modelled[op.param_group] = max(op.layer.params, modelled.get(op.param_group, 0.0))
    return trained_groups, layers_of, modelled


def _copy_bytes(params: float, matrices: float, tp: int, dec, weight_bytes: float, matrix_bytes: float) -> float:
    """Bytes a copy only to decode with receives of a module of ``params`` parameters, ``matrices`` of them in
    matrices, at tensor_parallel ``tp`` (its TP rank's shard, planner.generation.decode_shard_params: the matrices
    split, the norms whole): the matrices at ``matrix_bytes``, the rest at ``weight_bytes``."""
    matrices = min(max(matrices, 0.0), params)
    shard = decode_shard_params(params, dec, tp) if dec is not None and tp > 1 else params
    split = matrices / tp if dec is not None and tp > 1 else matrices
    return split * matrix_bytes + (shard - split) * weight_bytes


def _source(op: MetaOp, weights_from: Mapping[str, str]) -> str | None:
    """The trained component whose weights MetaOp ``op`` receives: its ``weights_from``, itself for a use computing
    no gradient (a forward, generate or sample use), else None."""
    return weights_from.get(op.component) or (op.component if op.frozen and op.mode != "train" else None)


def hand_offs(ops: Sequence[MetaOp], placed: PlacedSchedule, weights_from: Mapping[str, str], weight_bytes: float,
              devices_per_node: int, size: ModuleSize | None = None, held: Sequence[Holding] | None = None,
              tp_whole_params: Mapping[str, float] | None = None, matrix_bytes: float | None = None,
              matrices: Callable[[str], float | None] | None = None) -> list[HandOff]:
    """Every hand-off of ``placed`` (module docstring rule), sorted by (MetaOp, device); empty when no device lacks
    a trained module it runs. ``held``: ``placed``'s holdings when the caller has them (the simulator), else derived
    here. ``size``: module name -> (parameters, tensors) as the runtime builds it
    (:meth:`~planner.costmodel.CostModel.module_size`); a layer unknown to it counts ``layer.params``, an input module
    or a head 0 (as the gradient buckets count them). ``tp_whole_params``: component -> parameters of a layer every TP
    rank keeps whole (planner.metagraph.MetaGraph.tp_whole_params), which a layered receiver at tensor_parallel t
    takes whole beside ``1 / t`` of the rest (none: ``1 / t`` of the layer). ``matrix_bytes``: bytes per matrix
    parameter of the layers and LM heads a decode receives (``CostModel.decode_matrix_bytes``: it holds and receives
    them in the compute precision, runtime.rollout.lower_matrices; None: ``weight_bytes``), with ``matrices``: module
    name -> its matrix parameters (``CostModel.module_matrices``; None or unknown: a layer's modelled ``params``, a
    head's parameters but its final norm)."""
    if not _receives(ops, weights_from):
        return []
    size = size or (lambda name: (0.0, 0.0))
    trained_groups, layers_of, modelled = _trained(ops, size)
    matrices = matrices or (lambda name: None)
    steppers: dict[tuple[str, int], set[int]] = {}  # module -> the plan's holders, which step it (runtime.rollout)
    for h in holdings(ops, placed) if held is None else held:
        steppers.setdefault(h.key[:2], set()).update(h.devices)
    in_node = {key: {d // devices_per_node for d in devices} for key, devices in steppers.items()}
    need: dict[tuple[int, int], dict[tuple[str, int], tuple[float, bool]]] = {}  # (MetaOp, device) -> lacking modules
    names: dict[int, tuple[str, str]] = {}
    for wave in placed.waves:
        for s in wave.slices:
            op = ops[s.metaop]
            source = _source(op, weights_from)
            groups = trained_groups.get(source or "", {})
            if not groups:
                continue
            modules: list[tuple[tuple[str, int], float]] = []  # (module, bytes)
            if op.gen is not None:  # a whole use runs every trained layer of its source (its TP shard of each:
                # runtime.tp_decode), its input module and head (whole); a decode holds its layers' and head's
                # matrices in the compute precision and receives them so
                dec, tp = op.gen.decoder, s.layout.tp_degree
                low = matrix_bytes if dec is not None and matrix_bytes is not None else weight_bytes
                head = "head:" + op.task
                for g in groups:
                    m = matrices(g)
                    copy = _copy_bytes(groups[g], modelled[g] if m is None else m, tp, dec, weight_bytes, low)
                    modules += [((g, j), copy) for j in range(layers_of[g])]
                m, params = matrices(head), size(head)[0]
                modules += [(("embed:" + source, 0), size("embed:" + source)[0] * weight_bytes), ((head, 0), _copy_bytes(
                    params, params - (dec.hidden if dec is not None else 0) if m is None else m, 1, None, weight_bytes,
                    low))]
            else:
                g = _source_group(op.param_group, op.component, source)
                if g not in groups:
                    continue
                tp = s.layout.tp_degree
                whole = (tp_whole_params or {}).get(source, 0.0) if tp > 1 else 0.0
                modules += [((g, j), ((groups[g] - whole) / tp + whole) * weight_bytes)  # its TP rank's shard: the
                            for j in range(s.first_layer, s.first_layer + s.num_layers)]  # norms whole
                if s.first_layer == 0 and "embed:" + op.component in op.input_modules:
                    modules.append((("embed:" + source, 0), size("embed:" + source)[0] * weight_bytes))
            names[op.id] = (op.component, source)
            # the runtime (runtime.rollout.Roles) sends from the lowest stepper: to a weights_from receiver unless it
            # is that stepper, to an implicit receiver unless it steps the module itself
            kept: dict[int, set] = {}  # device -> the modules it is sent none of
            for key, _ in modules:
                holders = steppers.get(key)
                for h in ((min(holders),) if op.component in weights_from else holders) if holders else ():
                    kept.setdefault(h, set()).add(key)
            by_node: dict[int, dict] = {}  # every module a device of the node could be sent, and whether remotely
            for d in s.devices:
                node = d // devices_per_node
                if node not in by_node:
                    by_node[node] = {key: (nbytes, node not in in_node[key]) for key, nbytes in modules
                                     if nbytes > 0 and steppers.get(key)}
                mine = kept.get(d)
                need.setdefault((op.id, d), {}).update(
                    by_node[node] if not mine else {k: v for k, v in by_node[node].items() if k not in mine})
    out = []
    for (m, d), lacking in sorted(need.items()):
        total = sum(b for b, _ in lacking.values())
        network = sum(b for b, remote in lacking.values() if remote)
        if total > 0:
            out.append(HandOff(*names[m], m, d, total, network > 0, network))
    return out


def hand_off_gathers(ops: Sequence[MetaOp], placed: PlacedSchedule, weights_from: Mapping[str, str],
                     weight_bytes: float, devices_per_node: int, tp_whole_params: Mapping[str, float],
                     size: ModuleSize | None = None, held: Sequence[Holding] | None = None) -> list[HandOffGather]:
    """Every all-gather the senders of ``placed``'s hand-offs run first (module docstring; what
    runtime.rollout.Roles.hand_off gathers), sorted; empty when every sender holds what its receivers take (a layer
    trained at tensor_parallel 1, or a decode fed by the trainers of its own shard). Arguments as
    :func:`hand_offs`'s; ``tp_whole_params``: component -> parameters of a layer every TP rank keeps whole
    (planner.metagraph.MetaGraph.tp_whole_params)."""
    if not _receives(ops, weights_from):
        return []
    size = size or (lambda name: (0.0, 0.0))
    trained_groups, layers_of, _ = _trained(ops, size)
    steppers: dict[tuple[str, int], set[int]] = {}  # a layer's holders, any TP shard
    shards: dict[tuple[str, int], set[int]] = {}  # a layer's TP ranks held
    for h in holdings(ops, placed) if held is None else held:
        steppers.setdefault(h.key[:2], set()).update(h.devices)
        shards.setdefault(h.key[:2], set()).add(h.key[2])
    groups_of = layer_tp_groups(ops, placed, {g for groups in trained_groups.values() for g in groups})  # sent ones
    out: dict[tuple[str, int, tuple[int, ...]], float] = {}
    senders: dict[tuple[tuple[str, int], int], int] = {}  # (layer, node) -> its sender to a device of that node
    for wave in placed.waves:
        for s in wave.slices:
            op = ops[s.metaop]
            source = _source(op, weights_from)
            groups = trained_groups.get(source or "", {})
            if op.gen is not None:  # a whole use decodes every trained layer of its source
                keys = [(g, j) for g in groups for j in range(layers_of[g])]
            else:
                g = _source_group(op.param_group, op.component, source or "")
                keys = [(g, j) for j in range(s.first_layer, s.first_layer + s.num_layers)] if g in groups else []
            tp = s.layout.tp_degree
            for i, d in enumerate(s.devices):
                taken = (tp, i % tp) if tp > 1 else None  # the shard the receiver holds (None: whole)
                for key in keys:
                    holders = steppers.get(key)
                    if not holders:
                        continue
                    if op.component in weights_from:
                        src = min(holders)
                    elif d in holders or (taken is not None and len(shards[key]) == tp):
                        continue  # it steps the layer itself, or a trainer of its own shard sends it
                    else:
                        at = (key, d // devices_per_node)
                        src = senders.get(at)
                        if src is None:
                            src = senders[at] = sender(holders, d, devices_per_node)
                    group = groups_of.get((*key, src), (src,))
                    if len(group) > 1 and (len(group), group.index(src)) != taken:
                        out[(*key, group)] = (groups[key[0]] - tp_whole_params.get(source, 0.0)) * weight_bytes
    return [HandOffGather(g, j, devices, b) for (g, j, devices), b in sorted(out.items())]


def hand_off_seconds(offs: Sequence[HandOff], cost_model, devices_per_node: int,
                     gathers: Sequence[HandOffGather] = ()) -> float:
    """Seconds the hand-offs take (module docstring): the busiest device's all-gathers, then the busiest device's
    NVLink bytes or the busiest node's network bytes, plus one latency."""
    busy: dict[int, float] = {}  # device -> seconds of the gathers it takes part in, one after another
    for g in gathers:
        cross = len({d // devices_per_node for d in g.devices}) > 1
        seconds = cost_model.allgather_time(g.bytes, len(g.devices), cross)
        for d in g.devices:
            busy[d] = busy.get(d, 0.0) + seconds
    gather_s = max(busy.values(), default=0.0)
    if not offs:
        return gather_s
    intra: dict[int, float] = {}
    inter: dict[int, float] = {}
    for h in offs:
        intra[h.device] = intra.get(h.device, 0.0) + h.bytes - h.network_bytes
        node = h.device // devices_per_node
        inter[node] = inter.get(node, 0.0) + h.network_bytes
    hw = cost_model.hw
    t_intra = max(intra.values()) / hw.intra_bandwidth
    t_inter = max(inter.values()) / hw.inter_bandwidth
    latency = hw.device.inter_latency_s if any(inter.values()) else hw.device.intra_latency_s
    return gather_s + latency + max(t_intra, t_inter)
