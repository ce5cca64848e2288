"""Judges for the alignment recipe's evaluation steps (SysBench, FB-Bench): rule judges and an optional
OpenAI-compatible judge endpoint.

A criterion is one checklist item: an ``id``, a constraint ``type`` (SysBench's Action, Content, Background, Role,
Format, Style; FB-Bench leaves it free), its ``content`` (the sentence a human or an LLM judge reads), an optional
``weight`` (FB-Bench) and, for the rule judge, a ``rule``: ``{"kind": <one of RULES>, ...parameters}``. Rules read
words the way a word-level model writes them: a *word* is a run of letters (``\\w+`` without digits); list numbers
and punctuation are not words. Rules (:data:`RULES`, checked by :func:`check_rule`):

- ``include {word}`` / ``forbid {word}``: the word is (not) one of the answer's words;
- ``starts_with {word}`` / ``ends_with {word}``: the answer's first / last word;
- ``words {n}``, ``max_words {n}``: exactly / at most ``n`` words;
- ``only_words {words}``: every word of the answer is in the list (a closed vocabulary: the "language" of the answer);
- ``format {form}``: ``list`` (``1 . a 2 . b ...``: numbered from 1, one word an item, at least one item), ``period``
  (the last token is ``.``), ``lower`` (no upper-case letter);
- ``number {value}`` / ``not_number {value}``: the answer's last number (``minus 3`` reads -3) is (not) ``value``.

:class:`EndpointJudge` asks a judge model instead (``judge: {url, model, api_key_env, timeout_s, retries}`` in a
step's args): one POST to ``<url>/v1/chat/completions`` per judged answer, with the context, the answer and the
numbered checklist; the reply must hold JSON ``{"results": {"1": "yes", "2": "no", ...}}`` (SysBench's and
FB-Bench's judges answer the same way, in Chinese keys). urllib only; errors are one line (:class:`JudgeError`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from planner.errors import LoomError

TOKEN = re.compile(r"\w+|[^\w\s]")
FORMS = ("list", "period", "lower")


class JudgeError(LoomError):
    """A judge endpoint that cannot be reached or answers outside the expected JSON; one line."""


def words(answer: str) -> list[str]:
    """The answer's words (runs of letters; no numbers, no punctuation)."""
    return [t for t in TOKEN.findall(answer) if t.isalpha()]


def last_number(answer: str) -> int | None:
    """The last integer of ``answer`` (``minus 3`` reads -3); None without one."""
    found = re.findall(r"-?\d+", answer.replace("minus ", "-"))
    return int(found[-1]) if found else None


def _form(answer: str, form: str) -> bool:
    tokens = TOKEN.findall(answer)
    if form == "period":
        return bool(tokens) and tokens[-1] == "."
    if form == "lower":
        return bool(tokens) and answer == answer.lower()
    items = re.findall(r"(\d+) \. (\w+)", answer)  # list: "1 . a 2 . b", nothing else
    return bool(items) and [n for n, _ in items] == [str(i + 1) for i in range(len(items))] and \
        len(tokens) == 3 * len(items) and all(w.isalpha() for _, w in items)


RULES: dict[str, tuple[Callable[[str, dict], bool], dict[str, type]]] = {
    "include": (lambda a, r: r["word"] in words(a), {"word": str}),
    "forbid": (lambda a, r: r["word"] not in words(a), {"word": str}),
    "starts_with": (lambda a, r: words(a)[:1] == [r["word"]], {"word": str}),
    "ends_with": (lambda a, r: words(a)[-1:] == [r["word"]], {"word": str}),
    "words": (lambda a, r: len(words(a)) == r["n"], {"n": int}),
    "max_words": (lambda a, r: 0 < len(words(a)) <= r["n"], {"n": int}),
    "only_words": (lambda a, r: bool(words(a)) and set(words(a)) <= set(r["words"]), {"words": list}),
    "format": (lambda a, r: _form(a, r["form"]), {"form": str}),
    "number": (lambda a, r: last_number(a) == r["value"], {"value": int}),
    "not_number": (lambda a, r: last_number(a) != r["value"], {"value": int}),
}


