"""``python -m bench.alignment.pas [--out DIR] [--seeds N | --seed S ...] [--reuse] [--no-write]``: does PAS help?

For each seed, two ``loom run`` s (subprocesses) of recipes/alignment/pipeline/pas-tiny.yaml with ``training.seed``
and the steps' ``seed`` set to it:

- ``augmented``: the spec as shipped: PAS trained, half of the SFT prompts augmented by its complements (step
  ``pas_data``), the answer model trained on them, step ``pas_eval`` (gated);
- ``plain``: the same spec with ``share: 0`` (the SFT prompts as they are: the answer model never sees a complement)
  and the ``augmented`` run's PAS model instead of its own ``pas`` phase.

Each run's ``pas_eval`` metrics (recipes.alignment.pas.measure: greedy answers to 96 held-out prompts of three kinds,
arithmetic, explicit constraints and scene prompts that leave length and format to the scene
(recipes.alignment.pas_scenes), scored by the rule, alone, with the PAS model's complement appended and with the
generator's) and ``pas_data``'s
(the share of its complements that obey PAS's rules) are read from its ``OUT/<phase>/metrics.json``; the report gives
their mean and sample standard deviation over the seeds, and each run's wall time (the machine's load average
beside it). A run whose gate fails (exit 1) is a result, reported as such. Writes
bench/results/alignment-pas.{json,md}.
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

import yaml

from bench.common import REPO_ROOT, write_results
from recipes.alignment import pas_scenes, tasks

SPEC = REPO_ROOT / "recipes/alignment/pipeline/pas-tiny.yaml"
VARIANTS = ("plain", "augmented")
RUN_FILE = "bench-run.json"  # a run's exit code, wall time and load average, for --reuse
CHECKS_FILE = "bench-checks.json"  # check_rates of an augmented run
WAYS = {"rule_score": "alone", "rule_score_pas": "+ PAS complement", "rule_score_oracle": "+ generator's complement",
        "pas_gain": "PAS gain"}


def variant_spec(variant: str, seed: int, out: Path) -> dict:
    """The spec of one run: ``seed`` everywhere; ``plain``: share 0 and the augmented run's PAS model."""
    doc = yaml.safe_load(SPEC.read_text())
    for component in doc["components"].values():
        component["pretrained"] = str((SPEC.parent / component["pretrained"]).resolve())
    doc["training"]["seed"] = seed
    phases = {p["name"]: p for p in doc["phases"]}
    for task in (t for p in doc["phases"] for t in p.get("tasks", ())):  # the spec's relative files, from out/
        if not task["data"]["path"].startswith("@"):
            task["data"]["path"] = str((SPEC.parent / task["data"]["path"]).resolve())
    phases["pas_data"]["args"]["source"] = str((SPEC.parent / phases["pas_data"]["args"]["source"]).resolve())
    for name in ("pas_data", "pas_eval"):
        phases[name]["args"]["seed"] = seed
    if variant == "plain":
        pas_model = str(out / f"augmented-{seed}" / "pas/export/pas")
        phases["pas_data"]["args"] |= {"share": 0, "pas": pas_model}
        phases["pas_eval"]["args"]["pas"] = pas_model
        doc["phases"] = [p for p in doc["phases"] if p["name"] != "pas"]
        del doc["components"]["pas"]
    return doc


