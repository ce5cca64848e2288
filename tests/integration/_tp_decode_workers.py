"""Worker of tests/integration/test_tp_decode.py: a gloo world of 2 ranks decodes a tiny llama at tensor_parallel 2
(runtime.tp_decode over megatron-core blocks, one KV cache of the local heads per rank) and writes what it decoded.

The job, its modules (built from config and seeds, as the runtime builds them) and the prompts are the same in every
process, so only the results travel."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "runtime"))
from test_generate import FullRecompute  # noqa: E402  (the unit tests' decoder without a cache)

PROMPT, NEW, ROWS, VOCAB = 5, 7, 6, 48


def job():
    from planner.spec import parse_job

    return parse_job({
        "name": "gen", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"lm": {"kind": "llama", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 2,
                              "vocab_size": VOCAB, "seq_len": PROMPT + NEW}},
        "tasks": [{"name": "t", "batch_size": 4, "loss": "lm", "components": [{"component": "lm"}]}],
        "training": {"precision": "fp32"},
    })


def plain_modules():
    """(embed, plain llama layers, logits) of :func:`job`'s component, as runtime.reference builds them."""
    from runtime.generate import lm_logits
    from runtime.reference import ReferenceTrainer

    ref = ReferenceTrainer(job())
    return ref.modules[("embed:lm", 0)], [ref.modules[("lm", i)] for i in range(2)], lm_logits(ref.head(0))


def prompts() -> torch.Tensor:
    return torch.randint(0, VOCAB, (ROWS, PROMPT), generator=torch.Generator().manual_seed(1))


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from runtime import megatron_compat

    megatron_compat.apply_cpu_compat()
    from runtime.generate import decoder_for, generate, row_generators
    from runtime.megatron_backend import (
        PARAM_MAPS, MegatronTransformerBlock, load_reference, seed_model_parallel_rng,
    )
    from runtime.tp_decode import agree_on_first, flat_shard, local_shard, shard_of

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        group = dist.new_group(list(range(world_size)))
        seed_model_parallel_rng(0, rank)
        embed, plain, logits = plain_modules()
        blocks = []
        for layer in plain:
            block = MegatronTransformerBlock(32, 4, layer.gate_proj.out_features, group, rank, world_size,
                                             variant="llama", num_kv_heads=2)
            load_reference(block, layer)
            blocks.append(block)
        out = {}
        with torch.no_grad():
            for temperature in (0.0, 1.0):
                gens = row_generators(3, 0, "t", range(ROWS), 2)
                cached = generate(decoder_for(embed, blocks, logits), prompts(), NEW, temperature, gens,
                                  keep_logits=True, agree=agree_on_first(group, 0))

                def full_forward(ids):
                    x = embed(ids)
                    for block in blocks:
                        x = block(x)
                    return logits(x)
                full = generate(FullRecompute(full_forward), prompts(), NEW, temperature,
                                row_generators(3, 0, "t", range(ROWS), 2), keep_logits=True)
                out[temperature] = {"cached": cached, "full": full}
            # the hand-off's two ends: the shard cut from the plain layer is the block's own
            out["shards"] = [torch.equal(a, b) for layer, block in zip(plain, blocks) for a, b in zip(
                shard_of(dict(layer.named_parameters()), PARAM_MAPS["llama"], 4, 2, world_size, rank),
                local_shard(block))]
            out["flat"] = [torch.equal(flat_shard(layer, (world_size, rank)), flat_shard(block, (world_size, rank)))
                           for layer, block in zip(plain, blocks)]
            out["cache"] = blocks[0].layer.self_attention.num_query_groups_per_partition
            copies = [MegatronTransformerBlock(32, 4, layer.gate_proj.out_features, group, rank, world_size,
                                               variant="llama", num_kv_heads=2) for layer in plain]  # own weights
            out["bf16"] = bf16_copies(plain, blocks, copies, embed, logits, group, rank, world_size)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def bf16_copies(plain, blocks, copies, embed, logits, group, rank: int, world_size: int) -> dict:
    """A decode copy at tensor_parallel 2 under bf16 autocast: ``copies`` (blocks as ``blocks``) with their matrices
    in bf16 (runtime.rollout.lower_matrices), filled from the plain layers as a hand-off does (runtime.tp_decode
    .pack_wire: the matrices in bf16, norms and biases float32), decoding against the float32 ``blocks`` under the
    same autocast."""
    from runtime.generate import decoder_for, generate, row_generators
    from runtime.rollout import lower_matrices
    from runtime.tp_decode import agree_on_first, flat_shard, receive_order, unpack_wire

    for layer, block in zip(plain, copies):
        lower_matrices(block, torch.bfloat16)
        with torch.no_grad():
            unpack_wire(flat_shard(layer, (world_size, rank), matrices=torch.bfloat16),
                        receive_order(block, (world_size, rank)), torch.bfloat16)
    out = {"dtypes": {n: str(p.dtype) for n, p in copies[0].named_parameters()},
           "rounded": all(torch.equal(c, b.to(c.dtype)) for copy, block in zip(copies, blocks)
                          for c, b in zip(copy.parameters(), block.parameters()))}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name, decoding in (("float32", blocks), ("copy", copies)):
            out[name] = generate(decoder_for(embed, decoding, logits), prompts(), NEW, 1.0,
                                 row_generators(3, 0, "t", range(ROWS), 2), keep_logits=True,
                                 agree=agree_on_first(group, 0))
    return out


