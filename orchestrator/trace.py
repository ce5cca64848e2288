"""Chrome / Perfetto traces of a run: what each rank did when, as the plan predicts it and as the workers measured it.

``loom run`` writes two files of the same structure into its output directory (open either in
https://ui.perfetto.dev or chrome://tracing; ``loom gantt OUT`` draws them side by side):

- ``trace-predicted.json`` (:func:`predicted_trace`): one iteration of the plan, built from the Plan alone;
- ``trace.json`` (:func:`measured_trace`): the spans the workers recorded (``runtime.steps.Span``) for the last
  :data:`TRACE_STEPS` steps of the run (a :class:`TraceRecorder` keeps no more), each rank's steps placed on
  its host's wall clock (``StepTiming.start_unix``), so the tracks of one host line up.

Trace Event Format, JSON object form: ``{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}``.
One process per file (pid :data:`PREDICTED_PID` named "predicted", or :data:`MEASURED_PID` "measured"), one
track per rank (tid = rank, named ``rank <r>``, sorted by rank), complete events (``"ph": "X"``) with ``ts`` and
``dur`` in microseconds from the trace's start, ``cat`` one of :data:`CATEGORIES`, and ``args`` holding the
``step``, ``part`` (``runtime.steps.SPAN_PARTS``), ``wave`` and, for compute, the ``task`` and ``metaop``.

The prediction follows the simulator's timeline (planner.simulator) with what the Plan records: forward runs the
waves in order, each after the transfers into it; the loss stage; backward in reverse, each wave followed by its
gradients sent back; then the exposed gradient sync, the optimizer and the exposed all-gather. Two parts are
approximated because the Plan does not carry them: a wave's split into forward and backward (from its slowest
slice's MetaOp: 1/3 forward when it trains, 1/2 when frozen under a trained one, all forward when frozen at the
root; recompute is not recorded) and a boundary's duration (its slowest transfer, scaled so that the boundaries
add up to ``predicted.transfer_s``, split into activations in and gradients back by the bytes of the plan's
pieces). Gradient all-reduces hidden behind backward are not drawn.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from planner.plan import Plan, PlanSlice

TRACE_FILE = "trace.json"
PREDICTED_TRACE_FILE = "trace-predicted.json"
TRACE_STEPS = 5  # measured steps kept in trace.json: the last ones (the first is warm-up)
PREDICTED_PID, MEASURED_PID = 0, 1
CATEGORIES = ("compute", "transfer", "loss", "sync", "optimizer")
# runtime.steps.SPAN_PARTS -> (category, event name without the wave)
PARTS = {
    "forward": ("compute", "forward"),
    "backward": ("compute", "backward"),
    "transfer_forward": ("transfer", "transfer in"),
    "transfer_backward": ("transfer", "transfer back"),
    "loss": ("loss", "loss"),
    "reduce_losses": ("loss", "reduce losses"),
    "sync": ("sync", "gradient sync"),
    "optimizer": ("optimizer", "optimizer"),
    "gather": ("sync", "parameter all-gather"),
}
US = 1e6  # trace units per second


@dataclass(frozen=True)
class RecordedStep:
    """One step's timing from every rank (``StepTiming.to_dict()``, None where a rank sent none)."""

    step: int
    timings: tuple[Mapping | None, ...]


class TraceRecorder:
    """The workers' timings of the last ``max_steps`` steps (older ones are dropped: the trace stays bounded)."""

    def __init__(self, max_steps: int = TRACE_STEPS):
        self._steps: deque[RecordedStep] = deque(maxlen=max_steps)

    def record(self, step: int, timings: Sequence[Mapping | None]) -> None:
        self._steps.append(RecordedStep(step, tuple(timings)))

    @property
    def steps(self) -> list[RecordedStep]:
        return list(self._steps)


# --------------------------------------------------------------------------- events


def num_ranks(plan: Plan) -> int:
    return plan.cluster.num_nodes * plan.cluster.devices_per_node


def metadata_events(pid: int, process: str, ranks: int) -> list[dict]:
    """Names and order of the process and of one track per rank."""
    events = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": process}},
              {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}}]
    for rank in range(ranks):
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": rank,
                       "args": {"sort_index": rank}})
    return events


def span_event(plan: Plan, pid: int, rank: int, part: str, wave: int | None, start_s: float, end_s: float,
               step: int, slices: Mapping[tuple[int, int], PlanSlice]) -> dict:
    """A complete event for one span of ``rank`` (seconds from the trace's start); compute names its MetaOp."""
    category, name = PARTS[part]
    args: dict = {"step": step, "part": part, "wave": wave}
    if wave is not None:
        name = f"w{wave} {name}"
    s = slices.get((wave, rank)) if wave is not None else None
    if category == "compute" and s is not None:
        op = plan.metaops[s.metaop]
        name = f"{name} {op.name}"
        args.update(task=op.task, metaop=op.name, layers=s.num_layers)
    return {"name": name, "cat": category, "ph": "X", "ts": round(start_s * US, 3),
            "dur": round(max(0.0, end_s - start_s) * US, 3), "pid": pid, "tid": rank, "args": args}


