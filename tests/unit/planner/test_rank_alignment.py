"""Rank-aligned device choices (planner.reshard): the fewest rows move when a batch is re-split, none across nodes
when growing; and what placement does with them."""

from __future__ import annotations

import numpy as np
import pytest
from test_placement import LinearCost, hardware, op, problem_of, schedule

from planner.costmodel import Layout
from planner.placement import place_schedule
from planner.program import forward_moves
from planner.reshard import aligned_devices
from planner.simulator import simulate_transfers

BATCH = 48


def _moved(src, src_layout, dst, dst_layout, dpn):
    moves = forward_moves(src, src_layout, dst, dst_layout, BATCH)
    remote = moves.remote
    cross = remote & (moves.senders // dpn != moves.receivers // dpn)
    return int(moves.rows[remote].sum()), int(moves.rows[cross].sum())


def _fewest_rows(src_layout: Layout, layout: Layout) -> int:
    """Rows that must move when dp a -> b (same TP): growing, every new rank's rows but a's; shrinking, all but
    each new rank's one local input rank; counted on every TP device that receives them."""
    a, b, tp = src_layout.dp_degree, layout.dp_degree, layout.tp_degree
    return (BATCH - BATCH * min(a, b) // max(a, b) if b < a else BATCH * (b - a) // b) * tp


def test_growing_keeps_each_rank_and_fills_its_node():
    usable, score = np.ones(8, bool), np.zeros(8)
    got = aligned_devices((0, 4), Layout(2, 1), Layout(4, 1), usable, score, 4)
    assert got == (0, 1, 4, 5)
    assert _moved((0, 4), Layout(2, 1), got, Layout(4, 1), 4) == (BATCH // 2, 0)


def test_shrinking_takes_one_input_rank_per_group():
    usable, score = np.ones(8, bool), np.zeros(8)
    score[5] = 1.0  # a better device of the second group (e.g. it holds shared layers)
    got = aligned_devices((0, 1, 4, 5), Layout(4, 1), Layout(2, 1), usable, score, 4)
    assert got == (0, 5)
    assert _moved((0, 1, 4, 5), Layout(4, 1), got, Layout(2, 1), 4) == (BATCH // 2, 0)


def test_tensor_parallel_ranks_grow_as_whole_groups():
    got = aligned_devices((4, 5), Layout(1, 2), Layout(2, 2), np.ones(8, bool), np.zeros(8), 4)
    assert got == (4, 5, 6, 7)


@pytest.mark.parametrize("src, src_layout, layout, busy", [
    ((0, 4), Layout(2, 1), Layout(3, 1), ()),  # 3 / 2 is not whole
    ((0, 1), Layout(1, 2), Layout(4, 1), ()),  # TP degrees differ
    ((0, 4), Layout(2, 1), Layout(4, 1), (1, 2, 3)),  # no free device beside rank 0 in its node
    ((0, 1, 4, 5), Layout(4, 1), Layout(2, 1), (0, 1)),  # the first group's devices are taken
])
def test_no_aligned_choice(src, src_layout, layout, busy):
    usable = np.ones(8, bool)
    usable[list(busy)] = False
    assert aligned_devices(src, src_layout, layout, usable, np.zeros(8), 4) is None


def test_random_choices_move_the_fewest_rows_inside_nodes():
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(400):
        dpn, num_nodes = int(rng.choice([4, 8])), int(rng.integers(1, 5))
        n = dpn * num_nodes
        tp = int(rng.choice([1, 2]))
        a = int(rng.choice([1, 2, 4, 8]))
        b = int(rng.choice([1, 2, 3, 4, 8, 16]))
        if a * tp > n or b * tp > n or BATCH % a or BATCH % b:
            continue
        groups = rng.permutation(n // tp)[:a]  # whole TP groups (inside nodes) at random places
        src = tuple(sorted(int(g) * tp + j for g in groups for j in range(tp)))
        usable = rng.random(n) < 0.7
        usable[list(src)] |= rng.random(len(src)) < 0.8
        got = aligned_devices(src, Layout(a, tp), Layout(b, tp), usable, rng.random(n), dpn)
        if got is None:
            continue
        found += 1
        assert list(got) == sorted(set(got)) and len(got) == b * tp and usable[list(got)].all()
        assert all(len({d // dpn for d in got[i:i + tp]}) == 1 for i in range(0, len(got), tp))
        remote, cross = _moved(src, Layout(a, tp), got, Layout(b, tp), dpn)
        assert remote == _fewest_rows(Layout(a, tp), Layout(b, tp))
        if b > a:
            assert cross == 0
    assert found > 50, found


def test_placement_regrows_a_metaop_beside_its_ranks():
    """A runs on 2 devices (one per node, spread by B and C), then on 4: its new ranks take the devices beside its
    old ones, so no row crosses the network (before, the scorer packed it into one node)."""
    cm = LinearCost(hardware(num_nodes=2, devices_per_node=4))
    problem = problem_of([op(0, "a", layers=4, out=1e6), op(1, "b", layers=1, batch=6), op(2, "c", layers=1, batch=6)],
                         cm)
    sched = schedule([(1, 1, 3), (2, 1, 3), (0, 2, 2)], [(0, 2, 4)])
    placed = place_schedule(problem, sched, cm)
    first, second = (next(s for s in w.slices if s.metaop == 0) for w in placed.waves)
    assert sorted({d // 4 for d in first.devices}) == [0, 1]
    assert [d // 4 for d in second.devices] == [0, 0, 1, 1]
    assert _moved(first.devices, first.layout, second.devices, second.layout, 4)[1] == 0
    assert simulate_transfers(problem, placed, cm)[1] > 0