def run(variant: str, seed: int, out: Path, reuse: bool) -> dict:
    """``loom run`` of :func:`variant_spec` into ``out/<variant>-<seed>``; its phases' metrics, exit code, time."""
    target = out / f"{variant}-{seed}"
    done = (target / "pas_eval" / "metrics.json").exists()
    record = {"variant": variant, "seed": seed, "rc": None, "seconds": None, "load_average": None, "reused": True}
    if not (reuse and done):
        spec = out / f"{variant}-{seed}.yaml"
        spec.write_text(yaml.safe_dump(variant_spec(variant, seed, out), sort_keys=False))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(spec), "--out", str(target)],
                              cwd=REPO_ROOT, capture_output=True, text=True)
        stopped = proc.returncode == 1 and (target / "pas_eval" / "metrics.json").exists()  # the gate: a result
        if proc.returncode != 0 and not stopped:
            raise RuntimeError(f"loom run {spec} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        record |= {"rc": proc.returncode, "seconds": time.perf_counter() - start,
                   "load_average": os.getloadavg()[0], "reused": False}
        (target / RUN_FILE).write_text(json.dumps({k: record[k] for k in ("rc", "seconds", "load_average")}))
    elif (target / RUN_FILE).exists():  # a run of this bench: its exit code and time
        record |= json.loads((target / RUN_FILE).read_text())
    for phase in ("pas_data", "pas_eval"):
        record[phase] = json.loads((target / phase / "metrics.json").read_text())
    log = target / "sft" / "metrics.jsonl"
    losses = [json.loads(line)["loss"]["sft"] for line in log.read_text().splitlines() if line.strip()]
    record["sft_loss_last"] = statistics.fmean(losses[-len(losses) // 10:])
    return record


def check_rates(out: Path, seed: int, prompts: int) -> dict[str, dict[str, float]]:
    """What PAS changes, check by check: the augmented run's answer model and PAS model of ``seed`` decoded again
    (recipes.alignment.pas.measure, deterministic: its rule scores must equal the run's pas_eval metrics), each
    constraints check's pass rate per kind of constraints prompt (explicit, scene) and way (alone, with PAS's
    complement); ``rule_score_pas`` beside them, to compare with the run's."""
    from recipes.alignment import pas

    target = out / f"augmented-{seed}"
    if (target / CHECKS_FILE).exists():  # decoded before (--checks is slow on a loaded machine)
        return json.loads((target / CHECKS_FILE).read_text())
    metrics, rows = pas.measure(target / "pas/export/pas", target / "sft/export/policy", prompts, seed=seed)
    rates: dict[str, dict[str, float]] = {"rule_score_pas": {"all": metrics["rule_score_pas"]}}
    problems = [pas_scenes.problem(seed, pas.SPLIT, i) for i in range(prompts)]
    for kind in ("constraints", "scene"):
        mine = [(p, row) for p, row in zip(problems, rows) if pas_scenes.kind(p) == kind]
        for way in ("rule_score", "rule_score_pas"):
            for check in ("length", "keyword", "format"):
                rates.setdefault(f"{kind} {check}", {})[way] = sum(
                    tasks.checks(p, row[way])[check] for p, row in mine) / len(mine)
        rates[f"{kind} PAS states length"] = {"rule_score_pas": sum(
            f"exactly {p.words} counted words" in row["complement"] for p, row in mine) / len(mine)}
    (target / CHECKS_FILE).write_text(json.dumps(rates))
    return rates


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def summary(runs: list[dict]) -> dict:
    """Per variant and metric of pas_eval (and pas_data's complement_valid): mean and sample std over the seeds."""
    out = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        metrics = {k: [r["pas_eval"][k] for r in mine] for k in mine[0]["pas_eval"]}
        if all("complement_valid" in r["pas_data"] for r in mine):  # plain runs write no complement
            metrics["train_complement_valid"] = [r["pas_data"]["complement_valid"] for r in mine]
        metrics["sft_loss_last"] = [r["sft_loss_last"] for r in mine]
        out[variant] = {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                            "values": v} for k, v in metrics.items()}
    return out


def markdown(rec: dict) -> str:
    s, seeds = rec["summary"], rec["seeds"]
    cell = lambda variant, key: f"{s[variant][key]['mean']:.3f} ± {s[variant][key]['std']:.3f}"  # noqa: E731
    lines = ["# PAS: the answer model's held-out rule score with and without PAS complements", "",
             f"`{SPEC.relative_to(REPO_ROOT)}` through `loom run`, seeds {', '.join(map(str, seeds))} (training seed "
             "and the steps' seeds), mean ± sample std over the seeds. Greedy answers to 96 held-out prompts per seed "
             "(step `pas_eval`), a third each arithmetic, explicit constraints and scene prompts (length and format "
             "left to the scene: recipes.alignment.pas_scenes), scored by the recipe's rule (the fraction of checks "
             "passed). `plain`: the answer model fine-tuned on the explicit SFT prompts as they are; `augmented`: on "
             "the same rows with half of the prompts followed by the PAS model's complement (step `pas_data`). Both "
             "read the same PAS model per seed.", "",
             "| answer model | " + " | ".join(WAYS.values()) + " | SFT loss, last 10% |",
             "|---|" + "---|" * (len(WAYS) + 1)]
    for variant in VARIANTS:
        lines.append(f"| {variant} | " + " | ".join(cell(variant, k) for k in WAYS) +
                     f" | {cell(variant, 'sft_loss_last')} |")
    lines += ["", "Per kind of prompt (`augmented`, then `plain`):", "", "| answer model | prompts | " +
              " | ".join(list(WAYS.values())[:3]) + " |", "|---|---|---|---|---|"]
    for variant in reversed(VARIANTS):
        for kind in pas_scenes.KINDS:
            lines.append(f"| {variant} | {kind} | " + " | ".join(cell(variant, f"{k}_{kind}")
                                                                 for k in list(WAYS)[:3]) + " |")
    best = max(s["plain"]["rule_score"]["mean"], s["augmented"]["rule_score"]["mean"])
    lines += ["", f"The best answer model without PAS scores {best:.3f}; the augmented one with PAS's complement "
              f"{s['augmented']['rule_score_pas']['mean']:.3f} "
              f"({s['augmented']['rule_score_pas']['mean'] - best:+.3f}). Per seed, the augmented model's gain from "
              "PAS: " + ", ".join(f"{v:+.3f}" for v in s["augmented"]["pas_gain"]["values"]) + " (all prompts), " +
              ", ".join(f"{v:+.3f}" for v in s["augmented"]["pas_gain_scene"]["values"]) + " (scene prompts)."]
    aug = s["augmented"]
    lines += ["", "The PAS model's complements against PAS's rules (recipes.alignment.pas.complement_rules: 20-45 "
              "words, never the answer): "
              f"{aug['train_complement_valid']['mean']:.1%} of the 256 written into the SFT data and "
              f"{aug['complement_valid']['mean']:.1%} of the 96 held-out ones obey them; "
              f"{aug['complement_exact']['mean']:.1%} of the held-out ones equal the generator's word for word.", "",
              "| run | seed | exit | wall s | load average | rule score alone | + PAS | gain |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rec["runs"]:
        wall = "not recorded" if r["seconds"] is None else f"{r['seconds']:.0f}"
        load = "" if r["load_average"] is None else f"{r['load_average']:.1f}"
        m = r["pas_eval"]
        lines.append(f"| {r['variant']} | {r['seed']} | {r['rc'] if r['rc'] is not None else ''} | {wall} | {load} | "
                     f"{m['rule_score']:.3f} | {m['rule_score_pas']:.3f} | {m['pas_gain']:+.3f} |")
    if "checks" in rec:
        lines += ["", "Check by check, the augmented answer model on the held-out constraints prompts (pass rates, "
                  "mean over the seeds; `python -m bench.alignment.pas --checks` decodes the runs' models again):", "",
                  "| prompts, check | alone | + PAS complement |", "|---|---|---|"]
        for key in next(iter(rec["checks"].values())):
            if key == "rule_score_pas":
                continue
            cells = [statistics.fmean(c[key][way] for c in rec["checks"].values()) if way in rec["checks"][
                rec["seeds"][0]][key] else None for way in ("rule_score", "rule_score_pas")]
            lines.append(f"| {key} | " + " | ".join("" if v is None else f"{v:.2f}" for v in cells) + " |")
        again = [abs(c["rule_score_pas"]["all"] - r["pas_eval"]["rule_score_pas"]) for c, r in zip(
            rec["checks"].values(), [r for r in rec["runs"] if r["variant"] == "augmented"])]
        lines += ["", f"Decoded again, the rule score with PAS differs from the runs' by at most {max(again):.4f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment.pas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/loom-bench-pas"), help="where the runs go")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--seed", type=int, action="append", help="only this seed (repeatable; instead of --seeds): "
                        "runs of several seeds at once, then one --reuse run over all of them writes the report")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs under --out")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    parser.add_argument("--checks", action="store_true", help="decode the augmented runs again: each check's pass "
                        "rate with and without PAS")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seed or list(range(args.seeds))
    runs = [run(variant, seed, out, args.reuse) for seed in seeds for variant in reversed(VARIANTS)]
    rec = {"seeds": seeds, "runs": runs, "summary": summary(runs)}
    if args.checks:
        prompts = yaml.safe_load(SPEC.read_text())["phases"][-1]["args"]["prompts"]
        rec["checks"] = {seed: check_rates(out, seed, prompts) for seed in seeds}
    report = markdown(rec)
    print(report)
    if not args.no_write:
        write_results("alignment-pas", [rec], report, {"spec": str(SPEC.relative_to(REPO_ROOT)), "seeds": seeds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
