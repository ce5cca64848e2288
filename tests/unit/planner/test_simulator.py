"""Simulator: compute, transfers (re-split of a batch), gradient sync overlapped with backward, the ZeRO-1
optimizer and its all-gather, and peak memory against hand math, and the overlap model's bounds on random placed
schedules."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace

import numpy as np
import pytest

from planner.components import LayerSegment
from planner.costmodel import CostModel, Curve, Layout
from planner.devices import DEVICES, GIB, Hardware
from planner.flows import boundary_time, move_flows
from planner.metagraph import MetaOp, finalize_graph
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave, all_slices, build_ledger, place_schedule
from planner.program import _loss_hosts, forward_moves, grad_buckets, holdings, loss_hosts
from planner.schedule import Problem
from planner.simulator import (
    SIM_MEMO_SIZE, Phase, backward_ends, simulate, simulate_transfers, split_passes, sync_of,
)
from planner.sync import (
    SyncBucket, bucket_time, finish_iteration, gather_limits, gather_spans, gather_time, optimizer_seconds, sync_buckets,
)

from conftest import random_schedule


def resplit_flows(src, src_layout, dst, dst_layout, total_bytes, batch=8):
    """The forward flows of a batch of ``batch`` rows (``total_bytes`` in all) re-split from ``src`` to ``dst``."""
    return move_flows(forward_moves(src, src_layout, dst, dst_layout, batch), total_bytes / batch)


class LinearCost(CostModel):
    """Perfect data-parallel scaling: one layer takes ``flops_fwd * local_batch / 1e12`` seconds."""

    def layout_time(self, op: MetaOp, layout: Layout) -> float:
        return op.layer.flops_fwd * self.local_batch(op, layout) / 1e12


CM = LinearCost(Hardware(DEVICES["a800"], 2, 4, 80 * GIB, 200e9, 50e9))


def op(m: int, group: str, *, layers: int = 4, deps: tuple[int, ...] = (), batch: int = 8, task: str | None = None,
       params: float = 1e6, out: float = 1e4, frozen: bool = False, backward: float | None = None,
       recompute: bool = False) -> MetaOp:
    seg = LayerSegment(f"layer{m}", layers, 1e9 * (m + 1), params, 1e5, out, 0.0, 4)
    bwd = backward if backward is not None else (0.0 if frozen else 2.0)
    return MetaOp(m, f"{task or f't{m}'}.{group}", task or f"t{m}", group, seg, layers, batch, deps, group, frozen, bwd,
                  recompute=recompute)


def problem_of(*ops: MetaOp) -> Problem:
    return Problem.build(finalize_graph(list(ops)), CM)


def placed(problem: Problem, *waves: list[tuple[int, int, int, tuple[int, ...]]]) -> PlacedSchedule:
    """Waves of (metaop, first_layer, num_layers, devices); layouts from the curves."""
    return PlacedSchedule(tuple(
        PlacedWave(tuple(PlacedSlice(m, f, n, d, problem.curves[m].layout(len(d))) for m, f, n, d in wave))
        for wave in waves
    ))


def gather(params: float, n: int, cross_node: bool = False, cm: CostModel = CM) -> float:
    """ZeRO-1's all-gather of ``params`` updated parameters over ``n`` holders (shares padded to ceil(params / n))."""
    return cm.allgather_time(cm.param_bytes_moved * math.ceil(params / n) * n, n, cross_node)


def identity(sim) -> float:
    return sim.compute_s + sim.transfer_s + sim.sync_s + sim.optimizer_s + sim.gather_s + sim.handoff_s


def samples_moved(flows, out_bytes: float) -> float:
    return float(flows.nbytes.sum()) / out_bytes


