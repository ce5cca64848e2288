"""Point-to-point flows between devices and the time a set of them takes at once: the price of a transfer between
waves (:mod:`planner.simulator`), on the busiest link per direction (a device's intra-node link, a node's network)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from planner.costmodel import CostModel
from planner.placement import PlacedSchedule
from planner.program import Edge, Moves, row_bytes
from planner.schedule import Problem
from planner.timeline import flow_memo


@dataclass(frozen=True)
class Flows:
    """Point-to-point messages: ``senders[i]`` sends ``nbytes[i]`` bytes to ``receivers[i]``."""

    senders: np.ndarray
    receivers: np.ndarray
    nbytes: np.ndarray
    shared: bool = False  # kept by move_flows for every simulation (read-only): boundary_time prices it once

    @property
    def total_bytes(self) -> float:
        return float(self.nbytes.sum())


def boundary_time(flows: Sequence[Flows], cost_model: CostModel) -> float:
    """Seconds for ``flows`` running concurrently: the busiest link (device intra-node, node network) per direction.
    Remembered: kept flows by identity (one edge's, or a boundary's together: :func:`shared_memo`), any by their
    bytes (:func:`planner.timeline.flow_memo`)."""
    flows = [f for f in flows if len(f.nbytes)]
    if not flows:
        return 0.0
    if len(flows) == 1:  # most calls: one edge's flows (a transfer's own time), shared (move_flows): by identity
        together, ids = cost_model.__dict__.setdefault("_flows_priced", {}), (id(flows[0]),)
        if not flows[0].shared:
            ids = None
        snd, rcv, nbytes = flows[0].senders, flows[0].receivers, flows[0].nbytes
    else:
        together, ids = shared_memo(cost_model, "boundary", flows)
    if ids is not None and ids in together:
        return together[ids][1]
    if len(flows) > 1:
        snd = np.concatenate([f.senders for f in flows])
        rcv = np.concatenate([f.receivers for f in flows])
        nbytes = np.concatenate([f.nbytes for f in flows])
    worst = _busiest_link_time(snd, rcv, nbytes, cost_model)
    if ids is not None:
        together[ids] = (tuple(flows), worst)
    return worst


def _busiest_link_time(snd: np.ndarray, rcv: np.ndarray, nbytes: np.ndarray, cost_model: CostModel) -> float:
    memo, key = flow_memo(cost_model, "boundary", snd, rcv, nbytes)
    if key is not None and key in memo:
        return memo[key]
    dpn = cost_model.hw.devices_per_node
    cross = snd // dpn != rcv // dpn
    worst = 0.0
    for on_link, divisor in ((~cross, 1), (cross, dpn)):
        if on_link.any():
            weights = nbytes[on_link]
            for endpoints in (snd, rcv):
                per_link = np.bincount(endpoints[on_link] // divisor, weights=weights)
                worst = max(worst, cost_model.p2p_time(float(per_link.max()), cross_node=divisor > 1))
    if key is not None:
        memo[key] = worst
    return worst


def shared_memo(cost_model: CostModel, kind: str, flows: Sequence[Flows]) -> tuple[dict, tuple[int, ...] | None]:
    """The memo of what ``kind`` of pricing gave for several flows taken together, beside ``cost_model`` (one per
    ``plan_job``), and the key of ``flows`` in it: their identities, when every one is kept (:func:`move_flows`), else
    None. A boundary's flows are the same kept objects in every simulation that keeps the boundary's edges, so their
    identities say as much as their bytes (:func:`planner.timeline.flow_memo`) without concatenating and hashing them.
    Each entry is ``(flows, price)``: it keeps its flows alive, so an identity is not reused while its entry stands."""
    if not all(f.shared for f in flows):
        return {}, None
    return cost_model.__dict__.setdefault("_shared_" + kind, {}), tuple(map(id, flows))


FLOWS_MEMO_MAX_MOVES = 256  # every edge of the grid's cells has at most 128 moves
FLOWS_MEMO_MAX_DEVICES = 512  # jobs up to this size keep their flows (edge_flows); the kept flows live as long as the
# program's cached moves (the whole process): 10,240 x 500 MetaOps kept 26-33 MB more peak RSS for no measurable CPU


def move_flows(moves: Moves, row_bytes: float, keep: bool = False) -> Flows:
    """The remote part of ``moves`` (local moves cost nothing) as flows of ``row_bytes`` per row. With ``keep``,
    remembered on ``moves`` per row size (the program's moves are cached and shared, planner.program), read-only, up
    to :data:`FLOWS_MEMO_MAX_MOVES` moves: every simulation of a search rebuilt the same flows."""
    keep = keep and len(moves) <= FLOWS_MEMO_MAX_MOVES
    memo = moves.__dict__.setdefault("_flows", {}) if keep else {}
    flows = memo.get(row_bytes)
    if flows is None:
        remote = moves.remote
        flows = Flows(moves.senders[remote], moves.receivers[remote], moves.rows[remote] * row_bytes, shared=keep)
        if keep:
            for a in (flows.senders, flows.receivers, flows.nbytes):
                a.flags.writeable = False
            memo[row_bytes] = flows
    return flows


def edge_flows(problem: Problem, placed: PlacedSchedule, edge: Edge, cost_model: CostModel) -> tuple[Flows, Flows]:
    """(forward, backward) flows of one edge of the program: its rows at the producer boundary's bytes per row
    (activations and their gradients in the compute precision, ``cost_model.weight_bytes`` per element)."""
    src = placed.waves[edge.producer[0]].slices[edge.producer[1]]
    per_row = row_bytes(problem.graph.metaops[src.metaop], src.first_layer + src.num_layers, cost_model.weight_bytes)
    keep = problem.num_devices <= FLOWS_MEMO_MAX_DEVICES
    return move_flows(edge.forward, per_row, keep), move_flows(edge.backward, per_row, keep)
