"""``python -m bench.alignment.plans [--no-write]``: `loom plan` of the recipe's realistic GRPO iterations.

Plans recipes/alignment/grpo-qwen2-7b-16xH100.yaml and grpo-llama3-70b-64xH100.yaml as bench.rl plans its cells (one
analytic H100 cost model, one simulator): Loom's plan against verl-style ``colocated`` (every role on all devices in
turn) and OpenRLHF-style ``split`` (the best fixed pool per role), predicted iteration time and peak memory per device.
bench.rl.run_cell does the planning (its cells are bench/rl/<name>.yaml; a recipe spec is named by its path from
there). Writes bench/results/alignment-plans.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import re

from bench.common import REPO_ROOT, write_results
from bench.rl.__main__ import geomean
from bench.rl.__main__ import markdown as rl_markdown
from bench.rl.__main__ import run_cell

SPECS = ("recipes/alignment/grpo-qwen2-7b-16xH100.yaml", "recipes/alignment/grpo-llama3-70b-64xH100.yaml")


def plan_spec(spec: str, runnable: bool = False) -> dict:
    """bench.rl's record of one recipe spec (path from the repository root); with ``runnable``, every placement
    planned with the generation's layouts the runtime runs (planner.generation.as_run; bench.rl.run_cell)."""
    name = os.path.relpath(REPO_ROOT / spec, REPO_ROOT / "bench" / "rl").removesuffix(".yaml")
    return run_cell(name, runnable=runnable) | {"cell": spec}


def markdown(records: list[dict]) -> str:
    """bench.rl's tables and geometric mean of these records, under this bench's own heading."""
    body = rl_markdown(records)
    body = body[body.index("| cell |"):]
    start = body.index("Geometric mean speed-up over the better fitting baseline (")
    end = body.index("\n", start)
    # bench.rl's sentence counts its own 4 cells and a lag-1 mode these on-policy plans do not have: say what was run
    records = [r for r in records if not r.get("runnable")]  # the runnable ones have their own section and mean
    speedups = [r["speedup"] for r in records]
    own = (f"Geometric mean speed-up over the better fitting baseline, on-policy (lag 0), {len(records)} cells: "
           f"**{geomean(speedups):.2f}x** (" + ", ".join(f"{r['cell']} {r['speedup']:.2f}x" for r in records) + ")."
           if all(speedups) else "Geometric mean speed-up: n/a (a cell has no fitting baseline).")
    rest = re.sub(r"; one step off-policy (\*\*[0-9.]+x\*\*|n/a)", "", body[end:])  # no lag-1 plans here
    return HEADER + body[:start] + own + rest


HEADER = ("# Alignment recipe: `loom plan` of the GRPO iterations\n\n"
          "Predicted iteration time and peak memory per device (analytic H100 cost model, planner.simulator, weight "
          "hand-offs included) of Loom's plan, the colocated placement (verl-style: every role on all devices, in "
          "turn) and the best fixed split (OpenRLHF-style: a pool per role), for recipes/alignment/grpo-*.yaml "
          "(bench.rl's tables); (!) marks a placement that does not fit in device memory. The speed-up is over the "
          "better fitting baseline.\n\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment.plans", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    records = [plan_spec(spec, runnable) for runnable in (False, True) for spec in SPECS]
    report = markdown(records)
    print(report)
    if not args.no_write:
        write_results("alignment-plans", records, report, {"specs": list(SPECS), "cost_model": "analytic"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
