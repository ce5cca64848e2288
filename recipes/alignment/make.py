"""Write the recipe's files: generated data, its tokenizer, and the tiny Llama the CPU job fine-tunes.

    python -m recipes.alignment.make [--data DIR] [--models DIR] [--models-only]

Defaults: ``recipes/alignment/data`` (committed: JSONL files and the tokenizer, deterministic) and
``recipes/alignment/models`` (not committed: ``base/``, a 2-layer Llama 64 wide with the tokenizer saved beside it;
scripts/setup.sh and the tests make it). Everything is generated from seed :data:`SEED` (recipes.alignment.tasks)
and built locally from config classes (examples/make_models.py, examples/make_tokenizer.py): nothing is downloaded.

Data files (docs/data.md formats): ``train/sft.jsonl`` (chat: both domains, a correct answer each),
``train/sft_<domain>.jsonl`` (one domain each: per-domain SFT parents for merging), ``train/preference.jsonl`` and
``heldout/preference.jsonl`` (prompt, chosen, rejected, scores on four pairs in five),
``train/preference_<domain>.jsonl`` (the train pairs of one domain: the phased pipeline's SFT learns their chosen
answers, in the reward model's format), ``train/pas.jsonl`` and ``heldout/pas.jsonl`` (chat: prompt -> PAS complement).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path

from recipes.alignment import tasks
from recipes.alignment.data import generated_pair

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SEED = 0
SFT_ROWS = 400  # conversations per file (both domains, alternating)
PAIR_ROWS = {"train": 512, "heldout": 256}
PAS_ROWS = {"train": 200, "heldout": 64}
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def _example(module: str):
    """examples/<module>.py, imported by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(module, ROOT / "examples" / f"{module}.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_data(folder: str | Path = HERE / "data", seed: int = SEED) -> list[Path]:
    """Every data file (module docstring) under ``folder``; returns the paths written."""
    out = Path(folder)
    written = [_write(out / "train" / "sft.jsonl", [tasks.chat(seed, "sft", i) for i in range(SFT_ROWS)])]
    for domain in tasks.DOMAINS:
        rows = [tasks.chat(seed, f"sft-{domain}", i, domain) for i in range(SFT_ROWS // 2)]
        written.append(_write(out / "train" / f"sft_{domain}.jsonl", rows))
    for split, n in PAIR_ROWS.items():
        pairs = [generated_pair(seed, split, i) for i in range(n)]
        written.append(_write(out / split / "preference.jsonl", pairs))
        for domain in tasks.DOMAINS if split == "train" else ():  # the phased pipeline's per-domain SFT
            rows = [pair for pair in pairs if pair["domain"] == domain]
            written.append(_write(out / split / f"preference_{domain}.jsonl", rows))
    for split, n in PAS_ROWS.items():
        written.append(_write(out / split / "pas.jsonl", [tasks.pas_pair(seed, f"pas-{split}", i) for i in range(n)]))
    return written


def vocabulary_texts() -> list[str]:
    """Every word the generator can write (numbers, topics, templates, PAS complements), so that no row of any split
    or seed meets an unknown token."""
    numbers = " ".join(str(n) for n in range(0, 100))
    fixed = [numbers, " ".join(tasks.OPS), " ".join(tasks.TOPICS), *tasks.TOPICS.values(),
             *tasks.FORMAT_WORDS.values(), "minus", "done", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19"]
    samples = [tasks.problem(SEED, "vocabulary", i) for i in range(64)]
    rng = random.Random(SEED)
    generated = [text for p in samples for text in (p.prompt, tasks.pas_complement(p), tasks.answer(p, rng))]
    return fixed + generated + [tasks.answer(p, rng, f) for p in samples for f in tasks.REJECTIONS[p.domain]]


def write_tokenizer(folder: str | Path = HERE / "data" / "tokenizer") -> Path:
    """The recipe's word-level tokenizer (examples/make_tokenizer.build_tokenizer over :func:`vocabulary_texts`)."""
    return _example("make_tokenizer").build_tokenizer(folder, vocabulary_texts())


def write_model(folder: str | Path = HERE / "models" / "base", seed: int = SEED, **config) -> Path:
    """A tiny Llama (:data:`LLAMA`, ``config`` overriding) whose vocabulary is the recipe tokenizer's, saved with the
    tokenizer beside it, so that ``pretrained:`` names one folder for both."""
    from transformers import AutoTokenizer

    tokenizer_dir = write_tokenizer(folder)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
    return _example("make_models").save_llama(folder, seed=seed, vocab_size=vocab, **(LLAMA | config))


def main(argv: list[str]) -> int:
    return make_main(argv, "recipes.alignment.make", __doc__, HERE / "data", "base", write_data, write_tokenizer,
                     write_model)


def make_main(argv: list[str], module: str, doc: str, data: Path, model: str, write_data, write_tokenizer,
              write_model) -> int:
    """The CLI of a data-and-model writer (this module's, recipes.alignment.judge_data's): ``--data`` (data files and
    the tokenizer), ``--models`` (the tiny Llama, in the subfolder ``model``), ``--models-only``."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    parser.add_argument("--data", default=str(data), help="where the data files and the tokenizer go")
    parser.add_argument("--models", default=str(HERE / "models"), help=f"where the tiny Llama goes ({model}/)")
    parser.add_argument("--models-only", action="store_true", help="write the tiny Llama only (scripts/setup.sh)")
    args = parser.parse_args(argv)
    if not args.models_only:
        files = write_data(args.data)
        write_tokenizer(Path(args.data) / "tokenizer")
        print(f"wrote {len(files)} data files and the tokenizer under {args.data}")
    print(f"wrote {write_model(Path(args.models) / model)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
