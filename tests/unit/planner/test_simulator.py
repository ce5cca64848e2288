"""Simulator: compute, transfers (re-split of a batch), gradient sync, optimizer and peak memory against hand math."""

from __future__ import annotations

import pytest

from planner.components import LayerSegment
from planner.costmodel import CostModel, Layout
from planner.devices import DEVICES, GIB, Hardware
from planner.metagraph import MetaOp, finalize_graph
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave, build_ledger
from planner.schedule import Problem
from planner.simulator import (
    GRAD_BYTES_PER_PARAM, boundary_time, resplit_flows, simulate, sync_and_optimizer, sync_buckets,
)


class LinearCost(CostModel):
    """Perfect data-parallel scaling: one layer takes ``flops_fwd * local_batch / 1e12`` seconds."""

    def layout_time(self, op: MetaOp, layout: Layout) -> float:
        return op.layer.flops_fwd * self.local_batch(op, layout) / 1e12


CM = LinearCost(Hardware(DEVICES["a800"], 2, 4, 80 * GIB, 200e9, 50e9))


def op(m: int, group: str, *, layers: int = 4, deps: tuple[int, ...] = (), batch: int = 8, task: str | None = None,
       params: float = 1e6, out: float = 1e4, frozen: bool = False, backward: float | None = None) -> MetaOp:
    seg = LayerSegment(f"layer{m}", layers, 1e9 * (m + 1), params, 1e5, out, 0.0, 4)
    bwd = backward if backward is not None else (0.0 if frozen else 2.0)
    return MetaOp(m, f"{task or f't{m}'}.{group}", task or f"t{m}", group, seg, layers, batch, deps, group, frozen, bwd)


def problem_of(*ops: MetaOp) -> Problem:
    return Problem.build(finalize_graph(list(ops)), CM)


def placed(problem: Problem, *waves: list[tuple[int, int, int, tuple[int, ...]]]) -> PlacedSchedule:
    """Waves of (metaop, first_layer, num_layers, devices); layouts from the curves."""
    return PlacedSchedule(tuple(
        PlacedWave(tuple(PlacedSlice(m, f, n, d, problem.curves[m].layout(len(d))) for m, f, n, d in wave))
        for wave in waves
    ))


def samples_moved(flows, out_bytes: float) -> float:
    return float(flows.nbytes.sum()) / out_bytes


def test_single_wave_iteration_is_compute_plus_sync_plus_optimizer():
    o = op(0, "enc", layers=6, params=2e6)
    problem = problem_of(o)
    sim = simulate(problem, placed(problem, [(0, 0, 6, (0, 1, 2, 3))]), CM)
    compute = problem.curves[0].time(4) * 6
    sync = CM.allreduce_time(GRAD_BYTES_PER_PARAM * 2e6 * 6, 4, cross_node=False)
    optimizer = CM.optimizer_time(2e6 * 6)
    assert sim.compute_s == pytest.approx(compute)
    assert sim.wave_durations == (pytest.approx(compute),)
    assert sim.transfer_s == 0 and sim.transfers == ()
    assert sim.sync_s == pytest.approx(sync)
    assert sim.optimizer_s == pytest.approx(optimizer)
    assert sim.iteration_time_s == pytest.approx(compute + sync + optimizer)
    assert [(g.param_group, g.devices, g.bytes) for g in sim.sync_groups] == [("enc", (0, 1, 2, 3), 2 * 2e6 * 6)]


def test_shared_group_syncs_across_both_metaops_devices():
    """Two tasks' MetaOps share 'enc' on disjoint devices of two nodes: one cross-node all-reduce over 8."""
    a, b = op(0, "enc", task="ta", params=1e6), op(1, "enc", task="tb", params=1e6)
    problem = problem_of(a, b)
    sim = simulate(problem, placed(problem, [(0, 0, 4, (0, 1, 2, 3)), (1, 0, 4, (4, 5, 6, 7))]), CM)
    assert sim.compute_s == pytest.approx(max(problem.curves[m].time(4) * 4 for m in (0, 1)))
    assert sim.sync_s == pytest.approx(CM.allreduce_time(2 * 1e6 * 4, 8, cross_node=True))
    assert len(sim.sync_groups) == 1 and sim.sync_groups[0].metaops == (0, 1)


