"""SuperCorrect's tiny model: a word-level tokenizer over every word recipes.alignment.supercorrect_data writes, and
a tiny Llama with its vocabulary, in one folder (not in git; scripts/setup.sh writes it).

    python -m recipes.alignment.supercorrect_model [--models DIR]     # DIR/supercorrect (default recipes/alignment/models)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recipes.alignment import supercorrect_data as sc

MODEL_DIR = Path(__file__).resolve().parent / "models" / "supercorrect"
LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def write_model(folder: str | Path = MODEL_DIR, seed: int = 0, **config) -> Path:
    """The tokenizer (examples/make_tokenizer over :func:`supercorrect_data.vocabulary_texts`) and a tiny Llama
    (:data:`LLAMA`, ``config`` overriding) with its vocabulary, saved in ``folder`` (``pretrained:`` names it)."""
    from transformers import AutoTokenizer

    from recipes.alignment.make import _example

    _example("make_tokenizer").build_tokenizer(folder, sc.vocabulary_texts())
    vocab = len(AutoTokenizer.from_pretrained(folder, local_files_only=True))
    return _example("make_models").save_llama(folder, seed=seed, vocab_size=vocab, **(LLAMA | config))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.alignment.supercorrect_model",
                                     description="write SuperCorrect's tokenizer and tiny Llama")
    parser.add_argument("--models", default=str(MODEL_DIR.parent), help="the folder that gets supercorrect/")
    args = parser.parse_args(argv)
    print(f"wrote {write_model(Path(args.models) / 'supercorrect')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