def test_single_wave_iteration_is_compute_plus_sync_plus_optimizer_plus_gather():
    """One wave, one MetaOp: its bucket is ready exactly when backward ends, so nothing hides the sync, and the
    all-gather of the updated parameters follows the step."""
    o = op(0, "enc", layers=6, params=2e6)
    problem = problem_of(o)
    sim = simulate(problem, placed(problem, [(0, 0, 6, (0, 1, 2, 3))]), CM)
    compute = 8 * 1e9 / 4 / 1e12 * 6  # 2 samples per device, 1 GFLOP each, on a 1 TFLOP/s linear model
    sync = CM.allreduce_time(CM.grad_bytes * 2e6 * 6, 4, cross_node=False)
    optimizer = CM.optimizer_time(2e6 * 6 / 4)  # ZeRO-1: each of the 4 replicas steps a quarter
    gathered = CM.allgather_time(CM.param_bytes_moved * 2e6 * 6, 4, cross_node=False)  # then they gather the quarters
    assert sim.compute_s == pytest.approx(compute)
    assert sim.wave_durations == (pytest.approx(compute),)
    assert sim.transfer_s == 0 and sim.transfers == ()
    assert sim.sync_s == pytest.approx(sync)
    assert sim.sync_total_s == pytest.approx(sync)
    assert sim.optimizer_s == pytest.approx(optimizer)
    assert sim.gather_s == pytest.approx(gathered) and gathered > 0
    assert sim.iteration_time_s == pytest.approx(compute + sync + optimizer + gathered)
    assert [(g.param_group, g.devices, g.bytes) for g in sim.sync_groups] == [("enc", (0, 1, 2, 3), 2 * 2e6 * 6)]


def test_shared_group_syncs_across_both_metaops_devices():
    """Two tasks' MetaOps share 'enc' on disjoint devices of two nodes: one cross-node all-reduce over 8."""
    a, b = op(0, "enc", task="ta", params=1e6), op(1, "enc", task="tb", params=1e6)
    problem = problem_of(a, b)
    sim = simulate(problem, placed(problem, [(0, 0, 4, (0, 1, 2, 3)), (1, 0, 4, (4, 5, 6, 7))]), CM)
    assert sim.compute_s == pytest.approx(max(problem.curves[m].time(4) * 4 for m in (0, 1)))
    assert sim.sync_s == pytest.approx(CM.allreduce_time(2 * 1e6 * 4, 8, cross_node=True))
    assert sim.optimizer_s == pytest.approx(CM.optimizer_time(1e6 * 4 / 8))  # state sharded over all 8 holders
    assert sim.gather_s == pytest.approx(gather(1e6 * 4, 8, cross_node=True))  # the gather crosses nodes too
    assert len(sim.sync_groups) == 1 and sim.sync_groups[0].metaops == (0, 1)


def test_frozen_group_is_not_synced_and_has_no_optimizer_step():
    problem = problem_of(op(0, "enc", frozen=True))
    sim = simulate(problem, placed(problem, [(0, 0, 4, (0, 1, 2, 3))]), CM)
    assert sim.sync_s == 0 and sim.optimizer_s == 0 and sim.gather_s == 0 and sim.sync_groups == ()


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
    assert sim.iteration_time_s == pytest.approx(identity(sim))


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
    """Layers 0-1 on [0,1] and layers 2-3 on [0,1,2,3]: two buckets, sharing devices 0-1, so their all-reduces
    serialise, and so do their all-gathers after devices 0-1 (the slowest) have stepped."""
    problem = problem_of(op(0, "enc", layers=4, params=1e6))
    ledger = build_ledger(problem, [
        PlacedSlice(0, 0, 2, (0, 1), Layout(2, 1)), PlacedSlice(0, 2, 2, (0, 1, 2, 3), Layout(4, 1)),
    ], CM)
    buckets = sync_buckets(ledger)
    assert [(b.layers, b.devices) for b in buckets] == [((0, 1), (0, 1)), ((2, 3), (0, 1, 2, 3))]
    out = finish_iteration(ledger, [0.0, 0.0], 0.0, CM)  # everything ready when compute ends (at 0)
    sync = CM.allreduce_time(4e6, 2, False) + CM.allreduce_time(4e6, 4, False)
    # devices 0-1 step half of layers 0-1 and a quarter of layers 2-3 (ZeRO-1 over each bucket's replicas)
    optimizer = CM.optimizer_time(2e6 / 2 + 2e6 / 4)
    gathers = (gather(2e6, 2), gather(2e6, 4))
    assert out.gather_times == pytest.approx(gathers)
    assert out.sync_s == pytest.approx(sync)
    assert out.optimizer_s == pytest.approx(optimizer)
    assert out.gather_s == pytest.approx(sum(gathers))
    assert out.iteration_time_s == pytest.approx(sync + optimizer + sum(gathers))


