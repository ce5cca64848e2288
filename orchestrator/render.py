"""Text rendering of job specs and plans for the terminal (rich tables) and for plain logs.

Owns the human-readable views of a :class:`~planner.plan.Plan`: a header (job, devices, cost model,
MetaOps, planning time), one table per wave (MetaOp, layers, device ranges, dp x tp, time, memory
per device) and a summary (predicted iteration time and its parts, bounds, solver status, every
baseline with Loom's speed-up over it). Pure formatting: nothing here plans, reads or writes files.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Iterable, Sequence
from typing import IO

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from planner.plan import Plan, PlanMetaOp, PlanWave
from planner.spec import JobSpec

GIB = 1024**3
MIB = 1024**2
UNBOUNDED_WIDTH = 100_000  # columns when printing to a pipe or file: tables take their natural width, nothing is cut


# --------------------------------------------------------------------------- small formatters


def format_seconds(seconds: float) -> str:
    """``1.23 s``, ``45.6 ms`` or ``789 µs`` (three significant digits); ``-`` for NaN/inf."""
    if not math.isfinite(seconds):
        return "-"
    magnitude = abs(seconds)
    if magnitude >= 1.0 or magnitude == 0.0:
        return f"{seconds:.3g} s" if magnitude < 1000 else f"{seconds:,.0f} s"
    if magnitude >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def format_bytes(num_bytes: float) -> str:
    """``12.3 GiB`` or ``456 MiB`` (binary units, as device memory is quoted)."""
    if not math.isfinite(num_bytes):
        return "-"
    if abs(num_bytes) >= GIB:
        return f"{num_bytes / GIB:.1f} GiB"
    if abs(num_bytes) >= MIB:
        return f"{num_bytes / MIB:.0f} MiB"
    return f"{num_bytes / 1024:.0f} KiB"


def compact_ranges(ids: Iterable[int]) -> str:
    """Sorted ids as ranges: ``[0, 1, 2, 3, 16, 17, 5]`` -> ``0-3,5,16-17``."""
    ordered = sorted(set(ids))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def short_name(op: PlanMetaOp) -> str:
    """A MetaOp's name without its task prefix: ``seg.image_encoder#2`` -> ``image_encoder#2``."""
    prefix = op.task + "."
    return op.name[len(prefix):] if op.name.startswith(prefix) else op.name


def speedup(baseline_s: float, loom_s: float) -> float:
    """How many times faster Loom is than a baseline (both predicted iteration times, seconds)."""
    return baseline_s / loom_s if loom_s > 0 else math.nan


# --------------------------------------------------------------------------- job summary


