"""``python -m bench.planner.dynamic [--steps 2000] [--buckets 4]``: a plan cache against static plans, on varying data.

Two workloads whose batches vary from step to step, each drawn from a stated generative model (seeded, so the
sample of batches is the same on every run) and handed to the planner as a shapes file's ``batches:`` (the
form a data loader's log would take, docs/shapes.md):

``qwen-val-3@32`` (bench/workloads/qwen-val-3.yaml on 4 nodes of 8 A800s): a vision-language-audio model.
  - vision_language, 256 rows: a step's images share one resolution (a resolution-grouped sampler, as native-
    resolution ViTs train), side drawn from {224: 0.2, 336: 0.3, 448: 0.3, 672: 0.2} px; the LLM reads 256
    adapter queries plus the step's caption length, which is lognormal (median 96, sigma 0.7) rounded up to a
    multiple of 64, clipped to [64, 1024] (captions length-grouped: a step's rows are padded to one length).
  - text_only, a budget of 262,144 tokens per step (dynamic batching): the step's document length is lognormal
    (median 1024, sigma 0.8) rounded up to a power of two in [256, 8192]; rows = budget / length.
  - audio_language, 128 rows: clip length uniform in 4-30 s at 50 frames/s, rounded up to a multiple of 250
    frames (at most Whisper's 1500); the LLM reads half the frames (pooled by 2) plus 274 text tokens.
``clip-4@32`` (bench/workloads/clip-4.yaml on 4 nodes): the task mix varies: a step's 512 samples are split
  over the four tasks by a Dirichlet(2, 2, 2, 2) draw, in multiples of 32 rows, at least 32 per task.

For each workload the candidates are planned and priced once (planner.plan_cache.plan_candidates), then the
cache is chosen for run lengths 1 (every step drawn independently), 10 and 100 (a bucketed sampler serving
that many steps from one bucket). Reported, all predicted by the same simulator under the analytic cost model:
the cache's mean iteration time (with switching), one static plan made for the mean shape, one made for the
max shape (run on each batch's own shape, and with every batch padded to the max shape), and the best single
plan among all those planned. Writes bench/results/dynamic.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO_ROOT, write_results
from planner.api import make_cost_model
from planner.plan_cache import PlanSet, cache_from_candidates, plan_candidates
from planner.shapes import parse_shapes
from planner.spec import JobSpec, load_job

log = logging.getLogger("bench.planner.dynamic")

WORKLOADS_DIR = REPO_ROOT / "bench" / "workloads"
RUN_LENGTHS = (1, 10, 100)
SEED = 0


@dataclass(frozen=True)
class Workload:
    name: str
    spec: str  # file under bench/workloads
    num_nodes: int
    draw: Any  # (rng, steps) -> list of batches (shapes-file `batches:` entries)
    distribution: str  # one line for the report


def draw_vlm(rng: np.random.Generator, steps: int) -> list[dict[str, Any]]:
    """The qwen-val-3 batches of the module docstring."""
    batches = []
    sides = rng.choice([224, 336, 448, 672], size=steps, p=[0.2, 0.3, 0.3, 0.2])
    captions = np.clip(64 * np.ceil(rng.lognormal(math.log(96), 0.7, steps) / 64), 64, 1024).astype(int)
    docs = np.clip(2 ** np.ceil(np.log2(rng.lognormal(math.log(1024), 0.8, steps))), 256, 8192).astype(int)
    frames = np.minimum(250 * np.ceil(rng.uniform(4, 30, steps) * 50 / 250), 1500).astype(int)
    for side, caption, doc, frame in zip(sides, captions, docs, frames):
        batches.append({"tasks": {
            "vision_language": {"image_size": {"vision": int(side)}, "seq_len": {"llm": 256 + int(caption)}},
            "text_only": {"batch_size": 262_144 // int(doc), "seq_len": {"llm": int(doc)}},
            "audio_language": {"seq_len": {"audio": int(frame), "llm": int(frame) // 2 + 274}},
        }})
    return batches


def draw_clip_mix(rng: np.random.Generator, steps: int) -> list[dict[str, Any]]:
    """The clip-4 batches of the module docstring: 16 units of 32 rows split by Dirichlet(2, 2, 2, 2), >= 1 each."""
    tasks = ("vision_text", "audio_text", "audio_vision", "depth_vision")
    batches = []
    for share in rng.dirichlet([2.0] * len(tasks), size=steps):
        units = 1 + np.floor(share * (16 - len(tasks))).astype(int)
        units[np.argmax(share)] += 16 - units.sum()
        batches.append({"tasks": {t: {"batch_size": 32 * int(u)} for t, u in zip(tasks, units)}})
    return batches


WORKLOADS = (
    Workload("qwen-val-3@32", "qwen-val-3.yaml", 4, draw_vlm,
             "per step: image side {224,336,448,672} px, caption length lognormal(96, 0.7), document length "
             "lognormal(1024, 0.8) at 262,144 tokens per step, audio clips uniform 4-30 s"),
    Workload("clip-4@32", "clip-4.yaml", 4, draw_clip_mix,
             "per step: 512 samples split over 4 tasks by Dirichlet(2,2,2,2), multiples of 32 rows"),
)


def load_workload(workload: Workload) -> JobSpec:
    job = load_job(WORKLOADS_DIR / workload.spec)
    return job.model_copy(update={"cluster": job.cluster.model_copy(update={"num_nodes": workload.num_nodes})})


def shapes_document(workload: Workload, steps: int, buckets: int, seed: int = SEED) -> dict[str, Any]:
    """The workload's shapes file (as parsed YAML): ``steps`` batches drawn with ``seed``."""
    return {"max_buckets": buckets, "batches": workload.draw(np.random.default_rng(seed), steps)}


