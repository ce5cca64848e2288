"""SuperCorrect's cross-model collaborative DPO pairs from the student's own errors (Yang et al., arXiv 2410.09008,
section 3.2): the step ``supercorrect_errors``.

The paper runs the HSFT student on training problems, keeps its wrong results, has the teacher locate the first
wrong step k and write the correction, and trains DPO on prompt = the problem and the correct steps before k,
chosen = the teacher's correction from k, rejected = the student's own from k. Here the teacher is exact: every
problem record carries the teacher's solution (recipes.alignment.supercorrect_data), so the first wrong step of
any answer is the first unit that differs from the teacher's response to the same prompt.

The step greedily answers both prompts of each training problem with the HSFT model (``model``): solve (the problem
-> a template solution) and check (the problem and the generated student's solution -> the template review). A
response is cut into units, one per template section (``<plan> ...``, ``<step k> ...``, ``<fix>``, ``<answer> ...``);
where the model's first differs from the teacher's, one pair: prompt = the prompt and the teacher's units before
it, chosen = the teacher's units from there, rejected = the model's own. A right response gives no pair. The pairs
go to the artifact ``data`` as ``train/preference.jsonl`` (docs/data.md format preference), which a ``dpo`` phase
reads with ``data_dir: "@<phase>/data"``; the step reports the share of wrong responses and the pairs.

A check pair is a *missed error* where the teacher's first differing section says ``wrong`` and the student's ``ok``
(chosen: the teacher's location and fix), a *false alarm* where the teacher's says ``ok`` and the student's
``wrong`` (chosen: the teacher's ``ok`` and the review from there), else *other* (a slip in a recomputed value, the
fix or the answer: the same verdict on both sides). With ``balance`` (the default) the step keeps as many pairs of
each of the first two kinds, a seeded draw from the larger: DPO on the raw mix moves every verdict towards the kind
the student happened to err on more (a student that mostly raised false alarms learnt to approve every step).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from planner.pipeline import StepContext, check_known_args, check_model_arg, check_whole_args
from recipes.alignment import supercorrect_data as sc

DEFAULTS = {"limit": 1000, "new_tokens": 64, "batch_size": 256, "balance": True, "seed": 0}  # 64: above the
# longest template response (58)
METRICS = ("problems", "solve_wrong", "check_wrong", "missed_errors", "false_alarms", "dpo_pairs")
CHECK_KINDS = ("missed", "false_alarm", "other")
UNIT = re.compile(r" (?=< (?:plan|step \d+|fix|answer|check) >)")


def units(text: str) -> list[str]:
    """``text`` (normalised) cut before each template tag: one unit per section."""
    text = sc.normalise(text)
    return UNIT.split(text) if text else []


def first_error_pair(prompt: str, teacher: str, answer: str) -> dict | None:
    """The pair at the first unit where ``answer`` leaves ``teacher`` (module docstring); None when it does not."""
    want, got = units(teacher), units(answer)
    k = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    if not want[k:] or not got[k:]:  # the same, or one stops where the other goes on: no step to prefer
        return None
    return {"prompt": " ".join([sc.normalise(prompt), *want[:k]]), "chosen": " ".join(want[k:]),
            "rejected": " ".join(got[k:]), "first_error": k + 1}


def verdict(unit: str) -> str | None:
    """``ok`` or ``wrong`` where ``unit`` is a review's verdict section (``< step k > ... , v ok``), else None."""
    last = unit.rsplit(" ", 1)[-1]
    return last if unit.startswith("< step") and last in ("ok", "wrong") else None


def check_kind(pair: dict) -> str:
    """A check pair's kind (module docstring) from the first sections of its chosen and rejected sides."""
    teacher, student = verdict(units(pair["chosen"])[0]), verdict(units(pair["rejected"])[0])
    return {("wrong", "ok"): "missed", ("ok", "wrong"): "false_alarm"}.get((teacher, student), "other")


