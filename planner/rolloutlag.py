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
placement, Loom's role placement with a generation pool), the generating pool decodes step k+1's rollouts with the
weights step k started from while the other devices score and train step k; then the updated weights go over (the
runtime's hand-off is a blocking exchange after both sides are done: runtime.lagged, runtime.rollout). The period is
``max(G, R) + H``. Otherwise a device runs both generation and another role in turn (verl's colocated shape) and
nothing overlaps: the period is the synchronous iteration.

Memory: no second copy of the weights. Every generating device decodes the next step's rows with the weights it
holds during the step and keeps those rows until the next step (runtime.lagged.RolloutsAhead): the generate slice's
output once more (:func:`ahead_bytes`), in the placer's ledger (planner.placement.MemoryLedger), so the placer's
memory check and the simulator's peak both count it. (Receiving step k+1's weights while still decoding with step
k's would hide H too, at the price of a second copy of the weights; the runtime does not do that, so it is not
priced.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from planner.placement import PlacedSchedule


@dataclass(frozen=True)
class Lagged:
    """What ``rollout_lag: 1`` changes in one placement's prediction (:func:`lagged`)."""

    period_s: float  # the steady-state iteration
    hidden_s: float  # synchronous iteration - period: the generation time hidden behind the previous step
    generation_s: float  # G
    rest_s: float  # R
    overlaps: bool  # the generation runs on devices of its own (else nothing is hidden)


def lagged_generate(graph) -> set[int]:
    """The MetaOps that ``rollout_lag: 1`` moves a step early: root generate MetaOps (none without the lag)."""
    if not graph.rollout_lag:
        return set()
    return {op.id for op in graph.metaops if op.gen is not None and op.gen.mode == "generate" and not op.deps}


def ahead_bytes(graph, op, local_batch: int) -> float:
    """Bytes a device running ``local_batch`` rows of MetaOp ``op`` keeps for the rollouts it decoded a step ahead:
    its output rows (the packed tokens, of every micro-batch it decodes at once) with ``rollout_lag`` 1 on a lagged
    generate MetaOp, else 0."""
    if not graph.rollout_lag or op.gen is None or op.gen.mode != "generate" or op.deps:
        return 0.0
    return op.layer.out_bytes * local_batch * op.gen.batches


def generation_pool(waves, early: set[int]) -> set[int]:
    """The devices that run the lagged generate MetaOps ``early`` when none of them runs any other slice (the
    generation has a pool of its own: the only case :func:`lagged` overlaps), else the empty set. ``waves``: each
    wave's slices as ``(metaop, devices)`` pairs. The runtime decodes the next step's rollouts beside the step on
    exactly these devices (runtime.executor), so what runs and what is priced come from this one rule."""
    gen: set[int] = set()
    other: set[int] = set()
    for wave in waves:
        for metaop, devices in wave:
            (gen if metaop in early else other).update(devices)
    return gen if not gen & other else set()


def lagged(graph, placed: PlacedSchedule, wave_durations, iteration_s: float, handoff_s: float) -> Lagged | None:
    """The pipelined prediction of ``placed`` (module docstring) from its synchronous one: ``wave_durations`` (compute
    per wave), ``iteration_s`` (the synchronous iteration, hand-off excluded) and ``handoff_s``; None when the job
    has no lagged generate MetaOp."""
    early = lagged_generate(graph)
    if not early:
        return None
    generation = sum(seconds for wave, seconds in zip(placed.waves, wave_durations)
                     if all(s.metaop in early for s in wave.slices)) * graph.num_micro_batches
    rest = max(0.0, iteration_s - generation)
    pool = generation_pool(([(s.metaop, s.devices) for s in wave.slices] for wave in placed.waves), early)
    overlaps = bool(pool) and generation > 0
    period = (max(generation, rest) if overlaps else iteration_s) + handoff_s
    return Lagged(period, iteration_s + handoff_s - period, generation, rest, overlaps)
