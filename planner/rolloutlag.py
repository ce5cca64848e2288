"""One-step off-policy rollouts (``training.rollout_lag: 1``), priced as a steady-state pipeline.

With lag 1, step k's rollouts are generated with the weights step k-1 started from (step 0's with the initial ones;
docs/job-spec.md "Modes"). Those weights exist when step k-1 starts, so step k's rollouts can be generated while step
k-1 scores and trains: verl's one-step off-policy recipe, OpenRLHF's async training and AReaL all run this pipeline.
The simulator (planner.simulator) prices one synchronous iteration of a placement, every MetaOp in order; this module
turns it into the pipeline's period (:func:`lagged`):

- G, the generation: the waves whose slices all run *root* generate MetaOps (no inputs: a generate use reading
  another use's output cannot start a step early), the longest slice of each such wave, summed (times the
  micro-batches);
- R, the rest: the synchronous iteration without the weight hand-off, minus G (the rollouts start the iteration;
  everything else waits for them);
- H, the weight hand-off (planner.handoff).

When no device runs both a generate slice and any other slice (the generation has a pool of its own: a split
placement, Loom's role placement with a generation pool), the generating pool's cycle is H + G (it receives the
weights step k starts from, then decodes step k+1's rollouts with them) and the other devices' cycle is R (their
sends of the weights overlap their next step): the period is ``max(G + H, R)``. Otherwise a device runs both
generation and another role in turn (verl's colocated shape) and nothing overlaps: the period is the synchronous
iteration.

Memory: every device running a lagged generate slice holds a second copy of the weights it decodes with (the
behaviour policy's, kept while the next version is stepped or handed over; runtime.rollout keeps it the same way):
the generate MetaOp's parameters x the weight bytes (``CostModel.param_bytes_moved``: the runtime deep-copies its
float32 modules) / its tensor-parallel degree, added to the device's peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.placement import PlacedSchedule


@dataclass(frozen=True)
class Lagged:
    """What ``rollout_lag: 1`` changes in one placement's prediction (:func:`lagged`)."""

    period_s: float  # the steady-state iteration
    hidden_s: float  # synchronous iteration - period: the generation time hidden behind the previous step
    generation_s: float  # G
    rest_s: float  # R
    overlaps: bool  # the generation runs on devices of its own (else nothing is hidden)
    extra_bytes: dict[int, float]  # device -> bytes of the behaviour copy it holds


def lagged_generate(graph) -> set[int]:
    """The MetaOps that ``rollout_lag: 1`` moves a step early: root generate MetaOps (none without the lag)."""
    if not graph.rollout_lag:
        return set()
    return {op.id for op in graph.metaops if op.gen is not None and op.gen.mode == "generate" and not op.deps}


def lagged(graph, placed: PlacedSchedule, wave_durations, iteration_s: float, handoff_s: float,
           weight_bytes: float) -> Lagged | None:
    """The pipelined prediction of ``placed`` (module docstring) from its synchronous one: ``wave_durations`` (compute
    per wave), ``iteration_s`` (the synchronous iteration, hand-off excluded) and ``handoff_s``; None when the job
    has no lagged generate MetaOp."""
    early = lagged_generate(graph)
    if not early:
        return None
    gen_devices: set[int] = set()
    other_devices: set[int] = set()
    extra: dict[int, float] = {}
    generation = 0.0
    for wave, seconds in zip(placed.waves, wave_durations):
        if all(s.metaop in early for s in wave.slices):
            generation += seconds
        for s in wave.slices:
            if s.metaop in early:
                gen_devices.update(s.devices)
                dec = graph.metaops[s.metaop].gen.decoder
                copy = dec.params * weight_bytes / s.layout.tp_degree if dec is not None else 0.0
                for d in s.devices:
                    extra[d] = max(extra.get(d, 0.0), copy)
            else:
                other_devices.update(s.devices)
    generation *= graph.num_micro_batches
    rest = max(0.0, iteration_s - generation)
    overlaps = not gen_devices & other_devices and generation > 0
    period = max(generation + handoff_s, rest) if overlaps else iteration_s + handoff_s
    return Lagged(period, iteration_s + handoff_s - period, generation, rest, overlaps, extra)
