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


def clip_like_data(num_tasks: int, num_nodes: int = 16, seed: int = 0) -> dict[str, Any]:
    """The job spec (as a plain dict) of ``num_tasks`` random contrastive pairs over clip-10's encoders."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks ({num_tasks}) must be at least 1.")
    base = load_yaml(CLIP_SPEC)
    rng = random.Random(seed)
    modalities = sorted(INPUT_SIZES)
    tasks = []
    for i in range(num_tasks):
        pair = rng.sample(modalities, 2)
        uses = []
        for modality in pair:
            field, choices = INPUT_SIZES[modality]
            uses.append({"component": modality, "after": [], field: rng.choice(choices)})
        tasks.append({
            "name": f"task{i:03d}_{pair[0]}_{pair[1]}",
            "batch_size": rng.choice(BATCH_SIZES),
            "loss": "contrastive",
            "components": uses,
        })
    cluster = {**base["cluster"], "num_nodes": num_nodes}
    return {"name": f"synth-clip-{num_tasks}", "cluster": cluster, "components": base["components"], "tasks": tasks}


def clip_like_job(num_tasks: int, num_nodes: int = 16, seed: int = 0) -> JobSpec:
    """A validated JobSpec of ``num_tasks`` CLIP-like tasks (2 MetaOps each) on ``num_nodes`` nodes of 8."""
    job = parse_job(clip_like_data(num_tasks, num_nodes, seed), source="synthetic workload")
    check_components(job)
    return job


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
