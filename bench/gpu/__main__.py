"""``python -m bench.gpu [--device cuda|cpu] [--steps N] [--results-dir DIR] [--no-write]``: the GPU path, checked.

What CPU CI cannot run: a worker on a CUDA device in an NCCL world (one process per GPU of this host), megatron-core
without the CPU compatibility layer, diffusers' UNet blocks on CUDA. On one host with G GPUs:

1. **Training**: a job with a shared text encoder, a llama, a decoder, a text-conditioned UNet and connectors
   between towers of different shapes (``GPU_JOB``,
   ``cluster.device: h100``), planned for G devices, trained ``--steps`` steps by ``runtime.local_world`` (NCCL,
   one GPU per rank): its per-step losses against single-process training of the same job on the CPU (relative
   difference; TF32 convolutions and other kernels make a GPU differ by ~1e-4..1e-3, not by 1e-5), and its step
   times.
   The same job again at ``training.precision: bf16`` (autocast over float32 master weights): its losses against the
   float32 single-process run (``BF16_LOSS_RTOL``: bf16 rounds to 8 bits of mantissa).
2. **A pretrained Hugging Face Llama** (a ``save_pretrained`` folder made here, RoPE, GQA; its RMSNorms and SwiGLU
   run as Loom's kernels: Triton on a GPU), next-token training at fp32 and at bf16, against the float32
   single-process run on the CPU.
3. **megatron-core blocks** at TP=1 on one GPU, every variant (encoder, llama, decoder): output and input
   gradient against the plain block on the same GPU (max abs difference).

``--device cpu`` runs the same flow on CPU processes and gloo (to check the suite itself where there is no GPU).
Writes bench/results/gpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write_results
from planner.api import make_cost_model, plan_job
from planner.spec import parse_job
from runtime.local_world import run_world
from runtime.reference import ReferenceTrainer

log = logging.getLogger("bench.gpu")
LOSS_RTOL = 2e-3  # GPU vs CPU float32: TF32 convolutions and different reduction orders
BF16_LOSS_RTOL = 5e-2  # bf16 autocast vs float32: 8-bit mantissas through every matmul of a few steps
PRECISIONS = ("fp32", "bf16")

GPU_JOB = {
    "name": "gpu-check",
    "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "h100"},
    "components": {
        "text": {"kind": "transformer", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "seq_len": 16,
                 "vocab_size": 64},
        "lm": {"kind": "llama", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "seq_len": 16,
               "vocab_size": 64},
        "img": {"kind": "vit", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 4, "image_size": 16},
        "dec": {"kind": "decoder", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "seq_len": 8, "vocab_size": 64},
        "unet": {"kind": "unet2d", "num_layers": 1, "hidden_size": 32, "channel_mults": [1, 2], "num_heads": 4,
                 "in_channels": 4, "image_size": 16},
        "score": {"kind": "mlp", "num_layers": 1, "hidden_size": 32, "seq_len": 1},
    },
    "tasks": [
        {"name": "caption", "batch_size": 16, "loss": "cross_entropy", "components": [{"component": "text"}]},
        {"name": "lm", "batch_size": 16, "loss": "next_token", "components": [{"component": "lm"}]},
        {"name": "describe", "batch_size": 16, "loss": "cross_entropy",
         "components": [{"component": "img"}, {"component": "dec"}]},
        {"name": "generate", "batch_size": 16, "loss": "mse", "components": [{"component": "text"}, {"component": "unet"}]},
        # connectors: the llama reads the 17 image tokens, then 7 text tokens; the scorer projects 64 -> 32 and pools
        {"name": "rate", "batch_size": 16, "loss": "mse",
         "components": [{"component": "img"}, {"component": "lm", "seq_len": 24}, {"component": "score"}]},
    ],
    "training": {"steps": 5, "lr": 1e-3, "seed": 0, "precision": "fp32"},
    "planner": {"time_limit_s": 5},
}


def training_check(device: str, steps: int, precision: str = "fp32", data: dict | None = None,
                   check: str = "training", profiled: bool = False) -> dict:
    """Train ``data`` (default GPU_JOB) at ``precision`` on this host's GPUs (or CPU processes) and at float32 on one
    CPU process; losses and step times. ``profiled``: plan with the costs ``loom profile`` measures on this host (as
    ``loom run --costs``), so the step time is checked against a measured-cost prediction."""
    gpus = torch.cuda.device_count() if device == "cuda" else 2
    data = data or GPU_JOB
    data = data | {"cluster": data["cluster"] | {"devices_per_node": max(1, gpus),
                                                 "device": "h100" if device == "cuda" else "cpu"}}
    data["training"] = data["training"] | {"steps": steps, "precision": precision}
    job = parse_job(data)
    with tempfile.TemporaryDirectory() as tmp:
        costs = None
        if profiled:
            from runtime.profiler import profile_job

            costs = Path(tmp) / "costs.json"
            costs.write_text(json.dumps(profile_job(job, repeats=3)))
        plan = plan_job(job, make_cost_model(job, costs), with_baselines=False).plan
        world = run_world(job, plan, steps, tmp)
    reference = ReferenceTrainer(job.model_copy(update={"training": job.training.model_copy(
        update={"precision": "fp32"})}))
    diffs = []
    for step in range(steps):
        want = reference.train_step(step)
        diffs.append({task: abs(world.losses[step][task] - value) / abs(value) for task, value in want.items()})
    worst = max(max(d.values()) for d in diffs)
    limit = LOSS_RTOL if precision == "fp32" else BF16_LOSS_RTOL
    return {"check": check, "device": device, "precision": precision, "workers": plan.cluster.devices_per_node,
            "steps": steps, "losses": world.losses, "loss_rel_diff": diffs, "worst_rel_diff": worst, "limit": limit,
            "ok": worst <= limit, "step_s": world.step_seconds,
            "median_step_s": statistics.median(world.step_seconds[1:] or world.step_seconds),
            "predicted_s": plan.predicted.iteration_time_s}


def pretrained_check(device: str, steps: int, precision: str, folder: str) -> dict:
    """A pretrained Llama at ``folder`` (next-token, kernels auto), as :func:`training_check`."""
    data = {"name": "gpu-check-hf", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "h100"},
            "components": {"lm": {"pretrained": folder, "seq_len": 64}},
            "tasks": [{"name": "lm", "batch_size": 16, "loss": "lm", "components": [{"component": "lm"}]}],
            "training": {"lr": 1e-3, "seed": 0, "kernels": "auto"}, "planner": {"time_limit_s": 5}}
    return training_check(device, steps, precision, data, check="pretrained")


def save_check_llama(folder: str) -> str:
    """A Llama (256 wide, 4 layers, 8 heads over 2 kv heads, vocabulary 512) saved at ``folder`` with the library's
    own config class and ``save_pretrained`` (random weights; nothing is downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def megatron_check(device: str) -> list[dict]:
    """Every megatron block variant at TP=1 on ``device`` against its plain block (a world of one process)."""
    import os

    import torch.distributed as dist

    from runtime import megatron_compat
    from runtime.local_world import free_port
    from runtime.megatron_backend import MegatronTransformerBlock, load_reference, seed_model_parallel_rng
    from runtime.modules import DecoderBlock, LlamaBlock, TransformerBlock

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        megatron_compat.apply_cpu_compat()
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        seed_model_parallel_rng(0, 0)
        h, heads, f, s, b = 64, 4, 256, 12, 3
        plain = {"transformer": TransformerBlock(h, heads, f), "llama": LlamaBlock(h, heads, 2, f),
                 "decoder": DecoderBlock(h, heads, f, causal=True)}
        out = []
        for variant, reference in plain.items():
            block = MegatronTransformerBlock(h, heads, f, dist.group.WORLD, 0, 1, variant=variant, num_kv_heads=2,
                                             causal=variant == "decoder")
            load_reference(block, reference)
            reference, block = reference.to(dev), block.to(dev)
            kwargs = {"stream_len": s // 2} if variant == "decoder" else {}
            x = torch.randn(b, s, h, device=dev)
            results = []
            for module in (reference, block):
                xi = x.clone().requires_grad_(True)
                y = module(xi, **kwargs)
                y.square().sum().backward()
                results.append((y.detach(), xi.grad))
            (y0, g0), (y1, g1) = results
            out.append({"check": "megatron", "variant": variant, "device": device,
                        "max_out_diff": float((y0 - y1).abs().max()), "max_grad_diff": float((g0 - g1).abs().max()),
                        "ok": bool(torch.allclose(y0, y1, atol=2e-3) and torch.allclose(g0, g1, atol=2e-3))})
        return out
    finally:
        dist.destroy_process_group()


def guarded(check: str, precision: str, run, *args):
    """``run(*args)``, or a failed record holding the error: one broken check must not cost the others (a GPU lease
    is short)."""
    try:
        return run(*args)
    except Exception as error:  # noqa: BLE001 - any failure of a check is that check's result
        log.exception("%s check at %s failed", check, precision)
        return {"check": check, "precision": precision, "ok": False, "error": f"{type(error).__name__}: {error}"}


def report(records: list[dict]) -> str:
    train = next((r for r in records if r["check"] == "training" and "error" not in r), None)
    where = (f"Device: `{train['device']}`, {train['workers']} worker(s) "
             f"({'NCCL' if train['device'] == 'cuda' else 'gloo'}).") if train else "No training check ran."
    lines = ["# GPU path check", "", where, "", "| check | result | detail |", "|---|---|---|"]
    what = {"training": "training GPU_JOB", "pretrained": "training a pretrained HF Llama (kernels auto)",
            "profiled": "training GPU_JOB planned with `loom profile`'s costs"}
    for r in records:
        if "error" in r:
            lines.append(f"| {r['check']} at {r['precision']} | FAIL | {r['error'].splitlines()[0][:300]} |")
        elif r["check"] in what:
            lines.append(
                f"| {what[r['check']]} {r['steps']} steps at {r['precision']} vs single-process CPU fp32 | "
                f"{'PASS' if r['ok'] else 'FAIL'} | worst relative loss difference {r['worst_rel_diff']:.1e} (limit "
                f"{r['limit']:.0e}); median step {r['median_step_s'] * 1e3:.1f} ms, predicted "
                f"{r['predicted_s'] * 1e3:.1f} ms ({r['median_step_s'] / r['predicted_s']:.2f}x) |")
        if r["check"] == "megatron":
            lines.append(f"| megatron-core {r['variant']} block, TP=1 | {'PASS' if r['ok'] else 'FAIL'} | max |out "
                         f"diff| {r['max_out_diff']:.1e}, max |input grad diff| {r['max_grad_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--results-dir", help="write the results here instead of bench/results")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run on a GPU machine, or --device cpu to check the suite itself",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    records = [guarded("training", precision, training_check, args.device, args.steps, precision)
               for precision in PRECISIONS]
    records.append(guarded("profiled", "fp32", training_check, args.device, args.steps, "fp32", None, "profiled", True))
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_check_llama(f"{tmp}/llama")
        records += [guarded("pretrained", precision, pretrained_check, args.device, args.steps, precision, folder)
                    for precision in PRECISIONS]
    megatron = guarded("megatron", "fp32", megatron_check, args.device)
    records += megatron if isinstance(megatron, list) else [megatron]
    text = report(records)
    print(text)
    if not args.no_write:
        write_results("gpu", records, text, {"device": args.device, "steps": args.steps,
                                              "seconds": time.perf_counter() - started},
                      results_dir=Path(args.results_dir) if args.results_dir else None)
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
