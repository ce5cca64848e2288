"""Gantt charts (orchestrator.gantt) on synthetic plans: blocks, SVG/HTML structure, PNG output."""

from __future__ import annotations

import math
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from orchestrator.gantt import (
    KIND_FILLS, Block, block_fill, device_runs, fitting_label, gantt_blocks, metaop_colours, ms_label, nice_ticks,
    plan_panel, render_html, render_svg, shade, task_colours, wave_labels, write_gantt,
)
from planner.plan import PlanTransfer

SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize("seed, num_nodes, num_waves", [(0, 1, 3), (1, 2, 6), (2, 8, 40)])
def test_blocks_cover_every_slice_exactly(make_plan, seed: int, num_nodes: int, num_waves: int) -> None:
    plan = make_plan(num_nodes=num_nodes, num_waves=num_waves, seed=seed)
    blocks = [b for b in gantt_blocks(plan) if b.kind == "compute"]
    for wave in plan.waves:
        in_wave = [b for b in blocks if b.wave == wave.index]
        used: list[int] = []
        for s in wave.slices:
            mine = [b for b in in_wave if b.metaop == s.metaop]
            devices = sorted(d for b in mine for d in range(b.first_device, b.first_device + b.num_devices))
            assert devices == sorted(s.devices)
            for b in mine:
                assert b.start_s == wave.start_s  # no transfers in the synthetic plans
                assert b.duration_s == pytest.approx(min(s.time_s, wave.duration_s))
                assert b.label.startswith(f"{b.task}: ") and b.short_label == b.task  # the task named on the block
            used.extend(devices)
        assert len(used) == len(set(used))  # no device in two blocks of one wave


def test_device_runs_split_non_contiguous_devices() -> None:
    assert device_runs([9, 0, 1, 2, 5, 6]) == [(0, 3), (5, 2), (9, 1)]
    assert device_runs([]) == []


def test_colours(make_plan) -> None:
    plan = make_plan(num_tasks=6)
    colours = task_colours(plan)
    assert list(colours) == [f"task{t}" for t in range(6)]
    assert len(set(colours.values())) == 6
    fills = metaop_colours(plan)
    for task in colours:  # MetaOps of one task get different shades of its colour
        ops = [op.id for op in plan.metaops if op.task == task]
        assert len({fills[m] for m in ops}) == len(ops)
        assert fills[ops[0]] == colours[task]


def test_shade() -> None:
    assert shade("#4e79a7", 0.0) == "#4e79a7"
    assert shade("#4e79a7", 1.0) == "#ffffff"
    assert shade("#4e79a7", -1.0) == "#000000"


def _block(label: str = "image_encoder \u00d712", short: str = "image_encoder") -> Block:
    return Block(0, 0, "t", label, short, "tip", 0.0, 1.0, 0, 4)


def test_fitting_label() -> None:
    block = _block()
    assert fitting_label(block, 500, 40, 10) == (block.label, False)
    assert fitting_label(block, 90, 40, 10) == (block.short_label, False)
    assert fitting_label(block, 20, 500, 10) == (block.label, True)  # tall and narrow: vertical
    assert fitting_label(block, 8, 8, 10) is None


@pytest.mark.parametrize("end", [0.0009, 0.3, 1.0, 7.3, 123.0])
def test_nice_ticks(end: float) -> None:
    ticks = nice_ticks(end)
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert round(mantissa, 6) in (1.0, 2.0, 5.0)
    assert ticks[0] == 0 and ticks[-1] <= end * (1 + 1e-9) and ticks[-1] + step > end
    assert 4 <= len(ticks) <= 12


@pytest.mark.parametrize("width_px, vertical", [(4000, False), (300, True), (40, True)])
def test_wave_labels_do_not_overlap(make_plan, width_px: int, vertical: bool) -> None:
    plan = make_plan(num_nodes=8, num_waves=40, seed=2)
    marks = plan_panel(plan).marks
    font_px = 10.0
    px_per_s = width_px / plan.waves[-1].start_s  # squeeze: from all fitting side by side to few fitting at all
    centres, labels, turned = wave_labels(marks, px_per_s, font_px)
    assert turned == vertical
    assert 1 < len(labels) <= len(plan.waves)
    assert (len(labels) == len(plan.waves)) == (width_px == 4000)
    for (c0, l0), (c1, l1) in zip(zip(centres, labels), zip(centres[1:], labels[1:])):
        needed = font_px * 1.2 if vertical else (len(l0) + len(l1)) * font_px * 0.6 / 2
        assert (c1 - c0) * px_per_s >= needed


