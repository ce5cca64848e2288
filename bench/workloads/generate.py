"""Synthetic workloads for the planner's scale sweep: many CLIP-like contrastive tasks.

The encoders are clip-10.yaml's six ImageBind encoders (same sizes, so parameters stay ~1.1B
whatever the task count); each task pairs two distinct modalities as independent branches, with a
batch size and an input size drawn from short lists of realistic values. A task contributes two
MetaOps, so ``num_tasks=50`` gives the sweep's 100 MetaOps. Deterministic: the same arguments give
the same spec.

``python -m bench.workloads.generate --tasks 50 --out synth.yaml`` writes one as YAML.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import yaml

from planner.components import check_components
from planner.spec import JobSpec, parse_job
from planner.spec_file import load_yaml

WORKLOAD_DIR = Path(__file__).resolve().parent
CLIP_SPEC = WORKLOAD_DIR / "clip-10.yaml"

# Input sizes per modality: image sides are multiples of the encoder's patch (14 for vision, 16 for
# depth/thermal); sequence lengths follow ImageBind's preprocessors (audio: 5 s or 10 s of mel
# frames; IMU: 1000 or 2000 samples in patches of 8, plus cls; text: short captions or CLIP's 77).
INPUT_SIZES: dict[str, tuple[str, tuple[int, ...]]] = {
    "vision": ("image_size", (168, 196, 224, 280)),
    "depth": ("image_size", (160, 192, 224, 256)),
    "thermal": ("image_size", (160, 192, 224, 256)),
    "text": ("seq_len", (32, 64, 77)),
    "audio": ("seq_len", (109, 229)),
    "imu": ("seq_len", (126, 251)),
}
BATCH_SIZES = (32, 64, 128, 256, 512)


def clip_like_name(num_tasks: int, uses_per_task: int = 2) -> str:
    """The workload's name: ``synth-clip-<tasks>`` for pairs, ``synth-clip-<tasks>x<uses>`` otherwise."""
    return f"synth-clip-{num_tasks}" + ("" if uses_per_task == 2 else f"x{uses_per_task}")


def clip_like_data(num_tasks: int, num_nodes: int = 16, seed: int = 0, uses_per_task: int = 2) -> dict[str, Any]:
    """The job spec (as a plain dict) of ``num_tasks`` random contrastive tasks over clip-10's encoders, each of
    ``uses_per_task`` independent encoder uses: distinct modalities up to the six there are, then repeats (more
    views of a modality, each a named use with its own input size). Pairs (the default) are the sweep's tasks."""
    if num_tasks < 1 or uses_per_task < 2:
        raise ValueError(f"num_tasks ({num_tasks}) must be at least 1 and uses_per_task ({uses_per_task}) at least 2.")
    base = load_yaml(CLIP_SPEC)
    rng = random.Random(seed)
    modalities = sorted(INPUT_SIZES)
    tasks = []
    for i in range(num_tasks):
        picked = rng.sample(modalities, min(uses_per_task, len(modalities)))
        picked += [rng.choice(modalities) for _ in range(uses_per_task - len(picked))]
        uses = []
        for j, modality in enumerate(picked):
            field, choices = INPUT_SIZES[modality]
            name = {} if modality not in picked[:j] else {"name": f"{modality}_{j}"}
            uses.append({"component": modality, **name, "after": [], field: rng.choice(choices)})
        tasks.append({
            "name": f"task{i:03d}_" + "_".join(dict.fromkeys(picked)),
            "batch_size": rng.choice(BATCH_SIZES),
            "loss": "contrastive",
            "components": uses,
        })
    cluster = {**base["cluster"], "num_nodes": num_nodes}
    return {"name": clip_like_name(num_tasks, uses_per_task), "cluster": cluster, "components": base["components"],
            "tasks": tasks}


