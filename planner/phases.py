"""Phases of a placed schedule: consecutive wave ranges that every device finishes before the next one starts.

A plan's waves are split into phases (``PlacedSchedule.phases`` / ``Plan.phases``: the first wave of each, ascending,
starting at 0; one phase by default). On each device, a phase runs the forward of its waves in order, the loss of
every task whose loss host (:func:`planner.program.loss_hosts`) lies in it, then the backward of its waves in reverse,
before the device starts the next phase. There is no barrier across devices: a device starts the next phase as soon
as it is done with its own part of this one. So a task that is a phase of its own (the sequential shape) frees its
activations before the next task runs, and its gradient sync overlaps the next task's compute. No edge of the program
crosses phases (the consumer, or the loss host, lies in its producer's phase): a phase's activations are gone once
its backward is done.

Backward events. A gradient is final after a *backward event*: wave ``k``'s backward (code ``k``) or the loss stage
of phase ``p`` (code ``num_waves + p``; with one phase ``num_waves``, as before phases existed). Their execution order
is phase by phase: the phase's loss stage, then its waves from last to first (:func:`backward_positions`).
Forward events, where a parameter is first needed (ZeRO-1's all-gather must have ended by then): wave ``k``'s forward
(code ``k``) or phase ``p``'s loss stage (code ``num_waves + p``), phase by phase: the phase's waves in order, then its
loss stage (:func:`forward_positions`).
Pure Python; imports nothing from the planner.
"""

from __future__ import annotations

from collections.abc import Sequence

LOSS_WAVE = -1  # the pseudo-wave of the loss stage, after every real wave (planner.program's pieces and the runtime's)

ONE_PHASE: tuple[int, ...] = (0,)


def phase_ranges(starts: Sequence[int], num_waves: int) -> list[tuple[int, int]]:
    """``[first, end)`` wave range of every phase."""
    ends = list(starts[1:]) + [num_waves]
    return list(zip(starts, ends))


def phase_of_waves(starts: Sequence[int], num_waves: int) -> list[int]:
    """The phase of every wave."""
    out = [0] * num_waves
    for p, (a, b) in enumerate(phase_ranges(starts, num_waves)):
        out[a:b] = [p] * (b - a)
    return out


def loss_event(num_waves: int, phase: int) -> int:
    """The backward-event code of phase ``phase``'s loss stage."""
    return num_waves + phase


def backward_positions(starts: Sequence[int], num_waves: int) -> dict[int, int]:
    """Every backward-event code's position in execution order (module docstring)."""
    out: dict[int, int] = {}
    for p, (a, b) in enumerate(phase_ranges(starts, num_waves)):
        out[loss_event(num_waves, p)] = len(out)
        for k in reversed(range(a, b)):
            out[k] = len(out)
    return out


def forward_positions(starts: Sequence[int], num_waves: int) -> dict[int, int]:
    """Every forward-event code's position in execution order (module docstring)."""
    out: dict[int, int] = {}
    for p, (a, b) in enumerate(phase_ranges(starts, num_waves)):
        for k in range(a, b):
            out[k] = len(out)
        out[loss_event(num_waves, p)] = len(out)
    return out


def gather_events(ops: Sequence, waves: Sequence, starts: Sequence[int], buckets: Sequence) -> list[int]:
    """Per bucket (:class:`planner.program.Bucket` or :class:`planner.plan.PlanBucket`), the forward event (:mod:`planner.phases`: a
    wave, or a phase's loss stage) at which an iteration first needs its parameters: the earliest, in execution order,
    that runs one of its members (a layer; an input module, at its MetaOp's first slice; a loss head, at its loss
    stage, which is its ``ready_wave``). ``ops``: MetaOps or the plan's (``param_group``, ``input_modules``);
    ``waves``: placed or plan waves; ``starts``: the phases' first waves.

    ZeRO-1 overlaps the all-gather of a bucket's updated parameters with the next iteration's forward: after the
    optimizer step every holder launches the gathers in the order of these events (then the buckets' order), and
    waits for a bucket's before its own first forward event at or after the bucket's (runtime.zero; priced by
    :func:`planner.sync.finish_buckets`)."""
    position = forward_positions(starts, len(waves))
    first: dict[tuple[str, int], int] = {}
    for k, wave in enumerate(waves):  # waves ascend in forward order: the first wave seen is the earliest
        for s in wave.slices:
            op = ops[s.metaop]
            for layer in range(s.first_layer, s.first_layer + s.num_layers):
                first.setdefault((op.param_group, layer), k)
            for name in op.input_modules if s.first_layer == 0 else ():
                first.setdefault((name, 0), k)
    return [min((first.get((name, layer), b.ready_wave) for name, layer, _ in b.members), key=position.__getitem__)
            for b in buckets]


def gather_order(events: Sequence[int], starts: Sequence[int], num_waves: int) -> list[int]:
    """The launch order of the buckets' ZeRO-1 all-gathers (indices): by :func:`gather_events` in forward order, then
    by the buckets' own order."""
    position = forward_positions(starts, num_waves)
    return sorted(range(len(events)), key=lambda i: (position[events[i]], i))


def check_phase_starts(starts: Sequence[int], num_waves: int) -> str | None:
    """Why ``starts`` is not a valid list of phase starts for ``num_waves`` waves (None when it is)."""
    if not starts or starts[0] != 0:
        return "does not start with wave 0"
    if any(a >= b for a, b in zip(starts, starts[1:])):
        return "is not strictly ascending"
    if starts[-1] >= max(num_waves, 1):
        return f"names a wave past the last one ({num_waves - 1})"
    return None
