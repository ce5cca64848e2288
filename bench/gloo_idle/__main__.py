"""``python -m bench.gloo_idle [--repeats N] [--no-write]``: what a gloo collective costs after a stretch without one
(bench.gloo_idle's docstring). Writes ``bench/results/gloo-idle.{json,md}``."""

from __future__ import annotations

import argparse
import logging
import sys

from bench.common import write_results
from bench.gloo_idle import BYTES, measure, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gloo_idle", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25, help="timed samples per case (default 25)")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    records = measure(args.repeats)
    text = report(records, args.repeats)
    if args.no_write:
        print(text)
        return 0
    write_results("gloo-idle", records, text, {"repeats": args.repeats, "bytes": BYTES})
    return 0


if __name__ == "__main__":
    sys.exit(main())