def check_rule(rule: Any) -> str | None:
    """What is wrong with ``rule`` (a phrase), or None when the rule judge can apply it."""
    if not isinstance(rule, dict) or rule.get("kind") not in RULES:
        return f"rule {rule!r}: expected an object with `kind` one of {', '.join(RULES)}"
    params = RULES[rule["kind"]][1]
    for name, kind in params.items():
        value = rule.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"rule {rule!r}: `{name}` must be a {kind.__name__}"
    if rule["kind"] == "format" and rule["form"] not in FORMS:
        return f"rule {rule!r}: `form` must be one of {', '.join(FORMS)}"
    if rule["kind"] == "only_words" and not all(isinstance(w, str) for w in rule["words"]):
        return f"rule {rule!r}: `words` must be a list of words"
    extra = set(rule) - set(params) - {"kind"}
    return f"rule {rule!r}: unknown key(s) {', '.join(sorted(extra))}" if extra else None


@dataclass(frozen=True)
class Criterion:
    """One checklist item (module docstring)."""

    id: str
    content: str
    type: str = ""
    weight: float | None = None
    rule: dict | None = None

    def to_json(self) -> dict:
        row = {"id": self.id, "type": self.type, "content": self.content, "rule": self.rule}
        return row | ({"weight": self.weight} if self.weight is not None else {})


def criterion_from_json(row: Any, where: str) -> Criterion:
    """A :class:`Criterion` from its JSON object; a ValueError naming ``where`` when malformed. ``[content, weight]``
    (FB-Bench's own checklist layout) is accepted too, without a rule."""
    if isinstance(row, list) and len(row) == 2 and isinstance(row[0], str):
        row = {"content": row[0], "weight": row[1]}
    if not isinstance(row, dict) or not isinstance(row.get("content"), str):
        raise ValueError(f"{where}: expected an object with `content` (the criterion's text). Fix the item.")
    weight = row.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or
                               not 0 < weight <= 1):
        raise ValueError(f"{where}.weight ({weight!r}): expected a number in (0, 1] or null. Fix the item.")
    rule = row.get("rule")
    if rule is not None and (problem := check_rule(rule)):
        raise ValueError(f"{where}: {problem}. Fix the rule or leave it out (then a judge endpoint is needed).")
    return Criterion(str(row.get("id", "")), row["content"], str(row.get("type", "")), weight, rule)


def rule_verdicts(criteria: Sequence[Criterion], answer: str) -> list[bool]:
    """Each criterion's verdict on ``answer`` by its rule (every criterion must have one)."""
    return [RULES[c.rule["kind"]][0](answer, c.rule) for c in criteria]


# --------------------------------------------------------------------------- the judge endpoint

JUDGE_SYSTEM = ("You are an exact evaluator. Read the conversation, the answer to judge and the numbered checklist. "
                'Reply with JSON only: {"results": {"1": "yes" or "no", ...}}, one entry per checklist item.')


