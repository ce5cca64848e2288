"""Row shares: which rows of a MetaOp's batch each data-parallel rank of a slice owns.

One derivation for the planner (prices, the program's moves, the Plan's ``slices[].rows``) and the runtime (the rows
a rank computes, the rollouts it receives, the rows a loss gathers). A slice with ``dp`` ranks splits a batch of
``batch`` rows into contiguous shares in rank order, as even as whole rows allow: the first ``batch % dp`` ranks own
one row more (``numpy.array_split``'s rule). When ``dp`` divides ``batch`` every rank owns ``batch / dp`` rows, as
before uneven shares existed; otherwise the shares differ by one row, and the cost model prices a slice at its
largest share (planner.costmodel.CostModel.local_batch: ranks run in lock step, the largest share is the straggler).

Uneven shares let a pool of any size run a MetaOp (12 trainers for a batch of 512 rows: 8 ranks of 43, 4 of 42),
which the RL role placements need (planner.rlbaselines): the devices left beside a generation pool are seldom a
divisor of the batch. A loss gradient is the sum over every row divided by the task's batch (runtime.executor), so
the gradients summed over the ranks do not depend on how the rows are shared.
"""

from __future__ import annotations

import contextlib
import functools


@functools.lru_cache(maxsize=1 << 14)
def row_bounds(batch: int, dp: int) -> tuple[int, ...]:
    """The ``dp + 1`` rank boundaries of a batch of ``batch`` rows: rank ``i`` owns rows ``[b[i], b[i + 1])``.
    Requires ``1 <= dp <= batch`` (every rank owns at least one row)."""
    assert 1 <= dp <= batch, (batch, dp)
    per, extra = divmod(batch, dp)
    return tuple(i * per + min(i, extra) for i in range(dp + 1))


def row_shares(batch: int, dp: int) -> tuple[int, ...]:
    """Rows per rank (:func:`row_bounds`), in rank order."""
    b = row_bounds(batch, dp)
    return tuple(b[i + 1] - b[i] for i in range(dp))


def rank_rows(batch: int, dp: int, rank: int) -> tuple[int, int]:
    """``(start, stop)``: the rows data-parallel rank ``rank`` of ``dp`` owns."""
    b = row_bounds(batch, dp)
    return b[rank], b[rank + 1]


def even(batch: int, dp: int) -> bool:
    """Whether every rank owns the same number of rows."""
    return batch % dp == 0


@contextlib.contextmanager
def uneven_rows(cost_model):
    """``cost_model`` (a planner.costmodel.CostModel) with ``uneven_rows`` on inside the block: its layouts take any
    data-parallel degree up to the batch, so a pool of any size runs a MetaOp on all its devices (the RL role
    searches, planner.rlbaselines); its curves are cached per setting."""
    before, cost_model.uneven_rows = cost_model.uneven_rows, True
    try:
        yield cost_model
    finally:
        cost_model.uneven_rows = before
