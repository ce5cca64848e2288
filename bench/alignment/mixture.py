"""``python -m bench.alignment.mixture [--out DIR] [--reuse] [--no-write]``: data-mixture detection, end to end.

For each mixture below, runs recipes/alignment/pipeline/mixture-tiny.yaml with that mixture through ``loom run``
(a subprocess: data, the tiny Llama trained from scratch on it, the gated ``mixture_eval`` step), then estimates the
mixture again from three sampling seeds (1024 generations each) with recipes.alignment.mixture.evaluate, the step's
own code, and scores the untrained model the same way (what the estimate says of a model that learnt nothing).
An ablation runs the default mixture once more without packing (``pack: false``: one padded document a row, the
lm loss a mean over each row's tokens, so a document's first token weighs 1/its length) and compares the model's
opening shares with the shares that 1/length weighting predicts from the training file.
Reports the confusion-corrected and the raw (counting) estimates, their mean absolute error against the true
proportions, the classifier's accuracy and confusion matrix. Writes bench/results/alignment-mixture.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from bench.common import REPO_ROOT, write_results
from recipes.alignment import mixture, mixture_estimate as est

SPEC = REPO_ROOT / "recipes/alignment/pipeline/mixture-tiny.yaml"
MIXTURES = {"default": dict(mixture.MIXTURE), "reversed": {"prose": 0.1, "lists": 0.2, "arithmetic": 0.3,
                                                           "requests": 0.4}}
SEEDS = (0, 1, 2)
# the words a synthetic document's parts open with (recipes.alignment.mixture.part): its first word tells how it reads
OPENERS = {"compute": "arithmetic", "list": "lists", "the": "prose", "every": "prose", "then": "prose",
           "write": "requests"}


def opening_marginal(folder: Path) -> dict[str, float]:
    """The model's own probability of starting a document that reads as each domain: its exact next-token
    distribution after the beginning-of-text token, summed over each domain's opening words (a synthetic document
    reads wholly as one domain, the one its first word opens). ``other``: any other first token."""
    import torch

    from recipes.alignment.generation import load

    model, tokenizer = load(folder)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([[tokenizer.eos_token_id]])).logits[0, -1].float(), dim=-1)
    out = {d: 0.0 for d in mixture.DOMAINS}
    for word, domain in OPENERS.items():
        out[domain] += float(probs[tokenizer.convert_tokens_to_ids(word)])
    return out | {"other": 1.0 - sum(out.values())}


def run_pipeline(name: str, weights: dict[str, float], out: Path, reuse: bool, pack: bool = True) -> dict:
    """``loom run`` of the spec with ``weights`` as its mixture (and ``pack``) into ``out/name``; returns its exit
    code and time."""
    doc = yaml.safe_load(SPEC.read_text())
    doc["components"]["lm"]["pretrained"] = str((SPEC.parent / doc["components"]["lm"]["pretrained"]).resolve())
    doc["phases"][0]["args"]["mixture"] = weights
    doc["phases"][1]["tasks"][0]["data"]["pack"] = pack
    out.mkdir(parents=True, exist_ok=True)
    spec = out / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    target = out / name
    if reuse and (target / "detect" / "metrics.json").exists():
        return {"rc": None, "seconds": None, "reused": True}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(spec), "--out", str(target)],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: the gate failed, which is a result
        raise RuntimeError(f"loom run {spec} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {"rc": proc.returncode, "seconds": time.perf_counter() - start, "reused": False}


def losses(log: Path) -> dict[str, float]:
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    values = [r["loss"]["lm"] for r in records]
    k = max(1, len(values) // 10)
    return {"first": sum(values[:k]) / k, "last": sum(values[-k:]) / k, "steps": len(values)}


def confusion_matrix(reference: Path) -> dict:
    rows = mixture.read_reference(reference)
    fit, held = rows[0::2], rows[1::2]
    classifier = est.NaiveBayes.fit([r["text"] for r in fit], [r["domain"] for r in fit])
    c = est.confusion([r["domain"] for r in held], classifier.predict([r["text"] for r in held]),
                      list(classifier.domains))
    return {"domains": list(classifier.domains), "matrix": c.tolist()}


def length_weighted_openings(train: Path, tokenizer_folder: Path) -> dict[str, dict[str, float]]:
    """Each reading's share of the training documents' openings, counted (``documents``) and weighted by 1/the
    number of tokens the loss learns in the document's row (``per_row_mean``: what a per-row mean loss over unpacked
    rows makes the first token's maximum-likelihood distribution)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    seq_len = yaml.safe_load(SPEC.read_text())["phases"][1]["tasks"][0]["components"][0]["seq_len"]
    counted, weighted = dict.fromkeys(mixture.DOMAINS, 0.0), dict.fromkeys(mixture.DOMAINS, 0.0)
    for line in train.read_text().splitlines():
        text = json.loads(line)["text"]
        reading = OPENERS.get(text.split()[1], "prose")  # after the beginning-of-text token
        learned = min(len(tokenizer(text)["input_ids"]) + 1, seq_len) - 1  # + eos; the first token is not learned
        counted[reading] += 1
        weighted[reading] += 1 / learned
    return {"documents": {d: v / sum(counted.values()) for d, v in counted.items()},
            "per_row_mean": {d: v / sum(weighted.values()) for d, v in weighted.items()}}


