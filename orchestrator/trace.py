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

The prediction is the simulator's timeline as the Plan records it (planner.simulator): forward runs the waves in
order, each after its transfers in (``PlanWave.transfer_in_s``), each slice for its ``forward_s``; then the loss
stage with its transfers (``Prediction.loss_*``); backward in reverse, each wave followed by its gradients sent back
(``transfer_back_s``); then the exposed gradient sync, the optimizer and the exposed all-gather. Transfers are
drawn on the ranks the plan's pieces move data between; gradient all-reduces hidden behind backward are not drawn.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from planner.jsonfile import JsonKind, read_json
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
MAX_TRACE_BYTES = 256 * 2**20  # TRACE_STEPS steps of a thousand ranks at ~100 spans each: ~100 MiB
TRACE_JSON = JsonKind("trace file", "not a Chrome trace", 'a JSON object with a "traceEvents" list, as `loom run` '
                      "writes", "Re-run the job with this --out", MAX_TRACE_BYTES)


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


def transfer_ranks(plan: Plan) -> dict[int, set[int]]:
    """Per boundary (a wave's index, or -1 for the loss stage's), the devices that send or receive there: the ends of
    the plan's pieces that cross devices or, for a plan without pieces, every device of the transfers' groups."""
    ranks: dict[int, set[int]] = {}
    for piece in plan.pieces:
        if piece.bytes > 0:
            ranks.setdefault(piece.wave, set()).update((piece.src, piece.dst))
    for t in plan.transfers if not plan.pieces else ():
        ranks.setdefault(t.after_wave + 1 if t.after_wave + 1 < len(plan.waves) else -1, set()).update(
            t.src_devices, t.dst_devices)
    return ranks


def loss_hosts(plan: Plan) -> set[int]:
    """Devices that run a task's loss: the holders of the tasks' loss heads (``Plan.holdings``)."""
    return {d for h in plan.holdings if h.name.startswith("head:") for d in h.devices}


def predicted_trace(plan: Plan) -> dict:
    """The Chrome trace of one predicted iteration of ``plan`` (see the module docstring)."""
    ranks = range(num_ranks(plan))
    movers, slices, pred = transfer_ranks(plan), slices_by_rank(plan), plan.predicted
    events: list[dict] = []
    t = 0.0

    def add(part: str, wave: int | None, seconds: float, on) -> None:
        for rank in sorted(on):
            if seconds > 0:
                events.append(span_event(plan, PREDICTED_PID, rank, part, wave, t, t + seconds, 0, slices))

    def compute(k: int, part: str, wave_seconds: float) -> None:
        for rank in ranks:
            s = slices.get((k, rank))
            if s is not None:
                seconds = s.forward_s if part == "forward" else s.time_s - s.forward_s
                add(part, k, min(seconds, wave_seconds), [rank])

    for k, wave in enumerate(plan.waves):
        add("transfer_forward", k, wave.transfer_in_s, movers.get(k, ()))
        t += wave.transfer_in_s
        compute(k, "forward", wave.forward_s)
        t += wave.forward_s
    for part, seconds, on in (("transfer_forward", pred.loss_transfer_in_s, movers.get(-1, ())),
                              ("loss", pred.loss_s, loss_hosts(plan)),
                              ("transfer_backward", pred.loss_transfer_back_s, movers.get(-1, ()))):
        add(part, None, seconds, on)
        t += seconds
    for k in reversed(range(len(plan.waves))):
        wave = plan.waves[k]
        compute(k, "backward", wave.duration_s - wave.forward_s)
        t += wave.duration_s - wave.forward_s
        add("transfer_backward", k, wave.transfer_back_s, movers.get(k, ()))
        t += wave.transfer_back_s
    for part, seconds in (("sync", pred.sync_s), ("optimizer", pred.optimizer_s), ("gather", pred.gather_s),
                          ("reduce_losses", pred.reduce_s)):
        add(part, None, seconds, ranks)
        t += seconds
    return trace_document(plan, "predicted", events, steps=[0], iteration_s=pred.iteration_time_s)


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
    """A trace file written by :func:`write_trace`, checked (:func:`check_trace`): a SpecError naming the file when it
    cannot be read as JSON (planner.jsonfile), TraceError when its JSON is not a trace."""
    data = read_json(path, TRACE_JSON)
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
