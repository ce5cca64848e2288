"""``python -m bench.pipeline.rss {in_order,gpipe,1f1b} [--steps N]``: the largest resident memory of the workers that
train bench.pipeline's two hand-made stages of ``chain-cpu.yaml`` (8 micro-batches) for ``--steps`` steps, walked in
order, pipelined (GPipe's fill and drain) or pipelined 1F1B, beside the plan's predicted peak. One walk a process:
the largest RSS of a process's children is what ``resource.getrusage(RUSAGE_CHILDREN)`` keeps, over all of them.
Prints one JSON object (bench.pipeline runs it for each walk)."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile

WALKS = ("in_order", "gpipe", "1f1b")


def main(argv: list[str] | None = None) -> int:
    from bench.pipeline import MEASURED, stage_plan, with_order
    from planner.api import make_cost_model
    from planner.spec import load_job
    from runtime.local_world import run_world

    parser = argparse.ArgumentParser(prog="python -m bench.pipeline.rss", description=__doc__.split("\n\n")[0])
    parser.add_argument("walk", choices=WALKS)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    job = with_order(load_job(MEASURED), args.walk != "in_order")
    model = make_cost_model(job).with_one_f_one_b(args.walk == "1f1b")
    plan = stage_plan(job, model)
    with tempfile.TemporaryDirectory() as tmp:
        run_world(job, plan, args.steps, tmp)
    print(json.dumps({"walk": args.walk, "max_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "predicted_peak_mib": max(plan.peak_memory_bytes) / 2**20}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