def ablation(out: Path, reuse: bool) -> dict:
    """The default mixture without packing (module docstring): the detect step's metrics, the opening shares of the
    unpacked and the packed model, and the shares the training file predicts for each."""
    run = run_pipeline("default-unpacked", MIXTURES["default"], out, reuse, pack=False)
    folder = out / "default-unpacked"
    return {"run": run, "step_metrics": json.loads((folder / "detect/metrics.json").read_text()),
            "loss": losses(folder / "lm/metrics.jsonl"), "reading_shares": opening_marginal(folder / "lm/export/lm"),
            "packed_reading_shares": opening_marginal(out / "default" / "lm/export/lm"),
            "predicted": length_weighted_openings(folder / "data/data/train.jsonl", folder / "lm/export/lm")}


def measure(out: Path, reuse: bool) -> dict:
    base = REPO_ROOT / "recipes/alignment/models/base"
    records = {}
    for name, weights in MIXTURES.items():
        run = run_pipeline(name, weights, out, reuse)
        folder = out / name
        truth = json.loads((folder / "data/data/mixture.json").read_text())
        reference = folder / "data/data/reference.jsonl"
        step = json.loads((folder / "detect/metrics.json").read_text())
        trained = [mixture.evaluate(folder / "lm/export/lm", reference, truth, seed=s) for s in SEEDS]
        untrained = mixture.evaluate(base, reference, truth, seed=0)
        looks = opening_marginal(folder / "lm/export/lm")
        c = confusion_matrix(reference)
        # the mixture the model actually generates: its reading shares, as the confusion matrix maps label shares to
        # them, solved back (what a perfect estimator from infinitely many samples would report)
        implied = est.correct(np.array([looks[d] for d in c["domains"]]) / (1 - looks["other"]), np.array(c["matrix"]))
        records[name] = {"truth": truth, "run": run, "step_metrics": step, "seeds": trained, "untrained": untrained,
                         "loss": losses(folder / "lm/metrics.jsonl"), "confusion": c, "reading_shares": looks,
                         "implied": dict(zip(c["domains"], implied.tolist()))}
    records["ablation"] = ablation(out, reuse)
    return records


