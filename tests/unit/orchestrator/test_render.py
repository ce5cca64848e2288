"""Text views of plans and jobs (orchestrator.render) on synthetic plans: no solver needed."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import yaml

from orchestrator.render import (
    compact_ranges, describe_job, format_bytes, format_seconds, plan_console, print_plan, render_plan_text, short_name,
    speedup,
)
from planner.spec import load_job

EXAMPLES = Path(__file__).parents[3] / "examples"


def _expand(ranges: str) -> list[int]:
    out: list[int] = []
    for part in ranges.split(","):
        first, _, last = part.partition("-")
        out.extend(range(int(first), int(last or first) + 1))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_compact_ranges_round_trip(seed: int) -> None:
    rng = random.Random(seed)
    ids = rng.sample(range(64), rng.randint(1, 40))
    text = compact_ranges(ids)
    assert _expand(text) == sorted(ids)
    # maximal runs: no two neighbouring parts could be merged
    bounds = [(_expand(p)[0], _expand(p)[-1]) for p in text.split(",")]
    assert all(b[0] > a[1] + 1 for a, b in zip(bounds, bounds[1:]))


def test_compact_ranges_examples() -> None:
    assert compact_ranges(range(8)) == "0-7"
    assert compact_ranges([16, 17, 18, 19, 0, 1, 2, 3, 4, 5, 6, 7]) == "0-7,16-19"
    assert compact_ranges([5]) == "5"
    assert compact_ranges([3, 1]) == "1,3"


@pytest.mark.parametrize("seconds, text", [
    (1.5, "1.5 s"), (12.34, "12.3 s"), (0.0123, "12.3 ms"), (0.25, "250 ms"), (4.5e-5, "45 µs"), (0.0, "0 s"),
    (float("nan"), "-"),
])
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


@pytest.mark.parametrize("num_bytes, text", [
    (80 * 1024**3, "80.0 GiB"), (1.5 * 1024**3, "1.5 GiB"), (300 * 1024**2, "300 MiB"), (2048, "2 KiB"),
])
def test_format_bytes(num_bytes: float, text: str) -> None:
    assert format_bytes(num_bytes) == text


def test_short_name_strips_task(small_plan) -> None:
    op = small_plan.metaops[1]
    assert op.name == f"{op.task}.text_decoder"
    assert short_name(op) == "text_decoder"


def test_speedup() -> None:
    assert speedup(3.0, 2.0) == pytest.approx(1.5)


def test_plan_text_has_header_every_slice_and_summary(small_plan) -> None:
    text = render_plan_text(small_plan, planning_time_s=1.25)
    lines = text.splitlines()
    assert "planning time" in text and "1.25 s" in text
    assert small_plan.hash in text
    for wave in small_plan.waves:
        assert f"Wave {wave.index}: " in text
        for s in wave.slices:
            op = small_plan.metaops[s.metaop]
            row = next(line for line in lines if op.name in line and compact_ranges(s.devices) in line)
            assert f"{s.dp_degree} x {s.tp_degree}" in row
            assert f"{s.first_layer}..{s.first_layer + s.num_layers - 1}" in row
            assert format_seconds(s.time_s) in row and format_bytes(s.memory_bytes) in row


def test_plan_text_summary_numbers(small_plan) -> None:
    text = render_plan_text(small_plan)
    pred = small_plan.predicted
    assert "planning time" not in text  # not known for a plan loaded from a file
    assert f"predicted iteration {format_seconds(pred.iteration_time_s)}" in text
    assert f"{pred.compute_s / small_plan.bounds.per_level_s:.3f}x" in text
    assert f"{pred.compute_s / small_plan.bounds.dag_s:.3f}x" in text
    iteration = next(line for line in text.splitlines() if line.startswith("bound (iteration)"))
    assert format_seconds(small_plan.bounds.iteration_s) in iteration
    assert f"Loom iteration / bound = {pred.iteration_time_s / small_plan.bounds.iteration_s:.3f}x" in iteration
    assert small_plan.solver.status in text and f"{small_plan.solver.gap * 100:.2f}%" in text
    for name, seconds in small_plan.baselines.items():
        row = next(line for line in text.splitlines() if f" {name} " in line)
        assert f"{seconds / pred.iteration_time_s:.2f}x" in row


def test_plan_text_without_baselines(make_plan) -> None:
    plan = make_plan().model_copy(update={"baselines": {}})
    assert "not computed" in render_plan_text(plan)


def test_plan_text_fits_width(make_plan) -> None:
    text = render_plan_text(make_plan(num_nodes=8, num_waves=5), width=100)
    assert max(len(line) for line in text.splitlines()) <= 100


def test_piped_plan_carries_every_value_in_full(make_plan) -> None:
    """`loom plan | cat`: a console on something that is not a terminal cuts no column (it used to be 120 wide)."""
    plan = make_plan(num_nodes=8, num_waves=3)
    long_names = [op.model_copy(update={"name": f"a_rather_long_task_name.{op.name}_with_a_long_use_name#12"})
                  for op in plan.metaops]
    plan = plan.model_copy(update={"metaops": long_names}).sealed()
    buffer = io.StringIO()
    print_plan(plan, plan_console(buffer))
    text = buffer.getvalue()
    assert "\u2026" not in text  # rich's ellipsis: a value was cut
    assert max(len(line) for line in text.splitlines()) > 120
    for wave in plan.waves:
        for s in wave.slices:
            row = next(line for line in text.splitlines() if plan.metaops[s.metaop].name in line
                       and f" {compact_ranges(s.devices)} " in line)
            assert format_seconds(s.time_s) in row and format_bytes(s.memory_bytes) in row
    assert "\u2026" in render_plan_text(plan, width=120)  # the same plan at 120 columns is cut


def test_describe_job_counts_example() -> None:
    path = EXAMPLES / "medical-unimed.yaml"
    doc = yaml.safe_load(path.read_text())
    line = describe_job(load_job(path))
    num_devices = doc["cluster"]["num_nodes"] * doc["cluster"]["devices_per_node"]
    assert f"{len(doc['tasks'])} tasks" in line
    assert f"{len(doc['components'])} components" in line
    # every use of a non-unet component is one MetaOp
    assert f"{sum(len(t['components']) for t in doc['tasks'])} MetaOps" in line
    assert f"{num_devices} devices" in line


def test_the_header_names_the_planners_zero1_choice_only_where_it_made_one(small_plan) -> None:
    assert small_plan.shard_optimizer is None and "ZeRO-1" not in render_plan_text(small_plan)  # the job's setting
    for choice, said in ((False, "ZeRO-1 off"), (True, "ZeRO-1 on")):
        text = render_plan_text(small_plan.model_copy(update={"shard_optimizer": choice}))
        line = next(line for line in text.splitlines() if line.startswith("optimizer"))
        assert said in line and "auto" in line
