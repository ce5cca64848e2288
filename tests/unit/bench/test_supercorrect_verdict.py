"""bench/alignment/supercorrect_verdict.py: the rows of each variant, and the reading of a model's own review units
(recomputation right; verdict agreeing with the unit's own two values)."""

from __future__ import annotations

from bench.alignment.supercorrect_verdict import own_units, rows_of
from recipes.alignment import supercorrect_data as sc

RECORD = {"problem": "start with 7 , add 5 , multiply by 2 .", "plan": "add , then multiply",
          "steps": ["7 plus 5 = 12", "12 times 2 = 24"], "answer": "24", "student_steps": ["7 plus 5 = 12",
          "12 times 2 = 26"], "student_answer": "26", "first_error": 2}


def test_check_rows_repeat_and_unit_rows_end_at_each_verdict():
    solve, check = sc.sft_rows(RECORD, "template")
    assert rows_of([RECORD], 3, False) == [solve, check, check, check]
    units = rows_of([RECORD], 1, True)[2:]
    assert [u["chosen"] for u in units] == ["< step 1 > 7 plus 5 = 12 , 12 ok", "< step 2 > 12 times 2 = 24 , 26 wrong"]
    for unit in units:  # prompt and unit are a prefix of the whole review
        assert sc.normalise(f"{check['prompt']} {check['chosen']}").startswith(f"{unit['prompt']} {unit['chosen']}")
    assert rows_of([RECORD], 1, False, "plain") == sc.sft_rows(RECORD, "plain")


def test_own_units_read_the_recomputation_and_the_verdict():
    answers = [{"checked": "< check > < step 1 > 7 plus 5 = 12 , 12 ok < step 2 > 12 times 2 = 24 , 26 ok < answer > 26"},
               {"checked": "< check > < step 1 > 7 plus 5 = 13 , 12 wrong < step 2 > 12 times 2 = 26 , 26 wrong"},
               {"checked": "step 2 wrong , 12 times 2 = 24 , answer 24"}]  # plain: no units
    assert own_units(answers) == {"units": 4, "recomputed_right": 2, "verdict_consistent": 2,
                                  "ok_when_values_differ": 1, "wrong_when_values_equal": 1}
