"""Data-mixture detection (Data Proportion Detection, arXiv 2409.17527): estimate the domain proportions a model
was trained on from its own unconditional generations, as the steps ``mixture_data`` and ``mixture_eval``.

    python -m recipes.alignment.mixture data OUT [--documents N] [--seed S]
    python -m recipes.alignment.mixture eval MODEL REFERENCE [--truth mixture.json] [--samples N]

``mixture_data`` writes a training set drawn from known proportions of four synthetic domains (in the alignment
recipe's tokenizer vocabulary, told apart by structure and words: ``prose`` sentences, numbered ``lists``,
``arithmetic`` statements, ``requests``), each document prefixed with the tokenizer's eos as its beginning-of-text
token (the tokenizer has no BOS; GPT-2 does the same), so a trained phase learns how documents start. Files in its
artifact ``data``: ``train.jsonl`` (docs/data.md ``text``), ``reference.jsonl`` (labelled text of every domain in
equal shares, ``{"text", "domain"}``: the classifier's) and ``mixture.json`` (the true proportions).

``mixture_eval`` samples ``samples`` documents from the model starting from that token alone (temperature 1, no
top-k or top-p, at most ``new_tokens`` tokens, stopping at eos), trains a naive Bayes domain classifier on one half
of ``reference`` and measures its confusion matrix on the other, classifies the samples and corrects the counts for
the confusion (recipes.alignment.mixture_estimate). It reports ``mixture_mae`` (the corrected estimate's mean
absolute error against ``truth``, in proportions: 0.05 is 5 points), ``raw_mae`` (counting alone),
``classifier_accuracy`` and ``estimate_<domain>`` per domain. Real data: ``reference`` is any JSONL of
``{"text", "domain"}`` lines, ``truth`` a JSON object domain -> proportion (optional: without it only the estimates
are reported).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

from recipes.alignment import mixture_estimate as est
from recipes.alignment.tasks import TOPICS

DOMAINS = ("arithmetic", "lists", "prose", "requests")
MIXTURE = {"prose": 0.4, "lists": 0.3, "arithmetic": 0.2, "requests": 0.1}
NOISE = 0.15  # the chance that a document of one domain reads as another's
BOS = "<eos>"  # the recipe tokenizer's eos, used as the beginning of a document
DATA_ARGS = ("mixture", "documents", "reference_documents", "seed")
EVAL_ARGS = ("model", "reference", "truth", "samples", "new_tokens", "seed")


def part(domain: str, rng: random.Random) -> str:
    """One sentence (or one short list) of ``domain``, opening with its domain's words (``compute``, ``list``, ``the``
    / ``every`` / ``then``, ``write``: as code, tables and prose open differently); content words from a topic drawn per
    part, shared by every domain."""
    topic = TOPICS[rng.choice(sorted(TOPICS))].split()
    if domain == "arithmetic":
        a, b, op = rng.randint(1, 9), rng.randint(1, 9), rng.choice(("minus", "plus", "times"))
        value = a + b if op == "plus" else a * b if op == "times" else a - b
        return f"compute {a} {op} {b} is {'minus ' if value < 0 else ''}{abs(value)} ."
    if domain == "lists":
        return "list " + " ".join(f"{i + 1} . {rng.choice(topic)}" for i in range(rng.randint(2, 5))) + " ."
    if domain == "prose":
        form = rng.choice(("the {0} and the {1} .", "every {0} is {1} .", "the {0} is still {1} after the {2} .",
                           "then the {0} from the {1} ."))
        return form.format(*(rng.choice(topic) for _ in range(3)))
    assert domain == "requests", domain
    return (f"write {rng.randint(2, 12)} words about the {rng.choice(sorted(TOPICS))} , include the word "
            f"{rng.choice(topic)} .")


def document(domain: str, rng: random.Random) -> str:
    """One document of ``domain``: 1 to 3 parts, all written as one domain: its own, or with probability
    :data:`NOISE` another's (as a source labelled one domain holds pages that read as another). Those documents are
    misread by any classifier of the text, which is the confusion the estimate corrects; a model trained on the
    mixture generates them at the same rate."""
    others = [d for d in DOMAINS if d != domain]
    look = rng.choice(others) if rng.random() < NOISE else domain
    return " ".join(part(look, rng) for _ in range(rng.randint(1, 3)))


def domain_texts(seed: int, split: str, counts: dict[str, int]) -> list[dict]:
    """``counts[d]`` documents of each domain d, shuffled, ``{"text", "domain"}``; different splits differ."""
    rng = random.Random(f"mixture-{seed}-{split}")
    rows = [{"text": document(d, rng), "domain": d} for d in sorted(counts) for _ in range(counts[d])]
    rng.shuffle(rows)
    return rows


def shares(mixture: dict[str, float], n: int) -> dict[str, int]:
    """``n`` split by ``mixture`` (largest remainders), so that the written file holds the proportions exactly."""
    total = sum(mixture.values())
    raw = {d: n * w / total for d, w in mixture.items()}
    counts = {d: int(v) for d, v in raw.items()}
    for d in sorted(raw, key=lambda d: counts[d] - raw[d])[:n - sum(counts.values())]:
        counts[d] += 1
    return counts


def write_data(out: Path, mixture: dict[str, float] | None = None, documents: int = 4000,
               reference_documents: int = 1000, seed: int = 0) -> dict[str, float]:
    """The files of ``mixture_data`` (module docstring) under ``out``; returns the true proportions."""
    mixture = mixture or MIXTURE
    counts = shares(mixture, documents)
    truth = {d: counts[d] / documents for d in sorted(counts)}
    out.mkdir(parents=True, exist_ok=True)
    train = domain_texts(seed, "train", counts)
    reference = domain_texts(seed, "reference", {d: reference_documents for d in DOMAINS})
    (out / "train.jsonl").write_text("".join(json.dumps({"text": f"{BOS} {r['text']}"}) + "\n" for r in train))
    (out / "reference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reference))
    (out / "mixture.json").write_text(json.dumps(truth, indent=2) + "\n")
    return truth


def sample(folder: Path, samples: int, new_tokens: int, seed: int, batch_size: int = 256) -> list[str]:
    """``samples`` documents generated from the beginning-of-text token alone at temperature 1 (full distribution)."""
    import torch

    from recipes.alignment.generation import load

    model, tokenizer = load(folder)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    texts = []
    with torch.no_grad():
        for first in range(0, samples, batch_size):
            ids = torch.full((min(batch_size, samples - first), 1), start)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            for row in out[:, 1:].tolist():
                row = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
                texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def read_reference(path: Path) -> list[dict]:
    """Labelled reference text (``{"text", "domain"}`` lines); a ValueError naming the line otherwise."""
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        row = json.loads(line) if line.strip() else None
        if row is None:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not isinstance(row.get("domain"), str):
            raise ValueError(f"reference ({path}): line {i} is not {{\"text\": str, \"domain\": str}}. Fix the line.")
        rows.append(row)
    if len({r["domain"] for r in rows}) < 2:
        raise ValueError(f"reference ({path}): fewer than 2 domains; the classifier needs labelled text of each.")
    return rows


def evaluate(model: Path, reference: Path, truth: dict[str, float] | None, samples: int = 1024,
             new_tokens: int = 64, seed: int = 0, texts: list[str] | None = None) -> dict[str, float]:
    """The metrics of ``mixture_eval`` (module docstring); ``texts``: generations already made (skips sampling)."""
    rows = read_reference(reference)
    fit, held = rows[0::2], rows[1::2]
    classifier = est.NaiveBayes.fit([r["text"] for r in fit], [r["domain"] for r in fit])
    domains = list(classifier.domains)
    predicted_held = classifier.predict([r["text"] for r in held])
    c = est.confusion([r["domain"] for r in held], predicted_held, domains)
    texts = texts if texts is not None else sample(model, samples, new_tokens, seed)
    raw, corrected = est.estimate(classifier.predict(texts), c, domains)
    result = {"classifier_accuracy": float(np.mean([p == r["domain"] for p, r in zip(predicted_held, held)])),
              "samples": float(len(texts)), "empty_samples": float(sum(not t.strip() for t in texts))}
    if truth is not None:
        result |= {"mixture_mae": est.mae(corrected, truth, domains), "raw_mae": est.mae(raw, truth, domains)}
    result |= {f"estimate_{d}": float(v) for d, v in zip(domains, corrected)}
    return result | {f"raw_{d}": float(v) for d, v in zip(domains, raw)}


def _whole(args: dict, key: str, default: int, least: int) -> int:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{key} ({value!r}): expected a whole number >= {least}. Fix the value.")
    return value


def check_data_args(args: dict, base: Path | None) -> None:
    """``mixture_data``'s args: ``mixture`` (domain -> weight > 0, domains of :data:`DOMAINS`), ``documents``,
    ``reference_documents`` (per domain), ``seed``."""
    from planner.pipeline import check_known_args

    check_known_args(args, DATA_ARGS, "mixture_data")
    mixture = args.get("mixture", MIXTURE)
    if (not isinstance(mixture, dict) or not mixture or any(d not in DOMAINS for d in mixture)
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in mixture.values())):
        raise ValueError(f"mixture ({mixture!r}): expected a mapping of domains ({', '.join(DOMAINS)}) to weights > 0, "
                         "e.g. {prose: 0.5, lists: 0.3, arithmetic: 0.2}. Fix the value.")
    _whole(args, "documents", 4000, len(mixture))
    _whole(args, "reference_documents", 1000, 2)
    _whole(args, "seed", 0, 0)


def check_eval_args(args: dict, base: Path | None) -> None:
    """``mixture_eval``'s args: ``model`` (a from_pretrained folder or a reference), ``reference`` (a labelled JSONL
    file), optional ``truth`` (a JSON file or a mapping domain -> proportion), ``samples``, ``new_tokens``, ``seed``."""
    from planner.pipeline import StepContext, check_known_args

    check_known_args(args, EVAL_ARGS, "mixture_eval")
    ctx = StepContext("", {}, Path(), base)
    for key, want, is_ok in (("model", "a from_pretrained folder (or '@<phase>/model/<component>')", Path.is_dir),
                             ("reference", "a JSONL file of {\"text\", \"domain\"} lines", Path.is_file)):
        value = args.get(key)
        if not isinstance(value, str) or not (value.startswith("@") or is_ok(ctx.path(value))):
            raise ValueError(f"{key} ({value!r}): required, {want}. Fix the value.")
    truth = args.get("truth")
    if truth is not None and not (isinstance(truth, str) and (truth.startswith("@") or ctx.path(truth).is_file())) \
            and not (isinstance(truth, dict) and truth and all(isinstance(v, (int, float)) for v in truth.values())):
        raise ValueError(f"truth ({truth!r}): expected a JSON file or a mapping of domains to proportions (the "
                         "mixture the model was trained on). Fix the value or leave it out.")
    _whole(args, "samples", 1024, 1)
    _whole(args, "new_tokens", 64, 1)
    _whole(args, "seed", 0, 0)


def data_step(ctx) -> dict[str, float]:
    """Step ``mixture_data``: :func:`write_data` into the artifact ``data``; reports the true proportions."""
    a = ctx.args
    truth = write_data(ctx.artifact("data"), a.get("mixture"), a.get("documents", 4000),
                       a.get("reference_documents", 1000), a.get("seed", 0))
    return {f"true_{d}": v for d, v in truth.items()}


def eval_step(ctx) -> dict[str, float]:
    """Step ``mixture_eval``: :func:`evaluate` of ``model`` (writes nothing; reports the metrics)."""
    a = ctx.args
    truth = a.get("truth")
    if isinstance(truth, str):
        truth = json.loads(ctx.path(truth).read_text())
    return evaluate(ctx.path(a["model"]), ctx.path(a["reference"]), truth, a.get("samples", 1024),
                    a.get("new_tokens", 64), a.get("seed", 0))


EVAL_METRICS = ("mixture_mae", "raw_mae", "classifier_accuracy", "samples", "empty_samples",
                *(f"{kind}_{d}" for kind in ("estimate", "raw") for d in DOMAINS))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.alignment.mixture", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write a known mixture's training set and the labelled reference text")
    data.add_argument("out", type=Path)
    data.add_argument("--documents", type=int, default=4000)
    data.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval", help="estimate MODEL's training mixture from its generations")
    ev.add_argument("model", type=Path)
    ev.add_argument("reference", type=Path)
    ev.add_argument("--truth", type=Path, help="JSON domain -> proportion, for the error")
    ev.add_argument("--samples", type=int, default=1024)
    ev.add_argument("--new-tokens", type=int, default=64)
    ev.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            result = write_data(args.out, documents=args.documents, seed=args.seed)
        else:
            truth = json.loads(args.truth.read_text()) if args.truth else None
            result = evaluate(args.model, args.reference, truth, args.samples, args.new_tokens, args.seed)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, value in result.items():
        print(f"{key:24s} {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
