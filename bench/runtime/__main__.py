"""``python -m bench.runtime [--steps N] [--warmup N] [--rounds N] [--workload PATH] [--costs PATH] [--no-write]``:
Loom vs sequential, measured.

One run on this machine, side by side: profile the workload (``runtime.profiler``: layers, embeddings,
heads, AdamW and links; or read ``--costs``), plan it with the profiled cost model, then train the same
job under Loom's plan and under the sequential (Megatron-LM/DeepSpeed style) schedule on a local gloo
world of worker processes (the workers' logic is the one Ray actors run), in alternating rounds.
Before every round after the first the layers and AdamW are profiled again and both plans, as placed,
are predicted anew (``planner.api.predict_plan``): this host's speed wanders by 10-20% over tens of
seconds, so a prediction is compared with runs made seconds after its profile. Reports the median
measured step time of each after warm-up, their ratio, measured vs predicted iteration time (per
round, and against the first profile alone), and where each step goes: per wave and per part,
measured on the slowest worker, next to the prediction. Writes bench/results/runtime.{json,md}
(``--no-write``: prints the report only).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

from bench.common import REPO_ROOT, write_results
from orchestrator.metrics import STEP_PARTS, step_breakdown
from planner.api import make_cost_model, plan_job, plan_schedule, predict_plan
from planner.metagraph import build_metagraph
from planner.plan import Plan
from planner.schedule import Problem
from planner.solver import sequential_schedule
from planner.spec import load_job
from runtime.local_world import run_world
from runtime.profiler import as_first_worker, profile_job, profile_layers, profile_processes, time_optimizer

log = logging.getLogger("bench.runtime")
DEFAULT_WORKLOAD = REPO_ROOT / "bench" / "runtime" / "hetero.yaml"
SPEEDUP_TARGET = 1.2
PREDICTION_TARGET = 0.15
PROFILE_REPEATS = 9  # timed runs per profile point: single runs of a layer vary by 10% and more on a shared CPU


def measure(job, plan: Plan, steps: int, warmup: int) -> dict:
    """One run of ``plan``: its timed steps, and the median over them of each wave's and part's time (slowest rank)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = run_world(job, plan, steps + warmup, tmp)
    timed = result.step_seconds[warmup:]
    breakdowns = [step_breakdown(ranks) for ranks in result.timings[warmup:]]
    return {
        "median_step_s": statistics.median(timed),
        "step_s": timed,
        "first_predicted_s": plan.predicted.iteration_time_s,
        "wave_s": [statistics.median(waves[k] for waves, _ in breakdowns) for k in range(len(plan.waves))],
        "part_s": {part: statistics.median(parts[part] for _, parts in breakdowns) for part in STEP_PARTS},
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
    parser.add_argument("--rounds", type=int, default=7, help="alternating runs of each schedule")
    parser.add_argument("--costs", help="a profiled cost file (loom profile) to use instead of profiling here")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    job = load_job(args.workload)
    costs = (json.loads(Path(args.costs).read_text()) if args.costs
             else profile_job(job, repeats=PROFILE_REPEATS, warmup=3, progress=log.info))
    cost_model = make_cost_model(job, costs)  # the job's precision and optimizer sharding, as `loom plan --costs`
    loom = plan_job(job, cost_model, with_baselines=True, progress=log.info).plan
    problem = Problem.build(build_metagraph(job), cost_model)
    plans = {"loom": loom, "sequential": plan_schedule(job, sequential_schedule(problem), cost_model, method="sequential")}
    records = {}
    for run in range(args.rounds):  # alternate the two, so slow phases of a noisy machine hit both
        if run and not args.costs:  # profile again: this round's runs are predicted from costs seconds old
            processes = profile_processes(job)
            points, forward = profile_layers(job, PROFILE_REPEATS, 3, processes)
            with as_first_worker(job, processes):  # as profile_job times it
                optimizer = time_optimizer(job, PROFILE_REPEATS, 3)
            cost_model = make_cost_model(job, {**costs, "points": points, "forward": forward, **optimizer})
        for name, plan in plans.items():
            predicted = predict_plan(job, plan, cost_model)
            log.info("training %s (round %d): %d waves", name, run + 1, len(plan.waves))
            record = measure(job, plan, args.steps, args.warmup)
            record.update(predicted_s=predicted.iteration_time_s, predicted_wave_s=list(predicted.wave_durations),
                          predicted_part_s=predicted_parts(predicted))
            records.setdefault(name, []).append(record)
            log.info("%s: median step %.1f ms (predicted %.1f ms)", name, record["median_step_s"] * 1e3,
                     record["predicted_s"] * 1e3)
    text = report(records, args)
    if args.no_write:
        print(text)
        return 0
    write_results("runtime", [{"schedule": k, "round": i, **r} for k, runs in records.items() for i, r in enumerate(runs)],
                  text,
                  {"workload": args.workload, "steps": args.steps, "warmup": args.warmup, "profile": costs,
                   "environment_note": "2-core machine; one worker process per device, one thread each"})
    return 0


def predicted_parts(sim) -> dict[str, float]:
    """A simulation's parts outside the waves' layers, named as :data:`orchestrator.metrics.STEP_PARTS`."""
    return {"loss": sim.loss_s, "transfer": sim.transfer_s, "sync": sim.sync_s,
            "optimizer": sim.optimizer_s + sim.gather_s}


def report(records: dict[str, list[dict]], args) -> str:
    def med(name: str, field: str) -> float:
        return statistics.median(r[field] for r in records[name])

    median = {name: med(name, "median_step_s") for name in records}
    ratio = median["sequential"] / median["loom"]
    per_round = {name: statistics.median(r["median_step_s"] / r["predicted_s"] for r in runs)
                 for name, runs in records.items()}
    lines = [
        "# Runtime benchmark: Loom vs sequential, measured on this machine",
        "",
        f"Workload `{Path(args.workload).name}`; {args.rounds} alternating runs of each schedule, each "
        f"{args.warmup} warm-up + {args.steps} timed steps on a gloo world of worker processes (one per device, "
        "one thread each); a run's value is its median step, the table gives the median over runs. Plans use "
        "the profiled cost model (layers, embeddings, heads, AdamW, links) measured in the same invocation; the "
        "layers and AdamW are profiled again before every round, and each run is compared with the prediction of "
        "its plan (as placed) from the profile taken just before it (`predicted`, median over rounds); "
        "`first profile` is the plan's own prediction.",
        "",
        "| schedule | waves | method | measured step (median of runs) | runs | predicted | measured / predicted "
        "(median of runs) | first profile | measured / first |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in records.items():
        first = runs[0]["first_predicted_s"]
        lines.append(f"| {name} | {runs[0]['num_waves']} | {runs[0]['method']} | {median[name] * 1e3:.1f} ms | "
                     + ", ".join(f"{r['median_step_s'] * 1e3:.0f}" for r in runs)
                     + f" ms | {med(name, 'predicted_s') * 1e3:.1f} ms | {per_round[name]:.2f} | {first * 1e3:.1f} ms | "
                     f"{median[name] / first:.2f} |")
    loom_err = abs(per_round["loom"] - 1)
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
    for name, runs in records.items():
        lines += ["", *breakdown_table(name, runs)]
    return "\n".join(lines) + "\n"


def breakdown_table(name: str, runs: list[dict]) -> list[str]:
    """Where the step goes: each wave's compute and each part, measured (slowest worker; median over steps, then
    over runs) vs predicted (median over runs). Measured parts are maxima over workers, so they need not add up to
    the step: a worker that waits for its peer at a boundary counts the wait as transfer."""
    rows = [(f"wave {k} compute", statistics.median(r["wave_s"][k] for r in runs),
             statistics.median(r["predicted_wave_s"][k] for r in runs)) for k in range(len(runs[0]["wave_s"]))]
    rows += [(part, statistics.median(r["part_s"][part] for r in runs),
              statistics.median(r["predicted_part_s"][part] for r in runs)) for part in STEP_PARTS]
    lines = [f"## Where {name}'s step goes", "", "| part | measured (slowest worker) | predicted |", "|---|---|---|"]
    lines += [f"| {label} | {got * 1e3:.1f} ms | {value * 1e3:.1f} ms |" for label, got, value in rows]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
