"""``python -m bench.diffusion.itercomp [--out OUT] [--spec SPEC] [--no-write]``: IterComp's iteration, measured.

Runs ``loom run SPEC --out OUT`` (``--resume`` when OUT holds an earlier run; default
``recipes/diffusion/itercomp-pipeline-tiny.yaml``: reward models -> base UNet -> feedback, trained -> compare ->
regenerated gallery -> reward models again; a finished phase is not run again) and collects what its steps report (``OUT/<phase>/metrics.json``): the oracle's score and the reward
models' normalised reward of the UNet's held-out samples before and after feedback, per category (``compare``); the
feedback phase's losses and step time; the UNet's samples' oracle score in
the regenerated gallery; the reward models' held-out pairwise accuracy on the synthetic gallery and on pairs with a
new (UNet) image, before and after the second iteration. Writes bench/results/diffusion-itercomp.{json,md} and
copies the compare phase's sample grids to docs/recipes/img/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import write_results
from recipes.diffusion.shapes import CATEGORIES

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "recipes" / "diffusion" / "itercomp-pipeline-tiny.yaml"
IMAGES = ROOT / "docs" / "recipes" / "img"


def phase_metrics(out: Path) -> dict[str, dict[str, float]]:
    """Each step phase's reported metrics, and the trained feedback phase's (``feedback``): per task the mean loss of
    its first and second half of the steps (a batch of 6 at random timesteps: single steps' denoising losses range
    0.007-0.18), and the measured and predicted step time."""
    from orchestrator.metrics import read_step_log

    metrics = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/metrics.json"))}
    log = out / "feedback" / "metrics.jsonl"
    if log.is_file():
        records = read_step_log(log)
        half = max(len(records) // 2, 1)
        metrics["feedback"] = {
            **{f"{task}_loss_{when}": sum(r["loss"][task] for r in rows) / len(rows)
               for task in records[0]["loss"] for when, rows in (("first", records[:half]), ("last", records[-half:]))},
            "step_s": sorted(r["step_seconds"] for r in records[1:])[len(records[1:]) // 2] if len(records) > 1 else 0,
            "predicted_s": records[-1]["predicted_iteration_s"], "steps": len(records)}
    return metrics


def markdown(metrics: dict[str, dict[str, float]], spec: Path, wall: float | None) -> str:
    fb, re, rm2 = metrics.get("compare", {}), metrics.get("regenerate", {}), metrics.get("rm2", {})
    trained = metrics.get("feedback", {})
    lines = ["# Recipe diffusion: IterComp's iteration (measured)", "",
             f"`loom run {spec.relative_to(ROOT)}` on this machine's CPU"
             + (f" ({wall / 60:.1f} min including Ray's start)" if wall else "") + "; each step phase's "
             "`metrics.json`. Samples: DDIM from the same seeded noise before and after, one per held-out prompt.", "",
             "| Category | oracle before | oracle after | reward before | reward after |", "|---|---|---|---|---|"]
    for c in CATEGORIES:
        if f"oracle_{c}_before" in fb:
            lines.append(f"| {c} | {fb[f'oracle_{c}_before']:.3f} | {fb[f'oracle_{c}_after']:.3f} | "
                         f"{fb[f'reward_{c}_before']:.3f} | {fb[f'reward_{c}_after']:.3f} |")
    if trained:
        lines += ["", f"The feedback phase ({trained['steps']} steps on 2 workers): loss of the feedback task "
                  f"{trained['feedback_loss_first']:.5f} (mean of the first half of the steps) -> "
                  f"{trained['feedback_loss_last']:.5f} (second half), of the denoising task "
                  f"{trained['denoise_loss_first']:.4f} -> {trained['denoise_loss_last']:.4f}; median step "
                  f"{trained['step_s']:.3f} s measured, {trained['predicted_s']:.3f} s predicted (from the analytic "
                  "cost model, unprofiled: it prices the reward models' MetaOps, no loss head and no input module)."]
    if re:
        lines += ["", f"Regenerated gallery: the UNet's samples score {re['train_oracle_new']:.3f} (train prompts) and "
                  f"{re['heldout_oracle_new']:.3f} (held-out prompts) under the oracle."]
    if rm2:
        lines += ["", "Reward models' held-out pairwise accuracy, iteration 2 (`reward_update`):", "",
                  "| Category | gallery pairs before | after | pairs with a new image before | after |",
                  "|---|---|---|---|---|"]
        for c in CATEGORIES:
            lines.append(f"| {c} | {rm2[f'gallery_{c}_before']:.3f} | {rm2[f'gallery_{c}_after']:.3f} | "
                         f"{rm2[f'new_{c}_before']:.3f} | {rm2[f'new_{c}_after']:.3f} |")
    missing = [p for p in ("base", "feedback", "compare", "regenerate", "rm2") if p not in metrics]
    if missing:
        lines += ["", f"Not measured (the run did not finish these phases): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.diffusion.itercomp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "itercomp-pipeline-tiny")
    parser.add_argument("--spec", type=Path, default=SPEC)
    parser.add_argument("--no-run", action="store_true", help="collect a finished OUT without running")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    wall = None
    if not args.no_run:
        start = time.time()
        earlier = args.out.is_dir() and any(args.out.iterdir())  # --resume into an OUT with no run is refused
        subprocess.run([sys.executable, "-m", "orchestrator", "run", str(args.spec), "--out", str(args.out)]
                       + (["--resume"] if earlier else []), check=True, cwd=ROOT)
        wall = time.time() - start
    metrics = phase_metrics(args.out)
    report = markdown(metrics, args.spec.resolve(), wall)
    print(report)
    if not args.no_write:
        write_results("diffusion-itercomp", [{"metrics": metrics}], report, {"spec": str(args.spec.resolve()
                                                                                         .relative_to(ROOT))})
        IMAGES.mkdir(parents=True, exist_ok=True)
        for name in ("before", "after"):
            grid = args.out / "compare" / f"samples_{name}.png"
            if grid.is_file():
                shutil.copy(grid, IMAGES / f"itercomp-samples-{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
