"""Worker processes and shared inputs for tests/integration/test_megatron_cpu.py.

A separate module so that spawned children can import the worker by name. The reference block,
its weights and the inputs are built deterministically from SEED here, identically in the test
process and in every worker, so nothing large travels between processes.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

HIDDEN_SIZE = 32
NUM_HEADS = 4
FFN_HIDDEN_SIZE = 64
BATCH_SIZE = 3
SEQ_LEN = 5
SEED = 1234
PARAM_SCALE = 0.3  # weights and biases alike, so that every bias and LayerNorm mapping matters


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_reference() -> torch.nn.Module:
    """The plain-torch block with every parameter (biases and LayerNorms included) drawn from SEED."""
    from runtime.modules import TransformerBlock

    block = TransformerBlock(HIDDEN_SIZE, NUM_HEADS, FFN_HIDDEN_SIZE)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(block.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=gen) * PARAM_SCALE)
            if name.startswith("ln") and name.endswith("weight"):
                param.add_(1.0)  # LayerNorm gains around 1, as in a trained net
    return block


def make_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The input x (B, S, H) and the upstream gradient the loss sum(out * upstream) feeds back."""
    gen = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(BATCH_SIZE, SEQ_LEN, HIDDEN_SIZE, generator=gen)
    upstream = torch.randn(BATCH_SIZE, SEQ_LEN, HIDDEN_SIZE, generator=gen)
    return x, upstream


def _run_block(block, x: torch.Tensor, upstream: torch.Tensor) -> dict:
    from runtime.megatron_backend import gather_reference_grads, gather_reference_weights

    x = x.clone().requires_grad_(True)
    out = block(x)
    (out * upstream).sum().backward()
    return {"out": out.detach(), "x_grad": x.grad.detach(), "grads": gather_reference_grads(block),
            "weights": gather_reference_weights(block)}


def tp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Rank ``rank`` of a gloo world: a TP=world_size block on the whole world, then a TP=1 block
    on this rank's own single-rank group; both loaded from the same reference, run forward and
    backward on the same input; results saved to ``out_dir/rank{rank}.pt``."""
    started = time.perf_counter()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from runtime import megatron_compat

    megatron_compat.apply_cpu_compat()
    from runtime.megatron_backend import MegatronTransformerBlock, load_reference, seed_model_parallel_rng

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        tp_group = dist.new_group(list(range(world_size)))
        # new_group is collective over the default group: every rank creates every single-rank group.
        own_groups = [dist.new_group([r]) for r in range(world_size)]
        seed_model_parallel_rng(SEED, tp_rank=rank)
        # Idempotent: a second call must keep the seeded tracker (the block constructor checks it).
        megatron_compat.apply_cpu_compat()
        reference = make_reference()
        x, upstream = make_inputs()
        setup_s = time.perf_counter() - started

        tp_block = MegatronTransformerBlock(HIDDEN_SIZE, NUM_HEADS, FFN_HIDDEN_SIZE, tp_group, rank, world_size)
        load_reference(tp_block, reference)
        step_started = time.perf_counter()
        tp_result = _run_block(tp_block, x, upstream)
        step_s = time.perf_counter() - step_started

        single = MegatronTransformerBlock(HIDDEN_SIZE, NUM_HEADS, FFN_HIDDEN_SIZE, own_groups[rank], 0, 1)
        load_reference(single, reference)
        single_result = _run_block(single, x, upstream)
        local_qkv_rows = tp_block.layer.self_attention.linear_qkv.weight.shape[0]
        torch.save(
            {"tp": tp_result, "tp1": single_result, "local_qkv_rows": local_qkv_rows,
             "setup_s": setup_s, "step_s": step_s, "applied": megatron_compat.is_applied()},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()
