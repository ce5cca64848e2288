"""A 3-phase job end to end (docs/run.md, Phases): a real `loom run` process trains phase 'sft', runs the step
'average' (its model with the base model) and starts phase 'tune' from the average; SIGTERM after tune's first
checkpoint stops it (exit 143, one line naming the phase); `--resume` skips the finished phases, leaves their files
byte-identical and finishes tune from its checkpoint with exactly the losses and weights of tune run uninterrupted
from the same earlier phases."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from orchestrator.actors import EmbeddedRay
from orchestrator.checkpoint import complete_checkpoints
from orchestrator.metrics import read_step_log
from orchestrator.outdir import LOCK_FILE
from orchestrator.pipeline import PHASE_MARKER, read_pipeline, run_pipeline
from orchestrator.run import RunOptions

from test_cli_subprocess import ROOT, loom_command

sys.path.insert(0, str(ROOT / "examples"))
from make_models import save_llama  # noqa: E402  (examples/make_models.py)

TUNE_STEPS = 60


def job_doc(base: Path) -> dict:
    task = {"name": "chat", "batch_size": 4, "loss": "lm", "components": [{"component": "lm"}]}
    return {
        "name": "three",
        "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
        "components": {"lm": {"pretrained": str(base), "seq_len": 8}},
        "training": {"steps": 3, "lr": 0.01, "precision": "fp32", "seed": 4, "checkpoint_every": 3},
        "planner": {"time_limit_s": 2},
        "phases": [
            {"name": "sft", "tasks": [task]},
            {"name": "merge", "step": "average",
             "args": {"component": "lm", "models": ["@sft/model", str(base)], "weights": [0.75, 0.25]}},
            {"name": "tune", "components": {"lm": {"pretrained": "@merge/model"}}, "tasks": [task],
             "training": {"steps": TUNE_STEPS, "lr": 0.003, "checkpoint_every": 5}},
        ],
    }


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def kill_during_tune(job: Path, out: Path, err: Path) -> int:
    """`loom run` as a process, SIGTERM once phase tune has a complete checkpoint; its exit code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(err, "w") as stderr:
        proc = subprocess.Popen([*loom_command(), "run", str(job), "--out", str(out)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not complete_checkpoints(out / "tune"):
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_three_phases_killed_in_the_third_resume_to_the_uninterrupted_result(tmp_path):
    save_llama(tmp_path / "base", num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_doc(tmp_path / "base"), sort_keys=False))
    out, err = tmp_path / "out", tmp_path / "stderr.txt"

    code = kill_during_tune(job, out, err)
    text = err.read_text()
    lines = text.strip().splitlines()
    assert code == 143, text[-3000:]
    assert lines[-1].startswith("error: phase 'tune': stopped by SIGTERM after step "), text[-3000:]
    assert "Traceback" not in text and len([x for x in lines if "error:" in x]) == 1
    assert (out / "sft" / PHASE_MARKER).is_file() and (out / "merge" / PHASE_MARKER).is_file()
    assert not (out / "tune" / PHASE_MARKER).exists()
    stopped_at = len(read_step_log(out / "tune" / "metrics.jsonl"))
    assert 0 < stopped_at < TUNE_STEPS
    for what in ("phase 1/3 'sft': training 3 steps", "phase 2/3 'merge': step 'average' in the driver process",
                 "phase 3/3 'tune': training 60 steps"):
        assert what in text, text[-3000:]

    # the reference: the same finished phases, tune run from its start without interruption
    reference = tmp_path / "reference"
    shutil.copytree(out, reference, ignore=lambda folder, names: [n for n in names if n == LOCK_FILE])
    shutil.rmtree(reference / "tune")
    finished = {name: digests(out / name) for name in ("sft", "merge")}

    pipeline = read_pipeline(job)
    session = EmbeddedRay(num_cpus=1).start()
    try:
        resumed = run_pipeline(pipeline, RunOptions(out_dir=out, resume=True))
        whole = run_pipeline(pipeline, RunOptions(out_dir=reference, resume=True))
    finally:
        session.stop()
    assert [(p.name, p.skipped) for p in resumed.phases] == [("sft", True), ("merge", True), ("tune", False)]
    tune = resumed.phases[2].run
    assert tune.resumed_from is not None and tune.first_step == stopped_at and tune.last_step == TUNE_STEPS
    assert whole.phases[2].run.first_step == 0
    assert {name: digests(out / name) for name in ("sft", "merge")} == finished  # nothing of them rewritten

    losses = [r["loss"] for r in read_step_log(out / "tune" / "metrics.jsonl")]
    expected = [r["loss"] for r in read_step_log(reference / "tune" / "metrics.jsonl")]
    assert len(losses) == TUNE_STEPS and losses == expected  # exactly
    exported = load_file(str(out / "tune" / "export" / "lm" / "model.safetensors"))
    uninterrupted = load_file(str(reference / "tune" / "export" / "lm" / "model.safetensors"))
    assert exported.keys() == uninterrupted.keys()
    assert all((exported[k] == uninterrupted[k]).all() for k in exported)
    assert (out / "tune" / PHASE_MARKER).is_file()
