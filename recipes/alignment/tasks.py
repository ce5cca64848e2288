"""Synthetic alignment data with verifiable answers: prompts, rule rewards, preference pairs and PAS complements.

Two capability domains with different length distributions, so that packing and per-domain merging have something
to show (Baichuan Alignment, arXiv 2410.14940, §2.2 and §2.4):

- ``arithmetic`` (short: about 10 words): ``what is 7 plus 5 ?`` with an exact integer answer;
- ``constraints`` (long: 20-60 words): write N words about a topic, include a keyword, in a given format (all words
  lower case ending ``.``, or a numbered list, or ending with ``done``): each constraint is checkable by rule.

:func:`rule_score` gives every (prompt, response) an absolute score in [0, 1] (1: every check passes), which is both
the verifiable reward of RL and the normalised absolute score of the reward model's MSE term. A :class:`Problem` knows
its checks; :func:`problem` draws one deterministically from (seed, split, index), so a row is a pure function of its
index. :func:`pair` makes a chosen/rejected pair (the chosen answer passes every check, the rejected one fails some,
with its score; ``failure`` names the check it fails), :func:`pas_complement` the prompt complement PAS learns
(scenario, intent, format constraints, about 30 words, never the answer). Pure Python, no torch: the recipe's files
are written from these (recipes.alignment.make).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from runtime.source_files import stable_int

DOMAINS = ("arithmetic", "constraints")
OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
TOPICS = {
    "sea": "waves salt ships tides blue fish sand wind shore deep",
    "forest": "trees moss birds green leaves roots shade path deer quiet",
    "city": "streets lights trains people towers noise bridges shops night busy",
    "winter": "snow ice cold frost white fire coats dark long still",
    "garden": "flowers seeds rain bees soil roses sun grow weeds fruit",
}
FORMATS = ("lower", "list", "done")  # all lower case ending with "."; numbered list "1 . x 2 . y"; last word "done"
FORMAT_WORDS = {"lower": "in lower case ending with a period", "list": "as a numbered list",
                "done": "and end with the word done"}
REJECTIONS = {"arithmetic": ("wrong", "refuse"), "constraints": ("keyword", "length", "format")}
WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Problem:
    """One prompt and what a correct answer must satisfy: ``answer`` (arithmetic) or ``words``, ``keyword``,
    ``form`` and ``topic`` (constraints)."""

    domain: str
    prompt: str
    answer: int | None = None
    words: int = 0
    keyword: str = ""
    form: str = ""
    topic: str = ""
    extra: dict = field(default_factory=dict, compare=False)


def problem(seed: int, split: str, index: int, domain: str | None = None) -> Problem:
    """Problem ``index`` of ``split`` (any string; different splits draw from different streams) under ``seed``; the
    domain alternates with the index unless given."""
    rng = random.Random(stable_int("alignment", seed, split, index))
    domain = domain or DOMAINS[index % len(DOMAINS)]
    if domain == "arithmetic":
        a, b, op = rng.randint(1, 9), rng.randint(1, 9), rng.choice(sorted(OPS))
        return Problem(domain, f"what is {a} {op} {b} ?", answer=OPS[op](a, b))
    topic, form = rng.choice(sorted(TOPICS)), rng.choice(FORMATS)
    words, keyword = rng.randint(6, 14), rng.choice(TOPICS[topic].split())
    prompt = f"write {words} words about the {topic} , include the word {keyword} , {FORMAT_WORDS[form]} ."
    return Problem(domain, prompt, words=words, keyword=keyword, form=form, topic=topic)


ARITHMETIC_PROMPT = re.compile(r"what is (\d+) (plus|minus|times) (\d+) \?")
CONSTRAINTS_PROMPT = re.compile(r"write (\d+) words about the (\w+) , include the word (\w+) , (.+) \.")


def parse_prompt(prompt: str) -> Problem | None:
    """The :class:`Problem` a generated prompt states (the inverse of :func:`problem`'s wording, whitespace
    normalised: a tokenizer's decoding reads back), so that a rollout's answer can be scored by the rule from its
    tokens alone; None for any other text."""
    text = " ".join(prompt.split())
    if m := ARITHMETIC_PROMPT.fullmatch(text):
        a, op, b = int(m[1]), m[2], int(m[3])
        return Problem("arithmetic", text, answer=OPS[op](a, b))
    m = CONSTRAINTS_PROMPT.fullmatch(text)
    forms = {words: form for form, words in FORMAT_WORDS.items()}
    if m is None or m[2] not in TOPICS or m[4] not in forms:
        return None
    return Problem("constraints", text, words=int(m[1]), keyword=m[3], form=forms[m[4]], topic=m[2])


def _last_number(response: str) -> int | None:
    """The last integer of ``response`` (``minus 3`` reads as -3); None without one."""
    numbers = re.findall(r"-?\d+", response.replace("minus ", "-"))
    return int(numbers[-1]) if numbers else None


def _content_words(response: str) -> list[str]:
    """The words a constraints answer counts: no punctuation, no list numbers, no final ``done``."""
    return [w for w in WORD.findall(response) if w.isalpha()]


def checks(p: Problem, response: str) -> dict[str, bool]:
    """Every rule check of ``response`` to ``p`` by name (arithmetic: ``exact``; constraints: ``length``,
    ``keyword``, ``format``)."""
    tokens = WORD.findall(response)
    if p.domain == "arithmetic":
        value = _last_number(response)
        return {"exact": value == p.answer}
    words = _content_words(response)
    counted = words[:-1] if p.form == "done" and words and words[-1] == "done" else words
    if p.form == "lower":
        form_ok = bool(tokens) and tokens[-1] == "." and all(w == w.lower() for w in words)
    elif p.form == "list":
        numbers = [t for t in tokens if t.isdigit()]
        form_ok = numbers == [str(i + 1) for i in range(len(counted))] and bool(counted)
    else:
        form_ok = bool(words) and words[-1] == "done"
    return {"length": len(counted) == p.words, "keyword": p.keyword in counted, "format": form_ok}


def rule_score(p: Problem, response: str) -> float:
    """The absolute score of ``response``, in [0, 1]: arithmetic 1 for the exact answer, else 0.25 / (1 + |error|)
    for a wrong number and 0 for none; constraints the fraction of the three checks that pass."""
    result = checks(p, response)
    if p.domain == "arithmetic":
        if result["exact"]:
            return 1.0
        value = _last_number(response)
        return 0.25 / (1 + abs(value - p.answer)) if value is not None else 0.0
    return sum(result.values()) / len(result)


def _number(n: int) -> str:
    return str(n) if n >= 0 else f"minus {-n}"


def _compose(p: Problem, words: list[str]) -> str:
    if p.form == "list":
        return " ".join(f"{i + 1} . {w}" for i, w in enumerate(words))
    if p.form == "done":
        return " ".join(words) + " done"
    return " ".join(words) + " ."


def answer(p: Problem, rng: random.Random, failure: str | None = None) -> str:
    """A response to ``p``: correct (every check passes) without ``failure``, else one that fails it (arithmetic:
    ``wrong`` number or ``refuse``; constraints: ``keyword`` missing, wrong ``length``, wrong ``format``)."""
    if p.domain == "arithmetic":
        if failure == "refuse":
            return "i am not sure ."
        value = p.answer if failure is None else p.answer + rng.choice([-3, -2, -1, 1, 2, 3, 10])
        return f"the answer is {_number(value)} ."
    pool = [w for w in TOPICS[p.topic].split() if w != p.keyword]
    n = p.words if failure != "length" else max(2, p.words + rng.choice([-4, -3, 3, 4]))
    words = [rng.choice(pool) for _ in range(n)]
    if failure != "keyword":
        words[rng.randrange(n)] = p.keyword
    if failure == "format":
        other = rng.choice([f for f in FORMATS if f != p.form])
        return _compose(Problem(p.domain, p.prompt, words=n, form=other), words)
    return _compose(p, words)


def pair(seed: int, split: str, index: int, with_score: bool = True) -> dict:
    """Preference pair ``index`` of ``split`` in the documented JSONL layout (docs/data.md, format preference):
    ``prompt``, ``chosen`` (a correct answer), ``rejected`` (one that fails a check drawn for the domain) and, when
    ``with_score``, their rule scores ``score_chosen`` / ``score_rejected``; ``domain`` for the evaluator."""
    p = problem(seed, split, index)
    rng = random.Random(stable_int("answer", seed, split, index))
    failure = rng.choice(REJECTIONS[p.domain])
    chosen, rejected = answer(p, rng), answer(p, rng, failure)
    row = {"prompt": p.prompt, "chosen": chosen, "rejected": rejected, "domain": p.domain, "failure": failure}
    if with_score:
        row |= {"score_chosen": rule_score(p, chosen), "score_rejected": rule_score(p, rejected)}
    return row


def chat(seed: int, split: str, index: int, domain: str | None = None) -> dict:
    """SFT conversation ``index``: the prompt and a correct answer, as chat messages (docs/data.md, format chat)."""
    p = problem(seed, split, index, domain)
    rng = random.Random(stable_int("answer", seed, split, index))
    return {"messages": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": answer(p, rng)}],
            "domain": p.domain}


def pas_complement(p: Problem) -> str:
    """The prompt complement PAS learns for ``p``: scenario, intent and format constraints in about 30 words, never
    the answer (arithmetic: no number but the operands; constraints: no answer text)."""
    if p.domain == "arithmetic":
        return ("the user wants one exact arithmetic result ; compute it step by step in your head , then state only "
                "the final whole number after the words the answer is , with no other numbers or extra comments .")
    form = {"lower": "use only lower case words and end with a single period",
            "list": "number every word as a list starting from one",
            "done": "finish with the word done after the counted words"}[p.form]
    return (f"the user wants a short text about the {p.topic} with exactly {p.words} counted words ; the word "
            f"{p.keyword} must appear ; {form} ; count the words before answering .")


def pas_pair(seed: int, split: str, index: int) -> dict:
    """PAS training pair ``index``: the user prompt in, its complement out, as a chat conversation."""
    p = problem(seed, split, index)
    return {"messages": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": pas_complement(p)}],
            "domain": p.domain}
