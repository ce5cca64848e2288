"""bench/rl: the largest speed-up any on-policy plan could reach is the better fitting baseline over the plan's
iteration bound, and that bound is below every placement the bench prices (so the ceiling is a true one)."""

from __future__ import annotations

from bench.rl.__main__ import ceiling_section, measure_cell
from planner.api import make_cost_model
from planner.spec import parse_job
from tests.unit.planner.test_generation import grpo


def record(lag: int, colocated: float, split: float, split_fits: bool = True, bound: float | None = 1.0) -> dict:
    row = lambda s, fits=True: {"iteration_s": s, "fits": fits}  # noqa: E731
    return {"cell": f"c{lag}", "lag": lag, "bound_s": bound,
            "placements": {"loom": row(1.5), "colocated": row(colocated), "split": row(split, split_fits)}}


def test_ceiling_is_the_better_fitting_baseline_over_the_bound():
    lines = ceiling_section([record(0, 2.0, 1.8), record(1, 9.0, 9.0), record(0, 3.0, 1.1, split_fits=False) |
                             {"cell": "d0"}])
    rows = [line for line in lines if line.startswith("| c0") or line.startswith("| d0")]
    assert rows == ["| c0 | 1.80 s | 1.00 s | 1.800x | 1.200x | 1.500 |",  # split fits and is better
                    "| d0 | 3.00 s | 1.00 s | 3.000x | 2.000x | 1.500 |"]  # split does not fit: colocated's
    assert lines[-1].startswith(f"Geometric mean of the largest possible speed-ups: {(1.8 * 3.0) ** 0.5:.3f}x over 2 "
                                "cells: ")
    assert ceiling_section([record(1, 2.0, 2.0), record(0, 2.0, 2.0, bound=None)]) == []  # lag 1, or no plan


def test_the_bound_is_below_every_placement():
    job = parse_job(grpo(4))
    rec = measure_cell(job, make_cost_model(job), "grpo-tiny", lag=0, runnable=False)
    times = [p["iteration_s"] for p in rec["placements"].values()]
    assert len(times) == 3 and 0 < rec["bound_s"] <= min(times) * (1 + 1e-9)
