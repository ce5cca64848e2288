"""``python -m bench.alignment.supercorrect [--out DIR] [--reuse] [--no-write]``: SuperCorrect against plain SFT.

Runs both CPU pipelines with ``loom run`` (each into ``DIR/<spec name>``; ``--reuse`` keeps finished runs and the
scores of earlier bench runs on them, ``DIR/bench-scores``):
recipes/alignment/pipeline/supercorrect-tiny.yaml (hierarchical-thought SFT, then cross-model collaborative DPO)
and supercorrect-baseline-tiny.yaml (plain SFT on the same problems, as many steps as both together). Then every
model answers the same held-out problems greedily (recipes.alignment.supercorrect.evaluate: the problems the data
step wrote, none of them a training problem): plain SFT, HSFT alone and HSFT + cross DPO
(the last two as the pipelines' own evaluation phases scored them: OUT/eval/{metrics.json,answers.jsonl}).
Metrics per model: answer accuracy (solve prompts), first errors located and fixed (check prompts showing a student
solution with an error at a known step), each split by problem kind; each trained phase's loss, first and last 10%
of its steps; each pipeline's wall time. Writes bench/results/alignment-supercorrect.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.alignment.grpo import phase_losses
from bench.common import REPO_ROOT, write_results
from recipes.alignment import supercorrect as scs
from recipes.alignment import supercorrect_data as sc
from recipes.alignment.generation import load

SPECS = {"supercorrect": "recipes/alignment/pipeline/supercorrect-tiny.yaml",
         "baseline": "recipes/alignment/pipeline/supercorrect-baseline-tiny.yaml"}


def run_pipeline(spec: str, out: Path, reuse: bool) -> float | None:
    """``loom run spec --out out`` in a subprocess; its wall seconds (None when a finished run is reused)."""
    if reuse and (out / "eval" / "metrics.json").is_file():
        return None
    start = time.perf_counter()
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-m", "orchestrator", "run", spec, "--out", str(out), "--overwrite"],
                   cwd=REPO_ROOT, env=env, check=True)
    return time.perf_counter() - start


def by_kind(rows: list[dict]) -> dict[str, dict[str, float]]:
    """The three metrics per problem kind (chain: ``start with``; linear: ``solve``)."""
    out = {}
    for kind, word in (("chain", "start"), ("linear", "solve")):
        mine = [r for r in rows if r["problem"].startswith(word)]
        erring = [r for r in mine if r["first_error"]]
        out[kind] = {"problems": len(mine), "answer_accuracy": sum(r["answer_correct"] for r in mine) / max(1, len(mine)),
                     "first_error_located": sum(r["located"] for r in erring) / max(1, len(erring)),
                     "first_error_fixed": sum(r["fixed"] for r in erring) / max(1, len(erring))}
    return out


def score(name: str, folder: Path, records: list[dict], root: Path, reuse: bool) -> tuple[dict, list[dict]]:
    """(metrics, rows) of the model in ``folder`` on ``records``, kept in ``root/bench-scores/<name>.json`` and read
    from there with ``reuse``."""
    cache = root / "bench-scores" / f"{name}.json"
    if reuse and cache.is_file():
        metrics, rows = json.loads(cache.read_text())
        return metrics, rows
    metrics, rows = scs.evaluate(*load(folder), records)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps([metrics, rows]))
    return metrics, rows


def measure(root: Path, reuse: bool) -> dict:
    walls = {name: run_pipeline(spec, root / Path(spec).stem, reuse) for name, spec in SPECS.items()}
    tiny, baseline = root / Path(SPECS["supercorrect"]).stem, root / Path(SPECS["baseline"]).stem
    records = sc.read_records(tiny / "data/data/heldout/problems.jsonl")
    assert records == sc.read_records(baseline / "data/data/heldout/problems.jsonl")  # one held-out set for both
    folders = {"plain SFT (baseline)": baseline / "sft/export/policy",
               "HSFT (template SFT)": tiny / "hsft/export/policy", "HSFT + cross DPO (SuperCorrect)":
               tiny / "dpo/export/policy"}
    scored = {"plain SFT (baseline)": baseline, "HSFT + cross DPO (SuperCorrect)": tiny}  # by their eval phases
    models = {}
    for name, folder in folders.items():
        if name in scored:  # the pipeline's eval phase scored this model on these records: read its answers
            metrics = json.loads((scored[name] / "eval/metrics.json").read_text())
            rows = [json.loads(line) for line in (scored[name] / "eval/answers.jsonl").read_text().splitlines()]
        else:
            metrics, rows = score(name, folder, records, root, reuse)
        models[name] = {"metrics": metrics, "by_kind": by_kind(rows), "example": rows[next(
            i for i, r in enumerate(rows) if r["first_error"])]}
    losses = {**{f"supercorrect/{k}": v for k, v in phase_losses(tiny).items()},
              **{f"baseline/{k}": v for k, v in phase_losses(baseline).items()}}
    return {"heldout": len(records), "erring": sum(1 for r in records if r["first_error"]), "models": models,
            "losses": losses, "wall_s": walls}


def markdown(rec: dict) -> str:
    lines = ["# SuperCorrect: hierarchical-thought SFT + cross-model DPO against plain SFT", "",
             f"Both pipelines run by `loom run` on CPU, then every model answers the same {rec['heldout']} held-out "
             f"problems greedily ({rec['erring']} of them shown with a student solution that errs at a known step).", "",
             "| model | answer accuracy | first errors located | first errors fixed |", "|---|---|---|---|"]
    for name, r in rec["models"].items():
        m = r["metrics"]
        lines.append(f"| {name} | {m['answer_accuracy']:.3f} | {m['first_error_located']:.3f} | "
                     f"{m['first_error_fixed']:.3f} |")
    lines += ["", "By problem kind (answer accuracy / located / fixed):", "", "| model | chain | linear |", "|---|---|---|"]
    for name, r in rec["models"].items():
        cells = [" / ".join(f"{r['by_kind'][k][m]:.2f}" for m in scs.EVAL_METRICS) for k in ("chain", "linear")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    lines += ["", "| phase/task | steps | loss, first 10% | loss, last 10% |", "|---|---|---|---|"]
    for phase, v in rec["losses"].items():
        lines.append(f"| {phase} | {v['steps']} | {v['first']:.4f} | {v['last']:.4f} |")
    walls = ", ".join(f"{k} {v:.0f} s" for k, v in rec["wall_s"].items() if v is not None)
    lines += ["", f"Wall time of `loom run` on this machine: {walls or 'reused finished runs'}.", "",
              "A held-out check prompt and each model's answer (the student errs at step "
              f"{next(iter(rec['models'].values()))['example']['first_error']}):", ""]
    for name, r in rec["models"].items():
        lines.append(f"- {name}: `{r['example']['checked']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment.supercorrect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "bench-supercorrect", help="runs go here")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --out instead of rerunning")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rec = measure(args.out, args.reuse)
    report = markdown(rec)
    print(report)
    if not args.no_write:
        write_results("alignment-supercorrect", [rec], report, {"specs": SPECS, "out": str(args.out)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
