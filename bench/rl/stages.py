"""What pipeline stages would cost with micro-batches overlapping (1F1B), as an estimate beside the simulation.

The simulator prices a MetaOp cut into p pipeline stages as p waves one after another, each running its stage's
layers over the whole batch while the other stages' devices wait (runtime.executor runs them that way: a job with a
generate use runs one micro-batch). The frameworks the baselines stand for do not: verl's Megatron backend and
OpenRLHF's DeepSpeed pipeline run 1F1B over m micro-batches, so a run of p stage waves takes about
``(m + p - 1) / m`` times its slowest stage instead of the sum of all p (GPipe's and Megatron's bubble,
``(p - 1) / (m + p - 1)`` of the time). :func:`pipelined_s` applies that to a placement's prediction with
``m = MICRO_PER_STAGE * p`` (GPipe, arXiv 1811.06965, section 2.2: the bubble is negligible for m >= 4p), for every
placement alike (Loom's stages too, though Loom's runtime cannot run them so yet). Time only: stages that hold a
quarter of the batch's activations might let a placement use fewer stages, which this estimate does not re-plan.
"""

from __future__ import annotations

from planner.placement import PlacedSchedule
from planner.rolloutlag import lagged

MICRO_PER_STAGE = 4


def stage_runs(placed: PlacedSchedule) -> list[list[int]]:
    """Runs of consecutive waves (two or more) where each wave runs the next layers of exactly the MetaOps of the
    wave before it, each on devices the MetaOp's previous layers did not use: pipeline stages of the same MetaOps (a
    MetaOp's layers cut over waves on the same devices is no pipeline)."""
    runs: list[list[int]] = []
    for k, wave in enumerate(placed.waves):
        before = {s.metaop: s for s in placed.waves[k - 1].slices} if k else {}
        follows = bool(before) and {s.metaop for s in wave.slices} == set(before) and all(
            s.first_layer == before[s.metaop].first_layer + before[s.metaop].num_layers
            and not set(s.devices) & set(before[s.metaop].devices) for s in wave.slices)
        if follows and runs and runs[-1][-1] == k - 1:
            runs[-1].append(k)
        elif follows:
            runs.append([k - 1, k])
    return runs


def pipelined_s(problem, placed: PlacedSchedule, sim) -> float:
    """``sim``'s iteration (of ``placed``) with every run of stage waves priced as 1F1B over ``4 p`` micro-batches
    (module docstring); with ``rollout_lag`` 1 the pipeline period is recomputed from the shortened iteration."""
    saved = 0.0
    for run in stage_runs(placed):
        p, m = len(run), MICRO_PER_STAGE * len(run)
        seconds = [sim.wave_durations[k] for k in run]
        saved += sum(seconds) - (m + p - 1) / m * max(seconds)
    saved *= problem.graph.num_micro_batches
    if not problem.graph.rollout_lag:
        return sim.iteration_time_s - saved
    synchronous = sim.lag_hidden_s + sim.iteration_time_s - sim.reduce_s - sim.handoff_s  # hand-off excluded
    lag = lagged(problem.graph, placed, sim.wave_durations, synchronous - saved, sim.handoff_s)
    return lag.period_s + sim.reduce_s
