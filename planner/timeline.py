"""The per-device timeline of a placed schedule: what the runtime's workers do, without global barriers.

Every worker walks the plan the same way (runtime.executor): phase by phase (:mod:`planner.phases`), the forward of
the phase's waves in order, each after the boundary's point-to-point exchange with the devices its pieces name; the
loss stage of the phase's tasks; the backward of its waves in reverse, each followed by the gradients sent back. A
device that has nothing to do at a wave or exchange passes it at once; nothing waits for the whole world. So this
module prices a schedule as a dataflow over per-device clocks:

- **a slice** starts when all its devices are free (their clocks: inputs arrived, earlier work done) and takes its
  forward (or backward) seconds on all of them;
- **an exchange** at one boundary: the devices its remote moves connect form components (devices linked by a move,
  transitively: they pair up in one batch of sends and receives). A component starts when its last device arrives
  and lasts as long as its busiest link (a device's intra-node link per direction, a node's network link per
  direction, as :func:`planner.flows.boundary_time` prices a boundary); devices without remote moves pass;
- **a loss stage**: each task's loss head on its host's loss devices (``head_time``), after the loss boundary;
- **gradient accumulation**: the walk repeats per micro-batch; gradient buckets start in the last one.

Each clock carries its critical path split into compute and transfer seconds (the work that set it, followed back),
so ``clock = compute + transfer`` on every device. Global waves with a barrier are a special case that this model
never prices slower; a schedule whose device groups are disjoint (each task its own group, its MetaOps in
consecutive waves) runs every group on its own, as the task-parallel baselines do.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from planner.costmodel import CostModel


DeviceIndex = slice | np.ndarray  # an index of per-device arrays: device_index
DEVICE_INDEX_MAX_KEPT = 64  # device sets up to this size keep their index arrays (device_index): every set of a grid
# cell; at most 16,384 kept arrays of 512 bytes, so the scale cells' peak RSS stays put


def device_index(devices: Sequence[int]) -> DeviceIndex:
    """An index of per-device numpy arrays for ``devices`` (distinct ids, in their order): ``slice(a, b)`` when they
    are ``a, a + 1, ..., b - 1`` (most slices' and buckets' device sets: a view, no gather), else an int64 array.
    Either reads and writes the same elements in the same order as ``arr[list(devices)]``, so every result is the same
    bits; the simulator indexes its per-device arrays by the same sets many times per search, hence remembered (read-only
    arrays, sets of at most :data:`DEVICE_INDEX_MAX_KEPT` devices)."""
    devices = tuple(devices)
    if len(devices) > DEVICE_INDEX_MAX_KEPT:
        return _device_index(devices)
    return _kept_device_index(devices)


def _device_index(devices: tuple[int, ...]) -> DeviceIndex:
    if devices and devices[-1] - devices[0] == len(devices) - 1 and devices == tuple(range(devices[0], devices[-1] + 1)):
        return slice(devices[0], devices[-1] + 1)
    idx = np.array(devices, dtype=np.int64)
    idx.flags.writeable = False
    return idx


_kept_device_index = functools.lru_cache(maxsize=1 << 14)(_device_index)


def index_device(idx: DeviceIndex, i: int) -> int:
    """The ``i``-th device of a :func:`device_index` (``devices[i]``)."""
    return idx.start + i if isinstance(idx, slice) else int(idx[i])


@dataclass(frozen=True)
class Exchange:
    """One boundary's remote moves as components: ``devices`` (each taking part once), the component of each, and
    every component's seconds."""

    devices: np.ndarray
    component: np.ndarray
    seconds: np.ndarray

    @functools.cached_property
    def ends(self) -> np.ndarray:
        """Per component, the position of its last member once the members are sorted by component (components are
        numbered 0..C-1, none empty): where :meth:`Clocks.exchange` finds each component's last arrival."""
        return np.cumsum(np.bincount(self.component, minlength=len(self.seconds))) - 1

    @functools.cached_property
    def member_seconds(self) -> np.ndarray:
        """Per member (``devices``), its component's seconds."""
        return self.seconds[self.component]


