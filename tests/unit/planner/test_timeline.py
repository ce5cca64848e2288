"""The per-device timeline (planner.timeline): device groups run on their own (no barrier between waves), boundaries
priced per component of linked devices, phases run forward, loss and backward before the next phase."""

from __future__ import annotations

import random

import numpy as np
import pytest

from planner.costmodel import Layout
from planner.placement import PlacedSchedule
from planner.flows import Flows, boundary_time, move_flows
from planner.program import forward_moves
from planner.simulator import simulate
from planner.timeline import DEVICE_INDEX_MAX_KEPT, _components, device_index, exchange_of, index_device

from test_simulator import CM, LinearCost, op, placed, problem_of


def test_components_are_the_same_by_union_find_and_by_label_propagation():
    rng = random.Random(0)
    for trial in range(100):
        n, m = rng.randint(2, 40), rng.randint(1, 60)
        a = np.array([rng.randrange(n) for _ in range(m)])
        b = np.array([rng.randrange(n) for _ in range(m)])
        few = _components(a, b, n)
        many = _components(np.tile(a, 50), np.tile(b, 50), n)  # > 2048 links: the numpy path
        assert (few == many).all(), trial
        assert all(few[x] == few[y] for x, y in zip(a, b))  # linked devices share a component


def test_one_component_is_priced_like_a_boundary_and_disjoint_ones_apart():
    # 0 -> 1 (1 kB) and 1 -> 2 (3 kB) are linked through device 1; 4 -> 5 (2 kB) is on its own
    snd, rcv, nbytes = np.array([0, 1, 4]), np.array([1, 2, 5]), np.array([1e3, 3e3, 2e3])
    ex = exchange_of(snd, rcv, nbytes, CM)
    assert list(ex.devices) == [0, 1, 2, 4, 5]
    assert ex.component[0] == ex.component[1] == ex.component[2] != ex.component[3] == ex.component[4]
    first = boundary_time([Flows(snd[:2], rcv[:2], nbytes[:2])], CM)
    assert ex.seconds[ex.component[0]] == pytest.approx(first) == pytest.approx(CM.p2p_time(3e3, cross_node=False))
    assert ex.seconds[ex.component[3]] == pytest.approx(CM.p2p_time(2e3, cross_node=False))
    # cross-node moves of one component share its node's network link: devices 0 and 1 (node 0) send to node 1
    ex = exchange_of(np.array([0, 1]), np.array([4, 5]), np.array([1e3, 1e3]), CM)
    assert len(ex.seconds) == 2 and ex.seconds == pytest.approx([CM.p2p_time(1e3, cross_node=True)] * 2)
    ex = exchange_of(np.array([0, 1]), np.array([4, 4]), np.array([1e3, 1e3]), CM)
    assert len(ex.seconds) == 1 and ex.seconds[0] == pytest.approx(CM.p2p_time(2e3, cross_node=True))


def test_disjoint_device_groups_run_without_a_barrier_between_waves():
    """Task a: slow then fast on devices 0-1; task b: fast then slow on 2-3, in waves 0 and 1. With a barrier after
    each wave the iteration's compute would be slow + slow; each group on its own ends after slow + fast."""
    slow, fast = 4e9, 1e9
    ops = [op(0, "a0", task="a", params=0.0, out=0.0), op(1, "a1", task="a", deps=(0,), params=0.0, out=0.0),
           op(2, "b0", task="b", params=0.0, out=0.0), op(3, "b1", task="b", deps=(2,), params=0.0, out=0.0)]
    flops = {0: slow, 1: fast, 2: fast, 3: slow}
    # a layer key of their own: the shared cost model caches curves by it
    ops = [o.__class__(**{**vars(o), "layer": o.layer.__class__(**{**vars(o.layer), "flops_fwd": flops[o.id],
                                                                   "key": f"timeline-{o.id}"})}) for o in ops]
    problem = problem_of(*ops)
    sim = simulate(problem, placed(problem, [(0, 0, 4, (0, 1)), (2, 0, 4, (2, 3))],
                                   [(1, 0, 4, (0, 1)), (3, 0, 4, (2, 3))]), CM)
    per_flop = 8 / 2 * 4 / 1e12  # 4 samples per device, 4 layers, 1 TFLOP/s
    assert sim.iteration_time_s == pytest.approx((slow + fast) * per_flop)
    assert sum(sim.wave_durations) == pytest.approx(2 * slow * per_flop)  # the barrier picture the plan records