def test_unsharded_optimizer_steps_every_parameter_a_device_holds():
    problem = problem_of(op(0, "enc", layers=4, params=1e6))
    ledger = build_ledger(problem, [PlacedSlice(0, 0, 4, (0, 1, 2, 3), Layout(4, 1))], CM)
    plain = LinearCost(CM.hw, shard_optimizer=False)
    unsharded, sharded = finish_iteration(ledger, [0.0], 0.0, plain), finish_iteration(ledger, [0.0], 0.0, CM)
    assert unsharded.optimizer_s == pytest.approx(CM.optimizer_time(4e6))
    assert sharded.optimizer_s == pytest.approx(CM.optimizer_time(1e6))
    # every replica steps all of it: nothing to gather
    assert unsharded.gather_s == 0 and unsharded.gather_times == (0.0,)
    assert unsharded.iteration_time_s == pytest.approx(unsharded.sync_s + unsharded.optimizer_s)
    assert sharded.gather_s == pytest.approx(gather(4e6, 4)) and sharded.gather_s > 0


@pytest.mark.parametrize("shard", [True, False])
def test_gather_only_for_sharded_buckets_with_several_participants(shard):
    """x alone on device 0 (one participant), y on devices 1-2: only y gathers, and only under ZeRO-1."""
    cm = LinearCost(CM.hw, shard_optimizer=shard)
    problem = Problem.build(finalize_graph([op(0, "x", params=1e6), op(1, "y", params=1e6)]), cm)
    placed_schedule = placed(problem, [(0, 0, 4, (0,)), (1, 0, 4, (1, 2))])
    sim = simulate(problem, placed_schedule, cm)
    outcome = finish_iteration(build_ledger(problem, all_slices(placed_schedule), cm), [0.0, 0.0], 0.0, cm)
    gather_y = gather(4e6, 2, cm=cm) if shard else 0.0
    assert outcome.gather_times == (0.0, pytest.approx(gather_y))  # x's one holder steps all of it: nothing to gather
    # y's devices sync, step (half of y when sharded) and gather after device 0 has stepped all of x: y ends last
    step_x, step_y = cm.optimizer_time(4e6), cm.optimizer_time(4e6 / 2 if shard else 4e6)
    stepped_y = cm.allreduce_time(2 * 4e6, 2, False) + step_y
    assert stepped_y > step_x
    assert sim.gather_s == pytest.approx(gather_y)
    assert sim.iteration_time_s == pytest.approx(sim.compute_s + stepped_y + gather_y)
    assert sim.iteration_time_s == pytest.approx(identity(sim))


def test_gather_grows_with_the_buckets_bytes():
    """The same placement with larger layers: the exposed all-gather grows with the parameters gathered."""
    exposed = []
    for params in (1e6, 1e7, 1e8):
        problem = problem_of(op(0, "enc", params=params))
        sim = simulate(problem, placed(problem, [(0, 0, 4, (0, 1, 2, 3))]), CM)
        assert sim.gather_s == pytest.approx(gather(params * 4, 4))
        assert sim.iteration_time_s == pytest.approx(identity(sim))
        exposed.append(sim.gather_s)
    assert exposed[0] < exposed[1] < exposed[2]
    # beyond the latency, ten times the bytes take about ten times as long
    assert (exposed[2] - exposed[1]) == pytest.approx(10 * (exposed[1] - exposed[0]))


def test_disjoint_buckets_sync_concurrently():
    problem = problem_of(op(0, "x", params=1e6), op(1, "y", params=3e6))
    sim = simulate(problem, placed(problem, [(0, 0, 4, (0, 1)), (1, 0, 4, (2, 3))]), CM)
    # both ready when the single wave's backward ends; y's devices finish last: its sync, its step and its gather
    end_x = CM.allreduce_time(2 * 1e6 * 4, 2, False) + CM.optimizer_time(1e6 * 4 / 2) + gather(1e6 * 4, 2)
    end_y = CM.allreduce_time(2 * 3e6 * 4, 2, False) + CM.optimizer_time(3e6 * 4 / 2) + gather(3e6 * 4, 2)
    assert end_y > end_x
    assert sim.iteration_time_s == pytest.approx(sim.compute_s + end_y)
    assert sim.sync_s == pytest.approx(CM.allreduce_time(2 * 3e6 * 4, 2, False))
    assert sim.gather_s == pytest.approx(gather(3e6 * 4, 2))  # x's gather runs beside y's step


