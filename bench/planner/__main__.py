"""``python -m bench.planner [--quick] [--section grid|sweep|scale|recipe] [--only CELL ...] [--repeats 3]``.

The full run (no --quick, --section or --only) writes bench/results/planner.{json,md}; ``--section S`` writes
planner-S.*, another partial run planner-partial.*, a quick one planner-quick.*, so a partial run never overwrites
the full results. Scale cells are planned in a fresh process each (peak RSS per cell), baselines included in the
planning time, ``--scale-repeats`` times (default 1: the 10,240-device cell plans for up to a minute).
``--merge grid sweep scale recipe`` writes planner.{json,md} from the sections' results (run in parallel processes);
``--note TEXT`` adds a line under the report's title (e.g. the machine's load while planning times were measured).
``--shard-optimizer auto`` plans every cell with that ``training.shard_optimizer`` (results: <name>-zero-auto.*).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace

from bench.common import RESULTS_DIR, write_results
from bench.planner.cells import all_cells, quick_cells, select_cells
from bench.planner.measure import measure_cell, measure_cell_isolated
from bench.planner.report import evaluate_targets, render_report

log = logging.getLogger("bench.planner")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.planner", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 timed run, no warm-up; without --only, only the smallest cell of each grid workload")
    parser.add_argument("--only", action="append", default=[], metavar="CELL",
                        help="cell (clip-10@32), workload (clip-10) or group (grid, scale); repeat or comma-separate")
    parser.add_argument("--section", action="append", default=[], choices=("grid", "sweep", "scale", "recipe"),
                        help="run one group of cells (repeatable); results go to planner-<section>.*")
    parser.add_argument("--repeats", type=int, default=3, help="timed planning runs per cell (median reported)")
    parser.add_argument("--scale-repeats", type=int, default=1, help="timed plannings per scale cell (no warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed planning runs before the timed ones")
    parser.add_argument("--name", default=None, help="results file stem under bench/results/")
    parser.add_argument("--shard-optimizer", choices=("true", "false", "auto"), default=None,
                        help="training.shard_optimizer for every cell's job (default: each workload's own)")
    parser.add_argument("--note", default=None, help="a line under the report's title (e.g. the machine's load)")
    parser.add_argument("--merge", nargs="+", default=None, choices=("grid", "sweep", "scale", "recipe"),
                        help="write planner.{json,md} from these sections' planner-<section>.json, measuring nothing")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the planner's own log messages")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:
        logging.getLogger("planner").setLevel(logging.WARNING)
    if args.merge:
        return merge_sections(args.merge, args.name or "planner", args.note)
    repeats, warmup = (1, 0) if args.quick else (args.repeats, args.warmup)
    only = [s for item in args.only + args.section for s in item.split(",")]
    if args.repeats < 1 or args.scale_repeats < 1 or args.warmup < 0:
        print("error: --repeats and --scale-repeats must be at least 1 and --warmup at least 0", file=sys.stderr)
        return 2
    try:
        cells = select_cells(all_cells(), only) if only else (quick_cells() if args.quick else all_cells())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.shard_optimizer is not None:
        shard = {"true": True, "false": False}.get(args.shard_optimizer, args.shard_optimizer)
        cells = [replace(c, shard_optimizer=shard) for c in cells]
    section = "planner-" + "-".join(args.section) if args.section and not args.only else None
    name = args.name or ("planner-quick" if args.quick else section or ("planner-partial" if only else "planner"))
    if args.shard_optimizer is not None and not args.name:  # never the results of the workloads' own settings
        name += f"-zero-{args.shard_optimizer}"
    config = {"cells": [c.name for c in cells], "repeats": repeats, "warmup": warmup, "quick": args.quick,
              "scale_repeats": 1 if args.quick else args.scale_repeats, "cost_model": "analytic", "note": args.note,
              "shard_optimizer": args.shard_optimizer}
    records = []
    for i, cell in enumerate(cells, 1):
        log.info("[%d/%d] %s ...", i, len(cells), cell.name)
        if cell.group == "scale":
            record = measure_cell_isolated(cell, repeats=1 if args.quick else args.scale_repeats)
        else:
            record = measure_cell(cell, repeats=repeats, warmup=warmup)
        records.append(record)
        if record["error"]:
            log.info("[%d/%d] %s FAILED: %s", i, len(cells), cell.name, record["error"])
        else:
            log.info("[%d/%d] %s: Loom %.4g s, Spindle %.4g s, per-level bound %.4g s, plan %.2f s", i, len(cells),
                     cell.name, record["iteration_s"]["loom"], record["iteration_s"].get("spindle", float("nan")),
                     record["bounds"]["per_level_s"], record["planning_time_median_s"])
    json_path, md_path = write_results(name, records, render_report(records, config), config)
    for verdict in evaluate_targets(records):
        print(f"{verdict.verdict:>12}  {verdict.target}: {verdict.measured}")
    print(f"results: {md_path} and {json_path}")
    return 0


def merge_sections(sections: list[str], name: str, note: str | None) -> int:
    """planner.{json,md} from the records of ``planner-<section>.json`` (each written by ``--section``), in the order
    of :func:`all_cells`; the config of the first, its cells the union and ``note`` the given one (or the first's)."""
    bodies = []
    for section in sections:
        path = RESULTS_DIR / f"planner-{section}.json"
        if not path.exists():
            print(f"error: {path} does not exist: run `python -m bench.planner --section {section}` first",
                  file=sys.stderr)
            return 2
        bodies.append(json.loads(path.read_text()))
    order = {c.name: i for i, c in enumerate(all_cells())}
    records = sorted((r for b in bodies for r in b["records"]), key=lambda r: order.get(r["cell"], len(order)))
    config = {**bodies[0]["config"], "cells": [r["cell"] for r in records], "sections": sections,
              "note": note or bodies[0]["config"].get("note")}
    json_path, md_path = write_results(name, records, render_report(records, config), config)
    for verdict in evaluate_targets(records):
        print(f"{verdict.verdict:>12}  {verdict.target}: {verdict.measured}")
    print(f"results: {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
