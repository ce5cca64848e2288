"""BUTTON in recipe alignment: the world's tools and compositions exactly, call parsing and execution on hand-made
turns (a malformed turn scores 0 and never crashes), the task file, the steps' args, the pipelines, and the data and
evaluation steps end to end on a tiny untrained model."""

from __future__ import annotations

import json

import pytest

from orchestrator.recipes import import_recipe
from orchestrator.steps import STEPS, StepContext, check_step_args
from planner.errors import SpecError
from recipes.alignment import button_steps
from recipes.alignment.button import KINDS, Composition, generate, heldout, load_tasks, templates
from recipes.alignment.button_eval import play, score
from recipes.alignment.button_world import TOOLS, Call, CallError, ToolError, execute, parse_turn, shift, weekday

import_recipe("alignment")  # registers the phase steps, as loom does for a job naming the recipe

FUNCTIONS = ("price", "multiply", "add", "stock")


def c(name: str, **arguments) -> Call:
    return Call(name, tuple((k, str(v)) for k, v in arguments.items()))


def task(question: str, parallel: bool = True) -> Composition:
    """The generated composition of ``question`` (its plan), offered ``FUNCTIONS``."""
    for kind, pool in templates().items():
        for q, steps in pool:
            if q == question:
                return Composition(kind, q, FUNCTIONS if kind != "sequential" or "weekday" not in q else
                                   ("shift", "weekday"), parallel, steps)
    raise KeyError(question)


def test_the_tools_are_exact():
    assert [TOOLS["price"]({"item": "apple"}), TOOLS["stock"]({"item": "fish"})] == ["3", "3"]
    assert TOOLS["multiply"]({"a": "6", "b": "7"}) == "42" and TOOLS["add"]({"a": "12", "b": "3"}) == "15"
    assert shift(12, 3) == 15 and [weekday(1), weekday(8), weekday(10), weekday(31)] == [
        "monday", "monday", "wednesday", "wednesday"]
    for bad in (lambda: TOOLS["price"]({"item": "car"}), lambda: shift(30, 5), lambda: weekday(0),
                lambda: TOOLS["add"]({"a": "x", "b": "1"})):
        with pytest.raises(ToolError):
            bad()
    assert execute(c("price", item="car")) == "error" and execute(c("shift", day=2, days=3)) == "5"


def test_compositions_run_their_plans_and_write_three_agent_trajectories():
    cost = task("how much do 4 apple cost ?", parallel=False)
    assert cost.kind == "sequential" and cost.answer() == "12"
    assert cost.gold_calls() == [c("price", item="apple"), c("multiply", a=3, b=4)]  # $1 became price's result
    assert cost.messages() == [
        {"role": "system", "content": "functions : price ( item ) : the price of one item ; multiply ( a , b ) : a "
         "times b ; add ( a , b ) : a plus b ; stock ( item ) : how many of an item are in stock . call one "
         "function at a time ."},
        {"role": "user", "content": "how much do 4 apple cost ?"},
        {"role": "assistant", "content": "call price ( item = apple )"},
        {"role": "tool", "content": "price ( item = apple ) = 3"},
        {"role": "assistant", "content": "call multiply ( a = 3 , b = 4 )"},
        {"role": "tool", "content": "multiply ( a = 3 , b = 4 ) = 12"},
        {"role": "assistant", "content": "answer 12"}]
    pair = task("how much do one apple and one pear cost together ?")
    assert pair.kind == "parallel" and pair.answer() == "7"
    assert [m["content"] for m in pair.messages()[2:]] == [
        "call price ( item = apple ) ; price ( item = pear )", "price ( item = apple ) = 3 ; price ( item = pear ) = 4",
        "call add ( a = 3 , b = 4 )", "add ( a = 3 , b = 4 ) = 7", "answer 7"]
    serial = task("how much do one apple and one pear cost together ?", parallel=False).messages()
    assert [m["content"] for m in serial[2:6]] == ["call price ( item = apple )", "price ( item = apple ) = 3",
                                                   "call price ( item = pear )", "price ( item = pear ) = 4"]
    assert task("what weekday is 3 days after day 7 ?").answer() == "wednesday"
    assert task("how much are all the cheese in stock worth ?").answer() == "32"


