"""The shipped BUTTON pipeline (recipes/alignment/pipeline/button-tiny.yaml) end to end as a user runs it: a real
`loom run` process writes the compositional trajectories, fine-tunes the tiny Llama on 2 CPU workers and plays the
held-out sequential and parallel tasks; its eval phase's gate (task success) passes and the run exits 0.

This is the recipe's quality check: a change that trains the model differently (a kernel, the optimizer, the data
path) and loses the compositional skill fails here. (The recipe is sized so that every seed tried passes: the earlier
64-wide, 700-step recipe passed or failed by seed, docs/recipes/alignment.md, BUTTON.)"""

from __future__ import annotations

import json
import os
import subprocess

import yaml

from recipes.alignment import button_steps

from test_cli_subprocess import ROOT, loom_command

SPEC = ROOT / "recipes" / "alignment" / "pipeline" / "button-tiny.yaml"


def test_the_shipped_button_pipeline_passes_its_gate(tmp_path):
    model = button_steps.HERE / "models" / "button"
    assert (model / "config.json").is_file(), f"{model} is missing: scripts/setup.sh writes it"
    gate = next(p["gate"] for p in yaml.safe_load(SPEC.read_text())["phases"] if p["name"] == "eval")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*loom_command(), "run", str(SPEC), "--out", str(out)], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=900, stdin=subprocess.DEVNULL)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics["task_success"] >= gate["task_success"]
    assert metrics["malformed_rate"] <= 0.05