def pretrained_job(folder: str):
    from planner.spec import parse_job

    return parse_job({
        "name": "gen", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"lm": {"pretrained": folder, "seq_len": PROMPT + NEW, "tensor_parallel": [1, 2]}},
        "tasks": [{"name": "t", "batch_size": 4, "loss": "lm", "components": [{"component": "lm"}]}],
        "training": {"precision": "fp32"},
    })


def pretrained_modules(folder: str):
    """(embed, PretrainedLayers, logits) of a transformers causal LM saved at ``folder``, as the runtime builds them."""
    from runtime.generate import lm_logits
    from runtime.reference import ReferenceTrainer

    job = pretrained_job(folder)
    ref = ReferenceTrainer(job)
    layers = [ref.modules[("lm", i)] for i in range(job.components["lm"].num_layers)]
    return ref.modules[("embed:lm", 0)], layers, lm_logits(ref.head(0))


def prompt_mask() -> torch.Tensor:
    """Left padding: rows 1 and 4 have 2 and 1 pad positions."""
    mask = torch.ones(ROWS, PROMPT, dtype=torch.bool)
    mask[1, :2] = False
    mask[4, :1] = False
    return mask


def pretrained_worker(rank: int, world_size: int, port: int, out_dir: str, folder: str) -> None:
    """A transformers causal LM at ``folder`` decoded at tensor_parallel ``world_size`` (runtime.megatron_pretrained's
    blocks), with and without left padding; results to ``out_dir/rank{rank}.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from runtime import megatron_compat

    megatron_compat.apply_cpu_compat()
    from runtime.generate import decoder_for, generate, row_generators
    from runtime.megatron_backend import seed_model_parallel_rng
    from runtime.megatron_pretrained import build_pretrained_block
    from runtime.tp_decode import PretrainedTensorParallelDecoder, agree_on_first, flat_shard, local_shard

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        group = dist.new_group(list(range(world_size)))
        seed_model_parallel_rng(0, rank)
        embed, plain, logits = pretrained_modules(folder)
        blocks = [build_pretrained_block(layer, group, rank, world_size) for layer in plain]
        out = {}
        with torch.no_grad():
            decoder = decoder_for(embed, blocks, logits)
            out["decoder"] = type(decoder) is PretrainedTensorParallelDecoder
            for masked in (False, True):
                out[masked] = generate(decoder, prompts(), NEW, 1.0, row_generators(3, 0, "t", range(ROWS), 2),
                                       keep_logits=True, agree=agree_on_first(group, 0),
                                       prompt_mask=prompt_mask() if masked else None)
            out["flat"] = [torch.equal(flat_shard(layer, (world_size, rank)), torch.cat(
                [t.reshape(-1) for t in local_shard(block)])) for layer, block in zip(plain, blocks)]
            copies = [build_pretrained_block(layer, group, rank, world_size) for layer in plain]
            out["bf16"] = bf16_copies(plain, blocks, copies, embed, logits, group, rank, world_size)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
