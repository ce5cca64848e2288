"""SuperCorrect (recipes.alignment.supercorrect*): the generator's exact steps and marked first error, the
collaborative DPO pairs, the scorer on hand-made answers, the steps' argument checks, the data and evaluation steps,
and the pipelines' validation (a phase's data_dir read from an earlier step's artifact)."""

from __future__ import annotations

import copy

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import recipes.alignment  # noqa: F401  (registers the recipe)
from orchestrator.cli import app
from orchestrator.recipes import import_recipe
from orchestrator.steps import STEPS, StepContext, check_step_args
from planner.errors import SpecError
from planner.pipeline import parse_pipeline, phase_job
from recipes.alignment import supercorrect as scs
from recipes.alignment import supercorrect_data as sc
from recipes.alignment.supercorrect_model import write_model

import_recipe("alignment")
PIPELINES = Path(recipes.alignment.__file__).parent / "pipeline"
RECORDS = sc.generated(0, "test", 300)


def _parsed(step: str) -> tuple[int, str, int, int]:
    a, op, b, c = sc.EQUATION.match(step).groups()
    return int(a), op, int(b), int(c)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("supercorrect") / "supercorrect", num_hidden_layers=1, hidden_size=32,
                       intermediate_size=64)


def test_teacher_steps_are_exact_and_chained():
    kinds = set()
    for record in RECORDS:
        steps = [_parsed(s) for s in record["steps"]]
        numbers = [int(n) for n in re.findall(r"\d+", record["problem"])]
        kinds.add(record["problem"].split()[0])
        first = numbers[0] if record["problem"].startswith("start") else numbers[-1]  # start value, or c of a x +- b = c
        assert steps[0][0] == first
        for (a, op, b, c), following in zip(steps, steps[1:] + [None]):
            assert c == sc.OPS[op](a, b) and 0 <= c <= sc.MAX_VALUE
            assert op != "divided by" or a % b == 0  # the teacher divides exactly
            if following:
                assert following[0] == c  # each step reads the previous value
        assert record["answer"] == str(steps[-1][3])
        if record["problem"].startswith("solve"):  # the answer solves the equation
            a, sign, b, c = re.match(r"solve (\d+) x (plus|minus) (\d+) = (\d+)", record["problem"]).groups()
            assert sc.OPS[sign](int(a) * int(record["answer"]), int(b)) == int(c)
    assert kinds == {"start", "solve"}


def test_the_student_errs_first_at_the_marked_step():
    erring = [r for r in RECORDS if r["first_error"]]
    assert 0.6 < len(erring) / len(RECORDS) < 0.9
    assert {r["first_error"] for r in erring} >= {1, 2, 3}
    for record in RECORDS:
        k, student = record["first_error"], [_parsed(s) for s in record["student_steps"]]
        assert record["student_steps"][:max(k - 1, 0)] == record["steps"][:max(k - 1, 0)]
        if not k:
            assert record["student_steps"] == record["steps"] and record["student_answer"] == record["answer"]
            continue
        a, op, b, c = student[k - 1]
        assert c != sc.OPS[op](a, b)  # the slip is at step k ...
        for (a, op, b, c), following in zip(student[k:], student[k + 1:] + [None]):
            assert c == sc.OPS[op](a, b)  # ... and only there: the student carries on from its wrong value
        assert student[k][0] == student[k - 1][3] if k < len(student) else True
        assert record["student_answer"] != record["answer"]
        sc.check_record(record, "x")


def test_a_record_whose_first_error_is_not_the_first_difference_is_refused(tmp_path):
    record = next(r for r in RECORDS if r["first_error"] == 1 and len(r["steps"]) > 2)
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps(record | {"first_error": 2}) + "\n")
    with pytest.raises(ValueError, match=r"problems.jsonl:1: first_error \(2\) is not the student's first step that "
                                         r"differs from the teacher's \(1\)"):
        sc.read_records(path)
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "plan"}) + "\n")
    with pytest.raises(ValueError, match=r"problems.jsonl:1: missing plan;"):
        sc.read_records(path)