def measure(workload: Workload, steps: int, buckets: int) -> dict[str, Any]:
    job = load_workload(workload)
    shapes = parse_shapes(shapes_document(workload, steps, buckets), job, f"{workload.name} batches")
    cost_model = make_cost_model(job)
    start, start_cpu = time.perf_counter(), time.process_time()
    found = plan_candidates(job, shapes, cost_model, progress=lambda msg: log.info("%s: %s", workload.name, msg))
    planning = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - start_cpu}
    caches = {str(r): cache_from_candidates(job, shapes, found, r) for r in RUN_LENGTHS}
    caches["1, shared"] = cache_from_candidates(job, shapes, found, 1, placement="shared")
    return {
        "workload": workload.name, "distribution": workload.distribution, "steps": steps,
        "devices": job.cluster.num_devices, "distinct_shapes": len(shapes.points),
        "dims": [d.task + "." + d.field + ("." + d.use if d.use else "") for d in caches["1"].dims],
        "candidates": len(found.priced.plans), "planning": planning,
        "by_run_length": {r: _summary(c) for r, c in caches.items()},
    }


def _summary(plan_set: PlanSet) -> dict[str, Any]:
    c = plan_set.comparison
    return {
        "plans": len(plan_set.plans), "cache_s": c.cache_s, "switch_s": c.switch_s,
        "static_mean_s": c.static_mean_s, "static_mean_unfit": c.static_mean_unfit,
        "static_max_s": c.static_max_s, "padded_max_s": c.padded_max_s, "best_static_s": c.best_static_s,
        "buckets": [{"probability": b.probability, "shapes": len(b.members), "predicted_s": b.predicted_s,
                     "static_mean_s": b.static_mean_s, "static_max_s": b.static_max_s,
                     "method": plan_set.plans[b.plan].solver.method} for b in plan_set.buckets],
    }


def _ms(value: float | None) -> str:
    return "does not fit" if value is None else f"{value * 1e3:.1f}"


def _x(other: float | None, cache: float) -> str:
    return "-" if other is None else f"{other / cache:.3f}x"