def test_functions_come_from_the_composition_and_held_out_questions_are_never_trained():
    train = generate(KINDS, "train", 0, 600)
    assert [t.kind for t in train[:6]] == ["atomic", "sequential", "parallel"] * 2
    for t in train:
        used = {call.name for call in t.gold_calls()}
        assert used < set(t.functions) and len(t.functions) == len(used) + 1  # its tools and one distractor
        assert not heldout(t.question)
    held = generate(("sequential", "parallel"), "heldout", 0)
    assert held and all(heldout(t.question) for t in held) and {t.kind for t in held} == {"sequential", "parallel"}
    assert generate(KINDS, "train", 0, 30) == train[:30] and generate(KINDS, "train", 1, 30) != train[:30]


@pytest.mark.parametrize("text", [
    "", "hello", "answer", "answer 3 4", "call", "call price", "call price item = apple", "call price ( item = apple",
    "call price ( item apple )", "call price ( item = )", "call price ( )", "call price ( item = apple , item = pear )",
    "call price ( thing = apple )", "call weekday ( day = 3 )", "call lamp ( item = apple )",
    "call price ( item = apple ) price ( item = pear )", "call price ( item = apple ) ;",
    "call add ( a = 1 b = 2 )", "call add ( a = 1 , b = 2 , c = 3 )"])
def test_malformed_turns_are_refused(text):
    with pytest.raises(CallError):
        parse_turn(text, FUNCTIONS)


def test_well_formed_turns_parse():
    assert parse_turn("answer 12", FUNCTIONS) == "12"
    assert parse_turn("call price ( item = apple ) ; add ( b = 2 , a = 1 )", FUNCTIONS) == [
        c("price", item="apple"), Call("add", (("b", "2"), ("a", "1")))]
    assert parse_turn("call price ( item = car )", FUNCTIONS) == [c("price", item="car")]  # the tool says error


def scripted(turns: dict[str, list[str]]):
    """A responder that answers each task (by its question) with the next of its scripted turns."""
    state = {q: list(t) for q, t in turns.items()}
    return lambda conversations: [state[m[1]["content"]].pop(0) for m in conversations]


def test_episodes_execute_the_calls_and_score_them():
    cost, pair = task("how much do 4 apple cost ?"), task("how many apple and fish are in stock together ?")
    right = {cost.question: ["call price ( item = apple )", "call multiply ( a = 4 , b = 3 )", "answer 12"],
             pair.question: ["call stock ( item = fish ) ; stock ( item = apple )", "call add ( a = 3 , b = 12 )",
                             "answer 15"]}
    episodes = play([cost, pair], scripted(right))
    assert episodes[0].messages[3] == {"role": "tool", "content": "price ( item = apple ) = 3"}
    assert score(episodes) == {"task_success": 1.0, "argument_accuracy": 1.0, "malformed_rate": 0.0,
                               "task_success_sequential": 1.0, "task_success_parallel": 1.0}
    wrong = {cost.question: ["call price ( item = pear )", "call multiply ( a = 4 , b = 4 )", "answer 16"],
             pair.question: ["call stock ( item = fish ) stock ( item = apple )"]}  # malformed: no ';'
    episodes = play([cost, pair], scripted(wrong))
    assert [e.malformed for e in episodes] == [False, True] and episodes[1].calls == []
    assert score(episodes) == {"task_success": 0.0, "argument_accuracy": 0.0, "malformed_rate": 0.5,
                               "task_success_sequential": 0.0, "task_success_parallel": 0.0}
    partial = {cost.question: ["call price ( item = apple )", "answer 3"],
               pair.question: ["call stock ( item = fish ) ; stock ( item = apple ) ; stock ( item = fish )",
                               "call add ( a = 15 , b = 0 )", "answer 15"]}
    metrics = score(play([cost, pair], scripted(partial)))
    assert metrics["task_success"] == 0.5 and metrics["argument_accuracy"] == pytest.approx(3 / 5)
    looping = {cost.question: ["call price ( item = apple )"] * 3, pair.question: ["answer"] * 3}
    episodes = play([cost, pair], scripted(looping), max_turns=3)
    assert [e.answer for e in episodes] == [None, None] and len(episodes[0].calls) == 3
    assert score(episodes)["argument_accuracy"] == pytest.approx(1 / 5)


