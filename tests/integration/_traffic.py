"""Counting what a worker puts on the wire, where it leaves the process: torch.distributed's point-to-point batches,
all-reduces and all-gathers (used by test_byte_contract.py).

``count_traffic(out_dir, job)`` is a run_world ``setup``: in each rank's process it wraps those three calls, and each
call appends one JSON line to ``out_dir/traffic-rank<r>.jsonl``: the kind of traffic (named by the runtime function
that made the call, :data:`KINDS`; ``other`` for the rest: megatron's tensor-parallel reductions, the loss's row
gathers, the step's closing all-reduces; ``handoff_gather`` for the all-gathers of a tensor-parallel layer that a weight
hand-off's sender runs first, runtime.megatron_backend's ``_unshard`` under runtime.rollout.Roles.hand_off), the peer
or the group's ranks, the bytes and the dtype. An all-gather counts
the bytes gathered in all (every member's part), as the planner prices it; a point-to-point batch counts its sends,
and records each receive as kind ``receive`` with the runtime function that posted it (``posted_by``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

# runtime function making the call -> kind of traffic
KINDS = {"_exchange": "pieces", "_exchange_decoded": "pieces", "_launch_sync": "buckets", "_launch": "gather",
         "hand_off": "handoff", "move_rollouts": "rollouts"}


def count_traffic(out_dir: str, job) -> None:
    """Wrap this process's torch.distributed calls to record every message (module docstring); then load the job's
    recipe, as run_world's usual setup does."""
    from orchestrator.recipes import load_recipe

    load_recipe(job)
    batch, all_reduce, all_gather = dist.batch_isend_irecv, dist.all_reduce, dist.all_gather

    def record(kind: str, **entry) -> None:
        path = Path(out_dir) / f"traffic-rank{dist.get_rank()}.jsonl"
        with path.open("a") as f:
            f.write(json.dumps({"kind": kind, **entry}) + "\n")

    def caller() -> str:
        frame = sys._getframe(2)
        if frame.f_code.co_name == "_unshard":  # a TP layer gathered whole: for a hand-off (Roles.hand_off), or not
            while frame is not None and frame.f_code.co_name != "hand_off":
                frame = frame.f_back
            return "handoff_gather" if frame is not None else "other"
        return KINDS.get(frame.f_code.co_name, "other")

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def counted_batch(ops):
        kind, poster = caller(), sys._getframe(1).f_code.co_name
        for op in ops:
            name = getattr(op.op, "__name__", "")
            if name == "isend":
                record(kind, peer=op.peer, bytes=nbytes(op.tensor), dtype=str(op.tensor.dtype))
            elif name == "irecv":
                record("receive", peer=op.peer, bytes=nbytes(op.tensor), dtype=str(op.tensor.dtype), posted_by=poster)
        return batch(ops)

    def counted_all_reduce(tensor, *args, **kwargs):
        group = kwargs.get("group", args[1] if len(args) > 1 else None)
        record(caller(), group=_ranks(group), bytes=nbytes(tensor), dtype=str(tensor.dtype))
        return all_reduce(tensor, *args, **kwargs)

    def counted_all_gather(outputs, tensor, *args, **kwargs):
        group = kwargs.get("group", args[0] if args else None)
        record(caller(), group=_ranks(group), bytes=nbytes(tensor) * len(outputs), dtype=str(tensor.dtype))
        return all_gather(outputs, tensor, *args, **kwargs)

    dist.batch_isend_irecv = _same_name(counted_batch, batch)
    dist.all_reduce = _same_name(counted_all_reduce, all_reduce)
    dist.all_gather = _same_name(counted_all_gather, all_gather)


def _ranks(group) -> list[int]:
    return sorted(dist.get_process_group_ranks(group)) if group is not None else list(range(dist.get_world_size()))


def _same_name(wrapper: Callable, real: Callable) -> Callable:
    wrapper.__name__ = real.__name__
    return wrapper


def read_traffic(out_dir: str | Path, rank: int) -> list[dict]:
    """Every message rank ``rank`` recorded, in order."""
    path = Path(out_dir) / f"traffic-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