# --------------------------------------------------------------------------- overlap with backward


def test_passes_split_compute_into_forward_and_backward():
    assert split_passes(op(0, "a"), 3.0) == pytest.approx((1.0, 2.0))  # backward factor 2
    assert split_passes(op(0, "a", recompute=True), 4.0) == pytest.approx((1.0, 3.0))  # + one forward again
    assert split_passes(op(0, "a", frozen=True), 2.0) == pytest.approx((2.0, 0.0))  # forward only


def test_backward_runs_the_phases_in_reverse_with_gradients_sent_back():
    # forward: 1 | 0.5 transfer, 1  ->  2.5; backward: phase 1 (2) ends at 4.5, 0.25 back, phase 0 (2) ends at 6.75
    ends, finish = backward_ends([Phase(1.0, 2.0), Phase(1.0, 2.0, 0.5, 0.25)])
    assert ends == pytest.approx([6.75, 4.5])
    assert finish == pytest.approx(6.75)
    ends, finish = backward_ends([Phase(1.0, 2.0)], start=10.0)
    assert (ends, finish) == (pytest.approx([13.0]), pytest.approx(13.0))


@pytest.mark.parametrize("params_y", [1e6, 5e8])
def test_later_wave_group_syncs_during_the_earlier_waves_backward(params_y):
    """x (wave 0, devices 0-1) feeds y (wave 1, devices 2-3). y's gradients are final once wave 1's
    backward ends; its all-reduce then overlaps the gradients sent back and wave 0's backward. Devices 2-3
    are done once they have sent the gradients back (no barrier with devices 0-1).

    Small y: fully hidden, x's devices (sync ready at the very end) step last. Large y: y's devices step
    last, after their sync: the critical path runs through y's backward and its all-reduce. ZeRO-1's
    all-gathers overlap the next iteration: x's is needed at once, y's only when wave 1 starts.
    """
    x = op(0, "x", task="t", params=1e3, out=1e6)
    y = op(1, "y", task="t", deps=(0,), params=params_y)
    problem = problem_of(x, y)
    sim = simulate(problem, placed(problem, [(0, 0, 4, (0, 1))], [(1, 0, 4, (2, 3))]), CM)
    # x: 4 samples/device x 1 GFLOP = 4 ms a layer; y: 2 GFLOP a sample = 8 ms a layer; 4 layers each
    forward_x, backward_x = 16e-3 / 3, 32e-3 / 3
    forward_y, backward_y = 32e-3 / 3, 64e-3 / 3
    hop = CM.p2p_time(4 * 1e6, cross_node=False)  # each of 0, 1 sends its 4 samples' activations to 2, 3
    ready_y = forward_x + hop + forward_y + backward_y
    end_y = ready_y + hop  # devices 2-3: done once the gradients are back on 0-1
    compute_end = end_y + backward_x  # devices 0-1
    sync_x = CM.allreduce_time(2 * 1e3 * 4, 2, False)
    sync_y = CM.allreduce_time(2 * params_y * 4, 2, False)
    step_x, step_y = CM.optimizer_time(1e3 * 4 / 2), CM.optimizer_time(params_y * 4 / 2)
    stepped_x, stepped_y = compute_end + sync_x + step_x, max(end_y, ready_y + sync_y) + step_y
    start_y = forward_x + hop  # when the next iteration's wave 1 starts on devices 2-3
    iteration = max(stepped_x + gather(1e3 * 4, 2), stepped_y + gather(params_y * 4, 2) - start_y, stepped_y)
    assert sim.iteration_time_s == pytest.approx(iteration)
    if params_y == 1e6:
        assert stepped_x > stepped_y  # x's devices step last: the parts are theirs
        assert sim.compute_s == pytest.approx(48e-3) and sim.transfer_s == pytest.approx(2 * hop)
        assert sim.sync_s == pytest.approx(sync_x) and sim.optimizer_s == pytest.approx(step_x)
    else:  # y's devices step last, after y's sync: the critical path runs through y's backward, then its sync
        assert ready_y + sync_y > end_y and stepped_y > stepped_x
        assert sim.compute_s == pytest.approx(forward_x + forward_y + backward_y)
        assert sim.transfer_s == pytest.approx(hop)
        assert sim.optimizer_s == pytest.approx(step_y)
        assert sim.sync_s == pytest.approx(sync_y) == pytest.approx(sim.sync_total_s)
    assert sim.gather_s == pytest.approx(iteration - max(stepped_x, stepped_y))
    assert sim.iteration_time_s == pytest.approx(identity(sim))


