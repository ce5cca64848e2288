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
    assert [p["task"] for p in pairs] == ["check", "check"]
    missed, alarm = pairs
    assert missed["prompt"].endswith("< check > < step 1 > 7 plus 5 = 12 , 12 ok")
    assert missed["chosen"] == sc.normalise(teacher[teacher.index("<step 2>"):])
    assert missed["rejected"] == "< step 2 > 12 times 2 = 26 , 26 ok < answer > 26"
    assert alarm["prompt"].endswith("< check >") and alarm["chosen"].startswith("< step 1 > 7 plus 5 = 12 , 12 ok")
    assert sc.normalise(f"{missed['prompt']} {missed['chosen']}") == sc.normalise(
        f"{sc.check_prompt(RECORD)} {teacher}")


@pytest.mark.parametrize("args, message", [
    ({"problems": "@data/data/train/problems.jsonl"}, "phases[0].args.model (None): required"),
    ({"model": "@hsft/model/policy"}, "phases[0].args.problems: required"),
    ({"model": "@hsft/model/policy", "problems": "nowhere.jsonl"}, "phases[0].args.problems ('nowhere.jsonl'): no such"),
    ({"model": "@hsft/model/policy", "problems": "@d/data/p", "limit": 0}, "phases[0].args.limit (0): expected a whole"),
    ({"model": "@hsft/model/policy", "problems": "@d/data/p", "top": 1}, "phases[0].args.top: unknown argument"),
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
    assert reported == {"problems": 5, "solve_wrong": 1.0, "check_wrong": 1.0, "dpo_pairs": 10} and len(pairs) == 10
    for pair, record in zip(pairs[0::2], records):
        assert pair["prompt"] == sc.normalise(sc.solve_prompt(record)) and pair["first_error"] == 1
        assert pair["chosen"] == sc.normalise(sc.solution(record, "template")) and pair["rejected"]