def test_frozen_group_is_not_synced_and_has_no_optimizer_step():
    problem = problem_of(op(0, "enc", frozen=True))
    sim = simulate(problem, placed(problem, [(0, 0, 4, (0, 1, 2, 3))]), CM)
    assert sim.sync_s == 0 and sim.optimizer_s == 0 and sim.sync_groups == ()


def test_resplit_moves_exactly_the_samples_whose_owner_changes():
    """8 samples on [0, 1] -> [0, 1, 2, 3]: 0-3 | 4-7 becomes 0-1 | 2-3 | 4-5 | 6-7; samples 2-7 move."""
    out = 100.0
    flows = resplit_flows((0, 1), Layout(2, 1), (0, 1, 2, 3), Layout(4, 1), 8 * out)
    moved = sorted(zip(flows.senders.tolist(), flows.receivers.tolist(), (flows.nbytes / out).tolist()))
    assert moved == [(0, 1, 2.0), (1, 2, 2.0), (1, 3, 2.0)]
    # device 1 sends 4 samples: the busiest link
    assert boundary_time([flows], CM) == pytest.approx(CM.p2p_time(4 * out, cross_node=False))
    # same group, same layout: nothing moves
    assert samples_moved(resplit_flows((0, 1), Layout(2, 1), (0, 1), Layout(2, 1), 8 * out), out) == 0
    # a permutation of the same devices re-splits
    assert samples_moved(resplit_flows((0, 1), Layout(2, 1), (1, 2), Layout(2, 1), 8 * out), out) == 8


def test_resplit_with_tensor_parallel_groups():
    out = 10.0
    # a TP=2 group holds the whole batch on both devices: any DP split over them needs nothing
    assert samples_moved(resplit_flows((0, 1), Layout(1, 2), (0, 1), Layout(2, 1), 8 * out), out) == 0
    # onto a new TP group: each of its devices needs the whole batch, from its counterpart
    flows = resplit_flows((0, 1), Layout(1, 2), (2, 3), Layout(1, 2), 8 * out)
    assert sorted(zip(flows.senders.tolist(), flows.receivers.tolist())) == [(0, 2), (1, 3)]
    assert samples_moved(flows, out) == 16


def test_cross_node_flows_share_the_node_link():
    """Four devices of node 0 each send 1 kB to node 1: the node's network link carries 4 kB."""
    flows = resplit_flows((0, 1, 2, 3), Layout(4, 1), (4, 5, 6, 7), Layout(4, 1), 4000.0)
    assert boundary_time([flows], CM) == pytest.approx(CM.p2p_time(4000.0, cross_node=True))


def test_continuation_transfer_bytes_and_time_in_simulation():
    o = op(0, "enc", layers=4, out=100.0)
    problem = problem_of(o)
    sim = simulate(problem, placed(problem, [(0, 0, 2, (0, 1))], [(0, 2, 2, (0, 1, 2, 3))]), CM)
    (t,) = sim.transfers
    assert (t.after_wave, t.src_metaop, t.dst_metaop, t.src_devices, t.dst_devices) == (0, 0, 0, (0, 1), (0, 1, 2, 3))
    assert t.bytes == pytest.approx(6 * 100.0)
    one_way = CM.p2p_time(4 * 100.0, cross_node=False)
    assert t.time_s == pytest.approx(2 * one_way)  # activations forward, gradients backward
    assert sim.transfer_s == pytest.approx(2 * one_way)
    assert sim.iteration_time_s == pytest.approx(sim.compute_s + sim.transfer_s + sim.sync_s + sim.optimizer_s)


