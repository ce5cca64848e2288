"""Uneven data-parallel row shares (planner.rows): one split for the planner's program, the plan and the runtime; the
cost model's layouts take any degree up to the batch only inside the RL role searches, priced at the largest share."""

from __future__ import annotations

import numpy as np
import pytest

from planner.api import plan_placed
from planner.costmodel import Layout
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave
from planner.program import forward_moves
from planner.rlbaselines import split_schedule
from planner.rows import rank_rows, row_bounds, row_shares, uneven_rows
from runtime.assignment import sample_range
from tests.unit.planner.test_generation import setup


@pytest.mark.parametrize("batch, dp", [(12, 4), (512, 12), (10, 3), (7, 7), (2048, 52)])
def test_shares_cover_the_batch_in_rank_order_and_differ_by_at_most_one_row(batch, dp):
    bounds = row_bounds(batch, dp)
    shares = row_shares(batch, dp)
    assert bounds[0] == 0 and bounds[-1] == batch and len(shares) == dp and sum(shares) == batch
    assert max(shares) - min(shares) <= 1 and list(shares) == sorted(shares, reverse=True)
    assert max(shares) == -(-batch // dp)  # the straggler the cost model prices (CostModel.local_batch: ceil)
    assert [sample_range(batch, dp, r) for r in range(dp)] == [rank_rows(batch, dp, r) for r in range(dp)]
    if batch % dp == 0:
        assert set(shares) == {batch // dp}


def test_moves_between_uneven_splits_deliver_each_rank_its_rows_once():
    """12 rows from 5 ranks (3,3,2,2,2) to 3 ranks of 2-way TP (4,4,4): every receiving device gets exactly its
    rank's rows, from the producer rank that owns each row."""
    src, dst = tuple(range(5)), tuple(range(5, 11))
    moves = forward_moves(src, Layout(5, 1), dst, Layout(3, 2), 12)
    src_bounds, dst_bounds = row_bounds(12, 5), row_bounds(12, 3)
    for device in dst:
        mine = moves.receivers == device
        rows = sorted(r for a, b in zip(moves.starts[mine], moves.stops[mine]) for r in range(int(a), int(b)))
        rank = (device - 5) // 2
        assert rows == list(range(dst_bounds[rank], dst_bounds[rank + 1]))
    for s, a, b in zip(moves.senders, moves.starts, moves.stops):
        owner = int(np.searchsorted(src_bounds, a, side="right")) - 1
        assert s == src[owner] and b <= src_bounds[owner + 1]


def test_uneven_layouts_only_inside_the_role_searches():
    """A batch of 16 on 6 devices: no even layout; with uneven shares dp 6 (3 rows at most) and dp 3 x tp 2 are
    priced at their largest share, and the split search's pools run on every device they get."""
    _, cost_model, problem = setup(16)
    policy = problem.graph.metaops[3]
    assert 6 not in cost_model.curve(policy).counts
    assert not [lay for lay in cost_model.layouts(policy, 6) if lay.dp_degree in (3, 6)]
    with uneven_rows(cost_model):
        assert cost_model.uneven_rows and Layout(6, 1) in cost_model.layouts(policy, 6)
        assert cost_model.local_batch(policy, Layout(6, 1)) == 3
        assert 6 in cost_model.curve(policy).counts
    assert not cost_model.uneven_rows and 6 not in cost_model.curve(policy).counts  # the cache keys on the flag
    with uneven_rows(cost_model):
        from dataclasses import replace

        uneven = replace(problem, curves=tuple(cost_model.curve(op) for op in problem.graph.metaops))
    sizes = {"policy@generate": 1, "reward": 1, "reference": 1, "policy": 6}
    used = [[len(s.devices) for w in split_schedule(p, sizes).waves for s in w.slices if s.metaop == 3]
            for p in (uneven, problem)]
    assert used == [[6], [4]]  # a pool of 6 trains on all 6 with uneven shares, on 4 of them without


def test_a_plan_records_every_slices_shares():
    job, _, problem = setup(4)
    ops = problem.graph.metaops
    placed = PlacedSchedule((PlacedWave((PlacedSlice(0, 0, 1, (0,), Layout(1, 1)),)),
                             PlacedWave((PlacedSlice(1, 0, ops[1].num_layers, (1,), Layout(1, 1)),
                                         PlacedSlice(2, 0, ops[2].num_layers, (2,), Layout(1, 1)))),
                             PlacedWave((PlacedSlice(3, 0, ops[3].num_layers, (1, 2, 3), Layout(3, 1)),))))
    plan = plan_placed(job, placed)
    rows = {s.metaop: s.rows for w in plan.waves for s in w.slices}
    assert rows == {0: [16], 1: [16], 2: [16], 3: [6, 5, 5]}
    # the loss (on the policy's three ranks) receives the reward's rows split at 6 and 11
    cuts = {(p.start, p.stop) for p in plan.pieces if not p.backward and p.src == 1 and p.dst != 1}
    assert cuts == {(6, 11), (11, 16)}