def test_svg_is_wellformed_with_a_titled_rect_per_block(make_plan) -> None:
    plan = make_plan(num_nodes=2, num_waves=6, seed=4)
    fills = metaop_colours(plan)
    root = ET.fromstring(render_svg(plan_panel(plan), fills))
    rects = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "slice"]
    blocks = gantt_blocks(plan)
    assert len(rects) == len(blocks)
    assert [r.find(f"{SVG}title").text for r in rects] == [b.tooltip for b in blocks]
    assert [r.get("fill") for r in rects] == [block_fill(b, fills) for b in blocks]
    assert {b.kind for b in blocks} == {"compute", "sync", "optimizer"}  # the synthetic plan has no transfers, loss
    axis = [t.text for t in root.iter(f"{SVG}text")]
    assert "time (ms)" in axis


def test_plan_chart_draws_transfers_before_their_wave_and_ends_at_the_iteration(make_plan) -> None:
    plan = make_plan(num_waves=3, seed=1)
    first, second = plan.waves[0].slices[0], plan.waves[1].slices[0]
    moved = 0.01
    waves = [plan.waves[0], plan.waves[1].model_copy(update={"transfer_in_s": 0.75 * moved,
                                                             "transfer_back_s": 0.25 * moved}), *plan.waves[2:]]
    predicted = plan.predicted.model_copy(update={"transfer_s": moved})
    plan = plan.model_copy(update={"waves": waves, "predicted": predicted, "transfers": [PlanTransfer(
        after_wave=0, src_metaop=first.metaop, dst_metaop=second.metaop, src_devices=first.devices,
        dst_devices=second.devices, bytes=1e6, time_s=0.01)]}).sealed()
    blocks = gantt_blocks(plan)
    transfers = [b for b in blocks if b.kind == "transfer"]
    assert {d for b in transfers for d in range(b.first_device, b.first_device + b.num_devices)} \
        == set(first.devices) | set(second.devices)
    wave1 = [b for b in blocks if b.kind == "compute" and b.wave == 1]
    assert all(b.start_s == pytest.approx(plan.waves[1].start_s + moved) for b in wave1)
    assert all(t.start_s + t.duration_s == pytest.approx(wave1[0].start_s) for t in transfers)
    end = max(b.start_s + b.duration_s for b in blocks)
    pred = plan.predicted
    assert end == pytest.approx(pred.compute_s + pred.transfer_s + pred.sync_s + pred.optimizer_s)


def test_fills_and_ms_ticks() -> None:
    block = Block(0, -1, "", "sync", "S", "tip", 0.0, 1.0, 0, 1, "sync")
    assert block_fill(block, []) == KIND_FILLS["sync"]
    assert ms_label(0.0125) == "12.5" and ms_label(2.0) == "2000"


def test_html_is_standalone_and_deterministic(make_plan) -> None:
    plan = make_plan(seed=5)
    args = ([plan_panel(plan)], metaop_colours(plan), task_colours(plan), plan.job, "sub", "page")
    page = render_html(*args)
    assert page == render_html(*args)
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    lowered = page.lower()
    assert "<script" not in lowered and "<link" not in lowered and "@import" not in lowered
    assert lowered.count("http") == 1  # only the SVG namespace
    assert plan.job in page


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_png_for_8_and_64_devices(make_plan, tmp_path: Path) -> None:
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    write_gantt(make_plan(), small)
    write_gantt(make_plan(num_nodes=8, num_waves=40, num_tasks=6, seed=3), large)
    small_w, small_h = _png_size(small)
    large_w, large_h = _png_size(large)
    assert small_w == large_w >= 1200
    assert large_h > small_h  # rows scale with the number of devices


def test_write_gantt_rejects_unknown_suffix(small_plan, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported chart format"):
        write_gantt(small_plan, tmp_path / "chart.pdf")