def balanced(pairs: list[dict], seed: int) -> list[dict]:
    """``pairs`` with as many missed-error as false-alarm check pairs: a seeded draw of the larger kind's pairs, as
    many as the smaller kind has; solve pairs and other check pairs are all kept, every pair in its place."""
    kinds = {kind: [i for i, p in enumerate(pairs) if p.get("kind") == kind] for kind in ("missed", "false_alarm")}
    keep = min(len(v) for v in kinds.values())
    dropped = {i for v in kinds.values() for i in set(v) - set(random.Random(seed).sample(v, keep))}
    return [p for i, p in enumerate(pairs) if i not in dropped]


def own_error_pairs(records: list[dict], solved: list[str], checked: list[str]) -> list[dict]:
    """The pairs of the model's answers ``solved`` and ``checked`` to the records' solve and check prompts."""
    pairs = []
    for record, solve, check in zip(records, solved, checked):
        for task, prompt, teacher, answer in (
                ("solve", sc.solve_prompt(record), sc.solution(record, "template"), solve),
                ("check", sc.check_prompt(record), sc.review(record, "template", record["first_error"]), check)):
            pair = first_error_pair(prompt, teacher, answer)
            if pair is not None:
                pairs.append(pair | {"task": task} | ({"kind": check_kind(pair)} if task == "check" else {}))
    return pairs


def check_args(args: dict[str, Any], base: Path | None) -> None:
    """``model`` (the HSFT student: a folder or reference), ``problems`` (a records file or reference), optional
    ``limit`` (problems answered), ``new_tokens``, ``batch_size``, ``balance`` (true: as many missed-error as
    false-alarm pairs) and ``seed`` (of that draw)."""
    check_known_args(args, ("model", "problems", *DEFAULTS), "supercorrect_errors")
    check_model_arg("model", args.get("model"), base, "the HSFT student")
    problems = args.get("problems")
    if not isinstance(problems, str):
        raise ValueError("problems: required, a JSONL file of problem records or a reference ('@<phase>/data/...'). "
                         "Add it.")
    if not problems.startswith("@") and not StepContext("", {}, Path(), base).path(problems).is_file():
        raise ValueError(f"problems ({problems!r}): no such file. Point it at a JSONL file of problem records.")
    check_whole_args(args, (("limit", 1, 1_000_000), ("new_tokens", 1, 512), ("batch_size", 1, 4096),
                            ("seed", 0, 2**31 - 1)))
    if not isinstance(args.get("balance", True), bool):
        raise ValueError(f"balance ({args['balance']!r}): expected true (as many missed-error as false-alarm pairs) "
                         "or false (every pair). Fix the value.")


def errors_step(ctx: StepContext) -> dict[str, float]:
    """Write ``data/train/preference.jsonl`` (module docstring); report the shares of wrong responses and of
    missed errors and false alarms among the checks (before balancing), and the pairs written."""
    from recipes.alignment.generation import greedy, load

    a = DEFAULTS | ctx.args
    records = sc.read_records(ctx.path(a["problems"]))[:a["limit"]]
    model, tokenizer = load(ctx.path(a["model"]))
    solved = greedy(model, tokenizer, [sc.solve_prompt(r) for r in records], a["new_tokens"], a["batch_size"])
    checked = greedy(model, tokenizer, [sc.check_prompt(r) for r in records], a["new_tokens"], a["batch_size"])
    pairs = own_error_pairs(records, solved, checked)
    count = {kind: sum(p.get("kind", p["task"]) == kind for p in pairs) for kind in ("solve", *CHECK_KINDS)}
    kept = balanced(pairs, a["seed"]) if a["balance"] else pairs
    sc.write_jsonl(ctx.artifact("data") / "train" / "preference.jsonl", kept)
    return {"problems": len(records), "solve_wrong": count["solve"] / len(records),
            "check_wrong": sum(count[k] for k in CHECK_KINDS) / len(records),
            "missed_errors": count["missed"] / len(records), "false_alarms": count["false_alarm"] / len(records),
            "dpo_pairs": len(kept)}