def clip_like_job(num_tasks: int, num_nodes: int = 16, seed: int = 0, uses_per_task: int = 2) -> JobSpec:
    """A validated JobSpec of ``num_tasks`` CLIP-like tasks (``uses_per_task`` MetaOps each) on nodes of 8."""
    job = parse_job(clip_like_data(num_tasks, num_nodes, seed, uses_per_task), source="synthetic workload")
    check_components(job)
    return job


# A vision-audio-language model at the size such clusters train: a 34B-class LLaMA (Yi-34B's shape: 60 layers, 7168
# wide, 56 heads with 8 KV heads, FFN 20480; tensor parallel up to 8) fed by Qwen-VL's ViT-bigG/14 and a Whisper-large
# encoder, every component with activation checkpointing. Parameters: 33.4B (LLM layers) + 1.8B + 0.6B, so memory
# binds. (It was a 70B-class LLaMA until the memory model followed the runtime: fp32 weight and gradient and the
# bf16 cast on every tensor-parallel shard, >= 10 bytes per parameter, put 80 layers at TP 8 over an 80 GiB A800, and
# Loom has no ZeRO-3 or pipeline parallelism to go further.)
VLM_COMPONENTS: dict[str, dict[str, Any]] = {
    "vision": {"kind": "vit", "num_layers": 48, "hidden_size": 1664, "num_heads": 16, "ffn_hidden_size": 8192,
               "patch_size": 14, "image_size": 448, "in_channels": 3, "recompute": True},
    "audio": {"kind": "transformer", "num_layers": 32, "hidden_size": 1280, "num_heads": 20, "ffn_hidden_size": 5120,
              "seq_len": 1500, "recompute": True},
    "llm": {"kind": "llama", "num_layers": 60, "hidden_size": 7168, "num_heads": 56, "num_kv_heads": 8,
            "ffn_hidden_size": 20480, "vocab_size": 64000, "seq_len": 4096, "tensor_parallel": [1, 2, 4, 8],
            "recompute": True},
}
VLM_IMAGE_SIZES = (224, 336, 448)  # vision input sides (257, 577, 1025 tokens)
VLM_LLM_SEQ = (1024, 2048, 4096)  # tokens the LLM sees per sample
VLM_BATCH_SIZES = (128, 256, 512, 1024)  # halved when recompute's float32 input left no schedule of the cell fitting


def vlm_like_data(num_tasks: int, num_nodes: int = 512, seed: int = 0) -> dict[str, Any]:
    """``num_tasks`` random tasks of a 34B-class vision-audio-language model: each an encoder (vision or audio,
    with a drawn input size) feeding the shared LLM (2 MetaOps), with a drawn LLM length and batch."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks ({num_tasks}) must be at least 1.")
    rng = random.Random(seed)
    tasks = []
    for i in range(num_tasks):
        encoder = rng.choice(("vision", "audio"))
        use = {"component": encoder} | ({"image_size": rng.choice(VLM_IMAGE_SIZES)} if encoder == "vision" else {})
        tasks.append({"name": f"task{i:03d}_{encoder}_language", "batch_size": rng.choice(VLM_BATCH_SIZES),
                      "components": [use, {"component": "llm", "seq_len": rng.choice(VLM_LLM_SEQ)}]})
    cluster = {"num_nodes": num_nodes, "devices_per_node": 8, "device": "a800", "inter_node_gbps": 400}
    return {"name": f"synth-vlm-{num_tasks}", "cluster": cluster, "components": VLM_COMPONENTS, "tasks": tasks}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50, help="number of tasks (2 MetaOps each)")
    parser.add_argument("--nodes", type=int, default=16, help="nodes of 8 devices")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="YAML file to write")
    args = parser.parse_args(argv)
    job = clip_like_job(args.tasks, args.nodes, args.seed)
    args.out.write_text(yaml.safe_dump(job.model_dump(exclude_defaults=True), sort_keys=False))
    print(f"wrote {args.out}: {len(job.tasks)} tasks")


if __name__ == "__main__":
    main()