def test_collectives_wait_for_compute_on_a_device_that_cannot_overlap_them():
    """The plan above with a large y on a device whose collectives need the core it computes on (a CPU worker's gloo:
    planner.devices.DeviceInfo.overlaps_collectives False): y's all-reduce starts once y's devices stop computing
    (after sending the gradients back), not when its gradients are final, and ZeRO-1's all-gathers end the iteration
    instead of overlapping the next one's forward; the parts still add up to the iteration."""
    cm = LinearCost(replace(CM.hw, device=replace(DEVICES["a800"], overlaps_collectives=False)))
    x = op(0, "x", task="t", params=1e3, out=1e6)
    y = op(1, "y", task="t", deps=(0,), params=5e8)
    problem = Problem.build(finalize_graph([x, y]), cm)
    sim = simulate(problem, placed(problem, [(0, 0, 4, (0, 1))], [(1, 0, 4, (2, 3))]), cm)
    forward_x, backward_x, forward_y, backward_y = 16e-3 / 3, 32e-3 / 3, 32e-3 / 3, 64e-3 / 3
    hop = cm.p2p_time(4 * 1e6, cross_node=False)
    end_y = forward_x + hop + forward_y + backward_y + hop
    compute_end = end_y + backward_x
    stepped_x = compute_end + cm.allreduce_time(2 * 1e3 * 4, 2, False) + cm.optimizer_time(1e3 * 4 / 2)
    stepped_y = end_y + cm.allreduce_time(2 * 5e8 * 4, 2, False) + cm.optimizer_time(5e8 * 4 / 2)
    iteration = max(stepped_x + gather(1e3 * 4, 2, cm=cm), stepped_y + gather(5e8 * 4, 2, cm=cm))
    assert stepped_y > stepped_x
    assert sim.iteration_time_s == pytest.approx(iteration)
    assert sim.compute_s + sim.transfer_s == pytest.approx(end_y)  # y's devices' whole compute, then their sync
    assert sim.iteration_time_s == pytest.approx(identity(sim))
    on_gpu = simulate(problem_of(x, y), placed(problem_of(x, y), [(0, 0, 4, (0, 1))], [(1, 0, 4, (2, 3))]), CM)
    assert on_gpu.iteration_time_s < sim.iteration_time_s  # the same plan with its sync overlapping backward


def test_buckets_on_shared_devices_serialise_after_the_earlier_one():
    """x (wave 0) and y (wave 1) on the same devices: y reduces during wave 0's backward and runs past its
    end, so x's all-reduce (ready at the end) waits for it."""
    x, y = op(0, "x", params=1e3), op(1, "y", params=5e8)
    problem = problem_of(x, y)
    sim = simulate(problem, placed(problem, [(0, 0, 4, (0, 1))], [(1, 0, 4, (0, 1))]), CM)
    backward_x = 32e-3 / 3
    compute_end = 48e-3
    sync_x, sync_y = CM.allreduce_time(2 * 1e3 * 4, 2, False), CM.allreduce_time(2 * 5e8 * 4, 2, False)
    assert sync_y > backward_x
    step = CM.optimizer_time((1e3 + 5e8) * 4 / 2)
    # after the step, one after the other on the same devices, x's first (the next iteration needs it first); y's
    # overlaps the next iteration's wave 0 forward
    gather_x, gather_y = gather(1e3 * 4, 2), gather(5e8 * 4, 2)
    gathers = max(gather_x, gather_x + gather_y - compute_end / 9)  # wave 0's forward: a third of its 16 ms
    assert sim.iteration_time_s == pytest.approx(compute_end - backward_x + sync_y + sync_x + step + gathers)
    # the critical path: up to y's readiness (before wave 0's backward), then y's and x's all-reduces
    assert sim.compute_s == pytest.approx(compute_end - backward_x)
    assert sim.sync_s == pytest.approx(sync_y + sync_x)
    assert sim.gather_s == pytest.approx(gathers)


