"""``python -m bench.alignment.supercorrect [--out DIR] [--seeds N ...] [--reuse] [--no-ablation] [--no-write]``:
SuperCorrect against plain SFT.

Runs both CPU pipelines with ``loom run`` under each seed (the training seed and the data step's seed; each into
``DIR/<spec name>-seed<N>``; ``--reuse`` keeps finished runs and the scores of earlier bench runs on them,
``DIR/bench-scores``):
recipes/alignment/pipeline/supercorrect-tiny.yaml (hierarchical-thought SFT, the HSFT student's own errors, then
cross-model collaborative DPO on them) and supercorrect-baseline-tiny.yaml (plain SFT on the same problems, as many steps as both together). The
ablation: supercorrect-tiny's errors step with ``balance: false`` (every own-error pair), its DPO and eval resumed
from a copy of the seed's data and HSFT phases (``DIR/unbalanced-seed<N>``; ``--no-ablation`` skips it). Then every
model answers the same held-out problems greedily (recipes.alignment.supercorrect.evaluate: the problems the data
step wrote, none of them a training problem): plain SFT, HSFT alone and HSFT + cross DPO
(the last two as the pipelines' own evaluation phases scored them: OUT/eval/{metrics.json,answers.jsonl}).
Metrics per model: answer accuracy (solve prompts), first errors located and fixed (check prompts showing a student
solution with an error at a known step), the false-alarm rate (check prompts showing a right solution: any step
marked wrong), per seed and their mean and sample std, by problem kind; the DPO pairs by kind (missed errors, false
alarms) before balancing; each trained phase's loss, first and last 10% of its steps; each pipeline's wall time;
whether SuperCorrect's located and fixed are above plain SFT's on the mean and on which seeds.
Writes bench/results/alignment-supercorrect.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import statistics
import time
from pathlib import Path

import torch
import yaml

from bench.alignment.grpo import phase_losses
from bench.common import REPO_ROOT, write_results
from recipes.alignment import supercorrect as scs
from recipes.alignment import supercorrect_data as sc
from recipes.alignment.generation import load

SPECS = {"supercorrect": "recipes/alignment/pipeline/supercorrect-tiny.yaml",
         "baseline": "recipes/alignment/pipeline/supercorrect-baseline-tiny.yaml"}
SEEDS = (0, 1, 2)
BASELINE, SUPERCORRECT = "plain SFT (baseline)", "HSFT + cross DPO (SuperCorrect)"
UNBALANCED = "HSFT + cross DPO, unbalanced pairs (ablation)"


def seeded_spec(spec: str, seed: int, root: Path, balance: bool = True) -> Path:
    """A copy of ``spec`` under ``root/specs`` with ``seed`` as its training seed and its data step's seed (other
    problems, another held-out set, another data order), its relative model folders made absolute; with ``balance``
    false, its errors step keeps every pair (the ablation)."""
    source = REPO_ROOT / spec
    doc = yaml.safe_load(source.read_text())
    for component in doc["components"].values():
        if component["pretrained"].startswith("."):
            component["pretrained"] = str((source.parent / component["pretrained"]).resolve())
    doc["training"]["seed"] = seed
    for phase in doc["phases"]:
        if phase.get("step") in ("supercorrect_data", "supercorrect_errors"):  # the problems; the balancing draw
            phase["args"]["seed"] = seed
        if phase.get("step") == "supercorrect_errors" and not balance:
            phase["args"]["balance"] = False
    out = root / "specs" / f"{source.stem}-seed{seed}{'' if balance else '-unbalanced'}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def run_pipeline(spec: Path, out: Path, reuse: bool, resume: bool = False) -> float | None:
    """``loom run spec --out out`` in a subprocess (``--resume`` with ``resume``, else ``--overwrite``); its wall
    seconds, kept in ``<out's parent>/bench-walls/<out's name>.json`` so that a reused finished run still reports
    the wall time it took (None when a finished run is reused and its wall time was not kept)."""
    kept = out.parent / "bench-walls" / f"{out.name}.json"
    if reuse and (out / "eval" / "metrics.json").is_file():
        return json.loads(kept.read_text()) if kept.is_file() else None
    start = time.perf_counter()
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-m", "orchestrator", "run", str(spec), "--out", str(out), "--resume" if resume else "--overwrite"],
                   cwd=REPO_ROOT, env=env, check=True)
    wall = time.perf_counter() - start
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(wall))
    return wall


def by_kind(rows: list[dict]) -> dict[str, dict[str, float]]:
    """The metrics per problem kind (chain: ``start with``; linear: ``solve``)."""
    out = {}
    for kind, word in (("chain", "start"), ("linear", "solve")):
        mine = [r for r in rows if r["problem"].startswith(word)]
        out[kind] = {"problems": len(mine)} | scs.rates(mine)
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


def measure_seed(root: Path, seed: int, reuse: bool, ablation: bool = True) -> dict:
    """Both pipelines under ``seed`` (:func:`seeded_spec`) into ``root/<spec stem>-seed<seed>``, and with
    ``ablation`` the unbalanced DPO; every model scored."""
    outs = {name: root / f"{Path(spec).stem}-seed{seed}" for name, spec in SPECS.items()}
    walls = {name: run_pipeline(seeded_spec(spec, seed, root), outs[name], reuse) for name, spec in SPECS.items()}
    tiny, baseline = outs["supercorrect"], outs["baseline"]
    # the ablation: the errors step keeping every pair, DPO and eval resumed from a copy of this seed's data and
    # HSFT phases, so that both DPO phases start from the same HSFT model
    unbalanced = root / f"unbalanced-seed{seed}"
    if ablation:
        for phase in ("data", "hsft"):
            if not (unbalanced / phase).exists():
                shutil.copytree(tiny / phase, unbalanced / phase)
        walls["unbalanced"] = run_pipeline(seeded_spec(SPECS["supercorrect"], seed, root, balance=False), unbalanced,
                                           reuse, resume=True)
    records = sc.read_records(tiny / "data/data/heldout/problems.jsonl")
    assert records == sc.read_records(baseline / "data/data/heldout/problems.jsonl")  # one held-out set for both
    folders = {"plain SFT (baseline)": baseline / "sft/export/policy",
               "HSFT (template SFT)": tiny / "hsft/export/policy", "HSFT + cross DPO (SuperCorrect)":
               tiny / "dpo/export/policy", UNBALANCED: unbalanced / "dpo/export/policy"}
    scored = {BASELINE: baseline, SUPERCORRECT: tiny, UNBALANCED: unbalanced}  # by their eval phases
    if not ablation:
        del folders[UNBALANCED]
    models = {}
    for name, folder in folders.items():
        if name in scored:  # the pipeline's eval phase scored this model on these records: read its answers
            metrics = json.loads((scored[name] / "eval/metrics.json").read_text())
            rows = [json.loads(line) for line in (scored[name] / "eval/answers.jsonl").read_text().splitlines()]
            assert metrics == scs.rates(rows), (name, metrics)  # the phase's own metrics are its answers' rates
        else:
            metrics, rows = score(f"{name}-seed{seed}", folder, records, root, reuse)
        models[name] = {"metrics": metrics, "by_kind": by_kind(rows), "example": rows[next(
            i for i, r in enumerate(rows) if r["first_error"])]}
    losses = {**{f"supercorrect/{k}": v for k, v in phase_losses(tiny).items()},
              **{f"baseline/{k}": v for k, v in phase_losses(baseline).items()}}
    errors = json.loads((tiny / "errors/metrics.json").read_text())
    erring = [r for r in records if r["first_error"]]
    return {"seed": seed, "heldout": len(records), "erring": len(erring),
            "guess_located": sum(1 / len(r["student_steps"]) for r in erring) / len(erring),
            "models": models, "own_errors": errors, "losses": losses, "wall_s": walls,
            "unbalanced_pairs": json.loads((unbalanced / "errors/metrics.json").read_text())["dpo_pairs"]
            if ablation else None}


def measure(root: Path, seeds: list[int], reuse: bool, ablation: bool = True) -> dict:
    """Every seed measured (:func:`measure_seed`), each model's mean and sample std over them, and whether
    SuperCorrect's mean located and fixed are both above plain SFT's (the issue's target)."""
    runs = [measure_seed(root, seed, reuse, ablation) for seed in seeds]
    names = list(runs[0]["models"])
    values = {name: {m: [r["models"][name]["metrics"][m] for r in runs] for m in scs.EVAL_METRICS} for name in names}
    mean = {name: {m: statistics.fmean(v) for m, v in ms.items()} for name, ms in values.items()}
    std = {name: {m: statistics.stdev(v) if len(v) > 1 else 0.0 for m, v in ms.items()} for name, ms in values.items()}
    target = {m: mean[SUPERCORRECT][m] > mean[BASELINE][m] for m in ("first_error_located", "first_error_fixed")}
    per_seed = seeds_above_baseline(runs)
    return {"seeds": seeds, "runs": runs, "mean": mean, "std": std, "target_met": all(target.values()),
            "above_baseline": target, "seeds_above_baseline": per_seed,
            "every_seed_above": all(len(v) == len(runs) for v in per_seed.values())}


def seeds_above_baseline(runs: list[dict]) -> dict[str, list[int]]:
    """For located and fixed, the seeds on which SuperCorrect's rate is strictly above plain SFT's (a tie is not
    above)."""
    return {m: [r["seed"] for r in runs if r["models"][SUPERCORRECT]["metrics"][m] > r["models"][BASELINE]["metrics"][m]]
            for m in ("first_error_located", "first_error_fixed")}


def markdown(rec: dict) -> str:
    first = rec["runs"][0]
    lines = ["# SuperCorrect: hierarchical-thought SFT + cross-model DPO against plain SFT", "",
             f"Both pipelines run by `loom run` on CPU under seed{'s' if len(rec['seeds']) > 1 else ''} "
             f"{', '.join(map(str, rec['seeds']))} (each seed: its own generated "
             "problems, held-out set and data order); every model answers the same held-out problems greedily "
             f"({first['heldout']} a seed, {first['erring']} of them, seed {first['seed']}, shown with a student "
             "solution that errs at a known step).", "",
             "Mean +- sample std over seeds (false alarms: a step marked wrong in a right solution; located and "
             "fixed: over the solutions with an error):", "",
             "| model | answer accuracy | first errors located | first errors fixed | false-alarm rate |",
             "|---|---|---|---|---|"]
    for name, m in rec["mean"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f} +- {rec['std'][name][k]:.3f}" for k in scs.EVAL_METRICS)
                     + " |")
    guess = statistics.fmean(r["guess_located"] for r in rec["runs"])
    lines += ["", f"A check that names one step wrong at random on every problem would locate {guess:.3f} of the first "
              "errors (mean over seeds of 1 / the solution's steps) at a false-alarm rate of 1."]
    above = rec["above_baseline"]
    lines += ["", f"Target (SuperCorrect locates and fixes more first errors than plain SFT, means over seeds): "
              f"**{'met' if rec['target_met'] else 'not met'}** (located "
              f"{'above' if above['first_error_located'] else 'not above'}, fixed "
              f"{'above' if above['first_error_fixed'] else 'not above'})."]
    seeds_above = rec["seeds_above_baseline"]
    every = "every seed" if rec["every_seed_above"] else "not every seed"
    lines += ["", f"Per seed: SuperCorrect above plain SFT on **{every}** (located above on seeds "
              + (", ".join(map(str, seeds_above["first_error_located"])) or "none") + "; fixed above on seeds "
              + (", ".join(map(str, seeds_above["first_error_fixed"])) or "none") + ")."]
    n, errs = first["heldout"], first["erring"]
    lines += ["", f"Binomial standard errors of one seed at these sizes (seed {first['seed']}: {n} problems, {errs} "
              "erring), at the mean rates: located " + ", ".join(
                  f"{math.sqrt(m['first_error_located'] * (1 - m['first_error_located']) / errs):.3f}"
                  for m in rec["mean"].values()) + "; false alarms " + ", ".join(
                  f"{math.sqrt(m['false_alarm_rate'] * (1 - m['false_alarm_rate']) / max(1, n - errs)):.3f}"
                  for m in rec["mean"].values()) + " (in the table's order)."]
    lines += ["", "Per seed (answer accuracy / located / fixed / false alarms):", "",
              "| model | " + " | ".join(f"seed {r['seed']}" for r in rec["runs"]) + " |",
              "|---|" + "---|" * len(rec["runs"])]
    for name in rec["mean"]:
        cells = [" / ".join(f"{r['models'][name]['metrics'][m]:.3f}" for m in scs.EVAL_METRICS) for r in rec["runs"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "By problem kind, seed " + str(first["seed"]) + " (answer accuracy / located / fixed / false alarms):", "",
              "| model | chain | linear |", "|---|---|---|"]
    for name, r in first["models"].items():
        cells = [" / ".join(f"{r['by_kind'][k][m]:.2f}" for m in scs.EVAL_METRICS) for k in ("chain", "linear")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    lines += ["", "The HSFT student's own errors on its training problems (step `supercorrect_errors`; the DPO "
              "phase's pairs), as shares of the problems answered: wrong solutions, wrong checks, and among those "
              "missed errors and false alarms (before balancing); the pairs kept: " + "; ".join(
                  f"seed {r['seed']}: solve wrong {r['own_errors']['solve_wrong']:.3f}, check wrong "
                  f"{r['own_errors']['check_wrong']:.3f} (missed {r['own_errors'].get('missed_errors', math.nan):.3f}, "
                  f"false alarms {r['own_errors'].get('false_alarms', math.nan):.3f}), "
                  f"{r['own_errors']['dpo_pairs']:.0f} pairs kept"
                  + (f" (unbalanced: {r['unbalanced_pairs']:.0f})" if r["unbalanced_pairs"] is not None else "")
                  for r in rec["runs"]) + ".", "",
              "| seed | phase/task | steps | loss, first 10% | loss, last 10% |", "|---|---|---|---|---|"]
    for r in rec["runs"]:
        for phase, v in r["losses"].items():
            lines.append(f"| {r['seed']} | {phase} | {v['steps']} | {v['first']:.4f} | {v['last']:.4f} |")
    walls = "; ".join(f"seed {r['seed']}: " + (", ".join(f"{k} {v:.0f} s" for k, v in r["wall_s"].items()
                                                      if v is not None) or "reused finished runs")
                      for r in rec["runs"])
    lines += ["", f"Wall time of `loom run` on this (shared, loaded) machine: {walls}.", "",
              "A held-out check prompt of seed " + str(first["seed"]) + " and each model's answer (the student errs "
              f"at step {next(iter(first['models'].values()))['example']['first_error']}):", ""]
    for name, r in first["models"].items():
        lines.append(f"- {name}: `{r['example']['checked']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment.supercorrect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "bench-supercorrect", help="runs go here")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --out instead of rerunning")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="training and data seeds")
    parser.add_argument("--no-ablation", action="store_true", help="skip the unbalanced-pairs DPO ablation")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rec = measure(args.out, args.seeds, args.reuse, ablation=not args.no_ablation)
    report = markdown(rec)
    print(report)
    if not args.no_write:
        write_results("alignment-supercorrect", [rec], report, {"specs": SPECS, "seeds": args.seeds,
                                                                 "out": str(args.out),
                                                                 "ablation": not args.no_ablation})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
