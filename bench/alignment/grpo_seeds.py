"""``python -m bench.alignment.grpo_seeds OUT [--seeds 0 1 2] [--set PATH=VALUE ...] [--parallel] [--no-write]``:
GRPO's margin over the merged SFT model, over several seeds.

OUT is a finished ``loom run recipes/alignment/pipeline/pipeline-tiny.yaml --out OUT`` (its ``merge`` phase: GRPO's
start and reference). For each seed the pipeline's ``grpo`` phase runs alone (a one-phase job written from the
pipeline's own phase, policy and frozen reference both OUT/merge/export/policy, ``training.seed`` the seed: it draws
the training prompts and every rollout; trained in one process, :func:`train_seed`), then the step ``rule_eval``
(recipes.alignment.evaluate.rule_eval) scores the GRPO policy's greedy answers to N held-out prompts (the same N for
every seed and for the merged model, whose greedy answers do not depend on a seed). ``--set`` changes the phase before
it runs, e.g. ``--set training.lr=1e-3 --set tasks.0.components.0.samples=8`` (a dotted path into the one-phase job;
the value read as YAML; an index one past a list's end appends, e.g. ``--set 'tasks.1={name: sft_kl, ...}'`` adds
GRPO's KL penalty on SFT data as a second task, as docs/recipes/alignment.md shows); ``--parallel`` trains every seed
at once. Writes
bench/results/alignment-grpo-seeds[-NAME].{json,md} (``--name``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import yaml

from bench.common import REPO_ROOT, write_results
from recipes.alignment.evaluate import rule_eval

SPEC = "recipes/alignment/pipeline/pipeline-tiny.yaml"
METRICS = ("rule_score", "length", "keyword", "format", "answer_words", "kl_to_reference")


def grpo_job(out: Path, seed: int, overrides: list[str]) -> dict:
    """The pipeline's ``grpo`` phase as a one-phase job from OUT's merged model, at ``seed``, with ``overrides``."""
    pipeline = yaml.safe_load((REPO_ROOT / SPEC).read_text())
    phase = next(p for p in pipeline["phases"] if p["name"] == "grpo")
    merged = str((out / "merge/export/policy").resolve())
    job = {"name": f"grpo-seed{seed}", "recipe": pipeline["recipe"],
           "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
           "components": {"policy": {"pretrained": merged}, "reference": {"pretrained": merged, "frozen": True}},
           "training": {**pipeline["training"], **phase.get("training", {}), "seed": seed},
           "planner": pipeline.get("planner", {}), "tasks": phase["tasks"]}
    for item in overrides:
        path, _, value = item.partition("=")
        *parents, last = path.split(".")
        node = job
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list) and int(last) == len(node):  # one past the end: appended (a task, a use)
            node.append(yaml.safe_load(value))
        else:
            node[int(last) if isinstance(node, list) else last] = yaml.safe_load(value)
    return job


def train_seed(out: Path, work: Path, seed: int, overrides: list[str],
               reuse: bool = False) -> tuple[Path, float | None]:
    """Train one seed's GRPO job in this process (runtime.reference.ReferenceTrainer: the runtime's one-process
    oracle, whose steps the multi-process runtime is tested to equal) and export its policy as ``loom run`` does;
    (the exported folder, seconds). In-process because an embedded Ray cluster times out starting on a machine this
    loaded (loom's own runs of the same job: the same rollouts and updates, up to floating-point order). With
    ``reuse``, an earlier run's export of the same job is kept (seconds: its record in ``train_s.txt``, else None)."""
    import torch

    from orchestrator.recipes import import_recipe
    from planner.spec import parse_job
    from runtime.export import export_pretrained
    from runtime.reference import ReferenceTrainer

    torch.set_num_threads(1)
    folder = work / f"seed{seed}"
    spec = grpo_job(out, seed, overrides)
    done = (folder / "export/policy/config.json").is_file() and (folder / "job.yaml").is_file() and yaml.safe_load(
        (folder / "job.yaml").read_text()) == spec
    if reuse and done:
        record = folder / "train_s.txt"
        return folder / "export/policy", float(record.read_text()) if record.is_file() else None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    job = parse_job(spec)
    import_recipe(job.recipe)
    start = time.perf_counter()
    torch.manual_seed(job.training.seed)
    trainer = ReferenceTrainer(job)
    with open(folder / "losses.txt", "w") as log:
        for step in range(job.training.steps):
            log.write(f"{step} {trainer.train_step(step)}\n")
    export_pretrained(job, trainer.named_parameters(), folder / "export")
    seconds = time.perf_counter() - start
    (folder / "train_s.txt").write_text(f"{seconds:.1f}\n")
    return folder / "export/policy", seconds


def _seed_row(args: tuple) -> dict:
    """One seed trained (:func:`train_seed`) and scored: :func:`rule_eval` and the KL to the merged model."""
    out, work, seed, overrides, prompts, reuse = args
    policy, seconds = train_seed(out, work, seed, overrides, reuse)
    return {"seed": seed, "train_s": seconds, **rule_eval(policy, out / "merge/export/policy", prompts)}


def run_seeds(out: Path, work: Path, seeds: list[int], overrides: list[str], prompts: int,
              parallel: bool, reuse: bool = False) -> tuple[dict, list[dict]]:
    """(the merged model's :func:`rule_eval`, one row per seed): each seed's GRPO policy trained and scored (in
    parallel processes when ``parallel``); ``train_s`` is each run's wall time (parallel runs share the CPUs)."""
    import multiprocessing

    jobs = [(out, work, seed, overrides, prompts, reuse) for seed in seeds]
    with multiprocessing.get_context("spawn").Pool(len(seeds) if parallel else 1) as pool:
        pending = pool.map_async(_seed_row, jobs)  # the merged model is scored meanwhile
        base = rule_eval(out / "merge/export/policy", None, prompts)
        print(f"merged SFT: rule score {base['rule_score']:.3f}", flush=True)
        rows = pending.get()
    for row in rows:
        print(f"seed {row['seed']}: rule score {row['rule_score']:.3f}", flush=True)
    return base, rows


def summary(rows: list[dict], base: dict) -> dict:
    """Mean and sample std over seeds of each metric, and the rule-score margin over the merged model."""
    out = {}
    for key in METRICS:
        values = [r[key] for r in rows]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values), "max": max(values)}
    scores = out["rule_score"]
    out["margin"] = scores["mean"] - base["rule_score"]
    out["margin_over_std"] = out["margin"] / scores["std"] if scores["std"] else float("inf")
    out["seeds_above_base"] = sum(r["rule_score"] > base["rule_score"] for r in rows)
    return out


