"""`loom profile`'s last stage: the profile checked against the runtime itself, and corrected by what it finds.

The layers, embeddings, heads and optimizer are timed apart, each repeated from cold data caches. A run computes them
once a step, between other work, in its workers' processes: on this 2-core host the run's steps took 1.05-1.25x what
the profile predicted (bench/results/examples.md, session 27), every part a little slower (a task's data drawn at the
start of a step 1.4-2.3x its profiled time, layers' forwards 1.0-1.2x, the loss stage and optimizer step 1.3-1.8x),
and a small job's layers faster (caption-cpu's waves at 0.7x: its few MiB stay cached, which a profile that evicts 64
MiB before each sample does not see).

So for a CPU job on one node (`loom profile`; ``--no-calibrate`` skips it) the profile ends with a few seconds of
training steps of the job's *sequential* plan (planner.baselines: each task in turn, every MetaOp on all the workers)
planned with the fresh profile, through :func:`orchestrator.run.run_job`, as `loom run` trains
(:func:`calibration_steps`: about :data:`CALIBRATION_SECONDS` of them). Over its steps after the first quarter, three
ratios of measured to predicted: ``compute`` (the waves: every layer, embedding and data draw), ``loss`` (the loss
stage) and ``optimizer`` (the step and ZeRO-1's gathers). The cost file keeps them as ``calibration`` and
planner.costmodel.ProfiledCostModel multiplies its times by them. The plan a job then runs is usually another one, so
its prediction is still a prediction (when the planner picks the sequential plan itself, as quickstart-cpu's once in
session 28, the calibration was measured on the plan it predicts).
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from orchestrator.metrics import StepRecord
from planner.costfile import CALIBRATION_BOUNDS
from planner.plan import Plan
from planner.spec import JobSpec

log = logging.getLogger(__name__)

CALIBRATION_SECONDS = 3.0  # predicted seconds of steps the sequential plan runs, at least MIN_STEPS and at most
MIN_STEPS, MAX_STEPS = 12, 400  # MAX_STEPS: 12 steps of a 16 ms plan measured 0.93x one time and 1.3x another
WARMUP_SHARE = 4  # the first quarter of the steps is left out (each worker's first steps build its buffers, and Ray's
# own daemons are still starting for the first second)
MIN_PREDICTED_S = 1e-4  # a part predicted shorter than this (nothing priced) is not calibrated: its ratio is noise


class _Quiet:
    """A run reporter that reports nothing (the calibration's steps are not the user's training)."""

    def start(self, first_step: int, last_step: int) -> None:
        pass

    def step(self, record: StepRecord) -> None:
        pass

    def close(self) -> None:
        pass


def calibration_plan(job: JobSpec, costs: dict) -> Plan:
    """The job's sequential baseline plan, priced with the cost file ``costs`` (its contents)."""
    from planner.api import make_cost_model, plan_placed
    from planner.baselines import sequential_schedule
    from planner.metagraph import build_metagraph
    from planner.schedule import Problem

    cost_model = make_cost_model(job, costs)
    return plan_placed(job, sequential_schedule(Problem.build(build_metagraph(job), cost_model)), cost_model,
                       "sequential")


def calibration_steps(predicted_s: float) -> int:
    """Steps of a plan predicted at ``predicted_s`` a step: about :data:`CALIBRATION_SECONDS` of them."""
    return max(MIN_STEPS, min(MAX_STEPS, math.ceil(CALIBRATION_SECONDS / max(predicted_s, 1e-6))))


def ratios(records: Sequence[StepRecord], plan: Plan) -> dict[str, float]:
    """Measured over predicted of the waves' compute, the loss stage and the optimizer, summed over ``records``; a part
    the plan prices at (almost) nothing, or the workers did not time, is left out."""
    p, steps = plan.predicted, len(records)
    parts = {
        "compute": (sum(sum(r.wave_seconds) for r in records), sum(sum(r.predicted_wave_seconds) for r in records)),
        "loss": (sum(r.part_seconds.get("loss", 0.0) for r in records),
                 steps * (p.loss_s + p.loss_transfer_in_s + p.loss_transfer_back_s)),
        "optimizer": (sum(r.part_seconds.get("optimizer", 0.0) for r in records), steps * (p.optimizer_s + p.gather_s)),
    }
    return {part: measured / priced for part, (measured, priced) in parts.items()
            if priced >= MIN_PREDICTED_S * steps and measured > 0}


def calibrate_costs(job: JobSpec, costs: dict, progress: Callable[[str], None] = log.info) -> dict[str, float]:
    """The ``calibration`` of the cost file ``costs`` (module docstring): the ratios of :func:`calibration_steps` steps
    of the job's sequential plan, measured in an embedded Ray cluster, to that plan's prediction from ``costs``. A ratio
    outside planner.costfile's CALIBRATION_BOUNDS is left out (and reported)."""
    from orchestrator.remote import RunFailed
    from orchestrator.run import RunOptions, run_job
    from planner.errors import LoomError

    with tempfile.TemporaryDirectory(prefix="loom-calibrate-") as tmp:
        try:
            plan = calibration_plan(job, costs)
            steps = calibration_steps(plan.predicted.iteration_time_s)
            progress(f"calibrating: {steps} steps of the sequential plan ({len(plan.waves)} waves, "
                     f"{plan.predicted.iteration_time_s * 1e3:.1f} ms predicted) in the runtime")
            options = RunOptions(steps=steps, out_dir=Path(tmp) / "run", checkpoint_every=0)
            result = run_job(job, plan, options=options, reporter=_Quiet())
        except (LoomError, RunFailed) as exc:  # a plan that cannot be placed or run here: the profile stands without
            progress(f"calibration skipped: the sequential plan did not run ({exc})")
            return {}
    found = ratios(result.records[len(result.records) // WARMUP_SHARE:], plan)
    low, high = CALIBRATION_BOUNDS
    for part, ratio in list(found.items()):
        if not low <= ratio <= high:
            progress(f"calibration: {part} measured {ratio:.2f}x its prediction, outside [{low:g}, {high:g}]; left "
                     "uncalibrated (was the machine busy?)")
            del found[part]
    progress("calibrated (measured / predicted): " + ", ".join(f"{part} {ratio:.2f}x" for part, ratio in found.items()))
    return found
