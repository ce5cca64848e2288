"""PAS's data: prompts whose constraints the user leaves to the scene, a PAS model that states them, its tokenizer.

Baichuan Alignment's PAS (arXiv 2410.14940, §2.1) complements a user prompt with what the user left unsaid: scenario
requirements, intent, format. The recipe's generated prompts (recipes.alignment.tasks) state every constraint the
rule checks, so a complement there can only repeat them and a measurement of PAS has nothing to find. Here a third
kind of prompt, ``scene``, names where the text is going instead of its length and format, as users do::

    write about the sea for a telegram , include the word fish .

and the scene fixes what the rule checks (:data:`SCENES`: a telegram is 8 words ending with ``done``). The keyword
is stated; the length and the format are implicit, and recoverable: the PAS model learns each scene's conventions
from its training pairs (prompt -> complement, :func:`complement`), and its complement states them in the same words
for a scene prompt as for an explicit one. A complement adds what the prompt leaves out and points back to what it
says (the keyword: "the word the user asks for"), as the report's complements carry requirements, not the prompt
again; a 2-layer PAS model copies a topic's keyword wrong often enough to mislead the answer model otherwise. The
answer model is fine-tuned on explicit prompts only (the preference file's; a share of them followed by PAS's
complement: recipes.alignment.pas_data), so it learns to follow stated constraints and never sees a scene's answer:
it can only get a scene right alone by chance, and with PAS's complement by following what the complement states.

:func:`problem` draws the held-out and training problems of the PAS pipeline, cycling arithmetic, explicit
constraints and scene prompts; :func:`kind` names a problem's kind; :func:`parse_prompt` reads any of them back from
its text. :func:`write_data`, :func:`write_tokenizer` and :func:`write_model` write ``data/pas/`` (PAS's training and
held-out pairs, and a tokenizer: the recipe's vocabulary plus the scene words, in a folder of its own so the recipe
tokenizer's ids stay as they are) and ``models/pas/`` (the tiny Llama of recipes.alignment.make over that
tokenizer): ``python -m recipes.alignment.pas_scenes [--data DIR] [--models DIR] [--models-only]``.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from recipes.alignment import tasks
from runtime.source_files import stable_int

HERE = Path(__file__).resolve().parent
SCENES = {  # where the text goes -> (format, words) its reader expects; never said in a scene prompt
    "caption": ("lower", 6), "postcard": ("lower", 12), "checklist": ("list", 6), "agenda": ("list", 10),
    "telegram": ("done", 8), "logbook": ("done", 12)}
KINDS = ("arithmetic", "constraints", "scene")
SCENE_PROMPT = re.compile(r"write about the (\w+) for a (\w+) , include the word (\w+) \.")
PAS_ROWS = {"train": 600, "heldout": 96}
SEED = 0


def problem(seed: int, split: str, index: int) -> tasks.Problem:
    """Problem ``index`` of ``split`` under ``seed``: :data:`KINDS` in turn (index mod 3); arithmetic and explicit
    constraints are the generator's (tasks.problem), a scene prompt states its topic, scene and keyword only."""
    which = KINDS[index % len(KINDS)]
    if which != "scene":
        return tasks.problem(seed, split, index, which)
    rng = random.Random(stable_int("pas-scene", seed, split, index))
    topic, scene = rng.choice(sorted(tasks.TOPICS)), rng.choice(sorted(SCENES))
    keyword = rng.choice(tasks.TOPICS[topic].split())
    form, words = SCENES[scene]
    return tasks.Problem("constraints", f"write about the {topic} for a {scene} , include the word {keyword} .",
                         words=words, keyword=keyword, form=form, topic=topic, extra={"scene": scene})


def kind(p: tasks.Problem) -> str:
    """``scene`` for a scene prompt, else its domain."""
    return "scene" if p.extra.get("scene") else p.domain


def parse_prompt(prompt: str) -> tasks.Problem | None:
    """The problem a generated prompt of any kind states (tasks.parse_prompt, or a scene prompt with its scene's
    conventions), whitespace normalised; None for any other text."""
    text = " ".join(prompt.split())
    m = SCENE_PROMPT.fullmatch(text)
    if m is None or m[1] not in tasks.TOPICS or m[2] not in SCENES:
        return tasks.parse_prompt(text)
    form, words = SCENES[m[2]]
    return tasks.Problem("constraints", text, words=words, keyword=m[3], form=form, topic=m[1],
                         extra={"scene": m[2]})


FORMS = {"lower": "use only lower case words and end with a single period",
         "list": "number every word as a list starting from one",
         "done": "finish with the word done after the counted words"}


def complement(p: tasks.Problem) -> str:
    """The complement PAS learns for ``p`` (about 30 words, never the answer): arithmetic, the generator's
    (tasks.pas_complement: the answer's form); constraints, scene or explicit, the topic, the exact length and the
    format stated, the keyword pointed to."""
    if p.domain == "arithmetic":
        return tasks.pas_complement(p)
    return (f"the user wants a short text about the {p.topic} with exactly {p.words} counted words ; {FORMS[p.form]} "
            "; the word the user asks for must appear ; count the words before answering .")


def pas_pair(seed: int, split: str, index: int) -> dict:
    """PAS training pair ``index``: problem ``index``'s prompt in, its :func:`complement` out, as a chat
    conversation; ``kind`` for the reader."""
    p = problem(seed, split, index)
    return {"messages": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": complement(p)}],
            "kind": kind(p)}


def write_data(folder: str | Path = HERE / "data" / "pas", seed: int = SEED) -> list[Path]:
    """``train/pas.jsonl`` and ``heldout/pas.jsonl`` (:data:`PAS_ROWS` pairs each, streams ``pas-train`` and
    ``pas-heldout``) under ``folder``; the paths written."""
    written = []
    for split, rows in PAS_ROWS.items():
        path = Path(folder) / split / "pas.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(pas_pair(seed, f"pas-{split}", i)) + "\n" for i in range(rows)))
        written.append(path)
    return written


def write_tokenizer(folder: str | Path = HERE / "data" / "pas" / "tokenizer") -> Path:
    """The recipe's word-level vocabulary (recipes.alignment.make.vocabulary_texts) plus every scene prompt's and
    complement's words."""
    from recipes.alignment import make

    scenes = [f"write about the {t} for a {s} , include the word ." for t in tasks.TOPICS for s in SCENES]
    scenes.append(complement(problem(SEED, "vocabulary", 2)))
    return make._example("make_tokenizer").build_tokenizer(folder, make.vocabulary_texts() + scenes)


def write_model(folder: str | Path = HERE / "models" / "pas", seed: int = SEED, **config) -> Path:
    """recipes.alignment.make's tiny Llama (its LLAMA config, ``config`` overriding) over :func:`write_tokenizer`'s
    vocabulary, saved with the tokenizer beside it."""
    from transformers import AutoTokenizer

    from recipes.alignment import make

    tokenizer_dir = write_tokenizer(folder)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
    return make._example("make_models").save_llama(folder, seed=seed, vocab_size=vocab, **(make.LLAMA | config))


def main(argv: list[str]) -> int:
    from recipes.alignment.make import make_main

    return make_main(argv, "recipes.alignment.pas_scenes", __doc__, HERE / "data" / "pas", "pas", write_data,
                     write_tokenizer, write_model)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
