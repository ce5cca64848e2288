"""Device choices that avoid resharding: a slice placed so that its data-parallel ranks line up with its input's.

Owns :func:`aligned_devices`, which :mod:`planner.placement` tries for a slice that continues its MetaOp on
another device count, or whose input comes from a predecessor on another count, before scoring free devices one
by one. Pure: device ids and numpy masks in, device ids out.

Why. A slice's rows are split over its data-parallel ranks in device order (:mod:`planner.program`): rank ``i``
of ``dp`` owns rows ``[i B / dp, (i + 1) B / dp)``. When the count changes between two slices that pass a
batch, which devices the new slice takes decides how many rows move and whether they cross nodes. On the
benchmark workloads such re-splits of one MetaOp between its waves move most of the inter-wave bytes. With
the input on ``a`` ranks and the slice on ``b`` (same TP degree):

- ``b = k a`` (growing): input rank ``i``'s rows go to new ranks ``i k .. i k + k - 1``. Rank ``i``'s devices
  take the first (or last) of these, so they keep their rows, and the ``k - 1`` other ranks take the
  best-scoring free devices of the same node between rank ``i`` and its neighbour (placement's score:
  shared parameters held, memory), so the rows they need move over NVLink.
  Every row a new device needs must move, and no other row does: the fewest bytes any choice moves.
- ``a = k b`` (shrinking): new rank ``j`` needs the rows of input ranks ``j k .. j k + k - 1``; it takes the
  devices of one of them (the best scoring), which keeps ``1 / k`` of its rows, again the most any device
  can keep, and the rest come from its neighbours (consecutive ranks: usually the same node).

Other ratios or TP degrees, or no such free devices: None, and placement scores free devices as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from planner.costmodel import Layout


def can_align(src_layout: Layout, layout: Layout) -> bool:
    """Whether :func:`aligned_devices` may find devices: same TP degree, and one count a whole multiple of the other."""
    a, b = src_layout.dp_degree, layout.dp_degree
    return src_layout.tp_degree == layout.tp_degree and a != b and (a % b == 0 or b % a == 0)


def aligned_devices(src: Sequence[int], src_layout: Layout, layout: Layout, usable: np.ndarray, score: np.ndarray,
                    devices_per_node: int) -> tuple[int, ...] | None:
    """Devices for a slice of ``layout`` whose input lies on ``src`` (layout ``src_layout``), ranks aligned (module
    docstring); ``usable[d]``: device d is free and has room; ``score``: higher is better (ties: lower ids).
    None when the counts are equal, the TP degrees differ, the ratio is not whole or the devices are not free."""
    tp, a, b = layout.tp_degree, src_layout.dp_degree, layout.dp_degree
    if not can_align(src_layout, layout):
        return None
    ranks = [tuple(src[i * tp:(i + 1) * tp]) for i in range(a)]
    if a % b == 0:
        return _shrunk(ranks, a // b, usable, score)
    return _grown(ranks, b // a, tp, usable, score, devices_per_node)


def _shrunk(ranks: list[tuple[int, ...]], k: int, usable: np.ndarray, score: np.ndarray) -> tuple[int, ...] | None:
    out: list[int] = []
    for j in range(len(ranks) // k):
        group = [r for r in ranks[j * k:(j + 1) * k] if usable[list(r)].all()]
        if not group:
            return None
        out.extend(max(group, key=lambda r: (float(score[list(r)].sum()), -r[0])))
    return tuple(out)


def _best(candidates: list[int], need: int, score: np.ndarray) -> list[int]:
    """The ``need`` best-scoring of ``candidates`` (ties: lower ids), ascending."""
    return sorted(sorted(candidates, key=lambda d: (-float(score[d]), d))[:need])


def _grown(ranks: list[tuple[int, ...]], k: int, tp: int, usable: np.ndarray, score: np.ndarray,
           dpn: int) -> tuple[int, ...] | None:
    out: list[int] = []
    taken: set[int] = set()
    for i, rank in enumerate(ranks):
        if not usable[list(rank)].all():
            return None
        node = rank[0] // dpn
        if any(d // dpn != node for d in rank):
            return None
        lo_after = rank[-1] + 1
        hi_after = min(ranks[i + 1][0] if i + 1 < len(ranks) else len(usable), (node + 1) * dpn)
        lo_before = max(ranks[i - 1][-1] + 1 if i else 0, node * dpn)
        after = [d for d in range(lo_after, hi_after) if usable[d] and d not in taken]
        before = [d for d in range(lo_before, rank[0]) if usable[d] and d not in taken]
        need = (k - 1) * tp
        if len(after) >= need:
            block = list(rank) + _best(after, need, score)
        elif len(before) >= need:
            block = _best(before, need, score) + list(rank)
        else:
            return None
        taken.update(block)
        out.extend(block)
    return tuple(out)
