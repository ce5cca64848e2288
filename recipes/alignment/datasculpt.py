"""DataSculpt (arXiv 2409.00997): long-context packing as a multi-objective problem, as the data step ``datasculpt``.

    python -m recipes.alignment.datasculpt OUT [--corpus FILE] [--window N] [--documents N] [--tokenizer DIR]

Documents are embedded with an embedding model fitted on the corpus (TF-IDF + truncated SVD, numpy:
recipes.alignment.datasculpt_pack), clustered (spherical k-means) and packed into windows of ``window`` tokens by the
greedy multi-objective assignment (relevance, homogeneity, utilisation; integrity as a hard constraint), longest
first. Plain first-fit packing of the same corpus is the baseline; both are measured (token utilisation, truncation
rate, within-window similarity, and topic purity when the corpus has topics).

Corpus: a JSONL file, one document a line, ``{"text": "...", "topic": "optional label"}``; without one, the synthetic
corpus (:func:`synthetic_corpus`: documents on the alignment recipe's five topics, in its tokenizer's vocabulary,
lengths long-tailed so that some exceed the window). Lengths are counted with ``tokenizer`` (a tokenizer folder,
without special tokens) or, without one, as whitespace-separated words (exact for the recipe's word-level
tokenizer and the synthetic corpus). Each window holds at most ``window - 1`` tokens: one is left for the eos the
trained phase's ``text`` source appends.

Writes (``OUT`` or the step's artifact ``data``): ``train.jsonl`` (one ``{"text"}`` row per window, its documents
joined by a blank line: docs/data.md ``text`` format, read with ``seq_len: window``), ``first_fit.jsonl`` (the
baseline's rows, same format), ``windows.jsonl`` (per window, ``{"tokens", "docs": [[doc, start, stop], ...]}``),
``corpus.jsonl`` (the documents packed) and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

from recipes.alignment import datasculpt_pack as pack
from recipes.alignment.tasks import TOPICS
from runtime.source_files import read_jsonl

FILLERS = ("the", "a", "and", "with", "in", "is", "from", "after", "before", "by", "then", "still", "every")
SENTENCES = ("the {0} and the {1} .", "{0} with {1} in the {2} .", "every {0} is {1} .", "{n} {0} , {1} and {2} .",
             "the {0} is still {1} after the {2} .", "then the {0} from the {1} .")
STEP_ARGS = ("corpus", "documents", "window", "tokenizer", "clusters", "dims", "seed")
DEFAULTS = dict(documents=600, window=128, clusters=10, dims=32, seed=0)


def synthetic_corpus(seed: int, documents: int, window: int, noise: float = 0.15) -> list[dict]:
    """``documents`` rows ``{"text", "topic"}``: sentences whose content words come from the row's topic
    (tasks.TOPICS), each word from another topic with probability ``noise``; lengths log-normal with a median of
    ``window / 6`` words, at least 6, at most ``2 * window`` (about 2% exceed the window)."""
    rng = random.Random(f"datasculpt-{seed}")
    names = sorted(TOPICS)
    out = []
    for _ in range(documents):
        topic = rng.choice(names)
        target = int(min(2 * window, max(6, rng.lognormvariate(np.log(window / 6), 0.9))))
        words: list[str] = []
        while len(words) < target:
            content = [rng.choice(TOPICS[rng.choice(names) if rng.random() < noise else topic].split())
                       for _ in range(3)]
            words += rng.choice(SENTENCES).format(*content, n=rng.randint(2, 99)).split()
        out.append({"text": " ".join(words[:target - 1] + ["."]), "topic": topic})
    return out


def read_corpus(path: Path) -> list[dict]:
    """The JSONL corpus at ``path``: each line an object with a non-empty string ``text`` and an optional string
    ``topic`` (ValueError naming the line otherwise)."""
    rows = []
    for i, row in read_jsonl(path, "corpus"):
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f"corpus ({path}): line {i} has no non-empty string \"text\". Fix or remove the line.")
        if "topic" in row and not isinstance(row["topic"], str):
            raise ValueError(f"corpus ({path}): line {i}: \"topic\" must be a string label. Fix the line.")
        rows.append(row)
    if len(rows) < 2:
        raise ValueError(f"corpus ({path}): {len(rows)} documents; packing needs at least 2. Give a larger file.")
    return rows


def token_lengths(texts: list[str], tokenizer: Path | None) -> list[int]:
    """Each text's length in tokens (without special tokens), or in whitespace-separated words without a tokenizer."""
    if tokenizer is None:
        return [len(t.split()) for t in texts]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    return [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


def slice_text(text: str, start: int, stop: int, whole: int) -> str:
    """Tokens ``[start, stop)`` of a document as text: its words for a whole-word count; a cut document's pieces are
    word ranges (a subword tokenizer's pieces are cut at the same word positions, approximately)."""
    if start == 0 and stop == whole:
        return text
    words = text.split()
    scale = len(words) / max(whole, 1)
    return " ".join(words[int(start * scale):int(stop * scale)])


def rows(windows: list[list[pack.Piece]], texts: list[str], lengths: list[int]) -> list[dict]:
    """One ``{"text"}`` row per window, its pieces joined by a blank line."""
    return [{"text": "\n\n".join(slice_text(texts[d], s, e, lengths[d]) for d, s, e in w)} for w in windows]


def run(out: Path, corpus: Path | None = None, documents: int = 600, window: int = 128, tokenizer: Path | None = None,
        clusters: int = 10, dims: int = 32, seed: int = 0) -> dict[str, float]:
    """Pack the corpus both ways, write the files (module docstring) under ``out``; returns the metrics: DataSculpt's
    unprefixed, first-fit's and concatenate-and-cut's prefixed ``firstfit_`` and ``concat_``."""
    docs = read_corpus(corpus) if corpus is not None else synthetic_corpus(seed, documents, window)
    texts = [d["text"] for d in docs]
    topics = [d["topic"] for d in docs] if all("topic" in d for d in docs) else None
    lengths = token_lengths(texts, tokenizer)
    capacity = window - 1
    emb = pack.fit_embedding(texts, dims).embed(texts)
    labels, _ = pack.kmeans(emb, clusters, seed)
    packed = {"": pack.datasculpt(lengths, emb, labels, capacity), "firstfit_": pack.first_fit(lengths, capacity),
              "concat_": pack.concat_cut(lengths, capacity)}
    result = {}
    for prefix, windows in packed.items():
        result |= {prefix + k: v for k, v in pack.metrics(windows, lengths, capacity, emb, topics).items()}
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "train.jsonl", rows(packed[""], texts, lengths))
    _write(out / "first_fit.jsonl", rows(packed["firstfit_"], texts, lengths))
    _write(out / "windows.jsonl", [{"tokens": sum(e - s for _, s, e in w), "docs": [list(p) for p in w]}
                                   for w in packed[""]])
    _write(out / "corpus.jsonl", docs)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _write(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def check_args(args: dict, base: Path | None) -> None:
    """The ``datasculpt`` step's args (torch-free): a ValueError naming the argument."""
    from planner.pipeline import StepContext, check_known_args, check_whole_args

    check_known_args(args, STEP_ARGS, "datasculpt")
    check_whole_args(args, (("documents", 2, 10_000_000), ("window", 8, 1_000_000), ("clusters", 1, 100_000),
                            ("dims", 2, 4096), ("seed", 0, 2**31 - 1)))
    ctx = StepContext("", {}, Path(), base)
    for key, kind in (("corpus", "JSONL file"), ("tokenizer", "tokenizer folder")):
        value = args.get(key)
        if value is None or (isinstance(value, str) and value.startswith("@")):
            continue
        path = ctx.path(value) if isinstance(value, str) else None
        if path is None or not (path.is_file() if key == "corpus" else path.is_dir()):
            raise ValueError(f"{key} ({value!r}): no such {kind}. Point it at one, or leave it out "
                             f"({'the synthetic corpus' if key == 'corpus' else 'lengths in words'}).")


def step(ctx) -> dict[str, float]:
    """Step ``datasculpt`` (a planner.pipeline.StepContext): :func:`run` into the artifact ``data``."""
    args = ctx.args
    path = {k: ctx.path(args[k]) for k in ("corpus", "tokenizer") if args.get(k) is not None}
    values = {k: int(args.get(k, DEFAULTS[k])) for k in DEFAULTS}
    return run(ctx.artifact("data"), path.get("corpus"), tokenizer=path.get("tokenizer"), **values)


METRICS = tuple(p + m for p in ("", "firstfit_", "concat_") for m in ("utilisation", "truncation_rate", "similarity",
                                                                       "topic_purity", "windows", "docs_per_window"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.alignment.datasculpt", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the packed rows and metrics into")
    parser.add_argument("--corpus", type=Path, help="JSONL corpus (default: the synthetic one)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder to count tokens (default: words)")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key}", type=int, default=value, help=f"default {value}")
    args = parser.parse_args(argv)
    try:
        result = run(args.out, args.corpus, args.documents, args.window, args.tokenizer, args.clusters, args.dims,
                     args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, value in result.items():
        print(f"{key:28s} {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
