"""``python -m bench.alignment.judges [OUT] [--reuse] [--no-write]``: SysBench and FB-Bench of the tiny model before
and after alignment, from one run of the gated pipeline.

Runs ``loom run recipes/alignment/pipeline/judges-tiny.yaml --out OUT`` (default out/judges; ``--reuse``: read a
finished OUT instead) and reads what its evaluation phases reported (OUT/<phase>/metrics.json): the benchmarks' tiny
Llama at random initialisation (phases base_*), after SFT on generated system-message and feedback data (sft_*,
gated) and after DPO on the same pairs (dpo_*), on held-out synthetic sessions and items, judged by the rule judges.
Also from the run: each trained phase's loss (first and last 10% of its steps), the mean words of an answer in each
evaluation's report and the run's wall time. Writes bench/results/alignment-judges.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.common import REPO_ROOT, write_results
from recipes.alignment import fbbench, sysbench
from recipes.alignment.judge import words

SPEC = "recipes/alignment/pipeline/judges-tiny.yaml"
MODELS = ("base", "sft", "dpo")  # phase <model>_<benchmark> evaluates each


def run(out: Path) -> tuple[float, int]:
    """``loom run`` of the pipeline into ``out`` (replacing an earlier run there): its wall seconds and exit code (1
    when a gate stopped it; the evaluations' metrics are there all the same)."""
    start = time.perf_counter()
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}  # 1 thread: faster on a busy machine
    done = subprocess.run([sys.executable, "-m", "orchestrator", "run", SPEC, "--out", str(out), "--overwrite"],
                          cwd=REPO_ROOT, env=env)
    if done.returncode not in (0, 1):
        raise SystemExit(f"error: loom run exited with {done.returncode}")
    return time.perf_counter() - start, done.returncode


def answer_words(report: Path) -> float:
    """Mean words an answer in an evaluation's report."""
    rows = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    answers = [a for row in rows for a in (row["answers"] if "answers" in row else [row["answer"]])]
    return sum(len(words(a)) for a in answers) / len(answers)


def losses(out: Path, phase: str) -> dict[str, float]:
    """A trained phase's loss (its one task's), mean of the first and the last 10% of its steps."""
    records = [json.loads(line) for line in (out / phase / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"][phase] for r in records]
    k = max(1, len(losses) // 10)
    return {"first": sum(losses[:k]) / k, "last": sum(losses[-k:]) / k, "steps": len(losses)}


def measure(out: Path, seconds: float | None, code: int | None) -> dict:
    missing = [f"{m}_{b}" for m in MODELS for b in ("sysbench", "fbbench")
               if not (out / f"{m}_{b}" / "metrics.json").is_file()]
    if missing:
        raise SystemExit(f"error: {out}: no metrics of {', '.join(missing)}; the run stopped before them (its log "
                         "above says why).")
    spec = yaml.safe_load((REPO_ROOT / SPEC).read_text())
    phases = {p["name"]: p for p in spec["phases"]}
    record = {"spec": SPEC, "wall_s": seconds, "exit_code": code,
              "loss": {phase: losses(out, phase) for phase in ("sft", "dpo")}, "benchmarks": {}}
    for bench in ("sysbench", "fbbench"):
        record["benchmarks"][bench] = {
            "args": {k: v for k, v in phases[f"sft_{bench}"]["args"].items() if k not in ("model", "component")},
            "gates": {m: phases[f"{m}_{bench}"]["gate"] for m in MODELS if phases[f"{m}_{bench}"].get("gate")},
            "models": {m: {"metrics": json.loads((out / f"{m}_{bench}" / "metrics.json").read_text()),
                           "answer_words": answer_words(out / f"{m}_{bench}" / "report" / "answers.jsonl")}
                       for m in MODELS}}
    return record


def _row(label: str, metric: str, models: dict) -> str:
    values = [models[m]["metrics"].get(metric) for m in MODELS]
    return f"| {label} | " + " | ".join(f"{v:.3f}" if v is not None else "-" for v in values) + " |"


def _table(bench: dict, metrics: tuple[str, ...], names: dict[str, str]) -> list[str]:
    lines = ["| metric | base (random init) | SFT | SFT + DPO |", "|---|---|---|---|"]
    for metric in metrics:
        if any(metric in bench["models"][m]["metrics"] for m in MODELS):
            lines.append(_row(names.get(metric, metric), metric, bench["models"]))
    words_ = " | ".join(f"{bench['models'][m]['answer_words']:.1f}" for m in MODELS)
    return lines + [f"| words an answer | {words_} |"]


def markdown(rec: dict) -> str:
    sb, fb, loss = rec["benchmarks"]["sysbench"], rec["benchmarks"]["fbbench"], rec["loss"]
    ran = f" ({rec['wall_s']:.0f} s on the shared 2-core machine)" if rec["wall_s"] else ""
    gates = {0: " Every gate passed (exit 0).", 1: " A gate stopped the run (exit 1)."}.get(rec["exit_code"], "")
    return "\n".join([
        "# SysBench and FB-Bench of the tiny model: random init, after SFT, after SFT + DPO", "",
        f"`loom run {SPEC}`{ran}: SFT loss {loss['sft']['first']:.3f} -> {loss['sft']['last']:.3f} over "
        f"{loss['sft']['steps']} steps, DPO loss {loss['dpo']['first']:.3f} -> {loss['dpo']['last']:.3f} over "
        f"{loss['dpo']['steps']} steps (first vs last 10%). Rule judges; held-out synthetic data (split heldout)."
        + gates, "",
        f"SysBench: {sb['args']['sessions']} sessions of {sb['args']['turns']} turns; gates {sb['gates']}.", "",
        *_table(sb, sysbench.METRICS, {"csr": "CSR", "isr": "ISR", "ssr": "SSR"}), "",
        f"FB-Bench: {fb['args']['items']} items; gates {fb['gates']}.", "",
        *_table(fb, fbbench.METRICS, {})])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment.judges", description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="out/judges",
                        help="the run's --out folder (a relative one is under the repository root)")
    parser.add_argument("--reuse", action="store_true", help="read a finished run in OUT instead of running")
    parser.add_argument("--no-write", action="store_true", help="print, do not write bench/results")
    args = parser.parse_args(argv)
    out = Path(args.out)
    seconds, code = (None, None) if args.reuse else run(out)  # loom runs from the repository root
    rec = measure(out if out.is_absolute() else REPO_ROOT / out, seconds, code)
    text = markdown(rec)
    print(text)
    if not args.no_write:
        write_results("alignment-judges", [rec], text, {"spec": SPEC, "out": str(out), "reuse": args.reuse})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