def test_same_devices_mean_no_transfer():
    problem = problem_of(op(0, "enc", layers=4))
    sim = simulate(problem, placed(problem, [(0, 0, 2, (4, 5))], [(0, 2, 2, (4, 5))]), CM)
    assert sim.transfers == () and sim.transfer_s == 0


def test_producer_without_backward_gets_no_gradients():
    frozen = op(0, "vae", layers=2, frozen=True, out=100.0)
    head = op(1, "head", layers=2, deps=(0,), task="t0")
    problem = problem_of(frozen, head)
    sim = simulate(problem, placed(problem, [(0, 0, 2, (0,))], [(1, 0, 2, (1,))]), CM)
    (t,) = sim.transfers
    assert t.bytes == pytest.approx(8 * 100.0)
    assert sim.transfer_s == pytest.approx(CM.p2p_time(8 * 100.0, cross_node=False))


def test_flow_across_non_adjacent_waves_lands_before_the_consumer():
    a = op(0, "a", layers=2, out=50.0)
    b = op(1, "b", layers=2, deps=(0,), task="t0")
    other = op(2, "c", layers=2)
    problem = problem_of(a, b, other)
    sim = simulate(problem, placed(problem, [(0, 0, 2, (0, 1))], [(2, 0, 2, (0, 1))], [(1, 0, 2, (2, 3))]), CM)
    (t,) = sim.transfers
    assert (t.after_wave, t.src_metaop, t.dst_metaop, t.src_devices, t.dst_devices) == (1, 0, 1, (0, 1), (2, 3))
    assert t.bytes == pytest.approx(8 * 50.0)


def test_concurrent_transfers_at_one_boundary_take_the_busiest_link():
    a, b = op(0, "a", layers=2, out=100.0), op(1, "b", layers=2, out=300.0)
    problem = problem_of(a, b)
    sim = simulate(problem, placed(problem, [(0, 0, 1, (0,)), (1, 0, 1, (1,))], [(0, 1, 1, (2,)), (1, 1, 1, (3,))]), CM)
    assert len(sim.transfers) == 2
    assert sim.transfer_s == pytest.approx(2 * CM.p2p_time(8 * 300.0, cross_node=False))


def test_split_metaop_syncs_each_device_set_separately():
    """Layers 0-1 on [0,1] and layers 2-3 on [0,1,2,3]: two buckets, sharing devices 0-1, so they serialise."""
    problem = problem_of(op(0, "enc", layers=4, params=1e6))
    ledger = build_ledger(problem, [
        PlacedSlice(0, 0, 2, (0, 1), Layout(2, 1)), PlacedSlice(0, 2, 2, (0, 1, 2, 3), Layout(4, 1)),
    ], CM)
    buckets = sync_buckets(ledger)
    assert [(b.layers, b.devices) for b in buckets] == [((0, 1), (0, 1)), ((2, 3), (0, 1, 2, 3))]
    sync_s, optimizer_s = sync_and_optimizer(ledger, CM)
    assert sync_s == pytest.approx(CM.allreduce_time(4e6, 2, False) + CM.allreduce_time(4e6, 4, False))
    assert optimizer_s == pytest.approx(CM.optimizer_time(4e6))  # devices 0-1 hold all 4 layers


def test_disjoint_buckets_sync_concurrently():
    problem = problem_of(op(0, "x", params=1e6), op(1, "y", params=3e6))
    sim = simulate(problem, placed(problem, [(0, 0, 4, (0, 1)), (1, 0, 4, (2, 3))]), CM)
    assert sim.sync_s == pytest.approx(CM.allreduce_time(2 * 3e6 * 4, 2, False))


def test_peak_memory_is_layer_memory_times_layers():
    o = op(0, "enc", layers=3)
    problem = problem_of(o)
    sim = simulate(problem, placed(problem, [(0, 0, 3, (4, 5))]), CM)
    per_device = CM.layer_memory(o, Layout(2, 1)) * 3
    assert sim.peak_memory_bytes == (0.0, 0.0, 0.0, 0.0, pytest.approx(per_device), pytest.approx(per_device), 0.0, 0.0)
