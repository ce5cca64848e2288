"""Write examples/data/chat.jsonl: 200 short conversations, deterministic (seeded), a few KB.

    python examples/data/make_chat.py [OUT.jsonl]

Each line is ``{"messages": [...]}`` with a user question and an assistant answer (some with a system line first,
some with a second exchange), about small sums, colours of things and opposites, so that a tiny model can learn the
answers and its loss falls. The tokenizer of examples/make_tokenizer.py covers every word.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "night": "black", "blood": "red"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "old": "new", "day": "night"}
OUT = Path(__file__).resolve().parent / "chat.jsonl"


def exchange(rng: random.Random) -> tuple[str, str]:
    """One (question, answer)."""
    topic = rng.randrange(3)
    if topic == 0:
        a, b = rng.randrange(6), rng.randrange(5)
        return f"what is {NUMBERS[a]} plus {NUMBERS[b]} ?", f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]} ."
    if topic == 1:
        thing = rng.choice(sorted(COLOURS))
        return f"what colour is the {thing} ?", f"the {thing} is {COLOURS[thing]} ."
    word = rng.choice(sorted(OPPOSITES))
    return f"what is the opposite of {word} ?", f"the opposite of {word} is {OPPOSITES[word]} ."


def conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.1:
        messages.append({"role": "system", "content": "answer in one short sentence ."})
    for _ in range(2 if rng.random() < 0.15 else 1):
        question, answer = exchange(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else OUT
    rng = random.Random(11)
    lines = [json.dumps(conversation(rng), separators=(",", ":")) for _ in range(200)]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}: {len(lines)} conversations, {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
