"""ZeRO-1 (runtime.zero.ShardedAdamW) on a gloo world of 2 processes: each holder keeps AdamW state for half of a
shared bucket, and after each step every holder has exactly the parameters plain AdamW on the summed gradients gives."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from planner.spec import parse_job
from runtime.local_world import free_port
from runtime.optim import build_grouped_optimizer
from runtime.zero import ShardedAdamW

from _worlds import start_world  # tests/integration/_worlds.py

JOB = parse_job({
    "name": "zero", "components": {"m": {"kind": "mlp", "num_layers": 1, "hidden_size": 4}},
    "tasks": [{"name": "t", "batch_size": 2, "components": [{"component": "m"}]}],
    "training": {"lr": 0.1, "weight_decay": 0.01},
})
SHAPES = [(3, 5), (7,), (2, 2)]  # 26 elements: shares of 13
STEPS = 3


def _params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]


def _grads(rank: int, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(shape, generator=gen) for shape in SHAPES]


def _worker(rank: int, port: int, out_dir: str, shards: tuple[int, ...] = (0, 1)) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        params = _params()
        opt = ShardedAdamW(JOB, [((0, 1), params, shards)], {(0, 1): dist.group.WORLD}, rank, [])
        for step in range(STEPS):
            for p, g in zip(params, _grads(rank, step)):
                dist.all_reduce(g)  # what the executor's bucket sync does
                p.grad = g
            opt.step()
            opt.zero_grad()
        torch.save({"params": [p.detach() for p in params], "state": opt.state_elements(),
                    "range": (opt.shares[0].lo, opt.shares[0].hi)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shards", [(0, 1), (1, 0)], ids=["rank-order", "reversed"])
def test_sharded_adamw_keeps_half_the_state_and_updates_exactly(tmp_path, shards):
    """The plan's share owners (PlanBucket.shards) decide who steps which half; either order updates exactly."""
    start_world(_worker, args=(free_port(), str(tmp_path), shards), nprocs=2)
    params = _params()
    plain = build_grouped_optimizer(JOB, [(None, p) for p in params])  # no weight decay on the (7,) bias
    for step in range(STEPS):
        for p, g0, g1 in zip(params, _grads(0, step), _grads(1, step)):
            p.grad = g0 + g1
        plain.step()
        plain.zero_grad()
    total = sum(p.numel() for p in params)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for a, b in zip(got["params"], params):
            torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
        assert got["state"] == 2 * total // 2  # exp_avg and exp_avg_sq for its 13 of 26 elements
        assert got["range"] == ((0, 13) if shards.index(rank) == 0 else (13, 26))


def _deferred_worker(rank: int, port: int, out_dir: str) -> None:
    """Two buckets over the same devices, the second needed first (positions 1 and 0): ``step(defer=True)`` launches
    both gathers (the second first) and leaves the parameters untouched until ``wait_until`` lands them."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        params = _params()
        first, second = params[:1], params[1:]
        opt = ShardedAdamW(JOB, [((0, 1), first, (0, 1)), ((0, 1), second, (1, 0))],
                           {(0, 1): dist.group.WORLD}, rank, [], positions=[1, 0])
        untouched = True
        for step in range(STEPS):
            for p, g in zip(params, _grads(rank, step)):
                dist.all_reduce(g)
                p.grad = g
            before = [p.detach().clone() for p in params]
            opt.step(defer=True)
            opt.zero_grad()
            untouched &= all(torch.equal(p, b) for p, b in zip(params, before))  # nothing landed yet
            opt.wait_until(0)  # the next forward's first event: only the second bucket lands
            untouched &= torch.equal(first[0], before[0]) and not torch.equal(second[0], before[1])
            opt.wait_until(1)
            assert not opt.pending
        torch.save({"params": [p.detach() for p in params], "untouched": untouched}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_deferred_gathers_land_in_the_order_the_forward_needs_them_and_update_exactly(tmp_path):
    """The executor's overlap (step(defer=True), then a wait before each forward event): the parameters change only
    when their bucket's gather lands, the bucket needed first lands first, and three steps equal plain AdamW."""
    start_world(_deferred_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    params = _params()
    plain = build_grouped_optimizer(JOB, [(None, p) for p in params])
    for step in range(STEPS):
        for p, g0, g1 in zip(params, _grads(0, step), _grads(1, step)):
            p.grad = g0 + g1
        plain.step()
        plain.zero_grad()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["untouched"]
        for a, b in zip(got["params"], params):
            torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
