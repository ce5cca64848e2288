"""Bookkeeping around one training step of runtime.executor's WaveWorker: where its time goes and when
each gradient may be all-reduced.

:class:`StepTiming` is the per-device breakdown of a step (wall seconds, waits for peers included), measured
with a :class:`Lap` stopwatch, and the step's :class:`Span` list (what ran when, from the step's start);
orchestrator.metrics aggregates the breakdown over ranks, orchestrator.trace draws the spans.
A :class:`GradBucket` is one of the plan's gradient buckets on this device (planner.program decides them and the
wave after whose backward each is final), so the worker can launch its all-reduce while the rest of backward runs.
:class:`StepState` holds the tensors of one micro-batch of a step (outputs, received rows, gradients, its batches);
:func:`assemble_rows` and :func:`fp32_output` are the row and dtype bookkeeping around them.
No process groups or collectives here: values, a clock and the task's batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from planner.spec import JobSpec
from runtime.assignment import SliceRef
from runtime.data import TaskBatch, task_batch


SPAN_PARTS = ("forward", "backward", "transfer_forward", "transfer_backward", "loss", "sync", "optimizer",
              "reduce_losses")


@dataclass(frozen=True)
class Span:
    """One part of a step on one device, in seconds from the step's start (``Lap.start``).

    ``part`` is one of :data:`SPAN_PARTS`: a wave's ``forward`` or ``backward`` compute, the exchanges at the
    boundary before a wave (``transfer_forward``: activations in; ``transfer_backward``: their gradients back),
    the ``loss`` stage, ``sync`` (launching gradient all-reduces, or waiting for them), ``optimizer``, and
    ``reduce_losses`` (the all-reduce of the losses that ends the step). ``wave`` is the wave (for transfers,
    the wave after the boundary); None for the parts of the whole step. Waits for peers are inside the span."""

    part: str
    wave: int | None
    start_s: float
    end_s: float

    def to_list(self) -> list:
        return [self.part, self.wave, self.start_s, self.end_s]


@dataclass
class StepTiming:
    """Where one device's last step went, in wall seconds (``time.perf_counter``; waits for peers included).

    Per wave ``k``: ``compute_s[k]`` is the forward plus backward of this device's slice of wave k (0 when it
    has none; a root slice's embedding and synthetic data included), ``transfer_s[k]`` the exchanges at the
    boundary before wave k, forward and backward. ``loss_s``: the loss stage (the leaves' outputs in, heads,
    loss backward, gradients out). ``sync_s``: gradient all-reduce time not hidden by backward (launching
    the buckets, then waiting for them). ``optimizer_s``: AdamW. ``total_s``: the whole step, including the
    all-reduce of the losses at its end. ``spans``: the same time as :class:`Span` s in the order they ran (they
    do not overlap); ``start_unix``: the step's start on this host's wall clock (``time.time()``), to line up the
    spans of several devices. ``ahead``: with ``rollout_lag`` 1 on a device that runs only generate slices, the
    decode of the next step's rollouts that ran in a thread beside this step (start and end, seconds from the step's
    start; runtime.lagged); None otherwise."""

    compute_s: list[float]
    transfer_s: list[float]
    loss_s: float = 0.0
    sync_s: float = 0.0
    optimizer_s: float = 0.0
    total_s: float = 0.0
    spans: list[Span] = field(default_factory=list)
    start_unix: float = 0.0
    ahead: tuple[float, float] | None = None

    def finish(self, lap: Lap) -> None:
        """Close the step: its total time, spans and start from the stopwatch that timed it."""
        self.total_s, self.spans, self.start_unix = lap.total(), list(lap.spans), lap.start_unix

    def to_dict(self) -> dict:
        """Plain values (lists and floats) for crossing a process boundary; a span is [part, wave, start, end]."""
        return {"compute_s": list(self.compute_s), "transfer_s": list(self.transfer_s), "loss_s": self.loss_s,
                "sync_s": self.sync_s, "optimizer_s": self.optimizer_s, "total_s": self.total_s,
                "spans": [span.to_list() for span in self.spans], "start_unix": self.start_unix,
                "ahead": list(self.ahead) if self.ahead is not None else None}


class Lap:
    """A stopwatch: each call returns the seconds since the previous call (or since creation) and, given a ``part``
    of :data:`SPAN_PARTS`, records that interval as a :class:`Span` in :attr:`spans`. On a CUDA device it first
    waits for the kernels queued so far, so a part's time is its work, not its launches."""

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.cuda = device.type == "cuda"
        self.start = self.last = time.perf_counter()
        self.start_unix = time.time()
        self.spans: list[Span] = []

    def __call__(self, part: str | None = None, wave: int | None = None) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if part is not None:
            assert part in SPAN_PARTS, part
            self.spans.append(Span(part, wave, self.last - self.start, now - self.start))
        seconds, self.last = now - self.last, now
        return seconds

    def total(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class GradBucket:
    """Trainable parameters this device shares with exactly ``devices``, all final after ``ready_wave``'s backward;
    ``shards``: the plan's ZeRO-1 share owners (planner.plan.PlanBucket.shards; empty: ``devices`` in order)."""

    ready_wave: int
    devices: tuple[int, ...]
    params: list[torch.nn.Parameter] = field(default_factory=list)
    shards: tuple[int, ...] = ()
    # forward position (planner.phases.forward_positions) of the event that first needs the bucket's parameters: ZeRO-1
    # launches its all-gather in that order and waits for it there (planner.phases.gather_events)
    gather_position: int = 0


class StepState:
    """Tensors of one micro-batch (``micro`` of ``num_micro``) of one step on one device, keyed by slice; the plan's
    rows are those of the micro-batch, which starts at row ``micro * batch_size / num_micro`` of the task's batch."""

    def __init__(self, device: torch.device, step: int, micro: int = 0, num_micro: int = 1):
        self.device, self.step, self.micro, self.num_micro = device, step, micro, num_micro
        self.move_id = step * num_micro + micro  # unique per micro-batch of the run: the channel's key
        self.outputs: dict[SliceRef, torch.Tensor] = {}  # y of my slices (my dp rows)
        self.inputs: dict[tuple[SliceRef, int], torch.Tensor] = {}  # autograd leaves fed to my slices, by input
        # received rows (first row, tensor) by ("slice", consumer, input) or ("loss", leaf slice)
        self.received: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        self.grad_out: dict[SliceRef, torch.Tensor] = {}  # accumulated d loss / d y of my slices
        self.loss_inputs: dict[SliceRef, torch.Tensor] = {}  # leaf outputs at the loss host, by leaf slice
        self.batches: dict[tuple[int, int, int], TaskBatch] = {}  # (task, start, stop): drawn once per step
        self.rollouts: dict[int, tuple[int, torch.Tensor]] = {}  # generate MetaOp -> (first row, its packed rows)

    def release(self, first: int, end: int, done: bool = False) -> None:
        """Drop the tensors of the slices of waves ``[first, end)`` (a phase whose backward is done): outputs, their
        gradients and inputs (received rows are popped when read); ``done`` (the step's last phase), the drawn batches
        too. The rollouts stay (the step's last micro-batch's are kept as the worker's ``last_rollouts``)."""
        for table in (self.outputs, self.grad_out, self.loss_inputs):
            for ref in [r for r in table if first <= r[0] < end]:
                del table[ref]
        for key in [k for k in self.inputs if first <= k[0][0] < end]:
            del self.inputs[key]
        if done:
            self.batches.clear()

    def batch(self, job: JobSpec, task_index: int, step: int, start: int, stop: int) -> TaskBatch:
        key = (task_index, start, stop)
        if key not in self.batches:  # drawn on the CPU (deterministic generators), then moved
            offset = self.micro * job.tasks[task_index].batch_size // self.num_micro
            drawn = task_batch(job, task_index, step, offset + start, offset + stop)
            self.batches[key] = replace(drawn, micro_first=offset).to(self.device)
        return self.batches[key]


def fp32_output(layer: torch.nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """``layer(x)`` as float32, as the reference runs every layer: under autocast a layer that ends in a low-precision
    op (a UNet block's flat state, an MLP) hands on its output cast up, so that where a plan cuts a MetaOp does not
    change the math; a no-op for the residual-stream layers, whose outputs stay float32."""
    return layer(x, **kwargs).float()


def assemble_rows(parts: list[tuple[int, torch.Tensor]], start: int, stop: int) -> torch.Tensor:
    """Concatenate received row ranges into rows [start, stop); they must tile it exactly."""
    parts = sorted(parts, key=lambda item: item[0])
    cursor = start
    for first, tensor in parts:
        assert first == cursor, f"rows {cursor}..{first} missing"
        cursor += tensor.shape[0]
    assert cursor == stop, f"rows {cursor}..{stop} missing"
    return torch.cat([t for _, t in parts]).detach()
