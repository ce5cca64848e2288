"""``python -m bench.alignment.merging [--steps N] [--samples N] [--no-write]``: merging domain SFT models.

Baichuan Alignment §2.4 merges the best checkpoint of each domain's SFT before RL (Model Stock best). Here: the
recipe's tiny Llama (recipes/alignment/models/base) is fine-tuned by ``loom run`` (2 CPU workers, packed chat) on
each domain's data alone (``train/sft_arithmetic.jsonl``, ``train/sft_constraints.jsonl``), the two exported models
are merged by each method of recipes.alignment.merge over the base, and every model (base, both parents, each
merge) is scored on held-out conversations of each domain (prompts drawn from a stream no training file holds): the
mean loss over the assistant tokens, through its own exported LM head. Writes bench/results/alignment-merging.*.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from bench.common import write_results
from orchestrator.metrics import LogReporter
from orchestrator.run import RunOptions, run_job
from planner.spec import parse_job
from recipes.alignment import make, tasks
from recipes.alignment.merge import merge_folders
from runtime.evaluate import evaluate_job

BASE = make.HERE / "models" / "base"
MERGES = {"linear": {}, "task_arithmetic": {"scale": 1.0}, "model_stock": {}}


def sft_job(name: str, model: Path, files: dict[str, Path], steps: int):
    """Packed chat SFT of ``model`` on each file of ``files`` (one task each), 2 CPU workers."""
    return parse_job({
        "name": name, "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"policy": {"pretrained": str(model)}},
        "tasks": [{"name": task, "batch_size": 8, "loss": "lm", "components": [{"component": "policy", "seq_len": 128}],
                   "data": {"format": "chat", "path": str(path), "pack": True}} for task, path in files.items()],
        "training": {"steps": steps, "lr": 1e-3, "precision": "fp32", "seed": 0}, "planner": {"time_limit_s": 2},
    })


def markdown(losses: dict[str, dict[str, float]], steps: int, samples: int) -> str:
    lines = ["# Alignment recipe: merging per-domain SFT models", "",
             f"The tiny Llama fine-tuned by `loom run` for {steps} steps on each domain alone, then merged over the "
             f"base; mean loss over the assistant tokens of {samples} held-out conversations per domain (lower is "
             "better).", "", "| model | " + " | ".join(tasks.DOMAINS) + " | mean |",
             "|---|" + "---|" * (len(tasks.DOMAINS) + 1)]
    for model, per in losses.items():
        values = [per[d] for d in tasks.DOMAINS]
        lines.append(f"| {model} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {sum(values) / len(values):.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment.merging", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="SFT steps per domain")
    parser.add_argument("--samples", type=int, default=128, help="held-out conversations per domain")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        heldout = {}
        for domain in tasks.DOMAINS:
            rows = [tasks.chat(make.SEED, f"heldout-{domain}", i, domain) for i in range(args.samples)]
            heldout[domain] = root / f"heldout_{domain}.jsonl"
            heldout[domain].write_text("".join(json.dumps(row) + "\n" for row in rows))
        models = {"base": BASE}
        for domain in tasks.DOMAINS:
            job = sft_job(f"sft-{domain}", BASE, {domain: make.HERE / "data" / "train" / f"sft_{domain}.jsonl"},
                          args.steps)
            run_job(job, options=RunOptions(out_dir=root / domain, checkpoint_every=0), reporter=LogReporter())
            models[f"sft {domain}"] = root / domain / "export" / "policy"
        parents = [models[f"sft {d}"] for d in tasks.DOMAINS]
        for method, options in MERGES.items():
            models[f"merged: {method}"] = merge_folders(method, root / method, BASE, parents, **options)
        losses = {}
        for name, folder in models.items():
            report = evaluate_job(sft_job("score", folder, heldout, 1), None, "train", args.samples)
            losses[name] = {task: values["loss"] for task, values in report.metrics.items()}
    report = markdown(losses, args.steps, args.samples)
    print(report)
    if not args.no_write:
        write_results("alignment-merging", [{"losses": losses}], report,
                      {"steps": args.steps, "samples": args.samples, "merges": MERGES})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
