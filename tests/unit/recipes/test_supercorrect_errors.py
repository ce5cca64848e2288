"""SuperCorrect's pairs from the student's own errors (recipes.alignment.supercorrect_errors): the split at the first
template section that leaves the teacher's, on hand-made answers; the step's argument checks; the step end to end on a
tiny random model."""

from __future__ import annotations

import json

import pytest

from orchestrator.recipes import import_recipe
from orchestrator.steps import STEPS, StepContext, check_step_args
from planner.errors import SpecError
from recipes.alignment import supercorrect_data as sc
from recipes.alignment import supercorrect_errors as errors
from recipes.alignment.supercorrect_model import write_model

import_recipe("alignment")
RECORD = {"problem": "start with 7 , add 5 , multiply by 2 .", "plan": "add , then multiply",
          "steps": ["7 plus 5 = 12", "12 times 2 = 24"], "answer": "24", "student_steps": ["7 plus 5 = 12",
          "12 times 2 = 26"], "student_answer": "26", "first_error": 2}


def test_a_solution_splits_at_its_first_wrong_step():
    answer = "<plan> add , then multiply <step 1> 7 plus 5 = 12 <step 2> 12 times 2 = 25 <answer> 25"
    pair = errors.first_error_pair(sc.solve_prompt(RECORD), sc.solution(RECORD, "template"), answer)
    assert pair == {"prompt": "solve : start with 7 , add 5 , multiply by 2 . < plan > add , then multiply < step 1 > "
                              "7 plus 5 = 12", "chosen": "< step 2 > 12 times 2 = 24 < answer > 24",
                    "rejected": "< step 2 > 12 times 2 = 25 < answer > 25", "first_error": 3}
    assert errors.first_error_pair(sc.solve_prompt(RECORD), sc.solution(RECORD, "template"),
                                   sc.solution(RECORD, "template")) is None  # a right answer gives no pair
    assert errors.first_error_pair("p", "<answer> 24", "<answer> 24 <answer> 25") is None  # nothing to prefer


def test_a_review_splits_where_it_first_misjudges():
    teacher = sc.review(RECORD, "template", 2)
    accepts = "<check> <step 1> 7 plus 5 = 12 , 12 ok <step 2> 12 times 2 = 26 , 26 ok <answer> 26"
    false_alarm = "<check> <step 1> 7 plus 5 = 13 , 12 wrong <fix> <step 2> 13 times 2 = 26 <answer> 26"
    pairs = errors.own_error_pairs([RECORD, RECORD], [sc.solution(RECORD, "template")] * 2, [accepts, false_alarm])
    assert [(p["task"], p["kind"]) for p in pairs] == [("check", "missed"), ("check", "false_alarm")]
    missed, alarm = pairs
    assert missed["prompt"].endswith("< check > < step 1 > 7 plus 5 = 12 , 12 ok")
    assert missed["chosen"] == sc.normalise(teacher[teacher.index("<step 2>"):])
    assert missed["rejected"] == "< step 2 > 12 times 2 = 26 , 26 ok < answer > 26"
    assert alarm["prompt"].endswith("< check >") and alarm["chosen"].startswith("< step 1 > 7 plus 5 = 12 , 12 ok")
    assert sc.normalise(f"{missed['prompt']} {missed['chosen']}") == sc.normalise(
        f"{sc.check_prompt(RECORD)} {teacher}")


def test_a_slip_under_the_right_verdict_is_neither_kind():
    slip = "<check> <step 1> 7 plus 5 = 12 , 12 ok <step 2> 12 times 2 = 25 , 26 wrong <fix> <answer> 24"
    stops = "<check> <step 1> 7 plus 5 = 12 , 12 ok <answer> 26"
    pairs = errors.own_error_pairs([RECORD, RECORD], [sc.solution(RECORD, "template")] * 2, [slip, stops])
    assert [p["kind"] for p in pairs] == ["other", "other"]


def test_balancing_keeps_as_many_missed_errors_as_false_alarms():
    pairs = [{"task": "solve", "n": 0}] + [{"task": "check", "kind": "missed", "n": n} for n in range(1, 6)] + [
        {"task": "check", "kind": "false_alarm", "n": n} for n in (6, 7)] + [{"task": "check", "kind": "other", "n": 8}]
    kept = errors.balanced(pairs, seed=3)
    kinds = [p.get("kind", p["task"]) for p in kept]
    assert kinds.count("missed") == kinds.count("false_alarm") == 2 and {"solve", "other"} <= set(kinds)
    assert [p["n"] for p in kept] == sorted(p["n"] for p in kept)  # every pair in its place
    assert kept == errors.balanced(pairs, seed=3)  # a seeded draw
    assert {p["n"] for seed in range(20) for p in errors.balanced(pairs, seed)} == set(range(9))  # of any of them
    assert errors.balanced([p for p in pairs if p.get("kind") != "false_alarm"], 0) == [pairs[0], pairs[-1]]


@pytest.mark.parametrize("args, message", [
    ({"problems": "@data/data/train/problems.jsonl"}, "phases[0].args.model (None): required"),
    ({"model": "@hsft/model/policy"}, "phases[0].args.problems: required"),
    ({"model": "@hsft/model/policy", "problems": "nowhere.jsonl"}, "phases[0].args.problems ('nowhere.jsonl'): no such"),
    ({"model": "@hsft/model/policy", "problems": "@d/data/p", "limit": 0}, "phases[0].args.limit (0): expected a whole"),
    ({"model": "@hsft/model/policy", "problems": "@d/data/p", "top": 1}, "phases[0].args.top: unknown argument"),
    ({"model": "@hsft/model/policy", "problems": "@d/data/p", "balance": "yes"}, "phases[0].args.balance ('yes'): "
     "expected true"),
    ({"model": "@hsft/model/policy", "problems": "@d/data/p", "seed": -1}, "phases[0].args.seed (-1): expected a whole"),
])
def test_bad_args_are_one_error_line(tmp_path, args, message):
    with pytest.raises(SpecError) as caught:
        check_step_args("supercorrect_errors", args, "phases[0].args", tmp_path)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_the_step_writes_pairs_from_a_models_answers(tmp_path):
    model = write_model(tmp_path / "supercorrect", num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    records = sc.generated(0, "train", 6)
    sc.write_jsonl(tmp_path / "problems.jsonl", records)
    ctx = StepContext("errors", {"model": str(model), "problems": str(tmp_path / "problems.jsonl"), "limit": 5,
                                 "new_tokens": 6}, tmp_path / "errors")
    reported = STEPS["supercorrect_errors"].run(ctx)
    pairs = [json.loads(line) for line in (tmp_path / "errors/data/train/preference.jsonl").read_text().splitlines()]
    # a random model writes 6 words of nonsense: every answer is wrong in its first section
    assert reported["problems"] == 5 and reported["solve_wrong"] == reported["check_wrong"] == 1.0
    # nonsense carries no verdict: every check pair is of kind other, none is dropped by the balancing
    assert reported["missed_errors"] == reported["false_alarms"] == 0 and reported["dpo_pairs"] == len(pairs) == 10
    assert {p.get("kind") for p in pairs} == {None, "other"}
    for pair, record in zip(pairs[0::2], records):
        assert pair["prompt"] == sc.normalise(sc.solve_prompt(record)) and pair["first_error"] == 1
        assert pair["chosen"] == sc.normalise(sc.solution(record, "template")) and pair["rejected"]
