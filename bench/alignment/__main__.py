"""``python -m bench.alignment [--steps N] [--samples N] [--no-write]``: the alignment recipe, trained and scored.

Trains recipes/alignment/alignment-tiny.yaml exactly as ``loom run`` does (its own plan, an embedded Ray cluster of
the spec's 2 CPU workers; the tiny Llama must exist: ``python -m recipes.alignment.make``), then scores the trained
model as ``loom eval`` does on held-out pairs, next to the same metrics of the initial weights: the reward model's
pairwise accuracy (per domain and per kind of failure of the rejected answer), DPO's implicit reward margin, the SFT
loss and the packed token utilisation against padding. Writes bench/results/alignment.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from bench.common import REPO_ROOT, write_results
from bench.medical.__main__ import train
from orchestrator.recipes import load_job, load_recipe
from runtime.evaluate import evaluate_job

SPEC = "recipes/alignment/alignment-tiny.yaml"


def markdown(run: dict, trained: dict, initial: dict) -> str:
    lines = ["# Alignment recipe (Baichuan Alignment): trained on CPU, scored on held-out pairs", "",
             f"`{SPEC}` (seed {run['seed']}): {run['steps']} steps on {run['workers']} CPU workers through `loom run` "
             f"({run['train_s']:.0f} s of training, {run['step_s'] * 1e3:.0f} ms per step; the plan predicted "
             f"{run['predicted_step_s'] * 1e3:.0f} ms with the analytic CPU model).", "",
             "## Loss, mean of the first vs the last 10% of steps", "", "| task | first | last | change |",
             "|---|---|---|---|"]
    for task, v in run["loss"].items():
        lines.append(f"| {task} | {v['first']:.4f} | {v['last']:.4f} | {100 * (v['last'] / v['first'] - 1):+.0f}% |")
    lines += ["", f"## Held-out ({trained['num_samples']} pairs or rows per task)", "",
              "| task | metric | trained | initial weights | baseline |", "|---|---|---|---|---|"]
    for task, values in trained["metrics"].items():
        for name, value in values.items():
            base = trained["baselines"].get(task, {}).get(name)
            lines.append(f"| {task} | {name} | {value:.4f} | {initial['metrics'][task][name]:.4f} | "
                         f"{'' if base is None else f'{base:.4f}'} |")
    lines += ["", *(f"- {task}: {note}" for task, note in trained["notes"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="training steps (default: the spec's)")
    parser.add_argument("--samples", type=int, default=256, help="held-out pairs per task")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    parser.add_argument("--out", help="keep the run's output here (model.pt, export/, metrics) instead of a temp dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    job = load_job(REPO_ROOT / SPEC)
    load_recipe(job)  # its evaluator, for evaluate_job below
    with tempfile.TemporaryDirectory() as tmp:
        run, params = train(job, args.steps, Path(args.out or tmp))
    trained = evaluate_job(job, params, "heldout", args.samples).to_json()
    initial = evaluate_job(job, None, "heldout", args.samples).to_json()
    report = markdown(run, trained, initial)
    print(report)
    if not args.no_write:
        write_results("alignment", [{"run": run, "trained": trained, "initial": initial}], report,
                      {"spec": SPEC, "steps": run["steps"], "samples": args.samples})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
