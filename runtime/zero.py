"""ZeRO-1 on the gradient buckets: each holder of a shared parameter keeps AdamW state for its share only.

The executor's buckets group the parameters this device shares with exactly the same devices; after
their gradients are summed (all-reduce), the device the plan names for share ``i`` of ``n``
(planner.plan.PlanBucket.shards) updates elements ``shard_range(L, n, i)`` (``[i*ceil(L/n), (i+1)*ceil(L/n))``)
of the bucket's flattened parameters with its own AdamW state, then the holders all-gather the
updated shares (float32, as the plan prices them: planner.sync.gather_bytes) so every replica ends the step with
the same full parameters. AdamW is element-wise,
so this is the same update as every holder stepping all of it; the optimizer state per holder
shrinks to 1/n of the bucket (``training.shard_optimizer``, which the planner's memory model
assumes). Parameters this device holds alone keep ordinary AdamW state.

Parameter groups (runtime.optim: no weight decay on 1-d parameters, per-component learning rates) do not
move the shares: a share is cut into runs of consecutive elements of parameters with the same group, each
run its own fp32 master in that group's optimizer group; one all-gather per bucket, as the plan prices.

Overlap (``step(defer=True)``, what the executor does in a job whose uses all train): the all-gathers are launched
asynchronously after the step, in the order of the forward event that first needs each bucket
(planner.phases.gather_events / gather_order, the order the simulator prices), and :meth:`ShardedAdamW.wait_until`
completes those the next iteration's forward is about to need; :meth:`ShardedAdamW.settle` completes them all (before
anything else reads the parameters: checkpoints, exports, gradients). Every holder launches the same buckets in the
same order, so the collectives pair up whatever order the waits come in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kernels.grad_buffers import zero_grads
from planner.plan import shard_range
from planner.spec import JobSpec
from runtime.host import finish_collective
from runtime.modules import build_optimizer
from runtime.optim import group_key


@dataclass
class _Run:
    """Elements ``[lo, hi)`` of a bucket's flattened parameters, all of parameters of one optimizer group ``key``
    ((lr, weight decay)); ``master`` is their fp32 copy the inner optimizer steps."""

    lo: int
    hi: int
    key: tuple[float, float]
    master: nn.Parameter


@dataclass
class _Share:
    """This device's share of one bucket: elements ``[lo, hi)`` of its ``total`` flattened elements (empty when
    the bucket has fewer elements than holders), cut into :class:`_Run` s by optimizer group; every holder's share
    is padded to ``per`` elements for the all-gather. ``order[j]``: the share the group's rank ``j`` steps (the plan's
    ``shards`` seen from the process group, whose ranks are the holders ascending)."""

    params: list[nn.Parameter]
    group: object
    rank_in_group: int
    num_holders: int
    total: int
    per: int
    lo: int
    hi: int
    runs: list[_Run]
    order: tuple[int, ...] = ()
    position: int = 0  # forward position of the event that first needs the bucket (planner.phases.forward_positions)

    def gathered(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The bucket's ``total`` flattened elements from an all-gather's ``parts`` (one per group rank, each a padded
        share): the shares in share order, as :attr:`order` places them."""
        by_share = sorted(range(self.num_holders), key=lambda j: self.order[j])
        return torch.cat([parts[j] for j in by_share])[:self.total]


