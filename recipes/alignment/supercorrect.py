"""SuperCorrect (Yang et al., arXiv 2410.09008) as phases of recipe ``alignment``: the data step, the evaluation step
and its scorer, and the tiny model the CPU pipelines train.

- step ``supercorrect_data`` (writes ``data``): problem records (generated, or a JSONL of the documented format:
  recipes.alignment.supercorrect_data) -> ``data/train/sft.jsonl`` (solve and check rows, hierarchical template or
  plain style; each check row ``check_rows`` times), ``data/train/preference.jsonl`` (the cross-model collaborative DPO pairs at the first wrong step: a
  ``dpo`` phase reads them with ``data_dir: "@<phase>/data"``), ``data/{train,heldout}/problems.jsonl``.
- step ``supercorrect_eval`` (reports metrics, gateable): greedy answers of a model folder to held-out problems,
  scored by :func:`score`: ``answer_accuracy`` (solve prompts), ``first_error_located`` and ``first_error_fixed``
  (check prompts showing a student solution with an error: is the first step the model marks wrong the student's
  first wrong step, and does its fix write that step's exact equation and the right answer), and
  ``false_alarm_rate`` (check prompts showing a right solution: does the model mark any step wrong; a model that
  flags every step locates every error at step 1 and cannot hide it here).
The tiny model: recipes.alignment.supercorrect_model.

Pipelines: recipes/alignment/pipeline/supercorrect-tiny.yaml (HSFT -> cross DPO -> eval) and
supercorrect-baseline-tiny.yaml (plain SFT -> eval); docs/recipes/alignment.md, SuperCorrect.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from planner.pipeline import StepContext, check_known_args
from recipes.alignment import supercorrect_data as sc

DATA_DEFAULTS = {"style": "template", "train": 2000, "heldout": 128, "seed": 0, "check_rows": 1}
EVAL_DEFAULTS = {"limit": None, "new_tokens": 64}  # 64: above the longest response (53 tokens)
DATA_METRICS = ("problems", "student_errors", "dpo_pairs")
EVAL_METRICS = ("answer_accuracy", "first_error_located", "first_error_fixed", "false_alarm_rate")
EVAL_BATCH = 64  # prompts decoded together (left-padded: each decodes as it would alone); on CPU a decoding step costs
# about the same for 16 rows as for 64
ANSWER = re.compile(r"answer (?:> )?(-?\d+)")
MARKED_WRONG = re.compile(r"step (\d+) (?:> [^<]*?)?wrong")  # plain ``step k wrong``; the template's unit ``<step k> ... wrong``


# --------------------------------------------------------------------------- argument checks (torch-free)


def _count_or_file(args: dict, key: str, base: Path | None, top: int) -> None:
    value = args.get(key, DATA_DEFAULTS[key])
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= top:
            raise ValueError(f"{key} ({value}): expected a number of problems in 1..{top} or a JSONL file of "
                             "problem records. Fix the value.")
        return
    if not isinstance(value, str):
        raise ValueError(f"{key} ({value!r}): expected a number of problems to generate or a JSONL file of problem "
                         "records (docs/recipes/alignment.md, SuperCorrect). Fix the value.")
    if not value.startswith("@") and not StepContext("", {}, Path(), base).path(value).is_file():
        raise ValueError(f"{key} ({value!r}): no such file. Point it at a JSONL file of problem records.")


def check_data_args(args: dict[str, Any], base: Path | None) -> None:
    """``style`` (template | plain), ``train`` / ``heldout`` (a count to generate or a records file), ``seed``,
    ``check_rows`` (each check row written that many times, 1..10: the check task's weight in the SFT rows)."""
    check_known_args(args, sorted(DATA_DEFAULTS), "supercorrect_data")
    style = args.get("style", "template")
    if style not in sc.STYLES:
        raise ValueError(f"style ({style!r}): expected one of {', '.join(sc.STYLES)} (template: SuperCorrect's "
                         "hierarchical thought template; plain: the same steps without it). Fix the value.")
    _count_or_file(args, "train", base, 100_000)
    _count_or_file(args, "heldout", base, 10_000)
    seed = args.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed ({seed!r}): expected an integer >= 0. Fix the value.")
    rows = args.get("check_rows", 1)
    if not isinstance(rows, int) or isinstance(rows, bool) or not 1 <= rows <= 10:
        raise ValueError(f"check_rows ({rows!r}): expected an integer in 1..10 (how many times each check row is "
                         "written). Fix the value.")


def check_eval_args(args: dict[str, Any], base: Path | None) -> None:
    """``model`` (a from_pretrained folder or reference), ``problems`` (a records file or reference), optional
    ``limit`` (problems scored, > 0) and ``new_tokens`` (1..512)."""
    check_known_args(args, sorted({"model", "problems", *EVAL_DEFAULTS}), "supercorrect_eval")
    for key, kind in (("model", "is_dir"), ("problems", "is_file")):
        value = args.get(key)
        if not isinstance(value, str):
            raise ValueError(f"{key}: required, a {'model folder' if key == 'model' else 'JSONL file of problem records'}"
                             " or a reference ('@<phase>/...'). Add it.")
        if not value.startswith("@") and not getattr(StepContext("", {}, Path(), base).path(value), kind)():
            raise ValueError(f"{key} ({value!r}): no such {'folder' if kind == 'is_dir' else 'file'}. Fix the path.")
    for key, top in (("limit", 1_000_000), ("new_tokens", 512)):
        value = args.get(key, EVAL_DEFAULTS[key])
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top):
            raise ValueError(f"{key} ({value!r}): expected an integer in 1..{top}. Fix the value.")


