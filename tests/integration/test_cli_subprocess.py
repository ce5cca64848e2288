"""The `loom` CLI as a real process: the console script (or `python -m orchestrator.cli`), exit codes,
stdout/stderr separation and the single error line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from planner.plan import plan_from_json

ROOT = Path(__file__).resolve().parents[2]
SMALL_JOB = textwrap.dedent("""\
    name: subprocess-job
    cluster: {num_nodes: 1, devices_per_node: 4, device: h100}
    components:
      encoder: {kind: vit, num_layers: 4, hidden_size: 256, num_heads: 4, patch_size: 16, image_size: 128}
      decoder: {kind: transformer, num_layers: 2, hidden_size: 256, num_heads: 4, seq_len: 32}
    tasks:
      - {name: a, batch_size: 16, components: [{component: encoder}, {component: decoder}]}
      - {name: b, batch_size: 8, components: [{component: decoder, seq_len: 64}]}
    planner: {time_limit_s: 1}
    """)


def loom_command() -> list[str]:
    """The installed console script next to this interpreter, else the module."""
    script = shutil.which("loom", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "orchestrator.cli"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*loom_command(), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


# the process-level contract (exit 0, the one line, nothing on stderr) on one example of each source of inputs: synthetic
# data, pretrained folders, a chat file with its tokenizer; tests/unit/orchestrator/test_cli_plan.py validates every
# example in-process
VALIDATED = ("quickstart-cpu", "hf-vlm-cpu", "chat-sft-cpu")


def test_validate_examples_exit_zero() -> None:
    for example in (ROOT / "examples" / f"{name}.yaml" for name in VALIDATED):
        result = run("validate", str(example))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{example}: valid.")
        assert result.stderr == ""


def test_bad_spec_is_one_error_line(tmp_path: Path) -> None:
    job = tmp_path / "bad.yaml"
    job.write_text(SMALL_JOB.replace("kind: vit", "kind: vitt"))
    result = run("validate", str(job))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: components.encoder.kind ('vitt') is not a registered component; did you mean 'vit'?"
    ]


def test_yaml_error_is_one_error_line(tmp_path: Path) -> None:
    job = tmp_path / "broken.yaml"
    job.write_text("name: [unclosed\n")
    result = run("plan", str(job), "--output", "json")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "broken.yaml" in lines[0]
    assert "Traceback" not in result.stderr


def test_plan_json_to_stdout(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(SMALL_JOB)
    result = run("plan", str(job), "--output", "json", "--no-baselines")
    assert result.returncode == 0, result.stderr
    plan = plan_from_json(result.stdout)
    assert plan.job == "subprocess-job"
    assert all(d < 4 for wave in plan.waves for s in wave.slices for d in s.devices)
    assert "Traceback" not in result.stderr


def test_python_dash_m_orchestrator() -> None:
    result = subprocess.run([sys.executable, "-m", "orchestrator", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    for command in ("validate", "schema", "plan"):
        assert command in result.stdout


@pytest.mark.skipif(shutil.which("loom", path=str(Path(sys.executable).parent)) is None,
                    reason="loom is not installed in this interpreter's environment (run scripts/setup.sh)")
def test_console_script_is_installed() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("loom ")
    assert "not installed" not in result.stdout