def test_the_task_file_round_trips_and_bad_lines_name_their_line(tmp_path):
    tasks = generate(KINDS, "train", 3, 12)
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(t.to_json()) + "\n" for t in tasks))
    assert load_tasks(path) == tasks
    good = tasks[1].to_json()
    for change, match in [({"calls": [[{"name": "multiply", "arguments": {"a": "$1", "b": "2"}}]]}, r"'\$1' is not"),
                          ({"functions": ["price", "fly"]}, "must list tools"), ({"answer": "99"}, "not what the "),
                          ({"calls": [[{"name": "price", "arguments": {"item": "car"}}]]}, "outside its tool"),
                          ({"calls": [[{"name": "price", "arguments": {"thing": "x"}}]]}, "price takes item")]:
        path.write_text(json.dumps(tasks[0].to_json()) + "\n" + json.dumps(good | change) + "\n")
        with pytest.raises(ValueError, match=rf"line 2: .*{match}"):
            load_tasks(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1"):
        load_tasks(path)


def test_step_args_are_checked(tmp_path):
    check_step_args("button_data", {"kinds": ["atomic"], "rows": 10}, "phases[0].args", tmp_path)
    check_step_args("button_eval", {"model": "@sft/model", "component": "policy", "limit": 5}, "phases[2].args",
                    tmp_path)
    for step, bad, match in [
        ("button_data", {"kinds": ["atomic", "nested"]}, r"args\.kinds \(\['atomic', 'nested'\]\): expected"),
        ("button_data", {"rows": 0}, r"args\.rows \(0\): expected a whole number"),
        ("button_data", {"tasks": "missing.jsonl"}, r"args\.tasks .*missing\.jsonl\): no such file"),
        ("button_data", {"row": 3}, r"args\.row: unknown argument of step 'button_data'"),
        ("button_eval", {}, r"args\.model \(None\): required"),
        ("button_eval", {"model": "@sft/model", "max_turns": 0}, r"args\.max_turns \(0\)"),
        ("button_eval", {"model": "@sft/model", "kinds": "parallel"}, r"args\.kinds \('parallel'\)")]:
        with pytest.raises(SpecError, match=match):
            check_step_args(step, bad, "phases[0].args", tmp_path)


def test_the_pipelines_are_checked_whole():
    from orchestrator.pipeline import read_pipeline

    for name, kinds in [("button-tiny", ["atomic", "sequential", "parallel"]), ("button-atomic", ["atomic"])]:
        pipeline = read_pipeline(button_steps.HERE / "pipeline" / f"{name}.yaml")
        assert [(p.name, p.spec.step) for p in pipeline.phases] == [
            ("data", "button_data"), ("sft", None), ("eval", "button_eval")]
        assert pipeline.phases[0].spec.args["kinds"] == kinds and pipeline.phases[2].spec.args["model"] == "@sft/model"
    assert read_pipeline(button_steps.HERE / "pipeline" / "button-tiny.yaml").phases[2].spec.gate["task_success"].min


def test_the_steps_write_chat_data_and_evaluate_a_model(tmp_path):
    from runtime.tokenizer import encode_chat
    from transformers import AutoTokenizer

    folder = button_steps.write_model(tmp_path / "model", num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    STEPS["button_data"].run(StepContext("data", {"rows": 24}, tmp_path / "data"))
    rows = [json.loads(line) for line in (tmp_path / "data" / "data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and rows[0]["messages"] == generate(KINDS, "train", 0, 1)[0].messages()
    (tmp_path / "mine.jsonl").write_text((tmp_path / "data" / "data" / "tasks.jsonl").read_text().split("\n", 1)[1])
    STEPS["button_data"].run(StepContext("mine", {"tasks": "mine.jsonl"}, tmp_path / "mine", tmp_path))
    assert (tmp_path / "mine" / "data" / "train.jsonl").read_text().splitlines() == [
        json.dumps(row) for row in rows[1:]]  # a task file gives the same trajectories as the generator's tasks
    tokenizer = AutoTokenizer.from_pretrained(folder)
    doc = encode_chat(tokenizer, rows[1]["messages"], "row 1")
    assert tokenizer.unk_token_id not in doc.ids
    learned = tokenizer.decode([i for i in doc.labels if i >= 0])
    assert learned.split()[0] == "call" and learned.split()[-2:] == [rows[1]["messages"][-1]["content"].split()[-1],
                                                                      "<|im_end|>"]  # the assistant's turns only
    assert rows[1]["messages"][1]["content"].split()[0] not in learned.split()
    metrics = STEPS["button_eval"].run(StepContext("eval", {"model": str(folder), "limit": 6, "max_turns": 2,
                                                            "new_tokens": 8}, tmp_path / "eval"))
    assert set(metrics) == {"task_success", "argument_accuracy", "malformed_rate", "task_success_sequential"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
