"""More micro-batches, suggested: what ``loom plan`` says when its plan would run faster with them.

``training.grad_accum_steps`` is the user's: it splits each step's batch into micro-batches whose gradients add up
to the step's, so it changes how a step runs, not what it computes (except for a loss that contrasts the rows of
its micro-batch, ``infonce``). A plan whose MetaOps run on devices of their own (pipeline stages: a model that no
data-parallel layout holds) runs them one after the other in one micro-batch; pipelined over several
(``pipeline_micro_batches``), the stages overlap. Users who do not know this plan a 70B model at one micro-batch
and get a plan much slower than it could be (bench/rl's 70B GRPO cell: 62.7 s at 1, 44.4 s with the same placement
at 32).

:func:`micro_batch_hint` prices the chosen plan's placement again with ``2k, 4k, ...`` micro-batches pipelined
(each a ``grad_accum_steps`` the job's spec accepts: :meth:`planner.spec.JobSpec.micro_batches_refused`, each slice's
layout valid for the smaller micro-batch), under the plan's own ZeRO-1 choice and walked 1F1B where plans would be
(planner.simulator.one_f_one_b_if_no_slower), and returns the fastest that fits in device memory when it is at least
:data:`MIN_GAIN` faster. Re-planning at that count searches every placement anew
(on bench/pipeline's and bench/rl's 70B jobs it does as well or better: 6.41, 11.43 and 42.68 s). Nothing when the
job's micro-batches may not be pipelined (``pipeline_micro_batches: false``: more micro-batches in order are never
faster), a task's loss is ``infonce``, or the planner chose the count itself (``grad_accum_steps: auto``).

Pure: no files, no globals. What it must not import: the Ray or runtime layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.costmodel import CostModel
from planner.metagraph import build_metagraph
from planner.placement import PlacedSchedule
from planner.plan import Plan, zero_sharded
from planner.schedule import Problem
from planner.simulator import one_f_one_b_if_no_slower, simulate
from planner.spec import JobSpec

FACTORS = (2, 4, 8, 16, 32)  # micro-batches tried, as multiples of the job's
MIN_GAIN = 1.05  # the least speed-up worth a hint


@dataclass(frozen=True)
class MicroBatchHint:
    """``grad_accum_steps: steps`` pipelined runs the plan's placement in ``iteration_s`` (the plan: ``current_s``)."""

    steps: int
    iteration_s: float
    current_s: float
    peak_bytes: float
    one_f_one_b: bool = False  # walked one forward, one backward (planner.phases)

    def line(self) -> str:
        """The hint as ``loom plan`` prints it."""
        gain = self.current_s / self.iteration_s
        walk = ", 1F1B" if self.one_f_one_b else ""
        return (f"hint: training.grad_accum_steps: {self.steps} (micro-batches pipelined{walk}) runs this plan's "
                f"placement in {self.iteration_s:.4g} s instead of {self.current_s:.4g} s ({gain:.2f}x, "
                f"{self.peak_bytes / 2**30:.1f} GiB peak); the step's gradient is the same. Set it and plan again.")


def micro_batch_hint(job: JobSpec, plan: Plan, placed: PlacedSchedule, cost_model: CostModel) -> MicroBatchHint | None:
    """The fastest fitting count of micro-batches, pipelined, for ``placed`` (``plan``'s placement of ``job`` under
    ``cost_model``) when it is :data:`MIN_GAIN` faster than ``plan`` (module docstring); else None."""
    training = job.training
    if job.micro_batches_auto or training.pipeline_micro_batches is False or any(
            task.loss == "infonce" for task in job.tasks):
        return None
    base = cost_model.with_shard_optimizer(zero_sharded(plan, training))
    names = [op.name for op in build_metagraph(job).metaops]
    best = None
    for factor in FACTORS:
        k = training.grad_accum_steps * factor
        if job.micro_batches_refused(k) is not None:
            continue
        graph = build_metagraph(job.model_copy(update={"training": training.model_copy(
            update={"grad_accum_steps": k})}))
        model = base.with_in_flight(k)
        ops = graph.metaops
        if [op.name for op in ops] != names or any(
                s.layout not in model.layouts(ops[s.metaop], len(s.devices)) for w in placed.waves for s in w.slices):
            continue  # a slice's data-parallel degree does not divide the smaller micro-batch
        problem = Problem.build(graph, model)  # walked 1F1B where that is no slower or alone fits, as plans are
        walk, sim = one_f_one_b_if_no_slower(problem, model, placed, simulate(problem, placed, model))
        peak = max(sim.peak_memory_bytes, default=0.0)
        if peak <= model.hw.memory_bytes and (best is None or sim.iteration_time_s < best.iteration_s):
            best = MicroBatchHint(k, sim.iteration_time_s, plan.predicted.iteration_time_s, peak, walk.one_f_one_b)
    return best if best is not None and best.iteration_s * MIN_GAIN <= best.current_s else None
