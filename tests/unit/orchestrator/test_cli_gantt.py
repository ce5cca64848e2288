"""`loom gantt OUT` in-process (typer's CliRunner) on an output folder laid out as `loom run` leaves it (a synthetic
plan and the workers' spans, no Ray): the chart files, and one `error:` line with exit code 2 for a bad folder."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.trace import PREDICTED_TRACE_FILE, TRACE_FILE, load_trace, write_run_traces
from orchestrator.timeline import recorded_steps, trace_blocks
from planner.errors import SpecError

from test_trace import recorded, with_transfers  # tests/unit/orchestrator/test_trace.py

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture
def run_out(make_plan, tmp_path: Path) -> Path:
    """What `loom run --out` leaves: plan.json, trace-predicted.json, trace.json of steps 3..5 on 16 ranks."""
    plan = with_transfers(make_plan(num_nodes=2, num_waves=5, seed=7))
    out = tmp_path / "out"
    out.mkdir()
    plan.save(out / "plan.json")
    write_run_traces(out, plan, recorded(plan, range(3, 6), 16))
    return out


def assert_one_error_line(result, *fragments: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_gantt_writes_png_and_html_of_predicted_and_measured(run_out: Path) -> None:
    result = CliRunner().invoke(app, ["gantt", str(run_out)])
    assert result.exit_code == 0, (result.stderr, result.exception)
    png, page = run_out / "gantt.png", run_out / "gantt.html"
    assert "step 5: measured" in result.stdout and str(png) in result.stdout and str(page) in result.stdout
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 5000
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<script" not in text.lower()
    svgs = [ET.fromstring("<svg" + part.split("</svg>")[0] + "</svg>") for part in text.split("<svg")[1:]]
    assert len(svgs) == 2  # predicted, then measured
    assert "predicted iteration" in text and "measured step 5" in text
    measured = json.loads((run_out / TRACE_FILE).read_text())
    last = [e for e in measured["traceEvents"] if e["ph"] == "X" and e["args"]["step"] == 5 and e["dur"] > 0]
    titles = [r.find(f"{SVG}title").text for r in svgs[1].iter(f"{SVG}rect") if r.get("class") == "slice"]
    assert len(titles) == len(last)  # one block per span of the drawn step, on its rank's row
    assert all("step 5" in t for t in titles)
    texts = [t.text for t in svgs[1].iter(f"{SVG}text")]
    assert "time (ms)" in texts and "rank" in texts


def test_gantt_output_and_step_options(run_out: Path, tmp_path: Path) -> None:
    chart = tmp_path / "chart.html"
    result = CliRunner().invoke(app, ["gantt", str(run_out), "-o", str(chart), "--step", "3"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "step 3:" in result.stdout and chart.is_file() and not (run_out / "gantt.png").exists()
    assert "measured step 3" in chart.read_text()


def test_gantt_rebuilds_a_missing_prediction(run_out: Path) -> None:
    (run_out / PREDICTED_TRACE_FILE).unlink()
    result = CliRunner().invoke(app, ["gantt", str(run_out), "-o", str(run_out / "g.png")])
    assert result.exit_code == 0, (result.stderr, result.exception)


def test_predicted_blocks_merge_consecutive_ranks(run_out: Path, make_plan) -> None:
    from orchestrator.timeline import load_run_traces

    traces = load_run_traces(run_out)
    events = traces.predicted["traceEvents"]
    blocks = trace_blocks(traces.plan, events)
    compute = [b for b in blocks if b.kind == "compute"]
    assert any(b.num_devices > 1 for b in compute)
    assert all(b.label.startswith(b.task + ": ") and b.label.endswith(("fwd", "bwd")) for b in compute)
    rows = sum(b.num_devices for b in blocks)
    assert rows == sum(1 for e in events if e["ph"] == "X" and e["dur"] > 0)
    assert recorded_steps(traces.measured) == [3, 4, 5]


def _replace(path: Path, old: str, new: str) -> int:
    return path.write_text(path.read_text().replace(old, new))


@pytest.mark.parametrize("breakage, fragments", [
    (lambda out: out / "missing", ["no such directory"]),
    (lambda out: out / "plan.json", ["plan.json: not a directory. Give the --out folder of a finished `loom run`."]),
    (lambda out: (out / "plan.json").unlink() or out, ["no plan.json", "loom run"]),
    (lambda out: (out / TRACE_FILE).unlink() or out, ["no trace.json"]),
    (lambda out: (out / TRACE_FILE).write_text("{") and out, ["trace.json", "JSON"]),
    (lambda out: (out / TRACE_FILE).write_text('{"traceEvents": [{"ph": "X"}]}') and out, ["trace.json", "'name'"]),
    (lambda out: (out / "plan.json").write_text("[]") and out, ["plan.json"]),
    (lambda out: _replace(out / TRACE_FILE, '"plan_hash": "', '"plan_hash": "0') and out,
     ["trace.json", "written for plan 0"]),
], ids=["missing-dir", "a-file", "no-plan", "no-trace", "trace-not-json", "trace-bad-event", "plan-not-a-plan",
        "other-plan"])
def test_bad_out_folder_is_one_error_line(run_out: Path, breakage, fragments: list[str]) -> None:
    target = breakage(run_out)
    assert_one_error_line(CliRunner().invoke(app, ["gantt", str(target)]), *fragments)


def test_step_not_in_the_trace_is_one_error_line(run_out: Path) -> None:
    assert_one_error_line(CliRunner().invoke(app, ["gantt", str(run_out), "--step", "1"]),
                          "--step (1)", "3, 4, 5")


def test_bad_chart_suffix_is_one_error_line(run_out: Path) -> None:
    assert_one_error_line(CliRunner().invoke(app, ["gantt", str(run_out), "-o", "chart.pdf"]), "chart.pdf")


BAD_BYTES = {"binary": bytes(range(128, 256)) * 3, "deeply nested": b"[" * 100_000 + b"]" * 100_000}
REASONS = {"binary": "(not UTF-8 text)", "deeply nested": "(nested too deeply)"}


@pytest.mark.parametrize("bad", sorted(BAD_BYTES))
def test_load_trace_names_the_file(tmp_path: Path, bad: str) -> None:
    path = tmp_path / TRACE_FILE
    path.write_bytes(BAD_BYTES[bad])
    with pytest.raises(SpecError, match=re.escape(f"not a Chrome trace {REASONS[bad]}")):
        load_trace(path)


@pytest.mark.parametrize("bad", sorted(BAD_BYTES))
@pytest.mark.parametrize("name, kind", [("plan.json", "not a Loom plan"), (TRACE_FILE, "not a Chrome trace")])
def test_gantt_of_a_folder_with_a_broken_file_is_one_line(run_out: Path, name: str, kind: str, bad: str) -> None:
    """plan.json or trace.json that is no JSON file (binary, nested deeper than the parser recurses): one line naming
    the file (planner.jsonfile), never a traceback."""
    (run_out / name).write_bytes(BAD_BYTES[bad])
    result = CliRunner().invoke(app, ["gantt", str(run_out)])
    assert assert_one_error_line(result).startswith(f"error: {run_out / name}: {kind} {REASONS[bad]}")
    assert not (run_out / "gantt.png").exists()