def render_report(records: list[dict[str, Any]], config: dict[str, Any]) -> str:
    lines = ["# Plan cache on varying data (bench/planner/dynamic.py)", "",
             "Predicted mean iteration time (ms; analytic cost model, same simulator for every plan) of the plan "
             "cache against static plans, over a seeded sample of "
             f"{config['steps']} batches per workload, at most {config['buckets']} plans. Run length: steps "
             "served from one bucket before the next is drawn (1: independent steps; the cache pays the "
             "expected parameter movement of a switch divided by it; \"shared\": only plans holding every parameter "
             "where the best static plan does). Ratios are static / cache.", ""]
    for rec in records:
        lines += [f"## {rec['workload']} ({rec['devices']} devices)", "", rec["distribution"] + ".", "",
                  f"{rec['distinct_shapes']} distinct shapes over {len(rec['dims'])} dimensions; "
                  f"{rec['candidates']} candidate plans planned and priced in {rec['planning']['cpu_s']:.1f} s CPU "
                  f"({rec['planning']['wall_s']:.1f} s wall on a shared machine).", "",
                  "| run length | plans | cache | switch | mean-shape plan | max-shape plan | padded to max | "
                  "best single plan |", "|---|---|---|---|---|---|---|---|"]
        for r, s in rec["by_run_length"].items():
            cache = s["cache_s"]
            lines.append(f"| {r} | {s['plans']} | {_ms(cache)} | {_ms(s['switch_s'])} | {_ms(s['static_mean_s'])} "
                         f"({_x(s['static_mean_s'], cache)}) | {_ms(s['static_max_s'])} ({_x(s['static_max_s'], cache)}) "
                         f"| {_ms(s['padded_max_s'])} ({_x(s['padded_max_s'], cache)}) | {_ms(s['best_static_s'])} "
                         f"({_x(s['best_static_s'], cache)}) |")
        if rec["by_run_length"]["1"]["static_mean_unfit"]:
            lines += ["", f"The mean-shape plan does not fit the device memory of "
                      f"{rec['by_run_length']['1']['static_mean_unfit']:.1%} of batches."]
        longest = rec["by_run_length"][str(RUN_LENGTHS[-1])]
        lines += ["", f"Buckets at run length {RUN_LENGTHS[-1]}:", "",
                  "| bucket | probability | shapes | plan | predicted | mean-shape plan | max-shape plan |",
                  "|---|---|---|---|---|---|---|"]
        for k, b in enumerate(longest["buckets"]):
            lines.append(f"| {k} | {b['probability']:.3f} | {b['shapes']} | {b['method']} | {_ms(b['predicted_s'])} "
                         f"| {_ms(b['static_mean_s'])} | {_ms(b['static_max_s'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.planner.dynamic", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="batches drawn per workload")
    parser.add_argument("--buckets", type=int, default=4, help="plans in the cache at most")
    parser.add_argument("--name", default="dynamic", help="results file stem under bench/results/")
    parser.add_argument("--results-dir", type=Path, default=None, help="where to write (default bench/results)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("planner").setLevel(logging.WARNING)
    config = {"steps": args.steps, "buckets": args.buckets, "seed": SEED, "run_lengths": list(RUN_LENGTHS),
              "cost_model": "analytic"}
    records = [measure(w, args.steps, args.buckets) for w in WORKLOADS]
    json_path, md_path = write_results(args.name, records, render_report(records, config), config,
                                       results_dir=args.results_dir)
    for rec in records:
        s = rec["by_run_length"]["1"]
        print(f"{rec['workload']}: cache {s['cache_s'] * 1e3:.1f} ms (run length 1), "
              + ", ".join(f"{r}: {v['cache_s'] * 1e3:.1f} ms" for r, v in rec["by_run_length"].items() if r != "1")
              + f"; mean-shape plan {_ms(s['static_mean_s'])} ms, max-shape plan {_ms(s['static_max_s'])} ms")
    print(f"results: {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