def markdown(rec: dict) -> str:
    lines = ["# Data-mixture detection: a tiny LM's training mixture estimated from its generations", "",
             "`python -m bench.alignment.mixture`: `loom run recipes/alignment/pipeline/mixture-tiny.yaml` with each "
             "mixture (4000 documents, the tiny Llama trained 400 steps from random weights on packed rows), then "
             f"{len(SEEDS)} sampling seeds x 1024 generations from the beginning-of-text token at temperature 1, "
             "classified by naive Bayes (trained on 500 labelled documents per domain, confusion measured on 500 "
             "more) and corrected for its confusion. MAE in points (mean over the 4 domains of |estimate - true|).",
             ""]
    for name, r in rec.items():
        if name == "ablation":
            continue
        domains = r["confusion"]["domains"]
        mean = {d: statistics.mean(s[f"estimate_{d}"] for s in r["seeds"]) for d in domains}
        raw = {d: statistics.mean(s[f"raw_{d}"] for s in r["seeds"]) for d in domains}
        maes = [100 * s["mixture_mae"] for s in r["seeds"]]
        raws = [100 * s["raw_mae"] for s in r["seeds"]]
        gate = "passed" if r["step_metrics"]["mixture_mae"] <= 0.05 else "failed"
        lines += [f"## Mixture `{name}`", "",
                  f"`loom run`'s own `detect` step (seed 0): mixture_mae {100 * r['step_metrics']['mixture_mae']:.2f} "
                  f"points, gate `mixture_mae <= 0.05` {gate}. LM loss {r['loss']['first']:.3f} -> "
                  f"{r['loss']['last']:.3f} (first vs last 10% of {r['loss']['steps']} steps).", "",
                  "| domain | true | estimate (corrected, mean of seeds) | raw count | the model's own mixture | "
                  "untrained model |", "|---|---|---|---|---|---|"]
        for d in domains:
            lines.append(f"| {d} | {r['truth'][d]:.3f} | {mean[d]:.3f} | {raw[d]:.3f} | {r['implied'][d]:.3f} | "
                         f"{r['untrained'][f'estimate_{d}']:.3f} |")
        implied_mae = 100 * statistics.mean(abs(r["implied"][d] - r["truth"][d]) for d in domains)
        to_model = 100 * statistics.mean(abs(mean[d] - r["implied"][d]) for d in domains)
        lines += ["", f"- corrected MAE per seed: {', '.join(f'{m:.2f}' for m in maes)} points "
                  f"(mean {statistics.mean(maes):.2f})",
                  f"- raw (counting) MAE per seed: {', '.join(f'{m:.2f}' for m in raws)} points "
                  f"(mean {statistics.mean(raws):.2f})",
                  f"- untrained model: corrected MAE {100 * r['untrained']['mixture_mae']:.2f} points",
                  f"- the model's own mixture (its exact probabilities of opening a document of each reading, "
                  f"{100 * r['reading_shares']['other']:.1f}% other openings left out, corrected by the confusion "
                  f"matrix) is {implied_mae:.2f} points from the truth; the estimate (mean of seeds) is "
                  f"{to_model:.2f} points from the model's own mixture",
                  f"- classifier accuracy on held-out reference text: {r['seeds'][0]['classifier_accuracy']:.3f}; "
                  "confusion matrix (rows true, columns predicted, " + ", ".join(domains) + "): " +
                  "; ".join(" ".join(f"{v:.3f}" for v in row) for row in r["confusion"]["matrix"]), ""]
    return "\n".join(lines + ablation_markdown(rec["ablation"]))


def ablation_markdown(a: dict) -> list[str]:
    lines = ["## Why packing: the default mixture trained on unpacked rows", "",
             f"The same run with `pack: false` (one padded document a row): `detect` mixture_mae "
             f"{100 * a['step_metrics']['mixture_mae']:.2f} points (seed 0), raw {100 * a['step_metrics']['raw_mae']:.2f}."
             " The lm loss is a mean over each row's learned tokens, so a document's first token weighs 1/its "
             "length, and maximum likelihood then opens short documents more often than the data does. Opening "
             "shares by reading (the model's exact probabilities after the beginning-of-text token, renormalised "
             "over the four readings):", "",
             "| reading | training documents | predicted by 1/length weighting | model, unpacked | model, packed |",
             "|---|---|---|---|---|"]
    def shares(looks: dict) -> dict:
        return {d: looks[d] / (1 - looks["other"]) for d in mixture.DOMAINS}
    unpacked, packed = shares(a["reading_shares"]), shares(a["packed_reading_shares"])
    for d in mixture.DOMAINS:
        lines.append(f"| {d} | {a['predicted']['documents'][d]:.3f} | {a['predicted']['per_row_mean'][d]:.3f} | "
                     f"{unpacked[d]:.3f} | {packed[d]:.3f} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment.mixture", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/loom-bench-mixture"), help="where the runs go")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs under --out")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    rec = measure(args.out, args.reuse)
    report = markdown(rec)
    print(report)
    if not args.no_write:
        write_results("alignment-mixture", [rec], report, {"spec": str(SPEC.relative_to(REPO_ROOT)),
                                                          "mixtures": MIXTURES, "seeds": SEEDS})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
