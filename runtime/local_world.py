"""Run a plan on a local gloo world of processes (torch.multiprocessing), without Ray.

For tests and benchmarks of the worker logic: each process joins a gloo group on 127.0.0.1 (NCCL, one GPU per
process, for a GPU job on a host with GPUs),
creates the plan's sub-groups, builds a :class:`~runtime.executor.WaveWorker` from its rank's payload and trains
``steps`` steps. Results (per-step task losses and the final parameters each rank holds) come back
through files in ``out_dir``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from planner.plan import Plan
from planner.spec import JobSpec
from runtime.host import backend_for, configure_worker_process, worker_device
from runtime.payload import WorkerPayload


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class WorldResult:
    losses: list[dict[str, float]]  # per step, per task (identical on every rank; rank 0's)
    parameters: dict[int, dict[str, torch.Tensor]]  # per rank: what it holds after the last step
    gradients: dict[int, dict[str, torch.Tensor]]  # per rank: the last step's AdamW's (run_world's keep_gradients)
    step_seconds: list[float]  # per step, the slowest rank's wall time (steps start at a barrier)
    timings: list[list[dict]]  # per step, per rank: where the rank's time went (StepTiming.to_dict())
    sent: dict[int, list[tuple[dict, int]]]  # per rank: the last step's pieces sent to other ranks (JSON), bytes sent
    # per rank: its rows of each generate MetaOp's last rollout, (first row, packed rows) (runtime.rollout)
    rollouts: dict[int, dict[int, tuple[int, torch.Tensor]]] = field(default_factory=dict)
    first_gradients: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # per rank: the first step's


def _worker(rank: int, world_size: int, port: int, payloads: list[str], steps: int, out_dir: str,
            keep_gradients: bool, setup: Callable[[WorkerPayload], None] | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    payload = WorkerPayload.from_json(payloads[rank], f"rank {rank}'s payload")
    if setup is not None:
        setup(payload)
    device = worker_device(payload, rank)  # this host's GPUs in turn for a GPU job, else the CPU
    per_node = payload.cluster.devices_per_node  # pinned as a Ray actor of the run would be (runtime.host)
    configure_worker_process(device, (rank % per_node, per_node))
    dist.init_process_group(backend_for(device), rank=rank, world_size=world_size)
    try:
        from runtime.executor import Groups, WaveWorker

        worker = WaveWorker(payload, Groups.create(payload), device)
        losses, seconds, timings, first = [], [], [], {}
        for step in range(steps):
            dist.barrier()  # every rank starts the step together, so a step's wall time is the iteration time
            started = time.perf_counter()
            losses.append(worker.train_step(step, keep_gradients=keep_gradients and step in (0, steps - 1)))
            seconds.append(time.perf_counter() - started)
            timings.append(worker.last_timing.to_dict())
            if step == 0:
                first = dict(worker.last_gradients or {})
        torch.save({"losses": losses, "seconds": seconds, "timings": timings, "parameters": worker.named_parameters(),
                    "gradients": worker.last_gradients or {}, "first_gradients": first,
                    "sent": [(p.model_dump(mode="json"), nbytes) for p, nbytes in worker.last_sent],
                    "rollouts": worker.last_rollouts},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_world(job: JobSpec, plan: Plan, steps: int, out_dir: str | Path, keep_gradients: bool = False,
              setup: Callable[[WorkerPayload], None] | None = None) -> WorldResult:
    """Train ``steps`` steps of ``plan`` on one process per device of the plan's cluster; with ``keep_gradients``
    the result holds the gradients of the first and the last step (else none). Each process receives its rank's payload
    (runtime.prepare.build_payloads), not the job. ``setup(payload)`` runs first in every process (a picklable
    function): a job with a recipe passes ``orchestrator.recipes.load_recipe``, which the runtime cannot call itself
    (it reads the payload's ``recipe``)."""
    world_size = plan.cluster.num_nodes * plan.cluster.devices_per_node
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from runtime.prepare import build_payloads  # the driver's side: the ranks' processes import only the payload type

    payloads = [p.to_json() for p in build_payloads(job, plan)]  # what each rank receives
    mp.spawn(_worker, args=(world_size, free_port(), payloads, steps, str(out_dir), keep_gradients, setup),
             nprocs=world_size, join=True)
    per_rank = {r: torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)}
    seconds = [max(d["seconds"][i] for d in per_rank.values()) for i in range(steps)]
    timings = [[per_rank[r]["timings"][i] for r in range(world_size)] for i in range(steps)]
    return WorldResult(per_rank[0]["losses"], {r: d["parameters"] for r, d in per_rank.items()},
                       {r: d["gradients"] for r, d in per_rank.items()}, seconds, timings,
                       {r: d["sent"] for r, d in per_rank.items()}, {r: d["rollouts"] for r, d in per_rank.items()},
                       {r: d["first_gradients"] for r, d in per_rank.items()})

