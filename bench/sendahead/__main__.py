"""``python -m bench.sendahead [--only NAME ...] [--rounds R] [--steps N]``: the driver sending each step ahead, on and off.

For each job (default: the CPU examples with the shortest steps, where Ray's round trip weighs most), ``loom profile``
once, one plan from that profile, then ``R`` rounds of two runs of ``N`` steps each on one embedded Ray cluster,
alternating: ``RunOptions(send_ahead=False)`` (every step sent once the last one's results are back, the driver
before this change) and ``send_ahead=True`` (orchestrator.run: step k+1 sent with step k), one step per call in both
(``call_seconds=0``: the driver's several steps per call are measured by bench.examples). Per run: the median step
after the first ``WARMUP_STEPS`` and the median period (the gap between two steps' ends at the driver: the two arms
measure their steps from different points, the period is measured alike in both), the driver's round trip (median of the
step minus its slowest worker's ``train_step``; with send-ahead that is what Ray adds between two steps, and can be
negative), the skew of the ranks' step starts and the slowest rank's gradient sync and loss all-reduce from the
run's ``trace.json`` (waits for a peer included), and the machine's 1-minute load. Ratios compare the two arms of
one round, so a busy machine slows both. Writes ``bench/results/sendahead.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import environment, write_results
from bench.examples.__main__ import JOBS, WARMUP_STEPS, loom, measured_parts_of

log = logging.getLogger("bench.sendahead")

DEFAULT_JOBS = ("chat-sft-cpu", "caption-cpu")


class Clock:
    """A reporter that prints nothing and notes when the driver finished each step (``times``): the gaps between
    them are the run's true period, the driver's own work between steps included, whether or not a step was sent
    ahead (a record's ``step_seconds`` starts at the sending, or at the previous step's results when sent ahead, so
    it leaves the driver's bookkeeping out in one arm and not in the other)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def start(self, first_step: int, last_step: int) -> None: ...

    def step(self, record) -> None:
        self.times.append(time.perf_counter())

    def close(self) -> None: ...


def period_s(times: list[float], warmup: int) -> float:
    """The median gap between consecutive step ends after the first ``warmup`` steps."""
    gaps = [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]
    return statistics.median(gaps)


def start_skew_s(trace: Path) -> float:
    """Mean over the trace's steps of the spread of the ranks' first span starts (seconds)."""
    starts: dict[int, dict[int, float]] = {}
    for e in json.loads(trace.read_text())["traceEvents"]:
        if e.get("ph") == "X":
            by_rank = starts.setdefault(e["args"]["step"], {})
            by_rank[e["tid"]] = min(by_rank.get(e["tid"], float("inf")), e["ts"] / 1e6)
    spreads = [max(r.values()) - min(r.values()) for r in starts.values() if len(r) > 1]
    return statistics.mean(spreads) if spreads else 0.0


def one_run(job, plan, ahead: bool, steps: int, out: Path) -> dict:
    from orchestrator.run import RunOptions, run_job

    clock = Clock()
    # one step per call in both arms (call_seconds 0): the reporter's clock times each step's end at the driver
    result = run_job(job, plan, options=RunOptions(steps=steps, out_dir=out, checkpoint_every=0, send_ahead=ahead,
                                                   call_seconds=0), reporter=clock)
    timed = result.records[WARMUP_STEPS:] or result.records
    parts = measured_parts_of(out / "trace.json")
    return {"send_ahead": ahead, "step_s": statistics.median(r.step_seconds for r in timed),
            "period_s": period_s(clock.times, WARMUP_STEPS),
            "round_trip_s": statistics.median(r.step_seconds - max(r.worker_seconds) for r in timed),
            "start_skew_s": start_skew_s(out / "trace.json"), "sync_s": parts.get("sync", 0.0),
            "reduce_s": parts.get("step all-reduce", 0.0), "load_average": os.getloadavg()[0],
            "losses": [r.loss for r in result.records]}


def measure(name: str, rounds: int, steps: int, work: Path) -> dict:
    from planner.api import make_cost_model, plan_job
    from planner.generation import as_run
    from orchestrator.recipes import load_job, load_recipe

    costs = work / f"{name}.costs.json"
    loom("profile", str(JOBS[name]), "--output", str(costs))
    job = load_job(JOBS[name])
    load_recipe(job)
    cost_model = make_cost_model(job, costs)
    with as_run(cost_model):
        plan = plan_job(job, cost_model, with_baselines=False).plan
    runs = []
    for i in range(rounds):
        for ahead in (False, True):
            runs.append(one_run(job, plan, ahead, steps, work / f"{name}-{i}-{ahead}") | {"round": i})
            log.info("%s round %d send_ahead=%s: %.1f ms (load %.1f)", name, i, ahead, runs[-1]["step_s"] * 1e3,
                     runs[-1]["load_average"])
    same = all(r["losses"] == runs[0]["losses"] for r in runs)  # the schedule changes, the arithmetic must not
    return {"job": name, "predicted_step_s": plan.predicted.iteration_time_s, "runs": runs, "same_losses": same}


def median_of(runs: list[dict], key: str, ahead: bool) -> float:
    return statistics.median(r[key] for r in runs if r["send_ahead"] == ahead)


def report(records: list[dict], note: str) -> str:
    lines = ["# The driver sending each step ahead: off vs on, alternating", "",
             "Per job one profile and one plan, then rounds of two runs (send-ahead off, on) on one embedded Ray "
             f"cluster. Values: medians over the rounds of each run's median after {WARMUP_STEPS} steps of: the "
             "period (the gap between two steps' ends at the driver, its own work between steps included: what a "
             "run's wall time is made of), the recorded step (driver wall time from the sending, or from the "
             "previous step's results when sent ahead, so it leaves the driver's work between steps out when off), "
             "driver round trip (step minus slowest worker's call), rank start skew, slowest rank's gradient sync "
             "and loss all-reduce (from trace.json, waits included). Ratio: per round on / off of the period, then "
             "the median.", *([note] if note else []), "",
             "| job | predicted | period off | period on | on / off | step off / on | measured / predicted (on) | "
             "round trip off / on | start skew off / on | sync off / on | loss all-reduce off / on | same losses | "
             "load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        runs, ms = r["runs"], lambda v: f"{v * 1e3:.1f} ms"
        ratio = statistics.median(b["period_s"] / a["period_s"] for a, b in zip(runs[::2], runs[1::2]))
        pair = lambda key: f"{median_of(runs, key, False) * 1e3:.2f} / {median_of(runs, key, True) * 1e3:.2f} ms"
        loads = [x["load_average"] for x in runs]
        lines.append(f"| {r['job']} | {ms(r['predicted_step_s'])} | {ms(median_of(runs, 'period_s', False))} | "
                     f"{ms(median_of(runs, 'period_s', True))} | {ratio:.2f} | {pair('step_s')} | "
                     f"{median_of(runs, 'period_s', True) / r['predicted_step_s']:.2f} | {pair('round_trip_s')} | "
                     f"{pair('start_skew_s')} | {pair('sync_s')} | {pair('reduce_s')} | {r['same_losses']} | "
                     f"{min(loads):.1f}-{max(loads):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sendahead", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(JOBS), help="one job; repeat for several")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (off, on) per job (default 3)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    parser.add_argument("--note", default="", help="a line for the report (e.g. what else loaded the machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("orchestrator").setLevel(logging.WARNING)
    from orchestrator.actors import EmbeddedRay

    records = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRay(2):
        for name in args.only or DEFAULT_JOBS:
            records.append(measure(name, args.rounds, args.steps, Path(tmp)))
    for r in records:
        for run in r["runs"]:
            run.pop("losses")
    config = {"rounds": args.rounds, "steps": args.steps, "warmup_steps": WARMUP_STEPS, "note": args.note}
    write_results("sendahead", records, report(records, args.note), config, env=environment())
    return 0


if __name__ == "__main__":
    sys.exit(main())
