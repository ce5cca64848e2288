"""SuperCorrect's data (arXiv 2410.09008): multi-step problems with exact intermediate values, a student that errs at
a known step, hierarchical thought templates, and the cross-model collaborative DPO pairs at the first wrong step.

A problem is one JSONL record (the real-data format, docs/recipes/alignment.md "SuperCorrect"):

``problem`` (text), ``plan`` (the high-level thought: which operations, in order), ``steps`` (the teacher's detailed
steps, each ``a op b = c``), ``answer``, ``student_steps`` and ``student_answer`` (the student's own solution) and
``first_error`` (1-based index of the student's first wrong step; 0 when the student is right).

The generator draws two kinds, with small numbers (0-29) so that a tiny word-level model can hold the facts:

- ``chain``: ``start with 7 , add 5 , multiply by 2 , subtract 4 .`` -> ``7 plus 5 = 12``, ``12 times 2 = 24``, ...
- ``linear``: ``solve 3 x plus 4 = 19 for x .`` -> ``19 minus 4 = 15``, ``15 divided by 3 = 5``.

The student copies the teacher up to a drawn step k, writes a value off by 1 or 2 there, then carries on from its
wrong value, so step k is exactly the first wrong one and the student's answer is wrong. From a record come (:func:`sft_rows`) the training rows of
two tasks, solve (the problem -> a solution) and check (the problem and the student's solution -> where it first
goes wrong and the fix), in the hierarchical ``template`` style (``<plan>``, ``<step k>``, ``<check>``, ``<fix>``,
``<answer>`` sections, each opened by its tag and running to the next: a closing ``</tag>`` would be one more
word-level token, ``</``, for nothing) or the ``plain`` style (the same steps, no sections: the baseline); and (:func:`dpo_pairs`) the
collaborative pairs, prompt = the problem and the correct steps before step k, chosen = the teacher's step k and its
continuation, rejected = the student's own (for both tasks). Pure Python, no torch.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from runtime.source_files import stable_int

KINDS = ("chain", "linear")
STYLES = ("template", "plain")
MAX_VALUE = 29  # every value a generated problem or its student's solution writes is in [0, MAX_VALUE]
OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b,
       "divided by": lambda a, b: a // b}
CHAIN_OPS = {"plus": ("add {n}", "add"), "minus": ("subtract {n}", "subtract"), "times": ("multiply by {n}", "multiply")}
EQUATION = re.compile(r"^(\d+) (plus|minus|times|divided by) (\d+) = (-?\d+)$")
RECORD_FIELDS = ("problem", "plan", "steps", "answer", "student_steps", "student_answer", "first_error")
WORD = re.compile(r"\w+|[^\w\s]")


def normalise(text: str) -> str:
    """``text`` as the word-level tokenizer splits and decodes it: words and punctuation marks, one space apart."""
    return " ".join(WORD.findall(text))


# --------------------------------------------------------------------------- the generator


def _chain(rng: random.Random) -> tuple[str, str, list[tuple[int, str, int]]]:
    value, parts, plan, ops = rng.randint(2, 9), [], [], []
    start = value
    for _ in range(rng.randint(2, 4)):
        choices = ["plus"] * (value + 1 <= MAX_VALUE) + ["minus"] * (value >= 1) + ["times"] * (2 * value <= MAX_VALUE)
        op = rng.choice(choices)
        if op == "times":
            n = 2 if 3 * value > MAX_VALUE else rng.randint(2, 3)
        else:
            n = rng.randint(1, min(6, MAX_VALUE - value if op == "plus" else value))
        ops.append((value, op, n))
        parts.append(CHAIN_OPS[op][0].format(n=n))
        plan.append(CHAIN_OPS[op][1])
        value = OPS[op](value, n)
    problem = f"start with {start} , " + " , ".join(parts) + " . what is the result ?"
    return problem, " , then ".join(plan), ops


def _linear(rng: random.Random, held_out: bool) -> tuple[str, str, list[tuple[int, str, int]]]:
    """``a x +- b = c``; a quarter of these few hundred equations is reserved for the held-out split (``held_out``),
    so that held-out linear problems are never training problems."""
    while True:
        a, x, b = rng.randint(2, 4), rng.randint(1, 5), rng.randint(1, 9)
        if rng.random() < 0.5 or a * x - b < 0:
            c, sign, undo = a * x + b, "plus", "minus"
        else:
            c, sign, undo = a * x - b, "minus", "plus"
        if (stable_int("supercorrect-heldout", a, x, b, sign) % 4 == 0) == held_out:
            break
    problem = f"solve {a} x {sign} {b} = {c} for x ."
    plan = f"{'subtract' if undo == 'minus' else 'add'} {b} on both sides , then divide by {a}"
    return problem, plan, [(c, undo, b), (a * x, "divided by", a)]


def _equation(a: int, op: str, b: int, value: int | None = None) -> str:
    return f"{a} {op} {b} = {OPS[op](a, b) if value is None else value}"


def generate(seed: int, split: str, index: int) -> dict:
    """Problem ``index`` of ``split`` (any string: each split its own stream) under ``seed``, as a record (module
    docstring). Every fourth is ``linear`` (split ``heldout`` draws from its own quarter of them), the others
    ``chain``; three students in four err (``first_error`` > 0)."""
    rng = random.Random(stable_int("supercorrect", seed, split, index))
    problem, plan, ops = _linear(rng, split == "heldout") if index % 4 == 3 else _chain(rng)
    steps = [_equation(a, op, b) for a, op, b in ops]
    answer = OPS[ops[-1][1]](ops[-1][0], ops[-1][2])
    record = {"problem": problem, "plan": plan, "steps": steps, "answer": str(answer)}
    if rng.random() < 0.25:
        return record | {"student_steps": list(steps), "student_answer": str(answer), "first_error": 0}
    k = rng.randrange(len(ops))
    for delta in rng.sample([-2, -1, 1, 2], 4):  # the first slip that stays in range and changes the answer
        student, value = steps[:k], None
        for i, (a, op, b) in enumerate(ops[k:], start=k):
            a = a if value is None else value
            exact = OPS[op](a, b)
            value = exact + delta if i == k else exact
            student.append(_equation(a, op, b, value))
        if value != answer and all(0 <= int(s.split(" = ")[1]) <= MAX_VALUE for s in student):
            return record | {"student_steps": student, "student_answer": str(value), "first_error": k + 1}
    return record | {"student_steps": list(steps), "student_answer": str(answer), "first_error": 0}


def generated(seed: int, split: str, count: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``count`` records of ``split``, skipping any whose problem text is in ``exclude`` (held-out problems never
    repeat a training problem)."""
    out, index = [], 0
    while len(out) < count:
        if index >= 100 * count:
            raise ValueError(f"{split}: only {len(out)} of {count} problems are not in the training set after {index} "
                             "draws; ask for fewer held-out problems or more distinct ones.")
        record = generate(seed, split, index)
        index += 1
        if record["problem"] not in exclude:
            out.append(record)
    return out


