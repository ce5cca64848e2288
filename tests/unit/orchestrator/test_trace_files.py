"""`loom gantt OUT` on an output folder whose plan.json or trace.json is no JSON file (binary, nested deeper than the
parser recurses): one `error:` line naming the file, exit 2, never a traceback (planner.jsonfile)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.trace import TRACE_FILE, load_trace, write_run_traces
from planner.errors import SpecError

from test_trace import recorded, with_transfers  # tests/unit/orchestrator/test_trace.py

BAD_BYTES = {"binary": bytes(range(128, 256)) * 3, "deeply nested": b"[" * 100_000 + b"]" * 100_000}
REASONS = {"binary": "(not UTF-8 text)", "deeply nested": "(nested too deeply)"}


@pytest.fixture
def run_out(make_plan, tmp_path: Path) -> Path:
    """What `loom run --out` leaves: plan.json, trace-predicted.json and trace.json of 16 ranks."""
    plan = with_transfers(make_plan(num_nodes=2, num_waves=5, seed=7))
    out = tmp_path / "out"
    out.mkdir()
    plan.save(out / "plan.json")
    write_run_traces(out, plan, recorded(plan, range(2, 4), 16))
    return out


@pytest.mark.parametrize("bad", sorted(BAD_BYTES))
def test_load_trace_names_the_file(tmp_path: Path, bad: str) -> None:
    path = tmp_path / TRACE_FILE
    path.write_bytes(BAD_BYTES[bad])
    with pytest.raises(SpecError, match=f"not a Chrome trace {REASONS[bad]}".replace("(", r"\(").replace(")", r"\)")):
        load_trace(path)


@pytest.mark.parametrize("bad", sorted(BAD_BYTES))
@pytest.mark.parametrize("name, kind", [("plan.json", "not a Loom plan"), (TRACE_FILE, "not a Chrome trace")])
def test_gantt_of_a_folder_with_a_broken_file_is_one_line(run_out: Path, name: str, kind: str, bad: str) -> None:
    (run_out / name).write_bytes(BAD_BYTES[bad])
    result = CliRunner().invoke(app, ["gantt", str(run_out)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith(f"error: {run_out / name}: {kind} {REASONS[bad]}"), result.stderr
    assert "Traceback" not in result.stderr and not (run_out / "gantt.png").exists()
