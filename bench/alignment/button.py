"""``python -m bench.alignment.button [--runs DIR] [--seeds S ...] [--no-write]``: BUTTON's compositional data against
atomic tasks only, measured by executing the trained models' calls.

Runs ``loom run`` on recipes/alignment/pipeline/button-tiny.yaml (trajectories of atomic, sequential and parallel
tasks) and on button-atomic.yaml (atomic tasks only, the same number of trajectories, steps and model), each into
DIR/<spec name> (a temporary folder by default; a finished run there is reused: ``--runs`` after a run evaluates
again). Then every model plays every held-out task of each kind (questions never trained on; the untrained tiny
Llama as the floor), its calls executed against the world's tools (recipes.alignment.button_eval): task success
(final answer right), argument accuracy (gold calls made) and malformed turns, per kind. The eval phase's own
metrics (its gate's) are read from the run. ``--seeds``: the compositional pipeline again with each other
``training.seed`` (the same data; DIR/button-tiny-seed<S>), its eval phase's metrics reported per seed, since one
seed's number can mislead (docs/recipes/alignment.md, BUTTON). Writes bench/results/alignment-button.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import REPO_ROOT, write_results
from recipes.alignment.button import KINDS, generate
from recipes.alignment.button_eval import model_responder, play, score

SPECS = {"compositional": "recipes/alignment/pipeline/button-tiny.yaml",
         "atomic only": "recipes/alignment/pipeline/button-atomic.yaml"}
BASE = REPO_ROOT / "recipes/alignment/models/button"


def run_spec(spec: str, out: Path) -> dict:
    """``loom run spec --out out`` (unless ``out`` holds a finished run: its eval phase's metrics); the eval phase's
    metrics, the training's losses and seconds (the sum of its steps'), and the run's wall time when it ran here."""
    started, ran = time.perf_counter(), not (out / "eval" / "metrics.json").is_file()
    if ran:
        env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
        done = subprocess.run([sys.executable, "-m", "orchestrator", "run", spec, "--out", str(out)], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True)
        if done.returncode not in (0, 1):  # 1: a gate failed, the metrics are still there
            raise RuntimeError(f"loom run {spec} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"]["sft"] for r in records]
    k = max(1, len(losses) // 10)
    phase = json.loads((out / "eval" / "metrics.json").read_text())
    return {"run_s": time.perf_counter() - started if ran else None, "eval_phase": phase, "steps": len(losses),
            "train_s": sum(r["step_seconds"] for r in records), "loss_first": sum(losses[:k]) / k,
            "loss_last": sum(losses[-k:]) / k}


def seed_spec(spec: str, seed: int, folder: Path) -> Path:
    """``spec`` with ``training.seed`` = ``seed`` and its pretrained folders made absolute, written under ``folder``."""
    doc = yaml.safe_load((REPO_ROOT / spec).read_text())
    doc["training"]["seed"] = seed
    for comp in doc["components"].values():
        comp["pretrained"] = str((REPO_ROOT / spec).parent / comp["pretrained"])
    folder.mkdir(parents=True, exist_ok=True)
    (path := folder / f"{Path(spec).stem}-seed{seed}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def evaluate(folder: Path, seed: int = 0) -> dict:
    """Per kind, the metrics of ``folder``'s model playing every held-out task of that kind."""
    respond = model_responder(folder)
    result = {}
    for kind in KINDS:
        episodes = play(generate((kind,), "heldout", seed), respond)
        metrics = score(episodes)
        shown = {k: v for k, v in metrics.items() if not k.startswith("task_success_")}
        result[kind] = {"tasks": len(episodes), **shown, "example": episodes[0].messages[1:]}
    return result


def markdown(rec: dict) -> str:
    lines = ["# BUTTON: compositional function-calling data against atomic tasks only", "",
             "Each model plays every held-out task (a question never trained on) of each kind; its calls are executed "
             "against the toy world's tools. `task success`: the final answer is right; `arguments`: the gold calls "
             "it made; `malformed`: episodes ended by a turn that is not a well-formed call or answer.", "",
             "| model | kind | tasks | task success | arguments | malformed |", "|---|---|---|---|---|---|"]
    for name, per_kind in rec["models"].items():
        for kind, m in per_kind.items():
            lines.append(f"| {name} | {kind} | {m['tasks']} | {m['task_success']:.3f} | "
                         f"{m['argument_accuracy']:.3f} | {m['malformed_rate']:.3f} |")
    lines += ["", "Training (`loom run`, 2 CPU workers) and the pipeline's own eval phase (held-out sequential and "
              "parallel tasks together):", "",
              "| pipeline | spec | steps | loss, first 10% | loss, last 10% | training (s) | eval phase task_success | "
              "eval phase argument_accuracy |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rec["runs"].items():
        e = r["eval_phase"]
        lines.append(f"| {name} | `{SPECS[name]}` | {r['steps']} | {r['loss_first']:.4f} | {r['loss_last']:.4f} | "
                     f"{r['train_s']:.0f} | {e['task_success']:.3f} | {e['argument_accuracy']:.3f} |")
    if rec.get("seeds"):
        lines += ["", "The compositional pipeline by `training.seed` (the same data and model; its eval phase):", "",
                  "| seed | loss, last 10% | eval phase task_success | sequential | parallel | argument_accuracy |",
                  "|---|---|---|---|---|---|"]
        for seed, r in sorted(rec["seeds"].items(), key=lambda kv: int(kv[0])):
            e = r["eval_phase"]
            lines.append(f"| {seed} | {r['loss_last']:.4f} | {e['task_success']:.3f} | "
                         f"{e['task_success_sequential']:.3f} | {e['task_success_parallel']:.3f} | "
                         f"{e['argument_accuracy']:.3f} |")
    lines += ["", "A held-out parallel task as each model played it:", ""]
    for name, per_kind in rec["models"].items():
        turns = " / ".join(f"{m['role']}: `{m['content']}`" for m in per_kind["parallel"]["example"])
        lines.append(f"- {name}: {turns}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment.button", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, help="the runs' folder (default: a temporary one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S",
                        help="training seeds of the compositional pipeline (default: 0, the spec's own)")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    if not (BASE / "model.safetensors").is_file():
        print(f"error: {BASE} is missing; write it with `python -m recipes.alignment.button_steps`.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = args.runs or Path(tmp)
        runs = {name: run_spec(spec, runs_dir / Path(spec).stem) for name, spec in SPECS.items()}
        compositional = SPECS["compositional"]
        own = yaml.safe_load((REPO_ROOT / compositional).read_text())["training"]["seed"]
        seeds = {seed: runs["compositional"] if seed == own else run_spec(
            str(seed_spec(compositional, seed, runs_dir / "specs")),
            runs_dir / f"{Path(compositional).stem}-seed{seed}") for seed in args.seeds}
        models = {"untrained": evaluate(BASE)}
        models |= {name: evaluate(runs_dir / Path(spec).stem / "sft" / "export" / "policy")
                   for name, spec in SPECS.items()}
    rec = {"runs": runs, "models": models, "seeds": seeds}
    report = markdown(rec)
    print(report)
    if not args.no_write:
        write_results("alignment-button", [rec], report, {"specs": SPECS, "seeds": args.seeds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