def test_longest_first_launch_is_kept_when_ready_order_would_block():
    """r (wave 0, devices 2-3), q (wave 1, 0-3), p (wave 2, 0-1); p and r reduce long, q short. In ready order
    (p, q, r) q waits for p and r for q; launching p, r, then q lets p and r run side by side."""
    ops = [op(0, "r", params=8e8), op(1, "q", params=1e7), op(2, "p", params=8e8)]
    problem = problem_of(*ops)
    sim = simulate(problem, placed(problem, [(0, 0, 4, (2, 3))], [(1, 0, 4, (0, 1, 2, 3))], [(2, 0, 4, (0, 1))]), CM)
    # compute: r 4 ms a layer (2 devices), q 4 ms (2 GFLOP, 4 devices), p 12 ms (3 GFLOP, 2 devices); 4 layers each
    backward = [32e-3 / 3, 32e-3 / 3, 96e-3 / 3]
    compute_end = 16e-3 + 16e-3 + 48e-3
    ready_p = compute_end - backward[1] - backward[0]
    sync_p = sync_r = CM.allreduce_time(2 * 8e8 * 4, 2, False)
    sync_q = CM.allreduce_time(2 * 1e7 * 4, 4, False)
    assert ready_p + sync_p > compute_end  # p still runs when r becomes ready
    step = CM.optimizer_time(8e8 * 4 / 2 + 1e7 * 4 / 4)  # every device: half of p or r, a quarter of q
    longest_first = compute_end + sync_r + sync_q + step
    ready_order = ready_p + sync_p + sync_q + sync_r + step
    assert longest_first < ready_order
    # every device steps at the same time; the gathers follow the waves that need them, r, q, p, each overlapping
    # the next iteration's forward up to its wave (r: none; q: r's forward; p: r's and q's)
    g_big, g_q = gather(8e8 * 4, 2), gather(1e7 * 4, 4)
    assert sim.gather_s == pytest.approx(max(g_big, g_big + g_q - 16e-3 / 3, 2 * g_big + g_q - 32e-3 / 3))
    assert sim.iteration_time_s == pytest.approx(longest_first + sim.gather_s)
    groups = [g.param_group for g in sim.sync_groups]
    assert [groups[i] for i in sim.sync_order] == ["p", "r", "q"]


# --------------------------------------------------------------------------- bounds on random placed schedules


def no_overlap_iteration(problem: Problem, placed_schedule: PlacedSchedule, cost_model: CostModel) -> float:
    """The previous model: compute + transfers, then every bucket longest-first, then the unsharded optimizer,
    then every all-gather one after another."""
    compute = sum(
        max(problem.curves[s.metaop].time(len(s.devices)) * s.num_layers for s in wave.slices)
        for wave in placed_schedule.waves
    )
    _, transfers = simulate_transfers(problem, placed_schedule, cost_model)
    ledger = build_ledger(problem, all_slices(placed_schedule), cost_model)
    buckets = sorted(sync_buckets(ledger), key=lambda b: -bucket_time(b, cost_model))
    free = [0.0] * problem.num_devices
    for b in buckets:
        end = max(free[d] for d in b.devices) + bucket_time(b, cost_model)
        for d in b.devices:
            free[d] = end
    step = cost_model.optimizer_time(float(ledger.trainable_params.max()))
    return compute + transfers + max(free) + step + sum(gather_time(b, cost_model) for b in buckets)


def test_overlap_stays_between_compute_and_the_no_overlap_model():
    rng = random.Random(11)
    for trial in range(25):
        ops = [op(m, f"g{rng.randint(0, 2)}", task=f"t{rng.randint(0, 1)}", layers=rng.randint(1, 5),
                  deps=tuple(d for d in range(m) if rng.random() < 0.3), batch=rng.choice([4, 8]),
                  params=rng.choice([1e6, 1e8, 5e8]), out=rng.choice([1e4, 1e7]), frozen=rng.random() < 0.15)
               for m in range(5)]
        problem = problem_of(*ops)
        placed_schedule = place_schedule(problem, random_schedule(problem, rng), CM, check_memory_limit=False)
        sim = simulate(problem, placed_schedule, CM)
        floor = sim.compute_s + sim.transfer_s
        assert sim.iteration_time_s >= floor * (1 - 1e-12), trial
        assert sim.iteration_time_s <= no_overlap_iteration(problem, placed_schedule, CM) * (1 + 1e-12), trial
        assert sim.iteration_time_s == pytest.approx(identity(sim)), trial
        program = grad_buckets(holdings(problem.graph.metaops, placed_schedule))
        # the exposed sync is a chain of all-reduces on the critical path: at most all of them one after another
        assert 0 <= sim.sync_s <= sum(bucket_time(b, CM) for b in sync_of(program)) * (1 + 1e-12), trial
        gathers = sum(gather_time(b, CM) for b in sync_of(program))
        assert 0 <= sim.gather_s <= gathers * (1 + 1e-12), trial
        assert sorted(sim.sync_order) == list(range(len(sim.sync_groups))), trial


