"""Markdown report of the planner benchmark: a table per group and a verdict per target.

Targets (DESIGN.md §8, planner issue) are evaluated on the measured records exactly as stated;
a target that is not met says SHORT with the cells that miss it, a target whose cells were not run
says NOT MEASURED. Nothing is rounded in the verdicts (tables round for reading only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BASELINE_ORDER = ("sequential", "uniform", "optimus", "distmm_mt", "spindle")
PER_LEVEL_TARGET = 1.03
SPINDLE_MEAN_TARGET = 1.05
NEAR_BOUND = 1.05  # Spindle this close to the bound leaves little room for any speed-up
SEQUENTIAL_CELL, SEQUENTIAL_TARGET = "clip-10@32", 1.71
SMALL_MAX_DEVICES, SMALL_PLAN_S = 64, 3.0
LARGE_DEVICES, LARGE_MIN_METAOPS, LARGE_PLAN_S = 1024, 100, 30.0
# the scale section's targets (issue 13): (devices, MetaOps at least) -> planning seconds, peak RSS MiB (None: no limit)
SCALE_PLAN_TARGETS = {(1024, 200): (20.0, None), (10240, 500): (60.0, 1024.0)}
SCALE_MEAN_TARGET = 1.3  # geometric mean over the scale cells of best fitting baseline / Loom
EPS = 1e-9  # float noise allowed in "never slower" and "<= bound x" comparisons
SPINDLE_GROUPS = ("grid", "sweep", "scale")  # Spindle's workloads and the synthetic ones; recipe cells stay out

Record = dict[str, Any]


@dataclass(frozen=True)
class Verdict:
    """One target's evaluation: ``verdict`` is PASS, SHORT or NOT MEASURED."""

    target: str
    measured: str
    verdict: str
    notes: str = ""


# --------------------------------------------------------------------------- formatting


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _x(ratio: float | None, digits: int = 3) -> str:
    return "-" if ratio is None else f"{ratio:.{digits}f}"


def _ok(records: Sequence[Record]) -> list[Record]:
    return [r for r in records if not r.get("error")]


def geomean(values: Sequence[float]) -> float | None:
    """Geometric mean of positive values (None when empty)."""
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _baseline_keys(records: Sequence[Record]) -> list[str]:
    seen = {k for r in _ok(records) for k in r["iteration_s"] if k != "loom"}
    return [k for k in BASELINE_ORDER if k in seen] + sorted(seen - set(BASELINE_ORDER))


