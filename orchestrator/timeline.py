"""``loom gantt OUT``: a finished run's predicted iteration against a measured step, as one Gantt chart.

Entry point :func:`write_run_gantt`. It reads ``plan.json`` and ``trace.json`` from the output directory of
a ``loom run`` (and ``trace-predicted.json``, or rebuilds it from the plan when it is missing), and draws two
panels of orchestrator.gantt, one above the other, each on its own time axis (milliseconds): the
prediction, then one measured step (the last one the trace holds, or the one asked for). One row per
rank; every span of the trace is a block: forward and backward compute in the colour of the MetaOp's
task and named after it, transfers, loss, gradient sync and optimizer in greys. Labels above a panel
mark each wave's forward (``f<k>``) and backward (``b<k>``). A folder that is not such an output is a
:class:`RunOutputError` (the CLI's one ``error:`` line, exit 2).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.gantt import Block, Panel, device_runs, metaop_colours, task_colours, write_panels
from orchestrator.render import format_seconds
from orchestrator.trace import PREDICTED_TRACE_FILE, TRACE_FILE, TraceError, load_trace, predicted_trace
from planner.errors import LoomError
from planner.plan import Plan, load_plan

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"  # as orchestrator.run writes it
DEFAULT_CHARTS = ("gantt.png", "gantt.html")
PART_SHORT = {"transfer": "T", "loss": "L", "sync": "S", "optimizer": "O"}


class RunOutputError(LoomError):
    """The folder is not the output of a finished ``loom run`` (or its files are damaged)."""


@dataclass(frozen=True)
class RunTraces:
    """What ``loom gantt`` reads from a run's output folder."""

    plan: Plan
    predicted: dict
    measured: dict


@dataclass(frozen=True)
class GanttSummary:
    """What :func:`write_run_gantt` drew: the measured step, both durations (seconds) and the files written."""

    step: int
    predicted_s: float
    measured_s: float
    paths: list[Path]


def load_run_traces(out_dir: str | Path) -> RunTraces:
    """The plan and both traces of the run whose output folder is ``out_dir``; RunOutputError when one is missing."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        what = "not a directory" if out_dir.exists() else "no such directory"
        raise RunOutputError(f"{out_dir}: {what}. Give the --out folder of a finished `loom run`.")
    plan_path, trace_path = out_dir / PLAN_FILE, out_dir / TRACE_FILE
    if not plan_path.is_file():
        raise RunOutputError(f"{out_dir}: no {PLAN_FILE}; this is not the output folder of a `loom run`. Give the "
                             "folder `loom run --out` wrote.")
    plan = load_plan(plan_path)
    ranks = plan.cluster.num_nodes * plan.cluster.devices_per_node
    if not trace_path.is_file():
        raise RunOutputError(f"{out_dir}: no {TRACE_FILE}; `loom run` writes it when a run finishes its steps. "
                             "Run the job to the end (or resume it) with this --out.")
    measured = _load(trace_path, ranks)
    predicted_path = out_dir / PREDICTED_TRACE_FILE
    if predicted_path.is_file():
        predicted = _load(predicted_path, ranks)
    else:
        log.info("%s is missing; predicting from %s", predicted_path, plan_path)
        predicted = predicted_trace(plan)
    for path, trace in ((trace_path, measured), (predicted_path, predicted)):
        if trace.get("otherData", {}).get("plan_hash") not in (None, plan.hash):
            raise RunOutputError(f"{path}: written for plan {trace['otherData']['plan_hash']}, but {plan_path} is "
                                 f"plan {plan.hash}. Re-run the job with this --out.")
    return RunTraces(plan, predicted, measured)


def _load(path: Path, ranks: int) -> dict:
    try:
        return load_trace(path, ranks)
    except TraceError as exc:
        raise RunOutputError(f"{path}: {exc}. It is not a trace `loom run` wrote; re-run the job.") from None


def recorded_steps(trace: dict) -> list[int]:
    """The steps a measured trace holds spans of, in order."""
    return sorted({e["args"]["step"] for e in trace["traceEvents"] if e["ph"] == "X"})


def trace_blocks(plan: Plan, events: Sequence[dict], origin_us: float = 0.0) -> list[Block]:
    """One block per complete event (``ts`` from ``origin_us``); events equal but for their rank and on
    consecutive ranks become one block over those rows. Events without duration are left out."""
    ids = {op.name: op.id for op in plan.metaops}
    rows: dict[tuple, list[int]] = {}
    for e in events:
        if e["ph"] == "X" and e["dur"] > 0:
            rows.setdefault((e["name"], e["cat"], e["ts"], e["dur"]), []).append(e["tid"])
    args = {(e["name"], e["cat"], e["ts"], e["dur"]): e["args"] for e in events if e["ph"] == "X"}
    blocks = []
    for key, tids in rows.items():
        name, cat, ts, dur = key
        a = args[key]
        wave = a.get("wave") if a.get("wave") is not None else -1
        task = a.get("task", "")
        if cat == "compute" and a.get("metaop") in ids:
            direction = "fwd" if a.get("part") == "forward" else "bwd"
            metaop = ids[a["metaop"]]
            short = a["metaop"].removeprefix(task + ".")
            label, short_label, kind = f"{task}: {short} {direction}", task, "compute"
        else:
            metaop, label, short_label = -1, name, PART_SHORT.get(cat, cat[:1].upper())
            kind = cat if cat in PART_SHORT else "sync"
        for first, count in device_runs(tids):
            ranks = f"rank {first}" if count == 1 else f"ranks {first}..{first + count - 1}"
            tooltip = f"{name}\n{ranks}, step {a.get('step')}\n{format_seconds(dur / 1e6)}"
            blocks.append(Block(wave, metaop, task, label, short_label, tooltip, (ts - origin_us) / 1e6, dur / 1e6,
                                first, count, kind))
    return sorted(blocks, key=lambda b: (b.start_s, b.first_device))


def wave_marks(events: Sequence[dict], origin_us: float = 0.0) -> list[tuple[float, str]]:
    """``f<k>`` over the compute of wave k's forward and ``b<k>`` over its backward (centres in seconds from
    ``origin_us``), in time order."""
    spans: dict[str, tuple[float, float]] = {}
    for e in events:
        a = e["args"]
        if e["ph"] == "X" and e["cat"] == "compute" and a.get("wave") is not None:
            key = ("f" if a.get("part") == "forward" else "b") + str(a["wave"])
            lo, hi = spans.get(key, (e["ts"], e["ts"] + e["dur"]))
            spans[key] = (min(lo, e["ts"]), max(hi, e["ts"] + e["dur"]))
    return sorted(((lo + hi) / 2e6 - origin_us / 1e6, key) for key, (lo, hi) in spans.items())


def trace_panel(plan: Plan, trace: dict, heading: str, step: int | None = None) -> Panel:
    """A panel of ``trace``'s events (of ``step`` only, when given), its time axis from their first start."""
    events = [e for e in trace["traceEvents"]
              if e["ph"] == "X" and (step is None or e["args"].get("step") == step)]
    origin = min((e["ts"] for e in events), default=0.0)
    blocks = trace_blocks(plan, events, origin)
    end = max((b.start_s + b.duration_s for b in blocks), default=0.0)
    return Panel(heading.format(duration=format_seconds(end)), blocks,
                 plan.cluster.num_nodes * plan.cluster.devices_per_node, plan.cluster.devices_per_node, end,
                 wave_marks(events, origin), row_name="rank")