def test_peak_memory_is_layer_memory_times_layers():
    o = op(0, "enc", layers=3)
    problem = problem_of(o)
    sim = simulate(problem, placed(problem, [(0, 0, 3, (4, 5))]), CM)
    per_device = CM.layer_memory(o, Layout(2, 1)) * 3
    assert sim.peak_memory_bytes == (0.0, 0.0, 0.0, 0.0, pytest.approx(per_device), pytest.approx(per_device), 0.0, 0.0)


def test_a_plan_re_predicted_under_a_model_without_its_count_prices_its_layout():
    """A profile taken later may find 2 devices no faster than 1 for a MetaOp (so its curve leaves 2 out); a plan
    placed earlier with that MetaOp on 2 devices is still predicted, at the layout it runs."""
    o = op(0, "enc", layers=4)
    problem = problem_of(o)
    placed_schedule = placed(problem, [(0, 0, 4, (0, 1))])
    narrowed = Problem(problem.graph, (Curve((1,), (problem.curves[0].time(1),), (Layout(1, 1),), (0.0,)),),
                       problem.num_devices)
    sim = simulate(narrowed, placed_schedule, CM)
    assert sim.wave_durations == (pytest.approx(CM.layout_time(o, Layout(2, 1)) * 4),)


def test_simulations_are_remembered_per_problem_and_placement():
    """A placement priced again under the same problem is the same Simulation; another problem (other curves) with
    the same placement is priced on its own curves; the memo keeps only the latest SIM_MEMO_SIZE placements."""
    cm = LinearCost(Hardware(DEVICES["a800"], 2, 4, 80 * GIB, 200e9, 50e9))
    problem = problem_of(op(0, "enc", layers=6), op(1, "dec", layers=2, deps=(0,)))
    two = placed(problem, [(0, 0, 6, (0, 1, 2, 3))], [(1, 0, 2, (4, 5))])
    first = simulate(problem, two, cm)
    assert simulate(problem, two, cm) is first
    heavier = problem_of(op(0, "enc", layers=6), op(1, "dec", layers=2, deps=(0,), batch=16))  # same shapes, 2x rows
    other = simulate(heavier, two, cm)
    assert other is not first and other.iteration_time_s > first.iteration_time_s
    assert other == simulate(heavier, two, LinearCost(cm.hw))  # what a fresh cost model (no memo) predicts
    others = [placed(problem, [(0, 0, 6, enc)], [(1, 0, 2, dec)]) for enc in ((0, 1, 2, 3), (4, 5, 6, 7))
              for k in (1, 2) for dec in itertools.combinations(sorted(set(range(8)) - set(enc)), k)]
    others = [p for p in others if p != two][:SIM_MEMO_SIZE]
    assert len(others) == SIM_MEMO_SIZE
    for other_placement in others:  # as many other placements: the first is forgotten, then priced again
        simulate(problem, other_placement, cm)
    again = simulate(problem, two, cm)
    assert again is not first and again == first


def test_flows_of_shared_moves_are_built_once_read_only_and_priced_alike():
    """Kept (jobs up to FLOWS_MEMO_MAX_DEVICES), the program's cached moves give the same read-only Flows per row
    size; its price by identity equals the price of an equal copy (which goes through the bytes memo) and of a fresh
    cost model."""
    moves = forward_moves((0, 1, 2, 3), Layout(4, 1), (4, 5), Layout(2, 1), 8)
    flows = move_flows(moves, 1e6, keep=True)
    assert move_flows(moves, 1e6, keep=True) is flows and move_flows(moves, 2e6, keep=True) is not flows
    assert move_flows(moves, 1e6) is not flows and move_flows(moves, 1e6).nbytes.flags.writeable  # not kept
    assert float(move_flows(moves, 2e6).nbytes.sum()) == 2 * float(flows.nbytes.sum())
    with pytest.raises(ValueError):
        flows.nbytes[0] = 0.0  # shared by every simulation: never written
    cm = LinearCost(CM.hw)
    price = boundary_time([flows], cm)
    copy = type(flows)(flows.senders.copy(), flows.receivers.copy(), flows.nbytes.copy())
    assert boundary_time([flows], cm) == price == boundary_time([copy], cm) == boundary_time([flows], LinearCost(CM.hw))
    assert price == pytest.approx(CM.p2p_time(8e6, cross_node=True))  # all 8 rows cross node 0 -> 1 on one link


