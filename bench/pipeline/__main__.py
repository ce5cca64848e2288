"""``python -m bench.pipeline [--rounds N] [--steps N] [--warmup N] [--no-write]``: pipelined micro-batches, planned
and measured (bench.pipeline's docstring). Writes ``bench/results/pipeline.{json,md}``."""

from __future__ import annotations

import argparse
import logging
import sys

from bench.common import write_results
from bench.pipeline import measured_records, planned_records, report

log = logging.getLogger("bench.pipeline")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each measured plan (default 3)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    records = planned_records() + measured_records(args.rounds, args.steps, args.warmup, log.info)
    text = report(records, args.rounds, args.steps)
    if args.no_write:
        print(text)
        return 0
    write_results("pipeline", records, text, {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup})
    return 0


if __name__ == "__main__":
    sys.exit(main())