def _components(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Connected components of ``n`` nodes under the links ``a[i] - b[i]``: an index 0..C-1 per node (union-find for a
    few links; min-label propagation with pointer jumping, in numpy, for many)."""
    if len(a) > 2048:
        label = np.arange(n)
        while True:
            low = np.minimum(label[a], label[b])
            new = label.copy()
            np.minimum.at(new, a, low)
            np.minimum.at(new, b, low)
            new = new[new]
            if np.array_equal(new, label):
                return np.unique(label, return_inverse=True)[1]
            label = new
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist()):
        rx, ry = root(x), root(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return np.unique(np.array([root(x) for x in range(n)]), return_inverse=True)[1]


def _p2p_times(cost_model: CostModel, nbytes: np.ndarray, cross_node: bool) -> np.ndarray:
    values, inverse = np.unique(nbytes, return_inverse=True)
    return np.array([cost_model.p2p_time(float(v), cross_node) for v in values])[inverse]


def _busiest(component: np.ndarray, num: int, load: np.ndarray) -> np.ndarray:
    """Per component, the largest of ``load`` over its members."""
    out = np.zeros(num)
    np.maximum.at(out, component, load)
    return out


MEMO_MAX_MOVES = 4096  # flows of at most this many moves are remembered (:func:`flow_memo`); larger ones are priced


def flow_memo(cost_model: CostModel, kind: str, *arrays: np.ndarray) -> tuple[dict, tuple | None]:
    """The memo of flow prices under ``cost_model`` and the key of ``arrays`` in it (None: too large to keep).

    A search simulates many placements that share most boundaries (a bucket split's cuts, a local search's
    neighbours, a candidate's two orders), and pricing a boundary is a pure function of its moves and the cost
    model, so the prices are kept beside the cost model (one per ``plan_job``) by the moves' bytes. Only flows of at
    most :data:`MEMO_MAX_MOVES` moves: memory stays small at 10,240 devices, where few simulations repeat anyway."""
    memo = cost_model.__dict__.setdefault("_flow_memo", {})
    if len(arrays[-1]) > MEMO_MAX_MOVES:
        return memo, None
    return memo, (kind, *((a.dtype.str, a.tobytes()) for a in arrays))


def exchange_of(senders: np.ndarray, receivers: np.ndarray, nbytes: np.ndarray, cost_model: CostModel,
                ) -> Exchange | None:
    """The components of one boundary's remote moves (``senders[i]`` sends ``nbytes[i]`` to ``receivers[i]``, none
    local), each priced at its busiest link; None without any move. Remembered (:func:`flow_memo`)."""
    if not len(nbytes):
        return None
    memo, key = flow_memo(cost_model, "exchange", senders, receivers, nbytes)
    if key is not None and key in memo:
        return memo[key]
    found = _exchange(senders, receivers, nbytes, cost_model)
    if key is not None:
        memo[key] = found
    return found


def _exchange(senders: np.ndarray, receivers: np.ndarray, nbytes: np.ndarray, cost_model: CostModel) -> Exchange:
    devices, inverse = np.unique(np.concatenate([senders, receivers]), return_inverse=True)
    a, b = inverse[:len(senders)], inverse[len(senders):]
    component = _components(a, b, len(devices))
    num = int(component.max()) + 1
    dpn = cost_model.hw.devices_per_node
    cross = senders // dpn != receivers // dpn
    seconds = np.zeros(num)
    intra = ~cross
    if intra.any():  # a device's link per direction: each device lies in one component
        load = np.maximum(np.bincount(a[intra], weights=nbytes[intra], minlength=len(devices)),
                          np.bincount(b[intra], weights=nbytes[intra], minlength=len(devices)))
        busiest = _busiest(component, num, load)
        used = busiest > 0
        seconds[used] = _p2p_times(cost_model, busiest[used], False)
    if cross.any():  # a node's network link per direction, shared by the component's devices on that node
        per_move = component[a[cross]]
        span = int(devices.max()) // dpn + 1
        busiest = np.zeros(num)
        for endpoints in (senders[cross], receivers[cross]):
            keys, at = np.unique(per_move * span + endpoints // dpn, return_inverse=True)
            busiest = np.maximum(busiest, _busiest(keys // span, num, np.bincount(at, weights=nbytes[cross])))
        used = busiest > 0
        seconds[used] = np.maximum(seconds[used], _p2p_times(cost_model, busiest[used], True))
    return Exchange(devices, component, seconds)


class Clocks:
    """Per-device clocks (seconds) and each one's critical path split into compute and transfer seconds."""

    def __init__(self, num_devices: int):
        self.t = np.zeros(num_devices)
        self.compute = np.zeros(num_devices)
        self.transfer = np.zeros(num_devices)

    def run(self, devices: DeviceIndex, seconds: float) -> float:
        """Work of ``seconds`` on all of ``devices`` (:func:`device_index`) once they are all free; returns when it
        started. No work (a frozen slice's backward, an unprofiled loss head) waits for nothing: the runtime skips it."""
        clocks = self.t[devices]
        k = int(clocks.argmax())  # the method: np.argmax's dispatch costs more than the search over a few devices
        j = index_device(devices, k)
        start = float(clocks[k])
        if seconds <= 0:
            return start
        self.t[devices] = start + seconds
        self.compute[devices] = self.compute[j] + seconds
        self.transfer[devices] = self.transfer[j]
        return start

    def exchange(self, ex: Exchange | None) -> None:
        """Each component of ``ex`` starts when its last device is free and ends after its seconds."""
        if ex is None:
            return
        order = np.lexsort((self.t[ex.devices], ex.component))
        lead = ex.devices[order[ex.ends]]  # per component, the device that arrives last
        start = self.t[lead][ex.component]
        seconds = ex.member_seconds
        self.t[ex.devices] = start + seconds
        self.compute[ex.devices] = self.compute[lead][ex.component]
        self.transfer[ex.devices] = self.transfer[lead][ex.component] + seconds

    def latest(self, devices: Sequence[int] | np.ndarray) -> tuple[float, tuple[float, float]]:
        """The latest clock of ``devices`` and its (compute, transfer) path."""
        idx = device_index(devices)
        j = index_device(idx, int(self.t[idx].argmax()))
        return float(self.t[j]), (float(self.compute[j]), float(self.transfer[j]))
