"""Renumber a plan's devices so that it holds the parameters where another plan holds them.

Two plans of a plan cache (:mod:`planner.plan_cache`) often have the same structure on differently numbered
devices: the planner numbers devices as placement happens to pick them. Switching between such plans at run
time would move parameters for nothing. The cost model sees only which devices share a node, so renumbering
devices by a permutation that keeps nodes together (nodes permuted, devices permuted inside a node) changes
no compute or collective time; it can change which rows of a transfer stay on a device, since every slice
lists its devices in ascending order, so the renumbered plan is simulated again and
:func:`align_plan` returns its predicted time for the caller to judge.

The permutation maximises the parameter bytes each device keeps (:func:`kept_bytes`): an assignment
problem per pair of nodes (devices inside a node), then one over nodes, each solved exactly
(:func:`max_assignment`, the Hungarian method). Pure; numpy only.
"""

from __future__ import annotations

import numpy as np

from planner.api import build_plan
from planner.costmodel import CostModel, Layout
from planner.metagraph import build_metagraph
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave
from planner.plan import Plan
from planner.schedule import Problem
from planner.simulator import simulate
from planner.solver import SolveResult
from planner.spec import JobSpec

MAX_ALIGN_DEVICES = 1024  # the kept-bytes matrix is devices x devices; past this, plans keep their numbering
ALIGNED = ", devices aligned"  # method suffix of a renumbered plan


def kept_bytes(new: Plan, old: Plan, cost_model: CostModel) -> np.ndarray:
    """``K[a, b]``: parameter bytes device ``a`` of ``new`` would not have to receive if it were device ``b`` of
    ``old`` (summed over the module shards both hold: weights, and for trainable shards the optimizer state)."""
    n = new.cluster.num_nodes * new.cluster.devices_per_node
    held = {(h.name, h.layer, h.shard): h.devices for h in old.holdings}
    kept = np.zeros((n, n))
    for h in new.holdings:
        before = held.get((h.name, h.layer, h.shard))
        if not before or h.params <= 0:
            continue
        weight, state = cost_model.moved_bytes_per_param(h.trainable)
        per_device = h.params * (weight + state / len(h.devices))
        kept[np.ix_(h.devices, before)] += per_device
    return kept


def max_assignment(weights: np.ndarray) -> list[int]:
    """``col[i]`` for every row ``i`` of a square matrix, a permutation maximising ``sum(weights[i, col[i]])``
    (the Hungarian method with potentials, O(n^3))."""
    n = len(weights)
    cost = weights.max(initial=0.0) - weights  # minimise
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=int)  # match[j]: row (1-based) assigned to column j; 0: free
    way = np.zeros(n + 1, dtype=int)
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        slack = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (reduced < slack[1:])
            slack[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.where(free, slack[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[match[used]] += delta
            v[used] -= delta
            slack[1:][free] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    col = [0] * n
    for j in range(1, n + 1):
        col[match[j] - 1] = j - 1
    return col


def node_preserving_permutation(kept: np.ndarray, devices_per_node: int) -> list[int]:
    """``perm[d]``: the new number of device ``d``, keeping nodes together, maximising the kept bytes."""
    n = len(kept)
    nodes = n // devices_per_node
    inner: dict[tuple[int, int], list[int]] = {}
    value = np.zeros((nodes, nodes))
    for a in range(nodes):
        for b in range(nodes):
            block = kept[a * devices_per_node:(a + 1) * devices_per_node, b * devices_per_node:(b + 1) * devices_per_node]
            if not block.any():
                inner[a, b] = list(range(devices_per_node))
                continue
            inner[a, b] = max_assignment(block)
            value[a, b] = sum(block[i, j] for i, j in enumerate(inner[a, b]))
    node_of = max_assignment(value) if nodes > 1 else [0]
    perm = []
    for d in range(n):
        a, i = divmod(d, devices_per_node)
        perm.append(node_of[a] * devices_per_node + inner[a, node_of[a]][i])
    return perm


def align_plan(job: JobSpec, plan: Plan, anchor: Plan, cost_model: CostModel) -> Plan | None:
    """``plan`` (made for ``job``) with its devices renumbered to keep as much of ``anchor``'s parameter placement as
    a node-preserving permutation allows, simulated again (a slice's devices stay ascending, so its data-parallel
    ranks may change order, which moves rows a device held: the time can differ slightly); None when nothing changes
    or the cluster is too large."""
    n = cost_model.hw.num_devices
    if n > MAX_ALIGN_DEVICES:
        return None
    perm = node_preserving_permutation(kept_bytes(plan, anchor, cost_model), cost_model.hw.devices_per_node)
    if perm == list(range(n)):
        return None
    placed = PlacedSchedule(tuple(PlacedWave(tuple(
        PlacedSlice(s.metaop, s.first_layer, s.num_layers, tuple(sorted(perm[d] for d in s.devices)),
                    Layout(s.dp_degree, s.tp_degree))
        for s in wave.slices)) for wave in plan.waves))
    graph = build_metagraph(job)
    sim = simulate(Problem.build(graph, cost_model), placed, cost_model)
    report = plan.solver
    result = SolveResult(None, report.name, report.status, report.objective_s, report.bound_s, report.gap,
                         report.method + ALIGNED)
    return build_plan(job, graph, cost_model, placed, sim, result, plan.bounds, dict(plan.baselines),
                      dict(plan.baseline_notes))

