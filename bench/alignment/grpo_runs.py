"""``python -m bench.alignment.grpo_runs WORK [--seeds 0 1 2] [--resume] [--score-only] [--one-process] [--no-write]``:
the whole phase pipeline through ``loom run``, once per seed, and GRPO's margin over each run's own merged SFT model.

For each seed, ``recipes/alignment/pipeline/pipeline-tiny.yaml`` with ``training.seed`` the seed (every phase: data
order, heads, rollouts) is written to ``WORK/pipeline-seed<S>.yaml`` (its paths made absolute) and run by ``loom run
... --out WORK/out<S>`` (exit code, wall time and load average in ``WORK/run<S>.json``); ``--resume`` passes
``--resume`` to it, so that phases an earlier run of the same file finished there (each checked against its spec's
hash) are kept and the rest run (the wall time is then the rest's); ``--score-only`` scores the runs already there
(runs started by hand with the same files, e.g. side by side). Each run's models answer the
same N held-out constraints prompts greedily (step ``rule_eval``'s function, recipes.alignment.evaluate.rule_eval):
the two domain models (the merge's parents), the merged model (GRPO's start and reference) and the GRPO policy.
Where a run's GRPO export predates the export of the GRPO head's trained LM head (runtime.export: until 2026-12-04 a
GRPO phase exported the source's LM head and final norm), its policy is exported again from the run's ``model.pt``
by the current code before it is scored (``reexported``).

``--one-process`` also trains each run's ``grpo`` phase again in one process (runtime.reference.ReferenceTrainer: the
runtime's oracle) from the same merged model, with the same job (the phase's job as ``loom run`` built it, its
artifacts read from ``WORK/out<S>``), into ``WORK/one<S>/`` (kept when done already; ``--parallel`` trains the seeds
at once, and scores every seed's runs at once with or without ``--one-process``), scores it the same way and
reports the first step whose GRPO loss differs between the two runtimes by more than 1e-3 relative (``same_until``;
the number of steps when none does): the two are the same computation up to the order of floating-point sums, so
their trajectories part only where a sampled token flips. Writes bench/results/alignment-grpo-runs.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO_ROOT, write_results

SPEC = REPO_ROOT / "recipes/alignment/pipeline/pipeline-tiny.yaml"
MODELS = ("sft_arithmetic", "sft_constraints", "merge", "grpo")


def seed_spec(work: Path, seed: int) -> Path:
    """The pipeline at ``seed``, its relative paths made absolute, written under ``work``."""
    text = SPEC.read_text().replace("../", f"{SPEC.parent.parent}/")
    assert "seed: 0}" in text
    text = text.replace("seed: 0}", f"seed: {seed}}}").replace("name: alignment-pipeline-tiny",
                                                                f"name: alignment-pipeline-seed{seed}")
    path = work / f"pipeline-seed{seed}.yaml"
    path.write_text(text)
    return path


def run(work: Path, seed: int, resume: bool = False) -> dict:
    """``loom run`` of the seed's pipeline (``--resume`` with ``resume``): exit code, wall seconds, load average at
    the end, whether it resumed."""
    spec, out = seed_spec(work, seed), work / f"out{seed}"
    resume = resume and out.is_dir() and any(out.iterdir())  # loom run refuses --resume with no earlier run in OUT
    start = time.perf_counter()
    with open(work / f"run{seed}.log", "w") as log:
        rc = subprocess.call([sys.executable, "-m", "orchestrator", "run", str(spec), "--out", str(out)]
                             + (["--resume"] if resume else []), stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    record = {"exit": rc, "wall_s": time.perf_counter() - start, "load": os.getloadavg()[0], "resumed": resume}
    (work / f"run{seed}.json").write_text(json.dumps(record))
    return record


def grpo_policy(out: Path) -> tuple[Path, bool]:
    """(the GRPO policy's folder, whether it was exported again): the run's export when its LM head is the GRPO
    head's, else a fresh export from ``OUT/grpo/model.pt`` by the current code (``OUT/grpo/reexport``)."""
    import torch

    from bench.alignment.grpo_seeds import grpo_job
    from orchestrator.recipes import import_recipe
    from planner.spec import parse_job
    from runtime.export import component_tensors, export_pretrained
    from runtime.pretrained import read_tensors
    from runtime.reference import MODEL_FILE, load_model

    params = load_model(out / "grpo" / MODEL_FILE)
    exported = out / "grpo/export/policy"
    head = next((t for k, t in params.items() if k.endswith("/policy.out.weight") and k.startswith("head:")), None)
    current = read_tensors(str(exported), ["lm_head.weight"])["lm_head.weight"]
    if head is None or torch.equal(current, head):
        return exported, False
    job = parse_job(grpo_job(out, 0, []))  # the phase's job as bench.alignment.grpo_seeds writes it: the same sources
    import_recipe(job.recipe)
    assert torch.equal(component_tensors(job, "policy", params)["lm_head.weight"], head)
    export_pretrained(job, params, out / "grpo/reexport")
    return out / "grpo/reexport/policy", True


def phase_job_of(work: Path, seed: int):
    """The ``grpo`` phase's job of seed ``seed``'s run exactly as ``loom run`` built it (its artifacts, the merged
    model, read from ``WORK/out<S>``)."""
    from orchestrator.pipeline import read_pipeline
    from planner.pipeline import artifact_path, phase_job

    pipeline, out = read_pipeline(work / f"pipeline-seed{seed}.yaml"), work / f"out{seed}"
    return phase_job(pipeline.doc, pipeline.phase("grpo").spec, pipeline.base,
                     locate=lambda ref, sub: artifact_path(out, ref, sub).resolve())


def train_one_process(work: Path, seed: int) -> Path:
    """Seed ``seed``'s ``grpo`` phase trained in this process (:func:`phase_job_of`, ReferenceTrainer) and exported as
    ``loom run`` exports it: ``WORK/one<S>/`` with ``export/policy`` and ``losses.txt`` (one loss per step). A
    finished one is kept."""
    import torch

    from orchestrator.recipes import load_recipe
    from runtime.export import export_pretrained
    from runtime.reference import ReferenceTrainer

    folder, job = work / f"one{seed}", phase_job_of(work, seed)
    record = folder / "losses.txt"
    if (folder / "export/policy/config.json").is_file() and record.is_file() \
            and len(record.read_text().split()) == job.training.steps:
        return folder
    torch.set_num_threads(1)
    load_recipe(job)
    trainer = ReferenceTrainer(job)
    losses = [trainer.train_step(step)["grpo"] for step in range(job.training.steps)]
    export_pretrained(job, trainer.named_parameters(), folder / "export")
    record.write_text("".join(f"{value!r}\n" for value in losses))
    return folder


def same_until(out: Path, one: Path, rtol: float = 1e-3) -> int:
    """The first step whose GRPO loss in the ``loom run`` (``OUT/grpo/metrics.jsonl``) and in one process
    (``ONE/losses.txt``) differ by more than ``rtol`` relative (of at least 1e-4: a loss near 0 has no digits to
    compare); the number of steps when none does."""
    loom = {}
    for line in (out / "grpo/metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        loom[record["step"]] = record["loss"]["grpo"]
    mine = [float(v) for v in (one / "losses.txt").read_text().split()]
    return next((step for step, value in enumerate(mine)
                 if abs(loom[step] - value) > rtol * max(abs(value), 1e-4)), len(mine))


def gate_scores(out: Path, prompts: int) -> dict | None:
    """The merged model's and the GRPO policy's scores as the run's own step ``grpo_eval`` measured them
    (``OUT/grpo_eval/metrics.json``: rule_eval of the GRPO export against the merged model, with the merged model as
    its ``baseline``, on the same held-out prompts), or None when that step did not measure them so (no baseline, or
    another number of prompts than ``prompts``)."""
    import yaml

    path = out / "grpo_eval/metrics.json"
    spec = yaml.safe_load(SPEC.read_text())
    args = next(p for p in spec["phases"] if p["name"] == "grpo_eval")["args"]
    if not path.is_file() or args.get("prompts", 64) != prompts or "baseline" not in args:
        return None
    metrics = json.loads(path.read_text())
    return {"merge": {"rule_score": metrics["baseline_rule_score"]},
            "grpo": {k: v for k, v in metrics.items() if k not in ("baseline_rule_score", "gain")} | {
                "reexported": False}}


def score(out: Path, prompts: int, from_gate: bool = False) -> dict:
    """Each of :data:`MODELS` scored by rule_eval against the run's merged model; with ``from_gate``, the merged model
    and the GRPO policy alone, as the run's step ``grpo_eval`` scored them (:func:`gate_scores`; the parents are not
    scored)."""
    from recipes.alignment.evaluate import rule_eval

    merged = out / "merge/export/policy"
    row = gate_scores(out, prompts) if from_gate else None
    if row is not None:
        return row
    row = {}
    for name in MODELS:
        folder, again = grpo_policy(out) if name == "grpo" else (out / name / "export/policy", False)
        row[name] = rule_eval(folder, merged, prompts) | ({"reexported": again} if name == "grpo" else {})
    return row


def signed(x: float) -> str:
    """``x`` to 3 decimals with its sign, +0.000 for a difference that is 0 up to float error."""
    return f"{round(x, 9) + 0.0:+.3f}"


def markdown(records: list[dict], prompts: int) -> str:
    one = all("one_process" in r for r in records)
    lines = ["# The alignment pipeline through `loom run`, per seed: GRPO against its merged SFT model", "",
             f"`recipes/alignment/pipeline/pipeline-tiny.yaml` run whole by `loom run` once per seed (`training.seed`: "
             f"every phase), then each run's models answer the same {prompts} held-out constraints prompts greedily, "
             "scored by the rule (step `rule_eval`'s function); KL per answer token to the run's merged model.", "",
             "| seed | loom run exit | wall s | load | SFT arithmetic | SFT constraints | merged | GRPO | GRPO - merged "
             "| GRPO KL to merged |" + (" GRPO in one process | one process - merged | its KL | losses equal until step |"
                                       if one else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if one else "")]
    for r in records:
        s = r["scores"]
        run_ = r.get("run") or {}
        wall = (f"{run_['wall_s']:.0f}" + (" (resumed)" if run_.get("resumed") else "")) if run_ else "-"
        load = f"{run_['load']:.0f}" if run_ else "-"
        parents = " | ".join(f"{s[k]['rule_score']:.3f}" if k in s else "-"
                             for k in ("sft_arithmetic", "sft_constraints"))
        lines.append(f"| {r['seed']} | {run_.get('exit', '-')} | {wall} | {load} | {parents} | "
                     f"{s['merge']['rule_score']:.3f} | {s['grpo']['rule_score']:.3f}"
                     f"{' (re-exported)' if s['grpo']['reexported'] else ''} | "
                     f"{signed(s['grpo']['rule_score'] - s['merge']['rule_score'])} | {s['grpo']['kl_to_reference']:.4f} |"
                     + (f" {r['one_process']['rule_score']:.3f} | "
                        f"{signed(r['one_process']['rule_score'] - s['merge']['rule_score'])} | "
                        f"{r['one_process']['kl_to_reference']:.4f} | {r['same_until']} |" if one else ""))
    for what, score_of in [("through `loom run`", lambda r: r["scores"]["grpo"]["rule_score"])] + (
            [("in one process", lambda r: r["one_process"]["rule_score"])] if one else []):
        gains = [score_of(r) - r["scores"]["merge"]["rule_score"] for r in records]
        if len(gains) > 1:
            lines += ["", f"GRPO's gain over its merged model {what}: {signed(statistics.fmean(gains))} +- "
                      f"{statistics.stdev(gains):.3f} (mean +- sample std over {len(gains)} seeds), "
                      f"{sum(g > 0 for g in gains)} of {len(gains)} positive."]
    if all("sft_arithmetic" in r["scores"] for r in records):
        below = [r["seed"] for r in records if r["scores"]["merge"]["rule_score"] < min(
            r["scores"]["sft_arithmetic"]["rule_score"], r["scores"]["sft_constraints"]["rule_score"])]
        lines += ["", "Merged model below both parents on these (constraints) prompts in seeds: "
                  + (", ".join(map(str, below)) or "none") + "."]
    else:
        lines += ["", "Scores of the merged model and GRPO as each run's own gated step `grpo_eval` measured them "
                  "(`--from-gate`: the same rule_eval, prompts and baseline); the parents were not scored."]
    return "\n".join(lines) + "\n"


def one_process(work: Path, records: list[dict], prompts: int, parallel: bool) -> None:
    """Each record's seed trained in one process (:func:`train_one_process`; in parallel processes when ``parallel``),
    scored against the run's merged model, and the step its losses part from the ``loom run``'s."""
    import multiprocessing

    from recipes.alignment.evaluate import rule_eval

    seeds = [r["seed"] for r in records]
    with multiprocessing.get_context("spawn").Pool(len(seeds) if parallel else 1) as pool:
        folders = pool.starmap(train_one_process, [(work, seed) for seed in seeds])
    for rec, folder in zip(records, folders):
        out = work / f"out{rec['seed']}"
        rec["one_process"] = rule_eval(folder / "export/policy", out / "merge/export/policy", prompts)
        rec["same_until"] = same_until(out, folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment.grpo_runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="where the seeds' specs and runs go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prompts", type=int, default=512, help="held-out prompts (default 512, as the gate's)")
    parser.add_argument("--resume", action="store_true", help="loom run --resume: keep the phases an earlier run of "
                        "the same file finished in WORK/out<S>")
    parser.add_argument("--score-only", action="store_true", help="score the runs already in WORK")
    parser.add_argument("--from-gate", action="store_true", help="take the merged model's and GRPO's scores from each "
                        "run's grpo_eval step (the same rule_eval, prompts and baseline); the parents are not scored")
    parser.add_argument("--one-process", action="store_true", help="also train each run's grpo phase in one process "
                        "from the same merged model and compare (module docstring)")
    parser.add_argument("--parallel", action="store_true", help="score the seeds' runs at once (and with "
                        "--one-process, train them at once)")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    records = []
    for seed in args.seeds:
        done = args.work / f"run{seed}.json"  # what run() recorded, when the run was made here
        rec = {"seed": seed, "run": (json.loads(done.read_text()) if done.is_file() else None) if args.score_only
               else run(args.work, seed, args.resume)}
        if not args.parallel:
            rec["scores"] = score(args.work / f"out{seed}", args.prompts, args.from_gate)
        records.append(rec)
    if args.parallel:  # the seeds' runs scored at once
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(len(records)) as pool:
            scores = pool.starmap(score, [(args.work / f"out{r['seed']}", args.prompts, args.from_gate)
                                          for r in records])
        for rec, row in zip(records, scores):
            rec["scores"] = row
    if args.one_process:
        one_process(args.work, records, args.prompts, args.parallel)
    report = markdown(records, args.prompts)
    print(report)
    if not args.no_write:
        write_results("alignment-grpo-runs", records, report, {"seeds": args.seeds, "prompts": args.prompts,
                                                                "one_process": args.one_process})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
