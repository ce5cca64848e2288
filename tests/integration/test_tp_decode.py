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
        assert torch.allclose(cached.logits, full.logits, atol=1e-5, rtol=1e-5), rank


def test_hand_off_shard_of_a_plain_layer_is_the_blocks_shard(decoded):
    for rank, result in decoded.items():
        assert result["shards"] and all(result["shards"]), rank
        assert all(result["flat"]), rank
        assert result["cache"] == 1  # 2 key/value groups over 2 ranks: each caches one


def test_bf16_decode_copy_at_tp2_holds_bf16_matrices_and_decodes_as_float32_weights(decoded):
    """A decode copy's megatron blocks at tensor_parallel 2 (runtime.rollout.lower_matrices: the column- and
    row-parallel weights in bf16, the norms float32), filled by the hand-off's packed wire (runtime.tp_decode
    .pack_wire), hold the trainer's shard rounded and, under bf16 autocast on this CPU, sample the tokens and
    logits of the float32 blocks: autocast computes a linear layer from the bf16 cast of its weight either way."""
    for rank, result in decoded.items():
        bf16 = result["bf16"]
        assert {n for n, d in bf16["dtypes"].items() if d == "torch.bfloat16"} == {
            "layer.self_attention.linear_qkv.weight", "layer.self_attention.linear_proj.weight",
            "layer.mlp.linear_fc1.weight", "layer.mlp.linear_fc2.weight"}, bf16["dtypes"]
        assert all(d == "torch.float32" for n, d in bf16["dtypes"].items() if "layernorm" in n)
        assert bf16["rounded"], rank
        assert torch.equal(bf16["copy"].tokens, bf16["float32"].tokens), rank
        assert torch.equal(bf16["copy"].logits, bf16["float32"].logits), rank


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pretrained(request, tmp_path_factory):
    """A transformers causal LM (llama; qwen2: q/k/v biases) decoded at tensor_parallel 2, and its folder."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
    from make_models import save_llama  # examples/make_models.py

    root = tmp_path_factory.mktemp(f"tp_decode_{request.param}")
    folder = save_llama(root / "model", model_type=request.param, vocab_size=workers.VOCAB, hidden_size=32,
                        intermediate_size=64, num_hidden_layers=2)
    start_world(workers.pretrained_worker, args=(WORLD, free_port(), str(root), str(folder)), nprocs=WORLD)
    return str(folder), {rank: torch.load(root / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)}


@pytest.mark.parametrize("masked", [False, True])
def test_tp2_decode_of_a_pretrained_causal_lm_samples_the_one_process_tokens(pretrained, masked):
    """runtime.megatron_pretrained's blocks decode at tensor_parallel 2 (RoPE per row's position, left padding never
    attended) exactly the tokens runtime.generate.PretrainedDecoder samples in one process with transformers'
    layers and DynamicCache; the hand-off's shard of a PretrainedLayer is the block's own."""
    from runtime.generate import PretrainedDecoder, decoder_for, generate, row_generators

    folder, decoded = pretrained
    embed, layers, logits = workers.pretrained_modules(folder)
    with torch.no_grad():
        one = decoder_for(embed, layers, logits)
        assert isinstance(one, PretrainedDecoder)
        want = generate(one, workers.prompts(), workers.NEW, 1.0, row_generators(3, 0, "t", range(workers.ROWS), 2),
                        keep_logits=True, prompt_mask=workers.prompt_mask() if masked else None)
    for rank, result in decoded.items():
        got = result[masked]
        assert result["decoder"] and all(result["flat"]), rank
        assert torch.equal(got.tokens, want.tokens), rank
        assert torch.allclose(got.logits, want.logits, atol=1e-5, rtol=1e-5), (got.logits - want.logits).abs().max()
    if masked:  # the padding changes what a padded row decodes from
        plain = decoded[0][False]
        assert not torch.allclose(plain.logits[1], want.logits[1], atol=1e-3)


def test_bf16_decode_copy_of_a_pretrained_causal_lm_decodes_as_float32_weights(pretrained):
    """As for Loom's llama blocks above, for runtime.megatron_pretrained's: qwen2's q/k/v biases stay float32 in the
    copy (vectors), and megatron adds them to the bf16 product in float32 whatever the weight's dtype."""
    for rank, result in pretrained[1].items():
        bf16 = result["bf16"]
        lowered = {n for n, d in bf16["dtypes"].items() if d == "torch.bfloat16"}
        assert lowered and all(n.endswith("weight") and "norm" not in n for n in lowered), bf16["dtypes"]
        assert all(d == "torch.float32" for n, d in bf16["dtypes"].items() if n.endswith("bias") or "norm" in n)
        assert any(n.endswith("bias") for n in bf16["dtypes"]) == ("qwen2" in pretrained[0])
        assert bf16["rounded"], rank
        assert torch.equal(bf16["copy"].tokens, bf16["float32"].tokens), rank
        assert torch.equal(bf16["copy"].logits, bf16["float32"].logits), rank