def test_a_phase_finishes_its_backward_before_the_next_phase_runs():
    """Two one-MetaOp tasks on the same devices: in one phase both forwards run before both backwards; as two phases
    task a's backward comes first, so its gradients sync during task b's compute."""
    a, b = op(0, "x", task="a", params=1e8, out=0.0), op(1, "y", task="b", params=1e3, out=0.0)
    problem = problem_of(a, b)
    one = placed(problem, [(0, 0, 4, (0, 1))], [(1, 0, 4, (0, 1))])
    two = PlacedSchedule(one.waves, (0, 1))
    sim_one, sim_two = simulate(problem, one, CM), simulate(problem, two, CM)
    compute = sum(sim_one.wave_durations)
    sync_x = CM.allreduce_time(CM.grad_bytes * 1e8 * 4, 2, cross_node=False)
    assert sync_x < compute / 2  # x's sync fits in y's forward and backward
    # one phase: x's backward runs last, its bucket is ready at the very end; two phases: ready after half the work
    assert sim_one.iteration_time_s > sim_two.iteration_time_s
    assert sim_two.sync_s < sim_one.sync_s == pytest.approx(sync_x)
    # the memory ledger holds one phase's activations at a time
    assert max(sim_two.peak_memory_bytes) < max(sim_one.peak_memory_bytes)


def test_device_index_reads_and_writes_what_a_list_of_the_devices_does():
    """A run of consecutive devices becomes a slice, any other set an index array; either reads, argmaxes and writes
    the same elements as indexing by the list of devices, and a remembered index is never another set's."""
    rng = random.Random(3)
    sets = [tuple(range(a, a + n)) for a in (0, 5) for n in (1, 4)]  # runs
    sets += [tuple(rng.sample(range(16), rng.randint(1, 8))) for _ in range(40)]  # gaps, any order
    sets += [(4, 5, 6, 8), (7, 6, 5), (3, 4, 5, 6, 7, 8, 9, 10)]
    for devices in sets * 2:  # the second time from the memo
        idx = device_index(devices)
        assert isinstance(idx, slice) == (devices == tuple(range(devices[0], devices[0] + len(devices))))
        values = np.array([rng.random() for _ in range(16)])
        assert values[idx].tolist() == values[list(devices)].tolist()
        k = int(values[idx].argmax())
        assert index_device(idx, k) == devices[k] == devices[int(np.argmax(values[list(devices)]))]
        mine, theirs = values.copy(), values.copy()
        mine[idx] += 1.5
        theirs[list(devices)] += 1.5
        assert mine.tolist() == theirs.tolist()
    many = tuple(range(0, 2 * DEVICE_INDEX_MAX_KEPT, 2))  # too many devices to remember: built each time
    assert device_index(many).tolist() == list(many)


def test_an_exchange_finds_each_components_last_arrival_like_a_sort_by_component():
    """Exchange.ends (each component's last position once members are sorted by component) and member_seconds, kept
    on the exchange, are what sorting and differencing the components on every call gave."""
    rng = random.Random(5)
    for trial in range(50):
        n, m = rng.randint(2, 24), rng.randint(1, 30)
        snd = np.array([rng.randrange(n) for _ in range(m)])
        rcv = np.array([rng.randrange(n) for _ in range(m)])
        keep = snd != rcv
        if not keep.any():
            continue
        ex = exchange_of(snd[keep], rcv[keep], np.array([rng.uniform(1e3, 1e6) for _ in range(int(keep.sum()))]),
                         LinearCost(CM.hw))
        t = np.array([rng.random() for _ in range(len(ex.devices))])
        order = np.lexsort((t, ex.component))
        assert ex.ends.tolist() == np.flatnonzero(np.diff(ex.component[order], append=len(ex.seconds))).tolist()
        assert ex.member_seconds.tolist() == ex.seconds[ex.component].tolist()


def test_boundaries_priced_together_are_remembered_by_their_flows_not_whatever_came_first():
    """A boundary of several kept flows is priced by their identities (planner.flows.shared_memo): the same flows
    again give the remembered price, a boundary with one flow changed is priced anew, and both equal what a fresh cost
    model (no memo) gives; so does the timeline's exchange of the same flows."""
    cm = LinearCost(CM.hw)
    a = move_flows(forward_moves((0, 1), Layout(2, 1), (4, 5), Layout(2, 1), 8), 1e6, keep=True)
    b = move_flows(forward_moves((2, 3), Layout(2, 1), (6, 7), Layout(2, 1), 8), 1e6, keep=True)
    c = move_flows(forward_moves((2, 3), Layout(2, 1), (6, 7), Layout(2, 1), 8), 4e6, keep=True)  # 4x the bytes
    together = boundary_time([a, b], cm)
    assert boundary_time([a, b], cm) == together == boundary_time([a, b], LinearCost(CM.hw))
    changed = boundary_time([a, c], cm)
    assert changed == boundary_time([a, c], LinearCost(CM.hw)) > together
    problem = problem_of(op(0, "enc", layers=2), op(1, "dec", layers=2, deps=(0,)))
    one = placed(problem, [(0, 0, 2, (0, 1))], [(1, 0, 2, (4, 5))])
    other = placed(problem, [(0, 0, 2, (0, 1))], [(1, 0, 2, (2, 3))])  # the decoder on other devices
    for schedule in (one, other, one):
        assert simulate(problem, schedule, cm) == simulate(problem, schedule, LinearCost(CM.hw))