def describe_job(job: JobSpec) -> str:
    """One line: tasks, components, MetaOps (and levels) and devices of a validated job.

    Raises SpecError for an unknown device kind (``load_job`` does not resolve the device table).
    """
    from planner.devices import resolve_hardware  # local: keeps `import orchestrator.render` light
    from planner.metagraph import build_metagraph

    hardware = resolve_hardware(job.cluster)  # also rejects an unknown device kind
    graph = build_metagraph(job)
    return (
        f"{job.name}: {_count(len(job.tasks), 'task')}, {_count(len(job.components), 'component')}, "
        f"{_count(len(graph), 'MetaOp')} in {_count(len(graph.levels), 'level')}, "
        f"{_count(hardware.num_devices, 'device')} ({hardware.num_nodes} x {hardware.devices_per_node} "
        f"{hardware.device.name}, {format_bytes(hardware.memory_bytes)} each)"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# --------------------------------------------------------------------------- plan views


def plan_header(plan: Plan, planning_time_s: float | None = None) -> Table:
    """Key facts of a plan as a two-column grid."""
    cluster = plan.cluster
    num_devices = cluster.num_nodes * cluster.devices_per_node
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("job", plan.job)
    grid.add_row(
        "devices",
        f"{num_devices} ({cluster.num_nodes} node{'s' if cluster.num_nodes != 1 else ''} x "
        f"{cluster.devices_per_node} {cluster.device}, {format_bytes(cluster.memory_bytes)} each)",
    )
    grid.add_row("cost model", plan.cost_model)
    if plan.shard_optimizer is not None:  # the planner's choice (training.shard_optimizer: auto)
        grid.add_row("optimizer", f"ZeRO-1 {'on' if plan.shard_optimizer else 'off'} (auto: the faster that fits)")
    walk = ", 1F1B" if plan.one_f_one_b else ""  # the planner's walk of pipelined micro-batches, where no slower
    parts, auto = [], []
    if plan.grad_accum_steps is not None:  # the planner's count (training.grad_accum_steps: auto)
        parts.append(str(plan.grad_accum_steps))
        auto.append("the fastest count planned")
    if plan.pipelined is not None:  # the planner's order (training.pipeline_micro_batches: auto)
        parts.append(f"pipelined{walk}" if plan.pipelined else "in order")
        auto.append("the faster that fits")
    elif walk:
        parts.append("pipelined, 1F1B (no slower than GPipe's fill and drain)")
    if parts:
        grid.add_row("micro-batches", ", ".join(parts) + (f" (auto: {'; '.join(auto)})" if auto else ""))
    phases = f" in {len(plan.phases)} phases (first waves {plan.phases})" if len(plan.phases) > 1 else ""
    grid.add_row("MetaOps", f"{len(plan.metaops)} in {len(plan.waves)} wave{'s' if len(plan.waves) != 1 else ''}{phases}")
    if planning_time_s is not None:
        grid.add_row("planning time", format_seconds(planning_time_s))
    grid.add_row("plan hash", plan.hash or "(unsealed)")
    return grid


def wave_table(plan: Plan, wave: PlanWave) -> Table:
    """One wave: a row per MetaOp slice."""
    num_devices = plan.cluster.num_nodes * plan.cluster.devices_per_node
    busy = sum(len(s.devices) for s in wave.slices)
    end = wave.start_s + wave.duration_s
    table = Table(
        title=f"Wave {wave.index}: {format_seconds(wave.start_s)} .. {format_seconds(end)} "
        f"({format_seconds(wave.duration_s)}, {busy}/{num_devices} devices busy)",
        title_justify="left",
        title_style="bold",
    )
    table.add_column("MetaOp", no_wrap=True)
    table.add_column("layers", justify="right", no_wrap=True)
    table.add_column("devices", no_wrap=True)
    table.add_column("dp x tp", justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("memory/device", justify="right", no_wrap=True)
    for s in sorted(wave.slices, key=lambda s: (min(s.devices, default=0), s.metaop)):
        op = plan.metaops[s.metaop]
        last = s.first_layer + s.num_layers - 1
        table.add_row(
            op.name if op.mode == "train" else f"{op.name} ({op.mode})",
            f"{s.first_layer}..{last} ({s.num_layers}/{op.num_layers})",
            compact_ranges(s.devices),
            f"{s.dp_degree} x {s.tp_degree}",
            format_seconds(s.time_s),
            format_bytes(s.memory_bytes),
        )
    return table


def plan_summary(plan: Plan) -> Group:
    """Predicted time and its parts, bounds with ratios, solver report, peak memory and the baselines."""
    pred = plan.predicted
    lines = [
        Text.assemble(
            ("predicted iteration ", "bold"), format_seconds(pred.iteration_time_s),
            f" = compute {format_seconds(pred.compute_s)} + transfer {format_seconds(pred.transfer_s)}"
            f" + exposed sync {format_seconds(pred.sync_s)} + optimizer {format_seconds(pred.optimizer_s)}"
            f" + exposed all-gather {format_seconds(pred.gather_s)}"
            + (f" + weight hand-off {format_seconds(pred.handoff_s)}" if pred.handoff_s else "")
            + (f" + step all-reduce {format_seconds(pred.reduce_s)}" if pred.reduce_s else "")
            + (f" - generation hidden behind the previous step {format_seconds(pred.lag_hidden_s)}"
               if pred.lag_hidden_s else ""),
        ),
        Text.assemble(("bounds (compute) ", "bold"), _bounds_line(plan)),
        Text.assemble(("bound (iteration) ", "bold"), _iteration_bound_line(plan)),
        Text.assemble(("solver ", "bold"), _solver_line(plan)),
    ]
    if plan.peak_memory_bytes:
        peak = max(plan.peak_memory_bytes)
        device = plan.peak_memory_bytes.index(peak)
        lines.append(Text.assemble(
            ("peak memory ", "bold"),
            f"{format_bytes(peak)} on device {device} (of {format_bytes(plan.cluster.memory_bytes)})",
        ))
    parts: list[RenderableType] = list(lines)
    parts.append(baseline_table(plan) if plan.baselines else Text("baselines: not computed (--no-baselines)"))
    return Group(*parts)


def _bounds_line(plan: Plan) -> str:
    """The compute bounds against what they bound: the sum of the waves' durations (the timeline's compute, which
    overlaps waves, may be below them; the iteration bound bounds the timeline)."""
    waves = sum(w.duration_s for w in plan.waves)
    pieces = []
    for label, bound in (("per-level", plan.bounds.per_level_s), ("DAG", plan.bounds.dag_s)):
        ratio = f"{waves / bound:.3f}x" if bound > 0 else "-"
        pieces.append(f"{label} {format_seconds(bound)} (Loom waves' compute / bound = {ratio})")
    return ", ".join(pieces)


def _iteration_bound_line(plan: Plan) -> str:
    bound = plan.bounds.iteration_s
    ratio = f"{plan.predicted.iteration_time_s / bound:.3f}x" if bound > 0 else "-"
    return f"{format_seconds(bound)} (Loom iteration / bound = {ratio}): compute, optimizer step, unhidden sync"


def _solver_line(plan: Plan) -> str:
    solver = plan.solver
    gap = f"{solver.gap * 100:.2f}%" if math.isfinite(solver.gap) else "-"
    return (
        f"{solver.name}, {solver.status}, gap {gap}, objective {format_seconds(solver.objective_s)}, "
        f"bound {format_seconds(solver.bound_s)}, method {solver.method}"
    )


def baseline_table(plan: Plan) -> Table:
    """Every baseline's predicted iteration time (same simulator) and Loom's speed-up over it."""
    loom_s = plan.predicted.iteration_time_s
    table = Table(title="Baselines (same cost model and simulator)", title_justify="left", title_style="bold")
    table.add_column("schedule", no_wrap=True)
    table.add_column("predicted iteration", justify="right", no_wrap=True)
    table.add_column("Loom speed-up", justify="right", no_wrap=True)
    table.add_row("loom", format_seconds(loom_s), "1.00x", style="bold")
    for name, seconds in sorted(plan.baselines.items(), key=lambda item: (item[1], item[0])):
        mark = " (!)" if name in plan.baseline_notes else ""
        table.add_row(name + mark, format_seconds(seconds), f"{speedup(seconds, loom_s):.2f}x")
    if plan.baseline_notes:
        table.caption = "; ".join(f"(!) {name}: {note}" for name, note in sorted(plan.baseline_notes.items()))
        table.caption_justify = "left"
    return table


def plan_renderables(plan: Plan, planning_time_s: float | None = None) -> list[RenderableType]:
    """Everything ``loom plan`` prints, in order: header, a table per wave, summary."""
    parts: list[RenderableType] = [plan_header(plan, planning_time_s)]
    parts.extend(wave_table(plan, wave) for wave in plan.waves)
    parts.append(plan_summary(plan))
    return parts


def print_plan(plan: Plan, console: Console, planning_time_s: float | None = None) -> None:
    """Print the plan's views to ``console`` with a blank line between them."""
    for part in plan_renderables(plan, planning_time_s):
        console.print(part)
        console.print()


def plan_console(file: IO[str] | None = None) -> Console:
    """A console for :func:`print_plan` on ``file`` (default stdout): a terminal's own width, else
    :data:`UNBOUNDED_WIDTH`, so that a piped or redirected table carries every value in full (no ``…``)."""
    target = file if file is not None else sys.stdout
    on_terminal = target.isatty()
    return Console(file=file, width=None if on_terminal else UNBOUNDED_WIDTH, highlight=False)


def render_plan_text(plan: Plan, planning_time_s: float | None = None, width: int = 120) -> str:
    """The plan's views as plain text (no colour), ``width`` columns wide."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, highlight=False)
    print_plan(plan, console, planning_time_s)
    return buffer.getvalue()


def task_order(metaops: Sequence[PlanMetaOp]) -> list[str]:
    """Task names in the order they first appear among ``metaops``."""
    return list(dict.fromkeys(op.task for op in metaops))