# --------------------------------------------------------------------------- records: check, read, write


def check_record(record: object, at: str) -> dict:
    """``record`` if it is a well-formed problem record, else a ValueError naming ``at`` (the file and line): every
    field present and typed, and ``first_error`` the student's first step that differs from the teacher's."""
    if not isinstance(record, dict):
        raise ValueError(f"{at}: expected a JSON object with {', '.join(RECORD_FIELDS)}. Fix the line.")
    missing = [f for f in RECORD_FIELDS if f not in record]
    if missing:
        raise ValueError(f"{at}: missing {', '.join(missing)}; a SuperCorrect record has {', '.join(RECORD_FIELDS)} "
                         "(docs/recipes/alignment.md, SuperCorrect). Add them.")
    for name in ("steps", "student_steps"):
        steps = record[name]
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
            raise ValueError(f"{at}: {name} must be a non-empty list of non-empty strings. Fix the line.")
    for name in ("problem", "plan", "answer", "student_answer"):
        if not isinstance(record[name], str) or not record[name].strip():
            raise ValueError(f"{at}: {name} must be a non-empty string. Fix the line.")
    k, steps, student = record["first_error"], record["steps"], record["student_steps"]
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= len(student):
        raise ValueError(f"{at}: first_error ({k!r}) must be 0 (no error) or a step number 1..{len(student)} of "
                         "student_steps. Fix the line.")
    expected = next((i + 1 for i, (s, t) in enumerate(zip(student, steps)) if normalise(s) != normalise(t)), 0)
    if k and k != expected:
        raise ValueError(f"{at}: first_error ({k}) is not the student's first step that differs from the teacher's "
                         f"({expected or 'none differs'}). Fix first_error or the steps.")
    return record


