"""ZeRO-1 on the gradient buckets: each holder of a shared parameter keeps AdamW state for its share only.

The executor's buckets group the parameters this device shares with exactly the same devices; after
their gradients are summed (all-reduce), holder ``i`` of ``n`` updates elements ``[i*L/n, (i+1)*L/n)``
of the bucket's flattened parameters with its own AdamW state, then the holders all-gather the
updated shares so every replica ends the step with the same full parameters. AdamW is element-wise,
so this is the same update as every holder stepping all of it; the optimizer state per holder
shrinks to 1/n of the bucket (``training.shard_optimizer``, which the planner's memory model
assumes). Parameters this device holds alone keep ordinary AdamW state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from planner.spec import JobSpec
from runtime.modules import build_optimizer


@dataclass
class _Share:
    """This device's share of one bucket: elements ``[lo, hi)`` of its ``total`` flattened elements; every
    holder's share is padded to ``per`` elements for the all-gather."""

    params: list[nn.Parameter]
    group: object
    rank_in_group: int
    num_holders: int
    total: int
    per: int
    lo: int
    hi: int
    master: nn.Parameter | None  # None when the share is empty (fewer elements than holders)


class ShardedAdamW:
    """The optimizer of a worker with ZeRO-1: ``step``/``zero_grad``/``state_dict``/``load_state_dict`` like a torch
    optimizer. ``buckets`` are (devices, parameters) pairs, identical and in the same order on every holder."""

    def __init__(self, job: JobSpec, buckets: list[tuple[tuple[int, ...], list[nn.Parameter]]],
                 groups: dict[tuple[int, ...], object], rank: int, alone: list[nn.Parameter]):
        self.shares: list[_Share] = []
        for devices, params in buckets:
            n, i = len(devices), devices.index(rank)
            total = sum(p.numel() for p in params)
            per = -(-total // n)
            lo, hi = min(i * per, total), min((i + 1) * per, total)
            master = nn.Parameter(torch.empty(hi - lo, device=params[0].device)) if hi > lo else None
            self.shares.append(_Share(params, groups[devices], i, n, total, per, lo, hi, master))
        masters = [s.master for s in self.shares if s.master is not None]
        self.inner = build_optimizer(job, masters + list(alone))

    def step(self) -> None:
        """Update this device's shares (and its unshared parameters), then all-gather every bucket's shares."""
        if self.inner is None:
            return
        for share in self.shares:
            if share.master is not None:
                flat = torch.cat([p.detach().reshape(-1) for p in share.params])
                grad = torch.cat([p.grad.reshape(-1) for p in share.params])
                share.master.data.copy_(flat[share.lo:share.hi])
                share.master.grad = grad[share.lo:share.hi].clone()
        self.inner.step()
        for share in self.shares:
            self._gather(share)

    def _gather(self, share: _Share) -> None:
        device = share.params[0].device
        mine = torch.zeros(share.per, device=device)
        if share.master is not None:
            mine[:share.hi - share.lo] = share.master.detach()
        parts = [torch.empty(share.per, device=device) for _ in range(share.num_holders)]
        dist.all_gather(parts, mine, group=share.group)
        flat = torch.cat(parts)[:share.total]
        offset = 0
        with torch.no_grad():
            for p in share.params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.inner is not None:
            self.inner.zero_grad(set_to_none=set_to_none)
        for share in self.shares:
            for p in share.params:
                p.grad = None

    def state_dict(self) -> dict:
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.inner is not None:
            self.inner.load_state_dict(state)

    def state_elements(self) -> int:
        """Elements of optimizer state this device keeps (AdamW: two per element it updates)."""
        return sum(t.numel() for s in self.inner.state.values() for t in s.values() if t.dim() > 0) if self.inner else 0
