"""Pretrained Llama-family layers on megatron-core (runtime.megatron_pretrained): the weight map is exact, and a
pretrained Llama trained with tensor parallelism 2 equals single-process training and the transformers model.

The layer test runs two gloo processes; each applies megatron's CPU compatibility layer, builds every supported
family's layer from a tiny saved model (weights redrawn so that every norm, bias and head matters), then its megatron
block at TP=2 over both processes and at TP=1 on its own single-rank group, and runs forward and backward on the same
input as the transformers layer itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from planner.spec import load_job

from _equivalence import STEPS, check_equivalence, check_transformers_losses, plan_from_waves  # tests/integration/_equivalence.py
from _megatron_workers import free_port  # tests/integration/_megatron_workers.py
from _worlds import start_world  # tests/integration/_worlds.py (its ranks run OMP_NUM_THREADS=1)

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
from make_models import save_llama  # noqa: E402  (examples/make_models.py)

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")  # qwen2: q/k/v biases; qwen3: q/k norms and head_dim 128 != 64/4
SEED = 7
CLIP = 0.2  # below the tiny Llama's gradient norms (2.3 to 2.8 in these 3 steps)
RTOL = 1e-5


def _redrawn_layer(folder: Path):
    """Layer 1 of the model at ``folder`` as Loom runs it (a PretrainedLayer), every parameter redrawn from SEED:
    transformers' initialisation leaves norms at exactly 1 and biases at 0, which would hide a misplaced one."""
    from planner.spec import ComponentSpec
    from runtime.pretrained import build_layer

    layer = build_layer(ComponentSpec.model_validate({"pretrained": str(folder)}), 1)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(layer.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2 + (1.0 if "norm" in name else 0.0))
    return layer


def _forward_backward(module, x: torch.Tensor, upstream: torch.Tensor, grads) -> dict:
    x = x.clone().requires_grad_(True)
    out = module(x)
    (out * upstream).sum().backward()
    return {"out": out.detach(), "x_grad": x.grad.detach(), "grads": grads(module)}


def layer_worker(rank: int, world_size: int, port: int, models: str, out_dir: str) -> None:
    """Rank ``rank``: per model type, the transformers layer's and its megatron blocks' (TP=2, TP=1) outputs, input
    gradients and gradients by the layer's parameter names, saved to ``out_dir/rank{rank}.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from runtime import megatron_compat

    megatron_compat.apply_cpu_compat()
    from runtime.megatron_backend import gather_reference_grads, gather_reference_weights, seed_model_parallel_rng
    from runtime.megatron_pretrained import build_pretrained_block

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        tp_group = dist.new_group(list(range(world_size)))
        own = [dist.new_group([r]) for r in range(world_size)][rank]
        seed_model_parallel_rng(SEED, tp_rank=rank)
        results = {}
        for model_type in MODEL_TYPES:
            reference = _redrawn_layer(Path(models) / model_type)
            gen = torch.Generator().manual_seed(SEED + 1)
            x, upstream = torch.randn(2, 9, 64, generator=gen), torch.randn(2, 9, 64, generator=gen)
            results[model_type] = {"hf": _forward_backward(
                reference, x, upstream, lambda m: {n: p.grad.clone() for n, p in m.named_parameters()})}
            for tp, group, tp_rank in ((world_size, tp_group, rank), (1, own, 0)):
                block = build_pretrained_block(reference, group, tp_rank, tp)
                results[model_type][f"tp{tp}"] = _forward_backward(block, x, upstream, gather_reference_grads)
                results[model_type][f"tp{tp}"]["weights"] = gather_reference_weights(block)
                results[model_type][f"tp{tp}"]["qkv_rows"] = block.layer.self_attention.linear_qkv.weight.shape[0]
            results[model_type]["weights"] = {n: p.detach() for n, p in reference.named_parameters()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Max abs error relative to the reference's largest magnitude (as tests/integration/test_megatron_cpu.py)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    assert err <= RTOL, f"{what}: relative error {err:.2e} > {RTOL:.0e}"


def test_pretrained_layers_on_megatron_equal_the_transformers_layers(tmp_path):
    for seed, model_type in enumerate(MODEL_TYPES):
        save_llama(tmp_path / model_type, seed=seed, model_type=model_type)
    start_world(layer_worker, args=(2, free_port(), str(tmp_path), str(tmp_path)), nprocs=2)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for model_type in MODEL_TYPES:
            want = results[model_type]["hf"]
            for tp in ("tp2", "tp1"):
                got, what = results[model_type][tp], f"rank {rank} {model_type} {tp}"
                assert_close(got["out"], want["out"], f"{what} output")
                assert_close(got["x_grad"], want["x_grad"], f"{what} input gradient")
                assert set(got["grads"]) == set(want["grads"]), sorted(set(got["grads"]) ^ set(want["grads"]))
                for name, grad in want["grads"].items():
                    assert_close(got["grads"][name], grad, f"{what} gradient of {name}")
                for name, weight in results[model_type]["weights"].items():  # loaded and gathered back unchanged
                    assert torch.equal(got["weights"][name], weight), f"{what} weight {name}"
            heads = {"qwen3": 4 * 128 + 2 * 2 * 128}.get(model_type, 4 * 16 + 2 * 2 * 16)  # q rows + k and v rows
            assert results[model_type]["tp2"]["qkv_rows"] * 2 == results[model_type]["tp1"]["qkv_rows"] == heads


def test_pretrained_llama_on_megatron_tp2_equals_single_process_and_transformers(tmp_path):
    """A tiny Llama (RoPE, 4 heads over 2 key/value heads, SwiGLU) with tensor_parallel [2]: its 4 layers in two
    waves, each dp 1 x tp 2 on both workers, trained 3 steps with gradient clipping (the global norm must count each
    TP shard once and the replicated norms once, runtime.megatron_backend.owned_fractions)."""
    save_llama(tmp_path / "llama")
    spec = {
        "name": "hf-llama-tp", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"lm": {"pretrained": "llama", "seq_len": 12, "tensor_parallel": [2]}},
        "tasks": [{"name": "caption", "batch_size": 4, "loss": "lm", "components": [{"component": "lm"}]}],
        "training": {"steps": STEPS, "lr": 1e-3, "precision": "fp32", "grad_clip": CLIP},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    job = load_job(tmp_path / "job.yaml")
    plan = plan_from_waves(job, [[("caption.lm", 2, 2)], [("caption.lm", 2, 2)]])
    assert [(s.dp_degree, s.tp_degree) for w in plan.waves for s in w.slices] == [(1, 2), (1, 2)]
    # the world equals Loom's single-process training, parameters and gradients under the transformers layers' names
    world = check_equivalence(job, plan, tmp_path / "world")
    assert "lm/0/layer.self_attn.q_proj.weight" in world.parameters[1]

    check_transformers_losses(job, tmp_path / "llama", world, clip=CLIP)  # and the transformers model by hand