def read_records(path: str | Path) -> list[dict]:
    """The records of a JSONL file, each checked (:func:`check_record`); a ValueError naming the line otherwise."""
    path = Path(path)
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc.msg}). Fix the line.") from None
        records.append(check_record(row, f"{path}:{n}"))
    if not records:
        raise ValueError(f"{path}: no records. Give one JSON object a line.")
    return records


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --------------------------------------------------------------------------- prompts and responses


def solve_prompt(record: dict) -> str:
    return f"solve : {record['problem']}"


def check_prompt(record: dict) -> str:
    """The problem and the student's solution, written plainly (the same in both styles)."""
    return (f"check : {record['problem']} solution : {' , '.join(record['student_steps'])} , answer "
            f"{record['student_answer']}")


def _tagged_steps(steps: list[str], first: int = 1) -> str:
    return " ".join(f"<step {i}> {s}" for i, s in enumerate(steps, start=first))


def solution(record: dict, style: str, steps: list[str] | None = None, answer: str | None = None) -> str:
    """The solve response: the template's ``<plan>`` then ``<step k>`` sections and ``<answer>``, or the plain steps
    and answer; the teacher's unless ``steps``/``answer`` are given."""
    steps, answer = steps or record["steps"], answer or record["answer"]
    if style == "plain":
        return f"{' , '.join(steps)} , answer {answer}"
    return f"<plan> {record['plan']} {_tagged_steps(steps)} <answer> {answer}"


def _verdict(step: int, teacher: str, written: str, wrong: bool) -> str:
    """One ``<check>`` unit of the template: step ``step`` recomputed (the teacher's equation), then the value the
    checked solution wrote there, then the verdict (``ok``, or ``wrong`` where the two values differ)."""
    return f"<step {step}> {teacher} , {written.split(' = ')[-1]} {'wrong' if wrong else 'ok'}"


def review(record: dict, style: str, wrong: int) -> str:
    """The check response that marks step ``wrong`` (1-based; 0: none) as the first wrong one, with the teacher's
    fix from there. The template walks the steps up to it in ``<check>``, each recomputed before its verdict
    (:func:`_verdict`: the detailed thought that makes the verdict a comparison of two written values), then
    ``<fix>`` carries on from the corrected step and ``<answer>``; plain writes ``step k wrong`` and the steps from
    k."""
    steps, student, answer = record["steps"], record["student_steps"], record["answer"]
    if style == "plain":
        return (f"step {wrong} wrong , {' , '.join(steps[wrong - 1:])} , answer {answer}" if wrong
                else f"no wrong step , answer {answer}")
    units = [_verdict(i, steps[i - 1], student[i - 1], i == wrong) for i in range(1, (wrong or len(steps)) + 1)]
    fix = f" <fix> {_tagged_steps(steps[wrong:], wrong + 1)}".rstrip() if wrong else ""
    return f"<check> {' '.join(units)}{fix} <answer> {answer}"


