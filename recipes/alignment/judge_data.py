"""Write the SysBench / FB-Bench files: SFT data, held-out benchmark files, their tokenizer and a tiny Llama.

    python -m recipes.alignment.judge_data [--data DIR] [--models DIR] [--models-only]

The recipe's own tokenizer (recipes/alignment/data/tokenizer) has no words for system messages ("always", "never",
"start every answer ..."), and its ids are fixed by committed data, so these benchmarks have a tokenizer of their own,
built the same way (examples/make_tokenizer.py over every word the generators can write) and a tiny Llama of the
recipe's shape (recipes.alignment.make.LLAMA) over it. Defaults: ``recipes/alignment/data/judges`` (committed,
deterministic: ``train/preference.jsonl``, ``heldout/sysbench.jsonl``, ``heldout/fbbench.jsonl``, ``tokenizer/``) and
``recipes/alignment/models/judges`` (not committed; scripts/setup.sh writes it).

``train/preference.jsonl`` (docs/data.md, format preference: SFT learns its chosen answers, a DPO task reads its
pairs through ``data_dir``) holds one row per turn of :data:`SFT_SESSIONS` synthetic SysBench sessions (the prompt
with the reference history) and one per :data:`SFT_ITEMS` FB-Bench items, from the ``train`` stream; the held-out
files are the steps' default benchmarks (split ``heldout``), in the documented JSONL
formats, so that they double as examples of real data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from recipes.alignment import fbbench, sysbench
from recipes.alignment.make import LLAMA, _example, make_main
from recipes.alignment.sysbench import ROLES
from recipes.alignment.tasks import OPS, TOPICS

HERE = Path(__file__).resolve().parent
SEED = 0
SFT_SESSIONS = 600
SFT_ITEMS = 800
HELDOUT = {"sessions": 48, "items": 64}


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_data(folder: str | Path = HERE / "data" / "judges", seed: int = SEED) -> list[Path]:
    """The data files (module docstring) under ``folder``; returns the paths written."""
    out = Path(folder)
    rows = sysbench.sft_rows(seed, "train", SFT_SESSIONS) + fbbench.sft_rows(seed, "train", SFT_ITEMS)
    heldout = {"seed": seed, **HELDOUT}
    return [_write(out / "train" / "preference.jsonl", rows),
            _write(out / "heldout" / "sysbench.jsonl", [s.to_json() for s in sysbench.synthetic(heldout)]),
            _write(out / "heldout" / "fbbench.jsonl", [it.to_json() for it in fbbench.synthetic(heldout)])]


def vocabulary_texts() -> list[str]:
    """Every word the generators can write: topics, roles, numbers, operators, templates (sampled widely)."""
    fixed = [" ".join(str(n) for n in range(100)), " ".join(OPS), " ".join(TOPICS), *TOPICS.values(),
             " ".join(ROLES), "system user assistant : minus sorry i am sure"]
    sessions = [sysbench.session(SEED, "vocabulary", i) for i in range(400)]
    samples = [sysbench.render(s, [t.reference for t in s.turns[:-1]]) + " " + s.turns[-1].reference
               for s in sessions]
    samples += [row["rejected"] for row in sysbench.sft_rows(SEED, "vocabulary", 100)]
    items = [fbbench.item(SEED, "vocabulary", i) for i in range(400)]
    samples += [f"{fbbench.render(it)} {it.reference}" for it in items]
    return fixed + samples


def write_tokenizer(folder: str | Path = HERE / "data" / "judges" / "tokenizer") -> Path:
    """The benchmarks' word-level tokenizer (examples/make_tokenizer.build_tokenizer over :func:`vocabulary_texts`)."""
    return _example("make_tokenizer").build_tokenizer(folder, vocabulary_texts())


def write_model(folder: str | Path = HERE / "models" / "judges", seed: int = SEED, **config) -> Path:
    """A tiny Llama (recipes.alignment.make.LLAMA, ``config`` overriding) over :func:`write_tokenizer`'s vocabulary,
    saved with the tokenizer beside it."""
    from transformers import AutoTokenizer

    tokenizer_dir = write_tokenizer(folder)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
    return _example("make_models").save_llama(folder, seed=seed, vocab_size=vocab, **(LLAMA | config))


def main(argv: list[str]) -> int:
    return make_main(argv, "recipes.alignment.judge_data", __doc__, HERE / "data" / "judges", "judges", write_data,
                     write_tokenizer, write_model)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
