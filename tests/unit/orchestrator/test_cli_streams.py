"""What the CLI prints where, and option combinations it refuses: results on stdout, notes on stderr; a refused
combination is one `error:` line and exit code 2 before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from orchestrator.cli import app

TINY = {
    "name": "tiny-eval",
    "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
    "components": {"text": {"kind": "transformer", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "seq_len": 4}},
    "tasks": [{"name": "rating", "batch_size": 2, "loss": "mse", "components": [{"component": "text"}]}],
    "training": {"steps": 1, "precision": "fp32"},
}


def _write(tmp_path: Path, doc: dict, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def test_eval_writes_its_note_on_stderr_and_only_the_report_on_stdout(tmp_path: Path) -> None:
    job, out = _write(tmp_path, TINY), tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(job), "--samples", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" not in result.stdout
    assert result.stderr.strip() == f"wrote {out}"
    assert result.stdout.splitlines()[0].startswith("tiny-eval: split train, 2 samples per task")
    assert set(json.loads(out.read_text())["metrics"]) == {"rating"}


def test_run_refuses_cluster_with_resume(tmp_path: Path) -> None:
    job = _write(tmp_path, TINY)
    cluster = _write(tmp_path, {"cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"}}, "c.yaml")
    result = CliRunner().invoke(app, ["run", str(job), "--resume", "--cluster", str(cluster),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "--cluster with --resume" in lines[0] and "plan.json" in lines[0]
    assert not (tmp_path / "out").exists()  # refused before the run touched anything
