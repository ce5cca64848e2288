"""``python -m bench.runtime [--steps N] [--warmup N] [--workload PATH]``: Loom vs sequential, measured.

One run on this machine, side by side: profile the workload's layers (``runtime.profiler``), plan it
with the profiled cost model, then train the same job under Loom's plan and under the sequential
(Megatron-LM/DeepSpeed style) schedule on a local gloo world of worker processes (the workers' logic
is the one Ray actors run). Reports the median measured step time of each after warm-up, their
ratio, and measured vs predicted iteration time. Writes bench/results/runtime.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

from bench.common import REPO_ROOT, environment, write_results
from planner.api import make_cost_model, plan_job, plan_schedule
from planner.costmodel import ProfiledCostModel
from planner.devices import resolve_hardware
from planner.metagraph import build_metagraph
from planner.schedule import Problem
from planner.solver import sequential_schedule
from planner.spec import load_job
from runtime.local_world import run_world
from runtime.profiler import profile_job

log = logging.getLogger("bench.runtime")
DEFAULT_WORKLOAD = REPO_ROOT / "bench" / "runtime" / "hetero.yaml"
SPEEDUP_TARGET = 1.2
PREDICTION_TARGET = 0.15


def measure(job, plan, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = run_world(job, plan, steps + warmup, tmp)
    timed = result.step_seconds[warmup:]
    return {
        "median_step_s": statistics.median(timed),
        "step_s": timed,
        "predicted_s": plan.predicted.iteration_time_s,
        "first_losses": result.losses[0],
        "last_losses": result.losses[-1],
        "num_waves": len(plan.waves),
        "method": plan.solver.method,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.runtime", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default=str(DEFAULT_WORKLOAD))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per schedule")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    job = load_job(args.workload)
    costs = profile_job(job, progress=log.info)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(costs, f)
    cost_model = ProfiledCostModel.load(f.name, resolve_hardware(job.cluster), fallback=make_cost_model(job))
    loom = plan_job(job, cost_model, with_baselines=True, progress=log.info).plan
    problem = Problem.build(build_metagraph(job), cost_model)
    sequential = plan_schedule(job, sequential_schedule(problem), cost_model, method="sequential")
    records = {}
    for name, plan in (("loom", loom), ("sequential", sequential), ("loom (repeat)", loom)):
        log.info("training %s: %d waves", name, len(plan.waves))
        records[name] = measure(job, plan, args.steps, args.warmup)
        log.info("%s: median step %.1f ms (predicted %.1f ms)", name, records[name]["median_step_s"] * 1e3,
                 records[name]["predicted_s"] * 1e3)
    write_results("runtime", [{"schedule": k, **v} for k, v in records.items()], report(records, loom, args),
                  {"workload": args.workload, "steps": args.steps, "warmup": args.warmup, "profile": costs,
                   "environment_note": "2-core machine; one worker process per device, one thread each"})
    return 0


def report(records: dict, loom_plan, args) -> str:
    loom_s = statistics.median([records["loom"]["median_step_s"], records["loom (repeat)"]["median_step_s"]])
    seq_s = records["sequential"]["median_step_s"]
    ratio = seq_s / loom_s
    lines = [
        "# Runtime benchmark: Loom vs sequential, measured on this machine",
        "",
        f"Workload `{Path(args.workload).name}`; {args.warmup} warm-up + {args.steps} timed steps per run; "
        "Loom's plan ran twice (before and after sequential) and the median of the two is used. "
        "Plans use the profiled cost model measured in the same run.",
        "",
        "| schedule | waves | method | measured step (median) | predicted | measured / predicted |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in records.items():
        lines.append(f"| {name} | {r['num_waves']} | {r['method']} | {r['median_step_s'] * 1e3:.1f} ms | "
                     f"{r['predicted_s'] * 1e3:.1f} ms | {r['median_step_s'] / r['predicted_s']:.2f} |")
    loom_err = abs(loom_s / records["loom"]["predicted_s"] - 1)
    lines += [
        "",
        "## Targets",
        "",
        f"- Loom vs sequential, measured: **{ratio:.2f}x** (target >= {SPEEDUP_TARGET}x): "
        f"{'PASS' if ratio >= SPEEDUP_TARGET else 'SHORT'}",
        f"- Loom measured vs predicted: **{loom_err:.0%}** off (target within {PREDICTION_TARGET:.0%}): "
        f"{'PASS' if loom_err <= PREDICTION_TARGET else 'SHORT'}",
        "",
        "Losses (first -> last step): " + "; ".join(
            f"{task} {records['loom']['first_losses'][task]:.3f} -> {records['loom']['last_losses'][task]:.3f}"
            for task in records["loom"]["first_losses"]),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