def test_dpo_pairs_split_at_the_first_wrong_step():
    assert all(not sc.dpo_pairs(r) for r in RECORDS if not r["first_error"])
    for record in [r for r in RECORDS if r["first_error"]][:60]:
        k = record["first_error"]
        solve, check = sc.dpo_pairs(record)
        teacher = sc.solution(record, "template")
        student = sc.solution(record, "template", record["student_steps"], record["student_answer"])
        assert sc.normalise(f"{solve['prompt']} {solve['chosen']}") == sc.normalise(f"{sc.solve_prompt(record)} {teacher}")
        assert sc.normalise(f"{solve['prompt']} {solve['rejected']}") == sc.normalise(
            f"{sc.solve_prompt(record)} {student}")
        assert solve["prompt"].endswith(record["steps"][k - 2] if k > 1 else record["plan"])  # correct steps before k
        assert solve["chosen"].startswith(f"<step {k}> {record['steps'][k - 1]}")
        assert solve["rejected"].startswith(f"<step {k}> {record['student_steps'][k - 1]}")
        student_value = record["student_steps"][k - 1].split(" = ")[1]
        # the teacher recomputes step k, reads the student's value and rejects it; the student accepts its own
        assert check["chosen"].startswith(f"<step {k}> {record['steps'][k - 1]} , {student_value} wrong <fix>")
        assert check["rejected"].startswith(f"<step {k}> {record['student_steps'][k - 1]} , {student_value} ok")
        assert check["prompt"].endswith("<check>" if k == 1 else f"{record['steps'][k - 2].split(' = ')[1]} ok")
        assert sc.normalise(f"{check['prompt']} {check['chosen']}") == sc.normalise(
            f"{sc.check_prompt(record)} {sc.review(record, 'template', k)}")


RECORD = {"problem": "start with 7 , add 5 , multiply by 2 .", "plan": "add , then multiply",
          "steps": ["7 plus 5 = 12", "12 times 2 = 24"], "answer": "24", "student_steps": ["7 plus 5 = 12",
          "12 times 2 = 26"], "student_answer": "26", "first_error": 2}


@pytest.mark.parametrize("solved, checked, expected", [
    ("<plan> add , then multiply <step 1> 7 plus 5 = 12 <step 2> 12 times 2 = 24 <answer> 24",
     "<check> step 1 ok , step 2 wrong <fix> <step 2> 12 times 2 = 24 <answer> 24", (True, True, True)),
    ("7 plus 5 = 12 , 12 times 2 = 24 , answer 24", "step 2 wrong , 12 times 2 = 24 , answer 24", (True, True, True)),
    ("<answer> 26", "<check> step 1 wrong <fix> <step 1> 7 plus 5 = 12 <answer> 24", (False, False, False)),
    ("<answer> 24 <answer> 25", "<check> step 1 ok , step 2 wrong <fix> <step 2> 12 times 2 = 25 <answer> 25",
     (False, True, False)),  # the last answer counts; located, but the fix writes a wrong value
    ("", "<check> step 1 ok , step 2 ok <answer> 26", (False, False, False)),  # misses the error
    ("answer 24", "step 2 wrong , 12 times 2 = 24 , answer 26", (True, True, False)),  # right step, wrong answer
    ("answer 24", "<check> <step 1> 7 plus 5 = 12 , 12 ok <step 2> 12 times 2 = 24 , 26 wrong <fix> <answer> 24",
     (True, True, True)),  # the template's review: the recomputed step k is its fix
    ("answer 24", "<check> <step 1> 7 plus 5 = 13 , 12 wrong <step 2> 12 times 2 = 24 , 26 wrong <answer> 24",
     (True, False, False)),  # a false alarm at step 1 comes first
    ("answer 24", "<check> <step 1> 7 plus 5 = 12 , 12 ok <step 2> 12 times 2 = 26 , 26 ok <answer> 26",
     (True, False, False)),  # accepts the student's step
])
def test_the_scorer_on_hand_made_answers(solved, checked, expected):
    result = scs.score(RECORD, solved, checked)
    assert (result["answer_correct"], result["located"], result["fixed"]) == expected
    right = scs.score(RECORD | {"first_error": 0, "student_steps": RECORD["steps"]}, solved, checked)
    assert right == {"answer_correct": expected[0], "false_alarm": "wrong" in checked}  # shown a right solution


