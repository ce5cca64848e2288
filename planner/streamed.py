"""Streamed rollouts, evaluated and not adopted: the rows in chunks (micro-batches), each chunk decoded on its own with
the generation on a pool of its own, so chunk i+1 is generated while chunk i is scored and trained (docs/planner.md
section 11). bench.rl prices them beside Loom's plans; plans do not adopt them (the runtime decodes a step's
micro-batches at once, in the first: planner.generation.decode_batches)."""

from __future__ import annotations

from dataclasses import replace

from planner.costmodel import CostModel
from planner.generation import decode_batches
from planner.metagraph import build_metagraph
from planner.placement import PlacedSchedule
from planner.rlbaselines import GEN_SHARES, RoleBudget, Work, _search, level_split_schedule, rl_shaped
from planner.schedule import Problem
from planner.simulator import Simulation

STREAM_CHUNKS = (2, 4)  # chunk counts the streamed-rollout evaluation tries (bench.rl)


def streamed_job(job, chunks: int):
    """``job`` with every task's rows in ``chunks`` micro-batches (``training.grad_accum_steps``), or None when a
    chunk would not hold whole sample groups of every use (GRPO's advantages normalise within a group) or the job
    already accumulates."""
    if job.training.grad_accum_steps != 1:
        return None
    for task in job.tasks:
        rows = task.batch_size // chunks
        if task.batch_size % chunks or any(rows % u.samples for u in task.components):
            return None
    return job.model_copy(update={"training": job.training.model_copy(update={"grad_accum_steps": chunks})})


def streamed_problem(job, chunks: int, cost_model: CostModel) -> Problem | None:
    """The problem of :func:`streamed_job` (``job`` in ``chunks``, priced by ``cost_model``, made for that job) with
    each chunk's rollouts decoded on their own, in its micro-batch; None where :func:`streamed_job` is."""
    chunked = streamed_job(job, chunks)
    if chunked is None:
        return None
    graph = build_metagraph(chunked)
    ops = tuple(replace(op, gen=replace(op.gen, batches=1)) if decode_batches(op) > 1 else op for op in graph.metaops)
    return Problem.build(replace(graph, metaops=ops), cost_model)


def streamed_candidate(problem: Problem, cost_model: CostModel, budget: RoleBudget = RoleBudget()
                       ) -> tuple[PlacedSchedule, Simulation] | None:
    """Rollouts streamed in chunks: ``problem`` has the job's rows in micro-batches (:func:`streamed_job`) and the
    generation runs on a pool of its own (:func:`level_split_schedule` with ``gen_pool``), so the per-device
    timeline (planner.timeline: each device walks every micro-batch, no global barrier) generates chunk i+1 while
    the other devices score and train chunk i. The fastest fitting one over generation shares, stages and layout
    versions within ``budget``; None when none fits or the problem has one micro-batch."""
    if not rl_shaped(problem) or problem.graph.num_micro_batches < 2:
        return None
    found = _search(problem, cost_model, lambda p, k, w: (level_split_schedule(p, k, alone, share, gen_pool=True)
                                                          for alone in (False, True) for share in GEN_SHARES[1:]),
                    Work(budget))
    if found is None or max(found[1].peak_memory_bytes, default=0.0) > cost_model.hw.memory_bytes:
        return None
    return found
