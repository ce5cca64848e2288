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

import functools
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


FORWARD, LOSS, BACKWARD = "forward", "loss", "backward"  # the kinds of a step's events (:func:`step_walk`)
Event = tuple[str, int, int]  # (kind, micro-batch, wave; for LOSS the phase)


@functools.lru_cache(maxsize=256)
def step_walk(starts: tuple[int, ...], num_waves: int, num_micro: int, pipelined: bool,
              one_f_one_b: bool = False) -> tuple[Event, ...]:
    """The order in which every device meets one step's events (:data:`Event`): a wave's forward (its boundary's
    exchange, then its slice), a phase's loss stage, a wave's backward (its slice, then the gradients back). Every
    worker walks the same list, passing what it has no part in, so the point-to-point exchanges pair up.

    In order (``pipelined`` false, or one micro-batch), micro-batch after micro-batch, each walks the phases: a phase's
    waves forward, its loss stage, its waves backward in reverse. Pipelined (``training.pipeline_micro_batches``,
    GPipe's fill and drain), phase after phase, the forward positions (the phase's waves, then its loss stage) and
    then its backward positions (its waves in reverse) are each walked diagonally: at slot ``t`` every position
    ``i`` with micro-batch ``t - i``, later positions first. Waves on devices of their own (pipeline stages) then
    overlap: stage ``s`` sends micro-batch ``j`` on and starts ``j + 1`` while stage ``s + 1`` runs ``j``, and a
    device holds every micro-batch's saved activations until its backward
    (:attr:`planner.costmodel.CostModel.in_flight`). Pipelined with ``one_f_one_b``, phase after phase, one forward
    then one backward (1F1B, as Megatron-LM schedules its pipeline stages: :func:`one_forward_one_backward`): the
    same bubble on stages of their own, and wave ``i`` of a phase's ``n`` holds at most ``min(k, n - i)``
    micro-batches' activations (:func:`pipelined_in_flight`). Within one micro-batch the events keep their order, and
    each wave runs its forwards and its backwards in micro-batch order, so the same gradients accumulate in the same
    order in every walk."""
    out: list[Event] = []
    ranges = phase_ranges(starts, num_waves)
    if not pipelined or num_micro == 1:
        for j in range(num_micro):
            for p, (a, b) in enumerate(ranges):
                out += [(FORWARD, j, k) for k in range(a, b)]
                out.append((LOSS, j, p))
                out += [(BACKWARD, j, k) for k in reversed(range(a, b))]
        return tuple(out)
    for p, (a, b) in enumerate(ranges):
        if one_f_one_b:
            out += one_forward_one_backward(a, b, p, num_micro)
            continue
        forward = [(FORWARD, k) for k in range(a, b)] + [(LOSS, p)]
        for positions in (forward, [(BACKWARD, k) for k in reversed(range(a, b))]):
            for t in range(len(positions) + num_micro - 1):
                out += [(kind, t - i, at) for i, (kind, at) in reversed(list(enumerate(positions)))
                        if 0 <= t - i < num_micro]
    return tuple(out)


def one_forward_one_backward(a: int, b: int, phase: int, num_micro: int) -> list[Event]:
    """Phase ``phase``'s events (waves ``a .. b - 1``, then its loss stage) over ``num_micro`` micro-batches, 1F1B:
    of the phase's ``n`` waves, wave ``i`` runs ``min(k, n - i - 1)`` forwards first (its warm-up: as many as waves
    follow it; the loss stage runs on a wave's devices, as the last stage computes the loss), then a forward and a
    backward in turn, then the backwards left, and the loss stage its micro-batches in turn: every position's own
    order, merged slot by slot; at each slot every position whose next event has what it needs from earlier slots
    (the forward of the same micro-batch one position before, the loss stage or the backward one position after)
    takes it, later positions first, as the fill and drain did."""
    n, k = b - a, num_micro
    orders: list[list[tuple[str, int]]] = []
    for i in range(n):
        warm = min(k, n - i - 1)
        order = [(FORWARD, j) for j in range(warm)]
        for j in range(k - warm):
            order += [(FORWARD, warm + j), (BACKWARD, j)]
        orders.append(order + [(BACKWARD, j) for j in range(k - warm, k)])
    orders.append([(LOSS, j) for j in range(k)])  # position n
    done: set[tuple[str, int, int]] = set()

    def ready(kind: str, j: int, i: int) -> bool:
        if kind == FORWARD:
            return i == 0 or (FORWARD, j, i - 1) in done
        if kind == LOSS:
            return n == 0 or (FORWARD, j, n - 1) in done
        return (LOSS, j, n) in done if i == n - 1 else (BACKWARD, j, i + 1) in done

    heads = [0] * (n + 1)
    out: list[Event] = []
    while len(out) < k * (2 * n + 1):
        slot = [(i, *orders[i][heads[i]]) for i in reversed(range(n + 1))
                if heads[i] < len(orders[i]) and ready(*orders[i][heads[i]], i)]
        assert slot, "1F1B: no event can run"  # each position's order keeps micro-batches in turn: never happens
        for i, kind, j in slot:
            heads[i] += 1
            done.add((kind, j, i))
            out.append((kind, j, phase if kind == LOSS else a + i))
    return out


def pipelined_in_flight(starts: Sequence[int], num_waves: int, num_micro: int, wave: int) -> int:
    """The micro-batches whose saved activations wave ``wave`` holds at once under the pipelined walk (1F1B,
    :func:`step_walk`): ``min(k, n - i)`` for the ``i``-th of its phase's ``n`` waves."""
    for a, b in phase_ranges(starts, num_waves):
        if a <= wave < b:
            return min(num_micro, b - wave)
    raise ValueError(f"wave {wave} is not among {num_waves} waves")


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