def test_rates_count_located_over_erring_and_false_alarms_over_right_solutions():
    rows = [{"first_error": 2, "answer_correct": True, "located": True, "fixed": False},
            {"first_error": 1, "answer_correct": False, "located": False, "fixed": False},
            {"first_error": 0, "answer_correct": True, "false_alarm": True},
            {"first_error": 0, "answer_correct": True, "false_alarm": False},
            {"first_error": 0, "answer_correct": False, "false_alarm": False}]
    assert scs.rates(rows) == {"answer_accuracy": 0.6, "first_error_located": 0.5, "first_error_fixed": 0.0,
                               "false_alarm_rate": pytest.approx(1 / 3)}
    # a model that marks step 1 wrong on every check locates only the errors at step 1, and every right solution
    # counts against it
    flags = [scs.score(r, "", "step 1 wrong , answer 0") for r in RECORDS[:80]]
    rates = scs.rates([dict(f, first_error=r["first_error"]) for f, r in zip(flags, RECORDS)])
    at_one = [r for r in RECORDS[:80] if r["first_error"] == 1]
    assert rates["false_alarm_rate"] == 1.0 and rates["first_error_located"] == pytest.approx(
        len(at_one) / sum(1 for r in RECORDS[:80] if r["first_error"]))


@pytest.mark.parametrize("step, args, message", [
    ("supercorrect_data", {"style": "fancy"}, "phases[0].args.style ('fancy'): expected one of template, plain"),
    ("supercorrect_data", {"train": 0}, "phases[0].args.train (0): expected a number of problems in 1..100000"),
    ("supercorrect_data", {"heldout": "nowhere.jsonl"}, "phases[0].args.heldout ('nowhere.jsonl'): no such file."),
    ("supercorrect_data", {"trian": 5}, "phases[0].args.trian: unknown argument of step 'supercorrect_data'"),
    ("supercorrect_data", {"check_rows": 0}, "phases[0].args.check_rows (0): expected an integer in 1..10"),
    ("supercorrect_eval", {"problems": "@data/data/x.jsonl"}, "phases[0].args.model: required"),
    ("supercorrect_eval", {"model": "@a/model", "problems": "@d/data/p", "new_tokens": 0},
     "phases[0].args.new_tokens (0): expected an integer in 1..512."),
])
def test_bad_step_args_are_one_error_line(tmp_path, step, args, message):
    with pytest.raises(SpecError) as caught:
        check_step_args(step, args, "phases[0].args", tmp_path)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_data_and_eval_steps_end_to_end(tmp_path, model):
    data = StepContext("data", {"style": "template", "train": 24, "heldout": 4}, tmp_path / "data", tmp_path)
    reported = STEPS["supercorrect_data"].run(data)
    folder = data.artifact("data")
    sft = [json.loads(line) for line in (folder / "train" / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (folder / "train" / "preference.jsonl").read_text().splitlines()]
    assert reported == {"problems": 24, "student_errors": pytest.approx(sum(bool(p["first_error"]) for p in
                        sc.generated(0, "train", 24)) / 24), "dpo_pairs": len(pairs)}
    assert len(sft) == 48 and len(pairs) == 2 * round(reported["student_errors"] * 24)
    heldout = sc.read_records(folder / "heldout" / "problems.jsonl")
    assert len(heldout) == 4 and not {r["problem"] for r in heldout} & {r["problem"] for r in sc.generated(0, "train",
                                                                                                            24)}
    # check_rows writes each check row that many times, the solve rows once
    heavy = StepContext("heavy", {"train": 24, "heldout": 4, "check_rows": 3}, tmp_path / "heavy", tmp_path)
    STEPS["supercorrect_data"].run(heavy)
    rows = [json.loads(line) for line in (heavy.artifact("data") / "train" / "sft.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == ["solve", "check", "check", "check"] * 24
    assert [r for r in rows if r["task"] == "check"][::3] == [r for r in sft if r["task"] == "check"]
    # a real-data file in the documented format goes through the same code
    real = StepContext("real", {"train": str(folder / "train" / "problems.jsonl"), "heldout": 2}, tmp_path / "real")
    assert STEPS["supercorrect_data"].run(real)["problems"] == 24
    ctx = StepContext("eval", {"model": str(model), "problems": str(folder / "heldout" / "problems.jsonl"),
                               "new_tokens": 4}, tmp_path / "eval")
    metrics = STEPS["supercorrect_eval"].run(ctx)
    assert set(metrics) == set(STEPS["supercorrect_eval"].metrics) and all(0 <= v <= 1 for v in metrics.values())
    assert len((tmp_path / "eval" / "answers.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("name", ["supercorrect-tiny", "supercorrect-baseline-tiny"])
def test_the_pipelines_validate(tmp_path, model, name):
    text = (PIPELINES / f"{name}.yaml").read_text().replace("../models/supercorrect", str(model))
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(text)
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 0 and "valid" in result.output, result.output
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace("style: ", "style: fancy", 1).replace("fancytemplate", "fancy").replace(
        "fancyplain", "fancy"))
    refused = CliRunner().invoke(app, ["validate", str(broken)])
    assert refused.exit_code == 2 and refused.output.count("error:") == 1 and "args.style ('fancy')" in refused.output


def test_a_phase_reads_its_data_dir_from_an_earlier_step(tmp_path, model):
    doc = yaml.safe_load((PIPELINES / "supercorrect-tiny.yaml").read_text().replace("../models/supercorrect",
                                                                                    str(model)))
    steps = {name: step.writes for name, step in STEPS.items()}
    pipeline = parse_pipeline(doc, steps, tmp_path)
    dpo = pipeline.phase("dpo")
    assert dpo.job.data_dir == str(Path("out/supercorrect-tiny/errors/data").resolve())  # plan time: where it will be
    located = phase_job(pipeline.doc, dpo.spec, tmp_path, locate=lambda ref, sub: model if ref.artifact == "model"
                        else tmp_path / ref.phase / ref.artifact)
    assert located.data_dir == str((tmp_path / "errors" / "data").resolve())
    from orchestrator.pipeline import PipelineRunner, reads_data_artifacts
    from orchestrator.run import RunOptions

    dpo_only = copy.deepcopy(doc)  # the DPO task alone: data_dir is the phase's only reference to the data step
    dpo_only["phases"][3]["tasks"] = dpo_only["phases"][3]["tasks"][:1]
    pipeline = parse_pipeline(dpo_only, steps, tmp_path)
    assert reads_data_artifacts(pipeline.phase("dpo"))  # so its data is checked when it starts, not before
    PipelineRunner(pipeline, RunOptions(out_dir=tmp_path / "out")).check()
    doc["phases"][3]["data_dir"] = "@eval/data"
    with pytest.raises(SpecError, match=r"phases\[3\].data_dir \('@eval/data'\) reads a later phase's"):
        parse_pipeline(doc, steps, tmp_path)


def test_every_generated_row_tokenizes_without_unknown_words(model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    for record in RECORDS[:120]:
        for style in sc.STYLES:
            for row in sc.sft_rows(record, style) + sc.dpo_pairs(record, style):
                for side in ("chosen", "rejected"):
                    ids = tokenizer(f"{row['prompt']} {row[side]}")["input_ids"]
                    assert tokenizer.unk_token_id not in ids and len(ids) <= 120  # the pipelines' seq_len
                    assert tokenizer.decode(ids) == sc.normalise(f"{row['prompt']} {row[side]}")


def _trained_steps(doc: dict) -> dict[str, int]:
    """Each trained phase's steps: its own ``training.steps``, else the spec's."""
    return {phase["name"]: phase.get("training", {}).get("steps", doc["training"]["steps"])
            for phase in doc["phases"] if "tasks" in phase}


def test_the_baseline_trains_as_many_steps_as_hsft_and_dpo_together_on_the_same_problems():
    tiny = yaml.safe_load((PIPELINES / "supercorrect-tiny.yaml").read_text())
    baseline = yaml.safe_load((PIPELINES / "supercorrect-baseline-tiny.yaml").read_text())
    steps = _trained_steps(tiny)
    assert set(steps) == {"hsft", "dpo"} and steps["hsft"] > steps["dpo"]
    assert _trained_steps(baseline) == {"sft": steps["hsft"] + steps["dpo"]}
    data = {doc["name"]: next(p["args"] for p in doc["phases"] if p.get("step") == "supercorrect_data")
            for doc in (tiny, baseline)}
    assert data["supercorrect-tiny"].pop("style") == "template"
    assert data["supercorrect-baseline-tiny"].pop("style") == "plain"
    assert data["supercorrect-tiny"] == data["supercorrect-baseline-tiny"]  # same problems, seed and check rows
    assert (tiny["training"]["lr"], tiny["training"]["seed"]) == (baseline["training"]["lr"], baseline["training"]["seed"])
