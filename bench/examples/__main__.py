"""``python -m bench.examples [--only NAME ...] [--steps N]``: every CPU example, profiled then trained with its profile.

For each job (``examples/*-cpu.yaml`` and the medical recipe's ``unimed-tiny.yaml``) this runs what a user runs:
``loom profile JOB --output COSTS`` and ``loom run JOB --costs COSTS --steps N``, then reads the run's
``metrics.jsonl`` and ``plan.json``. A run's measured step is the median of its steps after the first
``WARMUP_STEPS`` (the driver's wall time per step), compared with the plan's predicted iteration time. Target
(issue 10): every example within 20% of its prediction. Writes ``bench/results/examples.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO_ROOT, environment, write_results

log = logging.getLogger("bench.examples")

JOBS = {path.stem: path for path in sorted((REPO_ROOT / "examples").glob("*-cpu.yaml"))}
JOBS["unimed-tiny"] = REPO_ROOT / "recipes" / "medical" / "unimed-tiny.yaml"
WARMUP_STEPS = 3
TARGET = 0.20  # measured within 20% of predicted


def loom(*args: str) -> subprocess.CompletedProcess:
    """Run the ``loom`` command of this environment; a failure ends the benchmark with its stderr."""
    cmd = [str(Path(sys.executable).with_name("loom")), *args]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise SystemExit(f"bench.examples: {' '.join(args[:2])} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return result


def measure(name: str, path: Path, steps: int, work: Path) -> dict:
    """Profile ``path``, train it ``steps`` steps with that profile and compare measured with predicted."""
    costs, out = work / f"{name}.costs.json", work / name
    started = time.perf_counter()
    loom("profile", str(path), "--output", str(costs), "--repeats", "3")
    profiled = time.perf_counter() - started
    loom("run", str(path), "--costs", str(costs), "--out", str(out), "--steps", str(steps))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    plan = json.loads((out / "plan.json").read_text())
    timed = [r["step_seconds"] for r in records[WARMUP_STEPS:]] or [r["step_seconds"] for r in records]
    measured, predicted = statistics.median(timed), plan["predicted"]["iteration_time_s"]
    return {"job": name, "path": str(path.relative_to(REPO_ROOT)), "workers": len(plan["peak_memory_bytes"]),
            "waves": len(plan["waves"]), "method": plan["solver"]["method"], "steps": len(records),
            "measured_step_s": measured, "predicted_step_s": predicted, "ratio": measured / predicted,
            "step_seconds": [r["step_seconds"] for r in records], "profile_s": profiled,
            "load_average": os.getloadavg()[0]}


def report(records: list[dict]) -> str:
    lines = ["# CPU examples: measured step vs the plan's prediction (profiled costs)", "",
             f"Each job: `loom profile JOB` then `loom run JOB --costs COSTS`; measured = median step after the first "
             f"{WARMUP_STEPS} (driver wall time), predicted = the plan's iteration time. Target: within "
             f"{TARGET:.0%} (issue 10).", "",
             "| job | workers | waves | method | measured step | predicted | measured / predicted | verdict | "
             "load (1 min) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        verdict = "PASS" if abs(r["ratio"] - 1) <= TARGET else "SHORT"
        lines.append(f"| {r['job']} | {r['workers']} | {r['waves']} | {r['method']} | "
                     f"{r['measured_step_s'] * 1e3:.1f} ms | {r['predicted_step_s'] * 1e3:.1f} ms | {r['ratio']:.2f} | "
                     f"{verdict} | {r['load_average']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.examples", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(JOBS), help="one job; repeat for several")
    parser.add_argument("--steps", type=int, default=30, help="training steps per job (default 30)")
    parser.add_argument("--name", default="examples", help="results file stem under bench/results/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or sorted(JOBS):
            log.info("%s: profiling and training %d steps", name, args.steps)
            records.append(measure(name, JOBS[name], args.steps, Path(tmp)))
            log.info("%s: measured %.1f ms vs predicted %.1f ms (%.2fx)", name, records[-1]["measured_step_s"] * 1e3,
                     records[-1]["predicted_step_s"] * 1e3, records[-1]["ratio"])
    write_results(args.name, records, report(records), {"steps": args.steps, "warmup_steps": WARMUP_STEPS,
                                                        "target": TARGET}, env=environment())
    return 0


if __name__ == "__main__":
    sys.exit(main())
