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

from bench.common import REPO_ROOT, write_results
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
    parser.add_argument("--rounds", type=int, default=5, help="alternating runs of each schedule")
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
    for run in range(args.rounds):  # alternate the two, so slow phases of a noisy machine hit both
        for name, plan in (("loom", loom), ("sequential", sequential)):
            log.info("training %s (round %d): %d waves", name, run + 1, len(plan.waves))
            record = measure(job, plan, args.steps, args.warmup)
            records.setdefault(name, []).append(record)
            log.info("%s: median step %.1f ms (predicted %.1f ms)", name, record["median_step_s"] * 1e3,
                     record["predicted_s"] * 1e3)
    write_results("runtime", [{"schedule": k, "round": i, **r} for k, runs in records.items() for i, r in enumerate(runs)],
                  report(records, args),
                  {"workload": args.workload, "steps": args.steps, "warmup": args.warmup, "profile": costs,
                   "environment_note": "2-core machine; one worker process per device, one thread each"})
    return 0


def report(records: dict[str, list[dict]], args) -> str:
    median = {name: statistics.median(r["median_step_s"] for r in runs) for name, runs in records.items()}
    predicted = {name: runs[0]["predicted_s"] for name, runs in records.items()}
    ratio = median["sequential"] / median["loom"]
    lines = [
        "# Runtime benchmark: Loom vs sequential, measured on this machine",
        "",
        f"Workload `{Path(args.workload).name}`; {args.rounds} alternating runs of each schedule, each "
        f"{args.warmup} warm-up + {args.steps} timed steps on a gloo world of worker processes (one per device, "
        "one thread each); a run's value is its median step, the table gives the median over runs. Plans use "
        "the profiled cost model measured in the same invocation.",
        "",
        "| schedule | waves | method | measured step (median of runs) | runs | predicted | measured / predicted |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in records.items():
        lines.append(f"| {name} | {runs[0]['num_waves']} | {runs[0]['method']} | {median[name] * 1e3:.1f} ms | "
                     + ", ".join(f"{r['median_step_s'] * 1e3:.0f}" for r in runs)
                     + f" ms | {predicted[name] * 1e3:.1f} ms | {median[name] / predicted[name]:.2f} |")
    loom_err = abs(median["loom"] / predicted["loom"] - 1)
    first, last = records["loom"][0]["first_losses"], records["loom"][0]["last_losses"]
    lines += [
        "",
        "## Targets",
        "",
        f"- Loom vs sequential, measured: **{ratio:.2f}x** (target >= {SPEEDUP_TARGET}x): "
        f"{'PASS' if ratio >= SPEEDUP_TARGET else 'SHORT'}",
        f"- Loom measured vs predicted: **{loom_err:.0%}** off (target within {PREDICTION_TARGET:.0%}): "
        f"{'PASS' if loom_err <= PREDICTION_TARGET else 'SHORT'}",
        "",
        "Losses of Loom's first run (first -> last step): "
        + "; ".join(f"{task} {first[task]:.3f} -> {last[task]:.3f}" for task in first),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