def markdown(rec: dict) -> str:
    base, rows, s = rec["base"], rec["seeds"], rec["summary"]
    change = ", ".join(rec["overrides"]) or "none"
    lines = [f"# GRPO over seeds: the held-out rule score before and after ({rec['name']})", "",
             f"The `grpo` phase of `{SPEC}` run alone from the pipeline's merged SFT model (its start and its "
             f"frozen reference), once per seed (the seed draws the training prompts and every rollout), each in one "
             f"process (runtime.reference.ReferenceTrainer); changes to the phase: {change}. Each GRPO policy and "
             f"the merged model answer the same "
             f"{rec['prompts']} held-out constraints prompts greedily (step `rule_eval`), scored by the rule.", "",
             "| model | seed | rule score | length | keyword | format | answer words | KL to reference | train s |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| merged SFT (start) | - | {base['rule_score']:.3f} | {base['length']:.2f} | {base['keyword']:.2f} | "
             f"{base['format']:.2f} | {base['answer_words']:.1f} | 0 | - |"]
    for r in rows:
        lines.append(f"| GRPO | {r['seed']} | {r['rule_score']:.3f} | {r['length']:.2f} | {r['keyword']:.2f} | "
                     f"{r['format']:.2f} | {r['answer_words']:.1f} | {r['kl_to_reference']:.4f} | "
                     f"{'-' if r['train_s'] is None else round(r['train_s'])} |")
    m = s["rule_score"]
    if len(rows) == 1:  # no spread to report
        lines += ["", f"Margin over the merged model: {s['margin']:+.3f}, one seed (no spread measured)."]
        return "\n".join(lines) + "\n"
    lines += [f"| GRPO, mean +- std over {len(rows)} seeds | - | {m['mean']:.3f} +- {m['std']:.3f} | "
              f"{s['length']['mean']:.2f} | {s['keyword']['mean']:.2f} | {s['format']['mean']:.2f} | "
              f"{s['answer_words']['mean']:.1f} | {s['kl_to_reference']['mean']:.4f} | - |", "",
              f"Margin over the merged model: {s['margin']:+.3f} (mean over seeds), {s['margin_over_std']:.1f} times "
              f"the std over seeds; {s['seeds_above_base']} of {len(rows)} seeds above the merged model (range "
              f"{m['min']:.3f} - {m['max']:.3f})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment.grpo_seeds", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a finished run of " + SPEC)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="change the one-phase job before it runs (repeatable)")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts (default 64, as the pipeline's gate)")
    parser.add_argument("--parallel", action="store_true", help="train the seeds in parallel processes (their wall "
                        "times then share the CPUs)")
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default OUT/grpo-seeds[-NAME])")
    parser.add_argument("--reuse", action="store_true", help="keep a seed's earlier export of the same job (its "
                        "training is not rerun)")
    parser.add_argument("--name", default="", help="a suffix naming this configuration's results")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    suffix = f"-{args.name}" if args.name else ""
    work = args.work or args.out / f"grpo-seeds{suffix}"
    base, rows = run_seeds(args.out, work, args.seeds, args.overrides, args.prompts, args.parallel, args.reuse)
    rec = {"name": args.name or "the pipeline's grpo phase", "prompts": args.prompts, "overrides": args.overrides,
           "base": base, "seeds": rows, "summary": summary(rows, base)}
    report = markdown(rec)
    print(report)
    if not args.no_write:
        write_results(f"alignment-grpo-seeds{suffix}", [rec], report,
                      {"spec": SPEC, "seeds": args.seeds, "prompts": args.prompts, "overrides": args.overrides})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