@dataclass(frozen=True)
class EndpointJudge:
    """An OpenAI-compatible chat-completions endpoint asked for per-criterion verdicts (module docstring)."""

    url: str
    model: str
    api_key_env: str | None = None
    timeout_s: float = 60.0
    retries: int = 2

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else (
            f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions")

    def prompt(self, context: str, answer: str, criteria: Sequence[Criterion]) -> str:
        checklist = "\n".join(f"{i + 1}. {c.content}" for i, c in enumerate(criteria))
        return f"# Conversation\n{context}\n\n# Answer to judge\n{answer}\n\n# Checklist\n{checklist}\n"

    def post(self, prompt: str) -> str:
        """The endpoint's reply text to ``prompt``; a JudgeError (one line) on any transport or HTTP failure."""
        body = json.dumps({"model": self.model, "temperature": 0, "messages": [
            {"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.api_key_env, '')}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read().decode())
            return reply["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as exc:
            raise JudgeError(f"judge {self.endpoint}: HTTP {exc.code} {exc.reason}. Check the url, the model "
                             f"'{self.model}' and the key in {self.api_key_env or '(no api_key_env)'}.") from None
        except (socket.timeout, TimeoutError):
            raise JudgeError(self._late()) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (socket.timeout, TimeoutError)):
                raise JudgeError(self._late()) from None
            raise JudgeError(f"judge {self.endpoint}: cannot connect ({exc.reason}). Check judge.url and that the "
                             "server runs.") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge {self.endpoint}: the reply is not an OpenAI chat completion (no "
                             "choices[0].message.content). Point judge.url at an OpenAI-compatible server.") from None

    def _late(self) -> str:
        return (f"judge {self.endpoint}: no reply within {self.timeout_s:g} s. Raise judge.timeout_s or check the "
                "server.")

    def verdicts(self, context: str, answer: str, criteria: Sequence[Criterion]) -> list[bool]:
        """Each criterion's verdict, asked of the endpoint (``retries`` more tries on a malformed reply)."""
        prompt, reply = self.prompt(context, answer, criteria), ""
        for _ in range(self.retries + 1):
            reply = self.post(prompt)
            parsed = parse_verdicts(reply, len(criteria))
            if parsed is not None:
                return parsed
        raise JudgeError(f"judge {self.endpoint}: {self.retries + 1} replies without verdicts for the "
                         f"{len(criteria)} items (last: {reply[:80]!r}); expected JSON "
                         '{"results": {"1": "yes", ...}}. Use a model that follows the judge prompt.')


def parse_verdicts(reply: str, count: int) -> list[bool] | None:
    """The ``count`` verdicts of a judge reply (JSON, possibly in a code fence), or None when it holds none."""
    found = re.search(r"\{.*\}", reply, re.DOTALL)
    try:
        results = json.loads(found.group(0))["results"] if found else None
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(results, dict):
        return None
    answers = {str(k): str(v).strip().lower() for k, v in results.items()}
    keys = [str(i + 1) for i in range(count)]
    if not all(answers.get(k) in ("yes", "no", "true", "false") for k in keys):
        return None
    return [answers[k] in ("yes", "true") for k in keys]


def check_judge(value: Any) -> None:
    """A step's ``judge`` argument: ``{url, model, api_key_env?, timeout_s?, retries?}`` (ValueError naming it)."""
    known = ("url", "model", "api_key_env", "timeout_s", "retries")
    if not isinstance(value, dict):
        raise ValueError(f"judge ({value!r}): expected {{url, model, api_key_env}} of an OpenAI-compatible "
                         "endpoint. Fix the value or leave it out (rule judges).")
    for key in value:
        if key not in known:
            raise ValueError(f"judge.{key}: unknown key; judge takes {', '.join(known)}.")
    if not isinstance(value.get("url"), str) or not value["url"].startswith(("http://", "https://")):
        raise ValueError(f"judge.url ({value.get('url')!r}): expected an http(s) URL of an OpenAI-compatible server "
                         "(e.g. http://localhost:8000). Fix the value.")
    if not isinstance(value.get("model"), str) or not value["model"]:
        raise ValueError("judge.model: required, the judge model's name on the server. Add it.")
    env = value.get("api_key_env")
    if env is not None and (not isinstance(env, str) or env not in os.environ):
        raise ValueError(f"judge.api_key_env ({env!r}): no such environment variable is set. Export it, or leave "
                         "api_key_env out for a server without a key.")
    timeout = value.get("timeout_s", 60)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"judge.timeout_s ({timeout!r}): expected a number of seconds > 0. Fix the value.")
    retries = value.get("retries", 2)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
        raise ValueError(f"judge.retries ({retries!r}): expected an integer in [0, 10]. Fix the value.")


def endpoint_judge(value: dict | None) -> EndpointJudge | None:
    """The :class:`EndpointJudge` a checked ``judge`` argument names; None without one (rule judges)."""
    if value is None:
        return None
    return EndpointJudge(value["url"], value["model"], value.get("api_key_env"), float(value.get("timeout_s", 60)),
                         int(value.get("retries", 2)))


def verdicts(criteria: Sequence[Criterion], context: str, answer: str, judge: EndpointJudge | None) -> list[bool]:
    """Each criterion's verdict: by the endpoint when there is one, else by the rules."""
    return judge.verdicts(context, answer, criteria) if judge is not None else rule_verdicts(criteria, answer)