def slices_by_rank(plan: Plan) -> dict[tuple[int, int], PlanSlice]:
    """(wave, rank) -> the slice ``rank`` runs in that wave."""
    return {(wave.index, d): s for wave in plan.waves for s in wave.slices for d in s.devices}


def trace_document(plan: Plan, kind: str, events: list[dict], **other) -> dict:
    pid = PREDICTED_PID if kind == "predicted" else MEASURED_PID
    return {"traceEvents": metadata_events(pid, kind, num_ranks(plan)) + events, "displayTimeUnit": "ms",
            "otherData": {"kind": kind, "job": plan.job, "plan_hash": plan.hash, "num_ranks": num_ranks(plan),
                          **other}}


# --------------------------------------------------------------------------- measured


def measured_trace(plan: Plan, steps: Sequence[RecordedStep]) -> dict:
    """The Chrome trace of the recorded steps' spans (see the module docstring); steps without spans are skipped."""
    starts = [t["start_unix"] for r in steps for t in r.timings if t and t.get("spans")]
    origin = min(starts, default=0.0)
    slices = slices_by_rank(plan)
    events = []
    for recorded in steps:
        for rank, timing in enumerate(recorded.timings):
            if not timing or not timing.get("spans"):
                continue
            offset = timing["start_unix"] - origin
            for part, wave, start, end in timing["spans"]:
                events.append(span_event(plan, MEASURED_PID, rank, part, wave, offset + start, offset + end,
                                         recorded.step, slices))
    shown = [r.step for r in steps if any(t and t.get("spans") for t in r.timings)]
    return trace_document(plan, "measured", events, steps=shown)


# --------------------------------------------------------------------------- predicted


def forward_fractions(plan: Plan) -> list[float]:
    """Per MetaOp, the forward share of its predicted compute (see the module docstring)."""
    trains: list[bool] = []  # whether the MetaOp or anything upstream of it trains
    fractions = []
    for op in plan.metaops:  # MetaOps come in dependency order
        upstream = any(trains[d] for d in op.deps)
        trains.append(upstream or not op.frozen)
        fractions.append(1 / 3 if not op.frozen else 1 / 2 if upstream else 1.0)
    return fractions


def boundary_seconds(plan: Plan) -> list[float]:
    """Per wave k, the predicted transfers into it (forward and back together; the module docstring's model)."""
    raw = [0.0] * len(plan.waves)
    for t in plan.transfers:
        if 0 <= t.after_wave + 1 < len(plan.waves):
            raw[t.after_wave + 1] = max(raw[t.after_wave + 1], t.time_s)
    total = sum(raw)
    scale = plan.predicted.transfer_s / total if total > 0 else 0.0
    return [seconds * scale for seconds in raw]


def transfer_ranks(plan: Plan) -> list[set[int]]:
    """Per wave k, the devices that send or receive at the boundary before it: the ends of the plan's pieces that
    cross devices or, for a plan without pieces, every device of the transfers' groups."""
    ranks: list[set[int]] = [set() for _ in plan.waves]
    for piece in plan.pieces:
        if 0 <= piece.wave < len(plan.waves) and piece.bytes > 0:
            ranks[piece.wave].update((piece.src, piece.dst))
    for t in plan.transfers if not plan.pieces else ():
        if 0 <= t.after_wave + 1 < len(plan.waves):
            ranks[t.after_wave + 1].update(t.src_devices, t.dst_devices)
    return ranks


def backward_share(plan: Plan, fractions: Sequence[float], k: int) -> float:
    """The part of boundary k's time that sends gradients back: the share of its bytes that the plan's pieces move
    backward or, without pieces, half unless every producer at the boundary runs forward only."""
    if plan.pieces:
        moved = [(piece.backward, piece.bytes) for piece in plan.pieces if piece.wave == k]
        total = sum(b for _, b in moved)
        return sum(b for back, b in moved if back) / total if total > 0 else 0.0
    producers = {t.src_metaop for t in plan.transfers if t.after_wave + 1 == k}
    return 0.5 if any(fractions[m] < 1.0 for m in producers) else 0.0


def loss_hosts(plan: Plan) -> set[int]:
    """Devices that run a task's loss: the first TP device of each data-parallel rank of the last slice (in wave
    order) of the task's leaf MetaOps, as the simulator prices the loss stage."""
    read = {d for op in plan.metaops for d in op.deps}
    last: dict[int, tuple[int, PlanSlice]] = {}
    for wave in plan.waves:
        for s in wave.slices:
            last[s.metaop] = (wave.index, s)
    hosts: set[int] = set()
    for task in dict.fromkeys(op.task for op in plan.metaops):
        leaves = [last[op.id] for op in plan.metaops if op.task == task and op.id not in read and op.id in last]
        if leaves:
            _, host = max(leaves, key=lambda ks: (ks[0], ks[1].metaop))
            hosts.update(host.devices[::host.tp_degree])
    return hosts


