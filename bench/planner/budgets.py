"""``python -m bench.planner.budgets [--settings default,split1500,...] [--only CELL ...]``: the grid's planning time
against plan quality as the search's work budgets (planner/api.py) change.

Each setting replaces some of planner.api's budget constants for the whole run (:data:`SETTINGS`); every grid cell
is planned once with baselines (``plan_job``, the job's own ``training.shard_optimizer``), timed as the planning
thread's CPU time. Quality does not depend on the clock (the budgets count work units, and a grid cell finishes well
inside its time limit), so it is exact; the times are one run each. Writes bench/results/planner-budgets.{json,md}:
per setting the median CPU seconds and the geometric mean and minimum of Spindle's predicted iteration over
Loom's, and per cell each setting's prediction. Issue 13's targets: grid planning < 3 s median, >= 1.05x over
Spindle's wavefront (never slower).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from contextlib import contextmanager

import planner.api as api
from bench.common import write_results
from bench.planner.cells import all_cells, load_cell_job, select_cells
from planner.api import plan_job

SETTINGS: dict[str, dict[str, float]] = {  # name -> planner.api constants it replaces
    "default": {},
    "split3000": {"SPLIT_BUDGET": 3000, "LEAST_SPLIT_BUDGET": 1000},
    "split1500": {"SPLIT_BUDGET": 1500, "LEAST_SPLIT_BUDGET": 500},
    "split3000-place100k": {"SPLIT_BUDGET": 3000, "LEAST_SPLIT_BUDGET": 1000, "PLACE_BUDGET": 100_000},
    "split3000-refine2000": {"SPLIT_BUDGET": 3000, "LEAST_SPLIT_BUDGET": 1000, "REFINE_BUDGET": 2000},
    "split3000-nolate": {"SPLIT_BUDGET": 3000, "LEAST_SPLIT_BUDGET": 1000, "LATE_SHARE": 0.0},
    "split1500-compute3000": {"SPLIT_BUDGET": 1500, "LEAST_SPLIT_BUDGET": 500, "COMPUTE_BUDGET": 3000},
    "split1500-compute1500": {"SPLIT_BUDGET": 1500, "LEAST_SPLIT_BUDGET": 500, "COMPUTE_BUDGET": 1500},
}


@contextmanager
def budgets(changes: dict[str, float]):
    """planner.api's constants ``changes`` names set to their values inside the block, restored after it."""
    missing = [name for name in changes if not hasattr(api, name)]
    if missing:
        raise KeyError(f"planner.api has no constant {', '.join(missing)}")
    saved = {name: getattr(api, name) for name in changes}
    for name, value in changes.items():
        setattr(api, name, type(saved[name])(value))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(api, name, value)


def measure(setting: str, cells) -> list[dict]:
    """One record per cell: CPU seconds of ``plan_job`` with baselines, Loom's and Spindle's predicted iteration."""
    records = []
    with budgets(SETTINGS[setting]):
        for cell in cells:
            job = load_cell_job(cell)
            start = time.thread_time()
            plan = plan_job(job, with_baselines=True, progress=lambda _msg: None).plan
            records.append({"setting": setting, "cell": cell.name, "cpu_s": time.thread_time() - start,
                            "loom_s": plan.predicted.iteration_time_s, "spindle_s": plan.baselines.get("spindle")})
    return records


def summary(records: list[dict]) -> dict:
    """Median CPU seconds, geometric mean and minimum of Spindle / Loom over ``records`` (one setting's)."""
    ratios = [r["spindle_s"] / r["loom_s"] for r in records if r["spindle_s"]]
    return {"median_cpu_s": statistics.median(r["cpu_s"] for r in records),
            "geomean_vs_spindle": math.exp(statistics.mean(math.log(x) for x in ratios)), "min_vs_spindle": min(ratios)}


def render(records: list[dict], settings: list[str]) -> str:
    lines = ["# Planner budgets: grid planning time against plan quality", "",
             __doc__.split("\n\n", 1)[1].strip().replace("``", "`").replace(":data:", ""), "",
             "| setting | replaces | median CPU s | geomean vs Spindle | min vs Spindle |", "|---|---|---|---|---|"]
    for name in settings:
        s = summary([r for r in records if r["setting"] == name])
        changes = ", ".join(f"{k} {v:g}" for k, v in SETTINGS[name].items()) or "-"
        lines.append(f"| {name} | {changes} | {s['median_cpu_s']:.2f} | {s['geomean_vs_spindle']:.4f} | "
                     f"{s['min_vs_spindle']:.4f} |")
    cells = list(dict.fromkeys(r["cell"] for r in records))
    lines += ["", "Loom's predicted iteration (ms) per cell and setting:", "",
              "| cell | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for cell in cells:
        by = {r["setting"]: r for r in records if r["cell"] == cell}
        lines.append(f"| {cell} | " + " | ".join(f"{by[s]['loom_s'] * 1e3:.1f}" for s in settings) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.planner.budgets", description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    parser.add_argument("--only", action="append", default=[], metavar="CELL", help="cells (default: the grid)")
    parser.add_argument("--name", default="planner-budgets", help="results file stem under bench/results/")
    args = parser.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        print(f"error: --settings: {', '.join(unknown) or 'none given'}; expected names of {', '.join(SETTINGS)}",
              file=sys.stderr)
        return 2
    cells = select_cells(all_cells(), args.only or ["grid"])
    records = [r for name in settings for r in measure(name, cells)]
    write_results(args.name, records, render(records, settings), {"settings": {s: SETTINGS[s] for s in settings},
                                                                  "cells": [c.name for c in cells]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