# --------------------------------------------------------------------------- the data step


def _records(ctx: StepContext, key: str, seed: int, exclude: set[str]) -> list[dict]:
    value = ctx.args.get(key, DATA_DEFAULTS[key])
    if isinstance(value, str):
        return sc.read_records(ctx.path(value))
    return sc.generated(seed, key, value, exclude)


def data_step(ctx: StepContext) -> dict[str, float]:
    """Write the ``data`` artifact (module docstring); report the train problems, the fraction whose student errs,
    and the DPO pairs."""
    style, seed = ctx.args.get("style", "template"), ctx.args.get("seed", 0)
    out = ctx.artifact("data")
    train = _records(ctx, "train", seed, set())
    heldout = _records(ctx, "heldout", seed, {r["problem"] for r in train})
    pairs = [p for r in train for p in sc.dpo_pairs(r)]
    sc.write_jsonl(out / "train" / "problems.jsonl", train)
    solve_check = [sc.sft_rows(r, style) for r in train]
    sc.write_jsonl(out / "train" / "sft.jsonl", [row for solve, check in solve_check
                                                  for row in [solve] + [check] * ctx.args.get("check_rows", 1)])
    sc.write_jsonl(out / "train" / "preference.jsonl", pairs)
    sc.write_jsonl(out / "heldout" / "problems.jsonl", heldout)
    sc.write_jsonl(out / "heldout" / "preference.jsonl", [p for r in heldout for p in sc.dpo_pairs(r)])
    errors = sum(1 for r in train if r["first_error"]) / len(train)
    return {"problems": len(train), "student_errors": errors, "dpo_pairs": len(pairs)}


# --------------------------------------------------------------------------- the scorer and the evaluation step


def _answer(text: str) -> str | None:
    found = ANSWER.findall(sc.normalise(text))
    return found[-1] if found else None


def score(record: dict, solved: str, checked: str) -> dict[str, bool]:
    """One problem's outcome from the model's answer to its solve prompt (``solved``) and to its check prompt
    (``checked``): ``answer_correct`` (the last ``answer N`` is the teacher's), and, for a record whose student errs
    at step k, ``located`` (the first step marked wrong, ``step j wrong`` or the template's ``<step j> ... wrong``,
    has j = k) and ``fixed`` (located, the teacher's step k equation written from that mark on, and the right
    answer); for a record whose student is right, ``false_alarm`` (some step marked wrong)."""
    out = {"answer_correct": _answer(solved) == sc.normalise(record["answer"])}
    k = record["first_error"]
    text = sc.normalise(checked)
    marked = MARKED_WRONG.search(text)
    if not k:
        return out | {"false_alarm": marked is not None}
    located = marked is not None and int(marked.group(1)) == k
    fixed = (located and sc.normalise(record["steps"][k - 1]) in text[marked.start():]
             and _answer(text) == sc.normalise(record["answer"]))
    return out | {"located": located, "fixed": fixed}


def evaluate(model, tokenizer, records: list[dict], new_tokens: int = EVAL_DEFAULTS["new_tokens"]) -> tuple[dict[str, float], list[dict]]:
    """(metrics, one row per record with the model's answers and its outcome) of greedy decoding (module docstring)."""
    from recipes.alignment.generation import greedy

    solved = greedy(model, tokenizer, [sc.solve_prompt(r) for r in records], new_tokens, EVAL_BATCH)
    checked = greedy(model, tokenizer, [sc.check_prompt(r) for r in records], new_tokens, EVAL_BATCH)
    rows = [{"problem": r["problem"], "first_error": r["first_error"], "solved": s, "checked": c} | score(r, s, c)
            for r, s, c in zip(records, solved, checked)]
    return rates(rows), rows


def rates(rows: list[dict]) -> dict[str, float]:
    """:data:`EVAL_METRICS` of scored rows (:func:`score`): located and fixed over the rows whose student errs, false
    alarms over the others (0 when there are none)."""
    erring = [row for row in rows if row["first_error"]]
    right = [row for row in rows if not row["first_error"]]
    return {"answer_accuracy": sum(row["answer_correct"] for row in rows) / len(rows),
            "first_error_located": sum(row["located"] for row in erring) / max(1, len(erring)),
            "first_error_fixed": sum(row["fixed"] for row in erring) / max(1, len(erring)),
            "false_alarm_rate": sum(row["false_alarm"] for row in right) / max(1, len(right))}


def eval_step(ctx: StepContext) -> dict[str, float]:
    """Score ``model`` on ``problems``; the rows go to ``OUT/<phase>/answers.jsonl``."""
    from recipes.alignment.generation import load

    records = sc.read_records(ctx.path(ctx.args["problems"]))[:ctx.args.get("limit") or None]
    model, tokenizer = load(ctx.path(ctx.args["model"]))
    metrics, rows = evaluate(model, tokenizer, records, ctx.args.get("new_tokens", EVAL_DEFAULTS["new_tokens"]))
    sc.write_jsonl(ctx.out_dir / "answers.jsonl", rows)
    return metrics