def predicted_trace(plan: Plan) -> dict:
    """The Chrome trace of one predicted iteration of ``plan`` (see the module docstring)."""
    ranks = range(num_ranks(plan))
    fractions, boundaries, movers = forward_fractions(plan), boundary_seconds(plan), transfer_ranks(plan)
    slices = slices_by_rank(plan)
    parts = []  # (forward, backward) seconds of each wave
    for wave in plan.waves:
        slowest = max(wave.slices, key=lambda s: s.time_s, default=None)
        forward = wave.duration_s * fractions[slowest.metaop] if slowest else 0.0
        parts.append((forward, wave.duration_s - forward))
    events: list[dict] = []

    def add(rank: int, part: str, wave: int | None, start: float, seconds: float) -> None:
        if seconds > 0:
            events.append(span_event(plan, PREDICTED_PID, rank, part, wave, start, start + seconds, 0, slices))

    t = 0.0
    for k, wave in enumerate(plan.waves):
        into = boundaries[k] * (1 - backward_share(plan, fractions, k))
        for rank in sorted(movers[k]):
            add(rank, "transfer_forward", k, t, into)
        t += into
        for rank in ranks:
            s = slices.get((k, rank))
            if s is not None:
                add(rank, "forward", k, t, min(s.time_s * fractions[s.metaop], parts[k][0]))
        t += parts[k][0]
    loss_s = max(0.0, plan.predicted.compute_s - sum(w.duration_s for w in plan.waves))
    for rank in sorted(loss_hosts(plan)):
        add(rank, "loss", None, t, loss_s)
    t += loss_s
    for k in reversed(range(len(plan.waves))):
        for rank in ranks:
            s = slices.get((k, rank))
            if s is not None:
                add(rank, "backward", k, t, min(s.time_s * (1 - fractions[s.metaop]), parts[k][1]))
        t += parts[k][1]
        back = boundaries[k] * backward_share(plan, fractions, k)
        for rank in sorted(movers[k]):
            add(rank, "transfer_backward", k, t, back)
        t += back
    predicted = plan.predicted
    for part, seconds in (("sync", predicted.sync_s), ("optimizer", predicted.optimizer_s),
                          ("gather", predicted.gather_s)):
        for rank in ranks:
            add(rank, part, None, t, seconds)
        t += seconds
    return trace_document(plan, "predicted", events, steps=[0], iteration_s=predicted.iteration_time_s)


# --------------------------------------------------------------------------- files


class TraceError(ValueError):
    """A trace file does not follow the structure this module writes."""


def check_trace(data: object, ranks: int | None = None) -> list[dict]:
    """The complete events of a trace written here; TraceError naming the first thing that is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise TraceError('not a Chrome trace: expected a JSON object with a "traceEvents" list')
    complete = []
    for i, event in enumerate(data["traceEvents"]):
        where = f"traceEvents[{i}]"
        if not isinstance(event, dict) or event.get("ph") not in ("X", "M"):
            raise TraceError(f'{where}: expected an object with "ph" "X" or "M"')
        for key, kind in (("name", str), ("pid", int), ("tid", int)):
            if not isinstance(event.get(key), kind) or isinstance(event.get(key), bool):
                raise TraceError(f"{where}: {key!r} missing or not a {kind.__name__}")
        if ranks is not None and not 0 <= event["tid"] < ranks:
            raise TraceError(f"{where}: tid {event['tid']} is not a rank of {ranks}")
        if event["ph"] == "M":
            continue
        for key in ("ts", "dur"):
            value = event.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise TraceError(f"{where}: {key!r} missing or not a finite number")
        if event["dur"] < 0 or event["ts"] < 0:
            raise TraceError(f"{where}: negative ts or dur")
        if event.get("cat") not in CATEGORIES or not isinstance(event.get("args"), dict):
            raise TraceError(f"{where}: 'cat' not one of {', '.join(CATEGORIES)}, or no 'args'")
        complete.append(event)
    return complete


def write_trace(path: str | Path, trace: dict) -> None:
    """Write ``trace`` as compact JSON (one event per line, so that the file diffs and greps well)."""
    events = ",\n".join(json.dumps(e, sort_keys=True) for e in trace["traceEvents"])
    rest = {k: v for k, v in trace.items() if k != "traceEvents"}
    head = "".join(f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)},\n" for k, v in sorted(rest.items()))
    Path(path).write_text(f'{{{head}"traceEvents": [\n{events}\n]}}\n', encoding="utf-8")


def load_trace(path: str | Path, ranks: int | None = None) -> dict:
    """A trace file written by :func:`write_trace`, checked (:func:`check_trace`); TraceError when it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TraceError(f"cannot read it as JSON ({exc})") from None
    check_trace(data, ranks)
    return data


def write_run_traces(out_dir: Path, plan: Plan, steps: Sequence[RecordedStep]) -> list[Path]:
    """``trace-predicted.json`` and, when any step recorded spans, ``trace.json`` in ``out_dir``; the paths."""
    written = [out_dir / PREDICTED_TRACE_FILE]
    write_trace(written[0], predicted_trace(plan))
    measured = measured_trace(plan, steps)
    if measured["otherData"]["steps"]:
        written.append(out_dir / TRACE_FILE)
        write_trace(written[1], measured)
    return written