def write_run_gantt(out_dir: str | Path, paths: Sequence[Path] = (), step: int | None = None) -> GanttSummary:
    """Draw the run in ``out_dir`` (predicted above measured) to ``paths`` (default ``gantt.png`` and
    ``gantt.html`` there); ``step``: the measured step to draw (default the last one recorded)."""
    out_dir = Path(out_dir)
    traces = load_run_traces(out_dir)
    steps = recorded_steps(traces.measured)
    if not steps:
        raise RunOutputError(f"{out_dir / TRACE_FILE}: holds no measured step. Re-run the job with this --out.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise RunOutputError(f"--step ({step}) is not in {out_dir / TRACE_FILE}; it holds steps "
                             f"{', '.join(map(str, steps))} (the last ones of the run). Pick one of them.")
    plan = traces.plan
    predicted = trace_panel(plan, traces.predicted, "predicted iteration: {duration}")
    measured = trace_panel(plan, traces.measured, f"measured step {step}: {{duration}}", step)
    ratio = f", {measured.end_s / predicted.end_s:.2f}x the prediction" if predicted.end_s > 0 else ""
    measured = Panel(measured.heading + ratio, measured.blocks, measured.num_devices, measured.devices_per_node,
                     measured.end_s, measured.marks, row_name="rank")
    ranks = predicted.num_devices
    title = f"{plan.job}: predicted against measured (plan {plan.hash})"
    subtitle = (f"{ranks} ranks, {len(plan.waves)} waves, cost model {plan.cost_model}; each panel on its own "
                "time axis; the prediction is the simulator's timeline as the plan records it (see docs/run.md)")
    targets = list(paths) or [out_dir / name for name in DEFAULT_CHARTS]
    for path in targets:
        try:
            write_panels([predicted, measured], metaop_colours(plan), task_colours(plan), title, subtitle, path,
                         page_title=f"{plan.job}: Loom run")
        except OSError as exc:
            raise RunOutputError(f"{path}: cannot write the chart ({exc.strerror or exc}). Check the path and "
                                 "permissions, or pass --output.") from None
    return GanttSummary(step, predicted.end_s, measured.end_s, targets)