def _elements(tensors: list[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """Elements ``[lo, hi)`` of ``tensors`` flattened and concatenated, reading only the tensors that overlap them."""
    pieces, offset = [], 0
    for t in tensors:
        n = t.numel()
        if offset < hi and lo < offset + n:
            pieces.append(t.reshape(-1)[max(lo - offset, 0):min(hi - offset, n)])
        offset += n
    return torch.cat(pieces) if len(pieces) != 1 else pieces[0]


def _runs(job: JobSpec, params: list[nn.Parameter], lo: int, hi: int,
          component_of: dict[int, str | None]) -> list[_Run]:
    """The runs of ``[lo, hi)``: the parts of each parameter inside it, consecutive ones of the same group merged."""
    runs: list[_Run] = []
    offset = 0
    for p in params:
        start, stop = max(lo, offset), min(hi, offset + p.numel())
        offset += p.numel()
        if start >= stop:
            continue
        key = group_key(job, component_of.get(id(p)), p)
        if runs and runs[-1].key == key and runs[-1].hi == start:
            runs[-1].hi = stop
        else:
            runs.append(_Run(start, stop, key, None))
    for run in runs:
        run.master = nn.Parameter(torch.empty(run.hi - run.lo, device=params[0].device))
    return runs


class ShardedAdamW:
    """The optimizer of a worker with ZeRO-1: ``step``/``zero_grad``/``state_dict``/``load_state_dict`` and
    ``param_groups`` like a torch optimizer. ``buckets`` are (devices, parameters, shards) triples, identical and in
    the same order on every holder; ``shards`` are the plan's share owners (planner.plan.PlanBucket.shards: device
    ``shards[i]`` steps share ``i``), a permutation of ``devices``. ``component_of`` maps ``id(parameter)`` to its
    component (for its learning rate; absent: ``training.lr``). ``positions``: per bucket, the forward position of the
    event that first needs it (the gathers' launch order, then the buckets' order; default: the buckets' order)."""

    def __init__(self, job: JobSpec,
                 buckets: list[tuple[tuple[int, ...], list[nn.Parameter], tuple[int, ...]]],
                 groups: dict[tuple[int, ...], object], rank: int, alone: list[nn.Parameter],
                 component_of: dict[int, str | None] | None = None, positions: list[int] | None = None):
        component_of = component_of or {}
        self.shares: list[_Share] = []
        self.pending: list[tuple[_Share, object, list[torch.Tensor]]] = []  # gathers in flight, in launch order
        for devices, params, shards in buckets:
            assert sorted(shards) == sorted(devices), f"shards {shards} are not one per device of {devices}"
            n, i = len(devices), list(shards).index(rank)
            total = sum(p.numel() for p in params)
            lo, hi = shard_range(total, n, i)
            order = tuple(list(shards).index(d) for d in sorted(devices))
            self.shares.append(_Share(params, groups[tuple(devices)], sorted(devices).index(rank), n, total,
                                      -(-total // n), lo, hi, _runs(job, params, lo, hi, component_of), order,
                                      positions[len(self.shares)] if positions is not None else 0))
        by_key: dict[tuple[float, float], list[nn.Parameter]] = {}
        for share in self.shares:
            for run in share.runs:
                by_key.setdefault(run.key, []).append(run.master)
        for p in alone:
            by_key.setdefault(group_key(job, component_of.get(id(p)), p), []).append(p)
        self.inner = build_optimizer(job, [{"params": ps, "lr": lr, "base_lr": lr, "weight_decay": decay}
                                           for (lr, decay), ps in by_key.items()]) if by_key else None

    @property
    def param_groups(self) -> list[dict]:
        """The inner optimizer's groups (the schedule sets their ``lr``)."""
        return self.inner.param_groups if self.inner is not None else []

    def step(self, defer: bool = False) -> None:
        """Update this device's shares (and its unshared parameters), then all-gather every bucket's shares (also
        with nothing to update: the other holders wait for this one's part), in launch order. ``defer``: launch the
        gathers and return; :meth:`wait_until` / :meth:`settle` complete them."""
        self.settle()
        for share in self.shares:
            for run in share.runs:  # only the share's elements: the bucket's others are the other holders' to step
                run.master.data.copy_(_elements([p.detach() for p in share.params], run.lo, run.hi))
                run.master.grad = _elements([p.grad for p in share.params], run.lo, run.hi).clone()
        if self.inner is not None:
            self.inner.step()
        for i in sorted(range(len(self.shares)), key=lambda i: (self.shares[i].position, i)):
            self._launch(self.shares[i])
        if not defer:
            self.settle()

    def wait_until(self, position: int) -> None:
        """Complete the gathers in flight of every bucket first needed at or before forward ``position``."""
        if not self.pending:
            return
        left = []
        for share, work, parts in self.pending:
            if share.position <= position:
                self._land(share, work, parts)
            else:
                left.append((share, work, parts))
        self.pending = left

    def settle(self) -> None:
        """Complete every gather in flight: the parameters are this step's everywhere."""
        pending, self.pending = self.pending, []
        for share, work, parts in pending:
            self._land(share, work, parts)

    def _launch(self, share: _Share) -> None:
        device = share.params[0].device
        mine = torch.zeros(share.per, device=device)
        for run in share.runs:
            mine[run.lo - share.lo:run.hi - share.lo] = run.master.detach()
        parts = [torch.empty(share.per, device=device) for _ in range(share.num_holders)]
        work = dist.all_gather(parts, mine, group=share.group, async_op=True)
        self.pending.append((share, work, parts))

    @staticmethod
    def _land(share: _Share, work, parts: list[torch.Tensor]) -> None:
        finish_collective(work, parts[0].device)
        flat = share.gathered(parts)
        offset = 0
        with torch.no_grad():
            for p in share.params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.inner is not None:
            self.inner.zero_grad(set_to_none=set_to_none)
        for share in self.shares:  # None, but a persistent gradient buffer (runtime.optim) is zeroed in place, kept
            zero_grads(share.params)

    def state_dict(self) -> dict:
        self.settle()
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.settle()
        if self.inner is not None:
            self.inner.load_state_dict(state)

    def state_elements(self) -> int:
        """Elements of optimizer state this device keeps (AdamW: two per element it updates)."""
        return sum(t.numel() for s in self.inner.state.values() for t in s.values() if t.dim() > 0) if self.inner else 0
