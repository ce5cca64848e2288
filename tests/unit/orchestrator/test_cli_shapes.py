"""`loom plan JOB --shapes FILE` end to end: the bucket table and comparison, the plan set on stdout and in --save,
and bad input as one `error:` line with exit code 2 (in-process, and once as a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from planner.plan_cache import plan_set_from_json

ROOT = Path(__file__).resolve().parents[3]
JOB = ROOT / "examples" / "vlm-cpu.yaml"
SHAPES = """\
max_buckets: 2
run_length: 10
distribution:
  caption: {batch_size: {8: 1, 16: 2, 32: 1}}
  rate: {batch_size: {4: 1, 8: 1, 16: 1}}
"""


@pytest.fixture(scope="module")
def shapes_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shapes") / "shapes.yaml"
    path.write_text(SHAPES)
    return path


@pytest.fixture(scope="module")
def json_run(shapes_file: Path, tmp_path_factory):
    saved = tmp_path_factory.mktemp("out") / "set.json"
    result = CliRunner().invoke(app, ["plan", str(JOB), "--shapes", str(shapes_file), "-o", "json", "--save", str(saved)])
    assert result.exit_code == 0, result.output
    return result, saved


def test_json_stdout_is_exactly_the_plan_set(json_run) -> None:
    result, saved = json_run
    plan_set = plan_set_from_json(result.stdout)  # verifies hashes and consistency
    assert plan_set.job == "vlm-cpu"
    assert result.stdout == plan_set.to_json() == saved.read_text()
    assert "Traceback" not in result.stderr


def test_table_shows_buckets_and_the_comparison(shapes_file: Path) -> None:
    result = CliRunner().invoke(app, ["plan", str(JOB), "--shapes", str(shapes_file)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "plan cache for vlm-cpu" in out
    assert "caption.batch 8-" in out  # a bucket's range of caption batch sizes
    assert "plan cache: predicted mean iteration" in out
    assert "one plan for the mean shape (caption.batch 16, rate.batch 8)" in out
    assert "one plan for the max shape (caption.batch 32, rate.batch 16)" in out


def _error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("text, expected", [
    ("distribution: {captoin: {batch_size: {8: 1}}}", "did you mean 'caption'?"),
    ("distribution: {caption: {batch_size: {8: -1}}}", "distribution.caption.batch_size[8] (-1)"),
    ("batches: []", "batches"),
    ("distribution: {caption: [\n", "line"),
    ("- 1\n- 2\n", "the top level must be a mapping"),
])
def test_bad_shapes_file_is_one_error_line(tmp_path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = _error(["plan", str(JOB), "--shapes", str(path)])
    assert str(path) in line and expected in line


def test_gantt_with_shapes_and_a_missing_file_are_usage_errors(shapes_file: Path, tmp_path) -> None:
    assert "--gantt draws one plan" in _error(["plan", str(JOB), "--shapes", str(shapes_file), "--gantt",
                                               str(tmp_path / "g.png")])
    assert "does not exist" in _error(["plan", str(JOB), "--shapes", str(tmp_path / "none.yaml")])


def test_subprocess_exit_code_and_single_error_line(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("max_buckets: 0\ndistribution: {caption: {batch_size: {8: 1}}}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "plan", str(JOB), "--shapes", str(path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip() == f"error: {path}: max_buckets (0): input should be greater than or equal to 1. " \
                                  "Fix the value in the shapes file."
