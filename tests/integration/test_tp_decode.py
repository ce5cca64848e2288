"""Tensor-parallel decoding (runtime.tp_decode): a tiny llama decoded at tensor_parallel 2 over megatron-core blocks
on a gloo world, each rank caching the keys and values of its own heads, samples exactly the tokens that decoding in
one process with the plain layers samples, and its KV-cache decode equals recomputing the whole sequence through the
megatron blocks at every token; the hand-off's shard of a plain layer is the block's own shard."""

from __future__ import annotations

import pytest
import torch

import _tp_decode_workers as workers  # tests/integration/_tp_decode_workers.py
from _megatron_workers import free_port
from _worlds import start_world

WORLD = 2


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("tp_decode")
    start_world(workers.worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD)
    return {rank: torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tp2_decode_samples_the_one_process_tokens(decoded, temperature):
    from runtime.generate import decoder_for, generate, row_generators

    embed, layers, logits = workers.plain_modules()
    with torch.no_grad():
        want = generate(decoder_for(embed, layers, logits), workers.prompts(), workers.NEW, temperature,
                        row_generators(3, 0, "t", range(workers.ROWS), 2), keep_logits=True)
    for rank, result in decoded.items():
        got = result[temperature]["cached"]
        assert torch.equal(got.tokens, want.tokens), rank
        assert torch.allclose(got.logits, want.logits, atol=1e-5, rtol=1e-5), (got.logits - want.logits).abs().max()
        assert torch.allclose(got.logprobs, want.logprobs, atol=1e-5)
    if temperature:  # sampling, and a group's samples differ
        assert len({tuple(r.tolist()) for r in want.tokens[:2, workers.PROMPT:]}) > 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tp2_kv_cache_decode_equals_full_recomputation(decoded, temperature):
    for rank, result in decoded.items():
        cached, full = result[temperature]["cached"], result[temperature]["full"]
        assert torch.equal(cached.tokens, full.tokens), rank
        assert torch.allclose(cached.logits, full.logits, atol=1e-5, rtol=1e-5), (cached.logits - full.logits).abs().max()


def test_hand_off_shard_of_a_plain_layer_is_the_blocks_shard(decoded):
    for rank, result in decoded.items():
        assert result["shards"] and all(result["shards"]), rank
        assert all(result["flat"]), rank
        assert result["cache"] == 1  # 2 key/value groups over 2 ranks: each caches one