def test_the_kept_loss_hosts_are_the_last_placements_only():
    """loss_hosts keeps its last answer (one simulation asks several times): another placement, or an equal one
    built anew, gets what computing afresh gives, and the answer cannot be changed in place."""
    problem = problem_of(op(0, "enc", layers=4), op(1, "dec", layers=2, deps=(0,)), op(2, "aux", layers=2, task="t1"))
    ops = problem.graph.metaops
    one = placed(problem, [(0, 0, 4, (0, 1)), (2, 0, 2, (2, 3))], [(1, 0, 2, (4, 5))])
    other = placed(problem, [(0, 0, 4, (0, 1))], [(1, 0, 2, (4, 5)), (2, 0, 2, (2, 3))])  # aux's host moves on
    for schedule in (one, one, other, placed(problem, [(0, 0, 4, (0, 1)), (2, 0, 2, (2, 3))], [(1, 0, 2, (4, 5))])):
        assert dict(loss_hosts(ops, schedule)) == _loss_hosts(ops, schedule)
    assert dict(loss_hosts(ops, one)) != dict(loss_hosts(ops, other))
    with pytest.raises(TypeError):
        loss_hosts(ops, one)["t1"] = ((0, 0), ())


def test_per_bucket_reductions_in_one_call_equal_a_loop_over_the_buckets():
    """optimizer_seconds, gather_spans and gather_limits reduce over every bucket's devices in one numpy call each
    (sync.bucket_devices); on random buckets (overlapping device sets, ZeRO-1 on and off) they give the same bits as
    a loop over the buckets in their order."""
    rng = random.Random(7)
    for trial in range(40):
        n = rng.randint(1, 16)
        buckets = [SyncBucket(f"g{i}", (i,), tuple(sorted(rng.sample(range(n), rng.randint(1, n)))), 1,
                              rng.uniform(1e3, 1e8), float(rng.randint(0, 9))) for i in range(rng.randint(1, 12))]
        cm = LinearCost(CM.hw, shard_optimizer=rng.random() < 0.5)
        params, tensors = [0.0] * n, [0.0] * n
        for b in buckets:
            shards = max(1, len(b.devices) // b.tp_degree) if cm.shard_optimizer else 1
            for d in b.devices:
                params[d] += b.num_params / b.tp_degree / shards
                tensors[d] += b.num_tensors
        step = [cm.optimizer_time(p, t) if p > 0 else 0.0 for p, t in zip(params, tensors)]
        assert optimizer_seconds(buckets, cm, n).tolist() == step
        stepped = [rng.uniform(0, 1) for _ in range(n)]
        times = [rng.choice((0.0, rng.uniform(0, 0.1))) for _ in buckets]
        free, ends = list(stepped), [max(stepped[d] for d in b.devices) for b in buckets]
        order = sorted(range(len(buckets)),
                       key=lambda i: (ends[i], -times[i], buckets[i].param_group, buckets[i].layers[0]))
        for i in order:
            if times[i] > 0:
                ends[i] = max(free[d] for d in buckets[i].devices) + times[i]
                for d in buckets[i].devices:
                    free[d] = ends[i]
        got_free, got_ends = gather_spans(buckets, times, np.array(stepped))
        assert got_free.tolist() == free and got_ends == ends
        ready = [rng.uniform(0, 1) for _ in buckets]
        uses = [rng.choice((math.inf, rng.uniform(0, 1))) for _ in buckets]
        first = [min((r for b, r in zip(buckets, ready) if d in b.devices), default=math.inf) for d in range(n)]
        assert gather_limits(buckets, uses, ready, n).tolist() == [
            min(u, min(first[d] for d in b.devices)) for b, u in zip(buckets, uses)]