def results_table(records: Sequence[Record]) -> str:
    """One markdown table: predicted iteration times (ms), bounds, ratios, solver and planning time per cell."""
    keys = _baseline_keys(records)
    head = (["Cell", "MetaOps"] + keys + ["Loom", "per-level bound", "DAG bound", "Loom/PL full",
            "Loom/PL compute", "Loom/DAG compute", "Spindle/PL compute", "vs Spindle", "vs sequential",
            "solver (gap)", "plan s (median)", "plan CPU s (median)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if r.get("error"):
            lines.append(f"| {r['cell']} | error: {r['error']}" + " |" * (len(head) - 1))
            continue
        it, ra, b = r["iteration_s"], r["ratios"], r["bounds"]
        notes = r.get("baseline_notes", {})
        row = [r["cell"], str(r["num_metaops"])] + [_ms(it.get(k)) + _marker(notes.get(k)) for k in keys] + [
            _ms(it["loom"]), _ms(b["per_level_s"]), _ms(b["dag_s"]), _x(ra["loom_over_per_level"]),
            _x(ra["loom_compute_over_per_level"]), _x(ra["loom_compute_over_dag"]),
            _x(ra["spindle_compute_over_per_level"]), _x(ra["speedup_vs_spindle"]),
            _x(ra["speedup_vs_sequential"], 2), f"{r['solver']['status']} ({r['solver']['gap']:.3f})",
            f"{r['planning_time_median_s']:.2f}", _cpu(r),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _cpu(record: Record) -> str:
    """The planning process's CPU seconds (median), '-' in records from before it was measured."""
    cpu = record.get("planning_cpu_median_s")
    return "-" if cpu is None else f"{cpu:.2f}"


def best_fitting_baseline(record: Record) -> tuple[str, float] | None:
    """The fastest baseline whose plan fits in device memory and runs (not named in ``baseline_notes``: Loom could
    adopt it), as (name, s)."""
    notes = record.get("baseline_notes", {})
    fitting = [(t, k) for k, t in record["iteration_s"].items() if k != "loom" and k not in notes]
    return (min(fitting)[1], min(fitting)[0]) if fitting else None


def speedup_vs_best(record: Record) -> float | None:
    best = best_fitting_baseline(record)
    return None if best is None else best[1] / record["iteration_s"]["loom"]


def scale_table(records: Sequence[Record]) -> str:
    """The scale section: every baseline (OOM where its plan does not fit), the best fitting one, Loom, the ratio,
    Loom's peak device memory, planning time (baselines included) and the planning process's peak RSS."""
    keys = _baseline_keys(records)
    head = (["Cell", "MetaOps"] + keys + ["best fitting", "Loom", "best / Loom", "Loom compute / PL",
                                          "Loom peak GiB (device)", "plan s", "peak RSS MiB", "solver method"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if r.get("error"):
            lines.append(f"| {r['cell']} | error: {r['error']}" + " |" * (len(head) - 1))
            continue
        it, notes, best = r["iteration_s"], r.get("baseline_notes", {}), best_fitting_baseline(r)
        mem = r.get("peak_memory_gib", {})
        rss = r.get("peak_rss_mib")
        row = [r["cell"], str(r["num_metaops"])] + [_ms(it.get(k)) + _marker(notes.get(k)) for k in keys] + [
            f"{best[0]} {_ms(best[1])}" if best else "none fits", _ms(it["loom"]), _x(speedup_vs_best(r)),
            _x(r["ratios"]["loom_compute_over_per_level"]),
            f"{mem.get('loom', float('nan')):.1f} ({mem.get('device', float('nan')):.0f})",
            f"{r['planning_time_median_s']:.2f}", "-" if rss is None else f"{rss:.0f}", r["solver"]["method"],
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _marker(note: str | None) -> str:
    """A baseline's mark in the tables: (OOM) where its plan does not fit in device memory, (cannot run) where it
    fits and the runtime could not run it (planner.api.baseline_notes)."""
    if note is None:
        return ""
    return " (cannot run)" if _cannot_run(note) else " (OOM)"


def _cannot_run(note: str) -> bool:
    """Whether a baseline's note says the runtime could not run its plan (else: it does not fit in memory)."""
    return note.startswith("the runtime cannot run")


def losses_table(records: Sequence[Record]) -> str:
    """Where each cell's predicted iteration goes: the compute on the simulated critical path (*timeline*: no barrier
    between waves, every forward, the losses, every backward) beside the waves' compute (each wave its slowest slice,
    what the compute ratios divide), ZeRO-1's exposed all-gather with its share of the iteration, the exposed sync
    and transfers. Records without the simulator's parts (``predicted``) are left out."""
    head = ["Cell", "Loom", "timeline compute", "waves' compute", "per-level bound", "timeline / waves",
            "gather (share)", "exposed sync", "transfers", "vs Spindle"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _ok(records):
        parts = r.get("predicted")
        if not parts:
            continue
        it, waves = parts["iteration_time_s"], r["compute_s"]["loom"]
        row = [r["cell"], _ms(it), _ms(parts["compute_s"]), _ms(waves), _ms(r["bounds"]["per_level_s"]),
               _x(parts["compute_s"] / waves if waves else None),
               f"{_ms(parts['gather_s'])} ({100 * parts['gather_s'] / it:.0f}%)" if it else "-",
               _ms(parts["sync_s"]), _ms(parts["transfer_s"]), _x(r["ratios"].get("speedup_vs_spindle"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def compute_steps_table(records: Sequence[Record]) -> str:
    """Where each grid cell's compute goes beyond the per-level bound, step by step (ratios to the bound): the
    allocation LP (valid device counts, whole layers per pattern, fractional repetitions; the best of the stage-window
    kinds: integer counts and dependencies), the solver's least-compute candidate (packing into waves of whole
    repetitions), the plan (chosen on the simulated iteration, not on compute) and its timeline compute (no barrier
    between waves). The pattern-LP bound (whole layers on valid counts, each wave its largest forward plus its largest
    backward: planner.layerbound.pass_layer_bound) is the per-level bound tightened, and the plan's waves over it.
    Records without the LP's value are left out."""
    head = ["Cell", "pattern-LP bound", "allocation LP", "least-compute candidate", "plan (waves)", "plan (timeline)",
            "plan (waves) / pattern-LP bound", "plan's method"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _ok(records):
        compute, bound = r["compute_s"], (r.get("bounds") or {}).get("per_level_s")
        if not compute.get("allocation_lp") or not bound:
            continue
        timeline, least = (r.get("predicted") or {}).get("compute_s"), compute.get("solver_least")
        tight = r["bounds"].get("pattern_lp_s")
        row = [r["cell"], _x(tight / bound if tight else None), _x(compute["allocation_lp"] / bound),
               _x(least / bound if least else None), _x(compute["loom"] / bound),
               _x(timeline / bound if timeline else None), _x(compute["loom"] / tight if tight else None),
               r["solver"]["method"]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- targets


def _failed(records: Sequence[Record]) -> str:
    return ", ".join(f"{r['cell']} ({r['error']})" for r in records if r.get("error"))


def _bound_target(records: Sequence[Record], key: str, label: str) -> Verdict:
    target = f"Loom <= {PER_LEVEL_TARGET}x per-level bound in every grid cell, {label}"
    grid = [r for r in records if r["group"] == "grid"]
    ok = _ok(grid)
    if not grid:
        return Verdict(target, "-", "NOT MEASURED", "no grid cell was run")
    ratios = {r["cell"]: r["ratios"][key] for r in ok}
    over = [f"{c} {v:.3f}" for c, v in ratios.items() if v > PER_LEVEL_TARGET + EPS]
    worst = max(ratios.items(), key=lambda kv: kv[1]) if ratios else None
    measured = f"max {worst[1]:.3f} ({worst[0]})" if worst else "-"
    notes = []
    if over:
        notes.append("over: " + ", ".join(over))
    least = [r["ratios"].get("solver_least_compute_over_per_level") for r in ok]
    if key == "loom_compute_over_per_level" and ok and None not in least:
        within = sum(v <= PER_LEVEL_TARGET + EPS for v in least)
        notes.append(f"within {PER_LEVEL_TARGET}x in {sum(v <= PER_LEVEL_TARGET + EPS for v in ratios.values())} of "
                     f"{len(ok)} cells; the solver's least-compute candidate (the plan is chosen on the simulated "
                     f"iteration, not on compute) is within it in {within} of {len(ok)} (max {max(least):.3f})")
        tight = [r["ratios"].get("loom_compute_over_pattern_lp") for r in ok]
        if None not in tight:
            notes.append(f"against the pattern-LP bound (the per-level bound tightened by whole layers on valid "
                         f"counts and each wave priced as its largest forward plus its largest backward, as the "
                         f"runtime runs it: planner.layerbound) within {PER_LEVEL_TARGET}x in "
                         f"{sum(v <= PER_LEVEL_TARGET + EPS for v in tight)} of {len(ok)} (max {max(tight):.3f})")
        bounds = [(r["cell"], r.get("bounds") or {}) for r in ok]
        barred, anyway = ([f"{cell} {b[key] / b['per_level_s']:.3f}" for cell, b in bounds
                           if b.get("per_level_s") and (b.get(key) or 0) > PER_LEVEL_TARGET * b["per_level_s"]]
                          for key in ("pattern_lp_s", "any_order_lp_s"))
        if barred:  # both bounds hold for schedules with level barriers (any schedule of a one-level job)
            notes.append(f"no wave schedule (with level barriers, as both bounds assume) reaches {PER_LEVEL_TARGET}x "
                         f"of the per-level bound in {len(barred)} of {len(ok)} cells, where the pattern-LP bound "
                         f"alone is over it: " + ", ".join(barred))
        if anyway:
            notes.append(f"no wave schedule at all (levels crossed or not: the pattern LP of the whole job with "
                         f"precedence dropped) reaches it in {len(anyway)}: {', '.join(anyway)}; so at most "
                         f"{len(ok) - len(anyway)} of {len(ok)} cells can be within {PER_LEVEL_TARGET}x")
    if _failed(grid):
        notes.append("failed: " + _failed(grid))
    scale = [r["ratios"][key] for r in _ok(records) if r["group"] == "scale"]
    if scale:
        notes.append(f"scale sweep (outside this target): max {max(scale):.3f}")
    verdict = "PASS" if not over and not _failed(grid) else "SHORT"
    return Verdict(target, measured, verdict, "; ".join(notes))


def _never_slower(records: Sequence[Record]) -> Verdict:
    target = "Loom never slower than Spindle (predicted iteration time), every cell"
    ok = [r for r in _ok(records) if r["ratios"]["speedup_vs_spindle"] is not None]
    if not records:
        return Verdict(target, "-", "NOT MEASURED")
    spindle = {r["cell"]: r["baseline_notes"]["spindle"] for r in ok if "spindle" in r.get("baseline_notes", {})}
    oom = [cell for cell, note in spindle.items() if not _cannot_run(note)]
    cannot = [cell for cell, note in spindle.items() if _cannot_run(note)]
    slower = [f"{r['cell']} {r['ratios']['speedup_vs_spindle']:.4f}x" for r in ok
              if r["iteration_s"]["loom"] > r["iteration_s"]["spindle"] * (1 + EPS) and r["cell"] not in spindle]
    compute_slower = [r["cell"] for r in ok if r["compute_s"]["loom"] > r["compute_s"]["spindle"] * (1 + EPS)]
    worst = min(ok, key=lambda r: r["ratios"]["speedup_vs_spindle"]) if ok else None
    measured = f"min {worst['ratios']['speedup_vs_spindle']:.3f}x ({worst['cell']})" if worst else "-"
    notes = []
    if slower:
        notes.append("slower: " + ", ".join(slower))
    if oom:
        notes.append("Spindle's plan exceeds device memory (Loom's fits), so its faster time is not achievable, in: "
                     + ", ".join(oom))
    if cannot:
        notes.append("Spindle's plan fits but the runtime could not run it (so Loom could not adopt it), in: "
                     + ", ".join(cannot))
    notes.append("compute-only slower in: " + (", ".join(compute_slower) if compute_slower else "no cell"))
    if _failed(records):
        notes.append("failed: " + _failed(records))
    missing = [r["cell"] for r in _ok(records) if r["ratios"]["speedup_vs_spindle"] is None]
    if missing:
        notes.append("no Spindle baseline in: " + ", ".join(missing))
    verdict = "PASS" if ok and not slower and not _failed(records) and not missing else "SHORT"
    return Verdict(target, measured, verdict, "; ".join(notes))


def _mean_speedup(records: Sequence[Record]) -> Verdict:
    target = f"Loom >= {SPINDLE_MEAN_TARGET}x faster than Spindle on geometric mean, all grid and scale cells"
    ok = [r for r in _ok(records) if r["ratios"]["speedup_vs_spindle"] is not None and r["group"] in SPINDLE_GROUPS]
    if not ok:
        return Verdict(target, "-", "NOT MEASURED")
    mean = geomean([r["ratios"]["speedup_vs_spindle"] for r in ok])
    notes = []
    for group in SPINDLE_GROUPS:
        values = [r["ratios"]["speedup_vs_spindle"] for r in ok if r["group"] == group]
        if values:
            notes.append(f"{group} {geomean(values):.3f}x")
    compute = geomean([r["ratios"]["compute_speedup_vs_spindle"] for r in ok])
    notes.append(f"compute-only {compute:.3f}x")
    near = [f"{r['cell']} ({r['ratios']['spindle_compute_over_per_level']:.3f})" for r in ok
            if r["ratios"]["spindle_compute_over_per_level"] <= NEAR_BOUND]
    notes.append(f"Spindle's compute already within {NEAR_BOUND:.2f}x of the per-level bound in "
                 + (", ".join(near) if near else "no cell"))
    recipes = [f"{r['cell']} {r['ratios']['speedup_vs_spindle']:.3f}x" for r in _ok(records)
               if r["group"] not in SPINDLE_GROUPS and r["ratios"]["speedup_vs_spindle"] is not None]
    if recipes:
        notes.append("recipe cells (outside this mean): " + ", ".join(recipes))
    counted = [r for r in records if r["group"] in SPINDLE_GROUPS]
    if _failed(counted):
        notes.append("failed: " + _failed(counted))
    verdict = "PASS" if mean >= SPINDLE_MEAN_TARGET and not _failed(counted) else "SHORT"
    return Verdict(target, f"{mean:.3f}x over {len(ok)} cells", verdict, "; ".join(notes))


def _vs_sequential(records: Sequence[Record]) -> Verdict:
    target = f"Loom vs sequential on {SEQUENTIAL_CELL} >= {SEQUENTIAL_TARGET}x (simulated)"
    cell = next((r for r in records if r["cell"] == SEQUENTIAL_CELL), None)
    if cell is None:
        return Verdict(target, "-", "NOT MEASURED", f"{SEQUENTIAL_CELL} was not run")
    if cell.get("error") or cell["ratios"]["speedup_vs_sequential"] is None:
        return Verdict(target, "-", "SHORT", f"no number: {cell.get('error') or 'no sequential baseline'}")
    value = cell["ratios"]["speedup_vs_sequential"]
    return Verdict(target, f"{value:.3f}x", "PASS" if value >= SEQUENTIAL_TARGET else "SHORT",
                   "Spindle reported 1.71x measured on this cell; "
                   f"Loom/Spindle here {_x(cell['ratios']['speedup_vs_spindle'])}x")


def _plan_time(records: Sequence[Record], label: str, select, limit: float) -> Verdict:
    target = f"Planning median < {limit:g} s, {label}"
    cells = [r for r in records if select(r)]
    if not cells:
        return Verdict(target, "-", "NOT MEASURED", "no such cell was run")
    ok = _ok(cells)
    slow = [f"{r['cell']} {r['planning_time_median_s']:.2f} s" for r in ok if r["planning_time_median_s"] >= limit]
    worst = max(ok, key=lambda r: r["planning_time_median_s"]) if ok else None
    measured = f"max {worst['planning_time_median_s']:.2f} s ({worst['cell']})" if worst else "-"
    notes = []
    if slow:
        notes.append("over: " + ", ".join(slow))
    timed = [r for r in ok if r.get("planning_cpu_median_s") is not None]
    if timed:  # what the planner spends itself: wall time above it is the machine's other load
        busiest = max(timed, key=lambda r: r["planning_cpu_median_s"])
        notes.append(f"CPU time max {busiest['planning_cpu_median_s']:.2f} s ({busiest['cell']})")
    if _failed(cells):
        notes.append("failed: " + _failed(cells))
    return Verdict(target, measured, "PASS" if not slow and not _failed(cells) else "SHORT", "; ".join(notes))


def _never_slower_than_best(records: Sequence[Record]) -> Verdict:
    target = "Loom <= the best baseline whose plan fits in memory (predicted iteration time), every cell"
    ok = [r for r in _ok(records) if speedup_vs_best(r) is not None]
    if not ok:
        return Verdict(target, "-", "NOT MEASURED")
    worst = min(ok, key=speedup_vs_best)
    slower = [f"{r['cell']} {speedup_vs_best(r):.3f}x ({best_fitting_baseline(r)[0]})" for r in ok
              if speedup_vs_best(r) < 1 - EPS]
    notes = ["slower than: " + ", ".join(slower)] if slower else []
    if _failed(records):
        notes.append("failed: " + _failed(records))
    verdict = "PASS" if not slower and not _failed(records) else "SHORT"
    return Verdict(target, f"min {speedup_vs_best(worst):.3f}x ({worst['cell']})", verdict, "; ".join(notes))


def _scale_mean(records: Sequence[Record]) -> Verdict:
    target = f"Loom >= {SCALE_MEAN_TARGET}x faster than the best fitting baseline on geometric mean, scale cells"
    cells = [r for r in records if r["group"] == "scale"]
    ok = [r for r in _ok(cells) if speedup_vs_best(r) is not None]
    if not ok:
        return Verdict(target, "-", "NOT MEASURED")
    mean = geomean([speedup_vs_best(r) for r in ok])
    notes = ", ".join(f"{r['cell']} {speedup_vs_best(r):.3f}x" for r in ok)
    if _failed(cells):
        notes += "; failed: " + _failed(cells)
    verdict = "PASS" if mean >= SCALE_MEAN_TARGET and not _failed(cells) else "SHORT"
    return Verdict(target, f"{mean:.3f}x over {len(ok)} cells", verdict, notes)


def _scale_planning(records: Sequence[Record], devices: int, metaops: int, limit_s: float,
                    rss_mib: float | None) -> Verdict:
    target = f"{devices:,} devices x {metaops}+ MetaOps: planning (baselines included) < {limit_s:g} s" + (
        "" if rss_mib is None else f" and peak RSS < {rss_mib / 1024:g} GiB")
    cells = [r for r in records if r["num_devices"] == devices and r["group"] == "scale"]
    ok = [r for r in _ok(cells) if r.get("num_metaops", 0) >= metaops]
    if not ok:
        return Verdict(target, "-", "NOT MEASURED" if not _failed(cells) else "SHORT", _failed(cells))
    r = max(ok, key=lambda r: r["planning_time_median_s"])
    rss = r.get("peak_rss_mib")
    measured = f"{r['planning_time_median_s']:.2f} s" + ("" if rss is None else f", {rss:.0f} MiB") + f" ({r['cell']})"
    passed = r["planning_time_median_s"] < limit_s and (rss_mib is None or (rss is not None and rss < rss_mib))
    return Verdict(target, measured, "PASS" if passed else "SHORT")


def evaluate_targets(records: Sequence[Record]) -> list[Verdict]:
    """Every target of the planner issue, evaluated on ``records``."""
    return [
        _bound_target(records, "loom_compute_over_per_level", "compute-only (what the bound bounds)"),
        _bound_target(records, "loom_over_per_level", "full predicted iteration time"),
        _never_slower(records),
        _mean_speedup(records),
        _vs_sequential(records),
        _plan_time(records, f"every cell up to {SMALL_MAX_DEVICES} devices",
                   lambda r: r["num_devices"] <= SMALL_MAX_DEVICES, SMALL_PLAN_S),
        _plan_time(records, f"{LARGE_DEVICES} devices x {LARGE_MIN_METAOPS}+ MetaOps",
                   lambda r: r["num_devices"] == LARGE_DEVICES and r.get("num_metaops", LARGE_MIN_METAOPS)
                   >= LARGE_MIN_METAOPS, LARGE_PLAN_S),
        _never_slower_than_best(records),
        _scale_mean(records),
    ] + [_scale_planning(records, n, m, limit, rss) for (n, m), (limit, rss) in SCALE_PLAN_TARGETS.items()]


def targets_table(verdicts: Sequence[Verdict]) -> str:
    lines = ["| Target | Measured | Verdict | Notes |", "|---|---|---|---|"]
    lines += [f"| {v.target} | {v.measured} | **{v.verdict}** | {v.notes} |" for v in verdicts]
    return "\n".join(lines)


def render_report(records: Sequence[Record], config: dict[str, Any]) -> str:
    """The whole markdown report: setup, grid table, scale-sweep table, targets."""
    parts = [
        "# Planner benchmark",
        "Cost model: analytic (A800 table, nodes of 8; recipe cells: the device of their spec). "
        f"Planning time: median of {config['repeats']} runs of "
        f"`plan_job(with_baselines=False)` after {config['warmup']} warm-up run(s); all other numbers from one "
        "extra run with baselines. Times in ms are predicted iteration times (simulator: compute, transfers, "
        "shared-parameter sync, optimizer). *full* ratios divide that by a bound; *compute* ratios divide the "
        "schedule's compute makespan (sum of wave durations), which is what the compute-only bounds bound. "
        "*vs Spindle* / *vs sequential*: baseline time / Loom time (> 1 means Loom is faster). "
        "(OOM): that baseline's plan needs more device memory than the cluster has (Loom's plan always fits); "
        "(cannot run): it fits, and the runtime could not run it (e.g. one layer at two tensor-parallel degrees), so "
        "Loom cannot adopt it and the best fitting baseline is the fastest of the others.",
    ]
    if config.get("note"):
        parts.insert(1, f"**Note:** {config['note']}")
    for group, title in (("grid", "Grid: Spindle's workloads (8-64 devices)"),
                         ("sweep", "Sweep: synthetic CLIP-like workload, 100 MetaOps"),
                         ("scale", "Scale: 1,024 to 10,240 devices (bench/workloads/README.md)"),
                         ("recipe", "Recipes: full-size recipe jobs on their own clusters")):
        rows = [r for r in records if r["group"] == group]
        parts += [f"## {title}", results_table(rows) if rows else "_not run_"]
        if group == "grid" and any(r.get("predicted") for r in _ok(rows)):
            parts += ["Where the grid cells lose (ms; docs/planner.md section 10 reads this table):", losses_table(rows)]
            if any(r["compute_s"].get("allocation_lp") for r in _ok(rows)):
                parts += ["Where the compute goes, step by step (ratios to the per-level bound; docs/planner.md "
                          "section 10):", compute_steps_table(rows)]
        if group == "scale" and rows:
            parts += ["Scale cells, memory and planning cost (each planned in its own process; planning time "
                      "includes the baselines; OOM: that baseline's plan does not fit in device memory; cannot "
                      "run: it fits and the runtime could not run it):",
                      scale_table(rows)]
    parts += ["## Targets", targets_table(evaluate_targets(records))]
    return "\n\n".join(parts) + "\n"