def student_review(record: dict, style: str) -> str:
    """The student's own check of its solution: every step accepted (recomputed from its own values), its own
    answer."""
    student, answer = record["student_steps"], record["student_answer"]
    if style == "plain":
        return f"no wrong step , answer {answer}"
    units = [_verdict(i, s, s, False) for i, s in enumerate(student, start=1)]
    return f"<check> {' '.join(units)} <answer> {answer}"


def sft_rows(record: dict, style: str) -> list[dict]:
    """Two SFT rows (docs/data.md format preference; ``lm`` learns ``chosen``): solve (the teacher's solution;
    rejected the student's) and check (the teacher's review of the student's solution; rejected the student's own
    review)."""
    student = solution(record, style, record["student_steps"], record["student_answer"])
    return [{"prompt": solve_prompt(record), "chosen": solution(record, style), "rejected": student, "task": "solve"},
            {"prompt": check_prompt(record), "chosen": review(record, style, record["first_error"]),
             "rejected": student_review(record, style), "task": "check"}]


def dpo_pairs(record: dict, style: str = "template") -> list[dict]:
    """The collaborative pairs at the student's first wrong step k (none without an error), docs/data.md format
    preference: solve (prompt: the problem and the teacher's plan and steps before k; chosen: the teacher's step k
    on; rejected: the student's) and check (prompt: the problem, the student's solution and the review up to k;
    chosen: the teacher's ``step k wrong`` and fix; rejected: the student's review, accepting step k)."""
    k = record["first_error"]
    if not k:
        return []
    steps, student = record["steps"], record["student_steps"]
    if style == "plain":
        prefix = " ".join(f"{s} ," for s in steps[:k - 1])
        chosen, rejected = solution(record, style, steps[k - 1:]), solution(
            record, style, student[k - 1:], record["student_answer"])
        review_prefix, review_chosen = "", review(record, style, k)
        review_rejected = student_review(record, style)
    else:
        prefix = f"<plan> {record['plan']} {_tagged_steps(steps[:k - 1])}".rstrip()
        chosen = f"{_tagged_steps(steps[k - 1:], k)} <answer> {record['answer']}"
        rejected = f"{_tagged_steps(student[k - 1:], k)} <answer> {record['student_answer']}"
        review_prefix = "<check> " + "".join(f"{_verdict(i, steps[i - 1], steps[i - 1], False)} " for i in range(1, k))
        review_chosen = review(record, style, k)[len(review_prefix):]
        review_rejected = student_review(record, style)[len(review_prefix):]
    return [{"prompt": f"{solve_prompt(record)} {prefix}".rstrip(), "chosen": chosen, "rejected": rejected,
             "task": "solve", "first_error": k},
            {"prompt": f"{check_prompt(record)} {review_prefix}".rstrip(), "chosen": review_chosen.strip(),
             "rejected": review_rejected.strip(), "task": "check", "first_error": k}]


def vocabulary_texts(seed: int = 0, count: int = 24) -> list[str]:
    """Every word the generator writes (numbers 0..MAX_VALUE + 9, the problems', plans' and both styles' words and
    tags; a test checks that no generated row meets an unknown token), for the tokenizer."""
    numbers = " ".join(str(n) for n in range(MAX_VALUE + 10))
    texts = [numbers, "step ok wrong no answer check solve solution fix plan then , : . ? < > =",
             "start with what is the result solve x for on both sides add subtract divide by",
             " ".join(OPS), " ".join(w for phrase, verb in CHAIN_OPS.values() for w in (phrase, verb))]
    for i in range(count):
        record = generate(seed, "vocabulary", i)
        for style in STYLES:
            texts += [v for row in sft_rows(record, style) + dpo_pairs(record, style) for v in row.values()
                      if isinstance(v, str)]
    return texts
