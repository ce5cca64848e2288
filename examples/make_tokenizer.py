"""Build a tiny word-level tokenizer with a chat template, locally (nothing is downloaded).

    python examples/make_tokenizer.py OUT_DIR [CORPUS.jsonl ...]

The vocabulary is every word and punctuation mark of the corpus (default: examples/data/chat.jsonl and, when present,
the captions of examples/data/shapes/manifest.jsonl; examples/data/tokenizer/ was written so), sorted, after
the special tokens; the tokenizer is a ``tokenizers`` WordLevel model behind ``transformers.PreTrainedTokenizerFast``
with pad, eos and unk tokens and a ChatML-style chat template, saved with ``save_pretrained``. Tests and examples
share :func:`build_tokenizer`. Deterministic: the same corpus gives the same folder.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<unk>", "<eos>", "<|im_start|>", "<|im_end|>")
ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORD = re.compile(r"\w+|[^\w\s]")  # what the Whitespace pre-tokenizer splits text into
DATA = Path(__file__).resolve().parent / "data"
DEFAULT_CORPUS = (DATA / "chat.jsonl", DATA / "shapes" / "manifest.jsonl")


def corpus_texts(path: Path) -> list[str]:
    """Every string value of every line of a JSONL file (texts, messages' contents, prompts, captions), but for
    a manifest's image paths."""
    out: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                if key != "image":
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for line in path.read_text().splitlines():
        if line.strip():
            walk(json.loads(line))
    return out


def build_tokenizer(out_dir: str | Path, texts: Iterable[str]) -> Path:
    """Save a WordLevel tokenizer covering ``texts`` (plus the chat roles) into ``out_dir``; returns the folder.
    Words it has not seen map to ``<unk>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in [*texts, *ROLES] for w in WORD.findall(text)} - set(SPECIAL_TOKENS))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHAT_TEMPLATE,
    )
    out = Path(out_dir)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    corpora = [Path(p) for p in argv[1:]] or [p for p in DEFAULT_CORPUS if p.is_file()]
    texts = [text for path in corpora for text in corpus_texts(path)]
    folder = build_tokenizer(argv[0], texts)
    print(f"wrote {folder} ({len(SPECIAL_TOKENS)} special tokens, from {', '.join(map(str, corpora))})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
