"""``python -m bench.medical [--steps N] [--samples N] [--no-write]``: the medical recipe, trained and scored.

Trains recipes/medical/unimed-tiny.yaml exactly as ``loom run`` does (its own plan, an embedded Ray
cluster of the spec's CPU workers), then scores the trained model as ``loom eval`` does: every task
on held-out scans next to its trivial baseline, and the transfer probe (trained vs initial encoder).
Reports each task's loss over the first vs the last 10% of steps. Writes bench/results/medical.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from bench.common import REPO_ROOT, write_results
from orchestrator.metrics import LogReporter
from orchestrator.run import RunOptions, run_job
from orchestrator.recipes import load_job, load_recipe
from runtime.evaluate import evaluate_job
from runtime.reference import MODEL_FILE, load_model

log = logging.getLogger("bench.medical")
SPEC = "recipes/medical/unimed-tiny.yaml"


def loss_falls(records, fraction: float = 0.1) -> dict[str, dict[str, float]]:
    """Per task: the mean loss over the first and the last ``fraction`` of the steps."""
    window = max(1, int(len(records) * fraction))
    return {task: {"first": sum(r.loss[task] for r in records[:window]) / window,
                   "last": sum(r.loss[task] for r in records[-window:]) / window}
            for task in records[0].loss}


def train(job, steps: int | None, out_dir: Path) -> tuple[dict, dict]:
    """Train ``job`` as ``loom run`` does into ``out_dir`` (``steps``: None for the spec's); (run summary: steps,
    workers, seed, seconds, measured and predicted step time, :func:`loss_falls`; the trained parameters)."""
    started = time.perf_counter()
    result = run_job(job, options=RunOptions(steps=steps, out_dir=out_dir, checkpoint_every=0, overwrite=True),
                     reporter=LogReporter())
    run = {"steps": len(result.records), "workers": job.cluster.num_devices, "seed": job.training.seed,
           "train_s": time.perf_counter() - started, "step_s": result.mean_step_seconds(),
           "predicted_step_s": result.plan.predicted.iteration_time_s, "loss": loss_falls(result.records)}
    return run, load_model(out_dir / MODEL_FILE)


def markdown(run: dict, heldout: dict, transfer: dict) -> str:
    lines = ["# Medical recipe (UniMed-style): trained on CPU, scored on held-out scans", "",
             f"`{SPEC}`: {run['steps']} steps on {run['workers']} CPU workers through `loom run` "
             f"({run['train_s']:.0f} s of training, {run['step_s'] * 1e3:.0f} ms per step; the plan predicted "
             f"{run['predicted_step_s'] * 1e3:.0f} ms with the analytic CPU model).", "",
             "## Loss, mean of the first vs the last 10% of steps", "", "| task | first | last | change |", "|---|---|---|---|"]
    for task, v in run["loss"].items():
        lines.append(f"| {task} | {v['first']:.4f} | {v['last']:.4f} | {100 * (v['last'] / v['first'] - 1):+.0f}% |")
    lines += ["", f"## Held-out scans ({heldout['num_samples']} per task)", "",
              "| task | metric | model | trivial baseline |", "|---|---|---|---|"]
    for task, values in heldout["metrics"].items():
        for name, value in values.items():
            lines.append(f"| {task} | {name} | {value:.4f} | {heldout['baselines'][task][name]:.4f} |")
    (probe,), (initial,) = transfer["metrics"]["transfer_probe"].values(), transfer["baselines"]["transfer_probe"].values()
    lines += ["", "## Transfer to an unseen lesion type", "",
              f"Linear probe, frozen encoder: **{probe:.4f}** accuracy with the trained encoder vs {initial:.4f} with "
              f"its initial weights ({transfer['notes']['probe']})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.medical", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="training steps (default: the spec's)")
    parser.add_argument("--samples", type=int, default=256, help="held-out scans per task")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    job = load_job(REPO_ROOT / SPEC)
    load_recipe(job)  # its evaluator, for evaluate_job below
    with tempfile.TemporaryDirectory() as tmp:
        run, params = train(job, args.steps, Path(tmp))
    heldout = evaluate_job(job, params, "heldout", args.samples).to_json()
    transfer = evaluate_job(job, params, "transfer").to_json()
    report = markdown(run, heldout, transfer)
    print(report)
    if not args.no_write:
        write_results("medical", [{"run": run, "heldout": heldout, "transfer": transfer}], report,
                      {"spec": SPEC, "steps": run["steps"], "samples": args.samples})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
