"""SysBench and FB-Bench (recipes.alignment.{judge,sysbench,fbbench,judge_steps}): the rule judges on hand-made
answers (each rule passing and failing), the metrics on hand-made verdicts, the judge endpoint against a local stub
server, the steps' argument checks, the committed data against a fresh generation, and a gated `loom run` that
passes and one that stops (exit 1, one error line)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from recipes.alignment import fbbench, judge_data, sysbench
from recipes.alignment.judge import Criterion, EndpointJudge, JudgeError, check_rule, rule_verdicts
from recipes.alignment.judge_steps import check_fbbench_args, check_sysbench_args

RULE_CASES = [  # (rule, an answer it accepts, one it refuses)
    ({"kind": "include", "word": "tides"}, "waves tides sand", "waves sand ."),
    ({"kind": "forbid", "word": "ships"}, "waves tides", "ships and tides"),
    ({"kind": "starts_with", "word": "guide"}, "guide waves .", "waves guide ."),
    ({"kind": "ends_with", "word": "done"}, "snow ice done", "snow done ice"),
    ({"kind": "words", "n": 3}, "1 . snow 2 . ice 3 . fire", "snow ice ."),
    ({"kind": "max_words", "n": 2}, "snow ice .", "snow ice fire"),
    ({"kind": "only_words", "words": ["snow", "ice"]}, "snow ice snow", "snow ships"),
    ({"kind": "format", "form": "list"}, "1 . snow 2 . ice", "1 . snow 3 . ice"),
    ({"kind": "format", "form": "period"}, "snow ice .", "snow ice"),
    ({"kind": "format", "form": "lower"}, "snow ice .", "Snow ice ."),
    ({"kind": "number", "value": -3}, "sorry , the answer is minus 3 .", "the answer is 3 ."),
    ({"kind": "not_number", "value": 14}, "the answer is 12 .", "yes , it is 14 ."),
]


@pytest.mark.parametrize("rule, good, bad", RULE_CASES, ids=[f"{r['kind']}-{i}" for i, (r, _, _) in
                                                              enumerate(RULE_CASES)])
def test_each_rule_judge_accepts_a_satisfying_answer_and_refuses_a_violating_one(rule, good, bad):
    criterion = Criterion("1", "hand-made", "content", None, rule)
    assert check_rule(rule) is None
    assert rule_verdicts([criterion], good) == [True] and rule_verdicts([criterion], bad) == [False]


def test_malformed_rules_are_named():
    assert "kind" in check_rule({"kind": "rhymes"})
    assert "`n` must be a int" in check_rule({"kind": "words", "n": "3"})
    assert "form" in check_rule({"kind": "format", "form": "upper"})
    assert "unknown key(s) x" in check_rule({"kind": "include", "word": "a", "x": 1})


def turn(alignment: str, *types: str) -> sysbench.Turn:
    return sysbench.Turn("hi", tuple(Criterion(str(i), "c", t) for i, t in enumerate(types)), alignment)


def test_sysbench_metrics_are_the_papers_csr_isr_ssr_on_hand_made_verdicts():
    related = sysbench.Session("a", "sys", (turn("align", "role", "format"), turn("misalign", "role", "format"),
                                            turn("align", "role", "format")), related=True)
    parallel = sysbench.Session("b", "sys", (turn("align", "style"), turn("misalign", "style")))
    judged = [[[True, True], [True, False], [True, True]], [[True], [True]]]
    found = sysbench.metrics([related, parallel], judged)
    assert found["csr"] == pytest.approx(7 / 8)  # satisfied criteria / criteria
    assert found["isr"] == pytest.approx(4 / 5)  # fully satisfied turns / turns
    assert found["ssr"] == pytest.approx((1 / 3 + 2 / 2) / 2)  # leading satisfied turns / turns, per session
    assert found["isr_misalign"] == pytest.approx(1 / 2) and found["isr_align"] == 1.0
    assert found["ssr_related"] == pytest.approx(1 / 3) and found["ssr_parallel"] == 1.0
    assert found["csr_format"] == pytest.approx(2 / 3) and found["csr_role"] == 1.0 and "csr_action" not in found


def test_synthetic_references_satisfy_every_criterion_and_answers_that_ignore_the_system_message_do_not():
    sessions = [sysbench.session(0, "check", i) for i in range(60)]
    answers = [[t.reference for t in s.turns] for s in sessions]
    assert sysbench.metrics(sessions, sysbench.judge_sessions(sessions, answers)) == pytest.approx(
        sysbench.metrics(sessions, [[[True] * len(t.criteria) for t in s.turns] for s in sessions]))
    ignoring = [[" ".join(s.system.split()[4:8])] * len(s.turns) for s in sessions]
    assert sysbench.metrics(sessions, sysbench.judge_sessions(sessions, ignoring))["isr"] < 0.2
    kinds = {c.rule["kind"] for s in sessions for t in s.turns for c in t.criteria}
    assert kinds == {"include", "forbid", "starts_with", "ends_with", "words", "max_words", "only_words", "format"}
    assert {t.alignment for s in sessions for t in s.turns} == {"align", "misalign"}
    assert {s.related for s in sessions} == {True, False}
    items = [fbbench.item(0, "check", i) for i in range(40)]
    found, _ = fbbench.evaluate(items, lambda prompts: [it.reference for it in items])
    assert found["score"] == pytest.approx(1.0)
    found, _ = fbbench.evaluate(items, lambda prompts: [it.first_response for it in items])
    assert found["error_correction"] < 0.5 and found["response_maintenance"] == pytest.approx(1.0)


def test_fbbench_scores_items_by_weights_and_macro_averages_cells():
    weighted = (Criterion("1", "a", weight=0.7), Criterion("2", "b", weight=0.3))
    assert fbbench.item_score(weighted, [True, False]) == pytest.approx(0.7)
    assert fbbench.item_score(weighted, [False, False]) == 0.0
    unweighted = (Criterion("1", "a"), Criterion("2", "b"))
    assert fbbench.item_score(unweighted, [False, True]) == 1.0  # FB-Bench: a satisfied unweighted item scores 1

    def it(bench, task):
        return fbbench.Item("x", bench, task, "q", "f", "fb", weighted)
    items = [it("error_correction", "mathematics"), it("error_correction", "mathematics"),
             it("error_correction", "text_creation"), it("response_maintenance", "mathematics")]
    found = fbbench.metrics(items, [1.0, 0.0, 0.4, 0.9])
    assert found["error_correction"] == pytest.approx((0.5 + 0.4) / 2)  # a macro average over task types
    assert found["score"] == pytest.approx((0.5 + 0.4 + 0.9) / 3)  # over (bench type, task type) cells


class StubJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions: replies server.replies in turn, records the request bodies."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append((self.path, self.headers.get("Authorization"), body))
        reply = self.server.replies.pop(0)
        if reply == "sleep":
            time.sleep(1.0)
            reply = "{}"
        if isinstance(reply, int):
            self.send_error(reply)
            return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def stub():
    server = HTTPServer(("127.0.0.1", 0), StubJudge)
    server.seen, server.replies = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_the_judge_endpoint_is_asked_per_answer_and_fails_in_one_line(stub, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "k123")
    url = f"http://127.0.0.1:{stub.server_port}"
    judge = EndpointJudge(url, "judge-model", "JUDGE_KEY", timeout_s=0.5, retries=1)
    s = sysbench.session(0, "stub", 0, turns=1)
    count = len(s.turns[0].criteria)
    verdict = {str(i + 1): "yes" if i else "no" for i in range(count)}
    stub.replies += ["not json", "```json\n" + json.dumps({"results": verdict}) + "\n```"]  # one retry, then JSON
    found, rows = sysbench.evaluate([s], lambda prompts: ["guide waves ."], judge)
    assert rows[0]["verdicts"] == [[False] + [True] * (count - 1)] and found["isr"] == 0.0
    path, auth, body = stub.seen[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer k123" and body["model"] == "judge-model"
    assert "guide waves ." in body["messages"][1]["content"] and s.turns[0].criteria[0].content in body[
        "messages"][1]["content"]
    stub.replies += ["nope", "still nope"]
    with pytest.raises(JudgeError, match=r"2 replies without verdicts .* expected JSON"):
        judge.verdicts("ctx", "answer", s.turns[0].criteria)
    stub.replies.append(500)
    with pytest.raises(JudgeError, match=r"HTTP 500") as err:
        judge.verdicts("ctx", "answer", s.turns[0].criteria)
    assert "\n" not in str(err.value)
    stub.replies.append("sleep")
    with pytest.raises(JudgeError, match=r"no reply within 0.5 s"):
        judge.verdicts("ctx", "answer", s.turns[0].criteria)
    with pytest.raises(JudgeError, match="cannot connect"):
        EndpointJudge("http://127.0.0.1:9", "m", timeout_s=0.5).verdicts("ctx", "answer", s.turns[0].criteria)


def test_step_args_are_checked_before_anything_runs(tmp_path):
    model = str(tmp_path)
    check_sysbench_args({"model": "@sft/model", "sessions": 4, "judge": {"url": "http://h:1", "model": "m"}}, None)
    bad = [({"model": model, "sesions": 4}, "sesions: unknown argument of step 'sysbench'"),
           ({}, r"model \(None\): required"),
           ({"model": str(tmp_path / "nope")}, "model .*: no such folder"),
           ({"model": model, "turns": 0}, r"turns \(0\): expected a whole number in 1\.\.20"),
           ({"model": model, "judge": {"url": "ftp://x", "model": "m"}}, "judge.url"),
           ({"model": model, "judge": {"url": "http://x", "model": "m", "api_key_env": "NO_SUCH_VAR_X"}},
            "judge.api_key_env .*no such environment variable"),
           ({"model": model, "data": "missing.jsonl"}, "data .*no such file")]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            check_sysbench_args(args, tmp_path)
    (tmp_path / "s.jsonl").write_text('{"system": "x", "turns": [{"user": "u", "criteria": [{"content": "c"}]}]}\n')
    with pytest.raises(ValueError, match=r"line 1.turns\[0\]: a criterion without `rule`, and no judge endpoint"):
        check_sysbench_args({"model": model, "data": "s.jsonl"}, tmp_path)
    check_sysbench_args({"model": model, "data": "s.jsonl", "judge": {"url": "http://h", "model": "m"}}, tmp_path)
    (tmp_path / "f.jsonl").write_text(json.dumps({"bench_type": "Error Correction", "user_query": "q",
                                                  "origin_first_response": "a", "feedback": "f",
                                                  "checklist": [["right", 1.5]]}) + "\n")
    with pytest.raises(ValueError, match=r"checklist\[0\].weight \(1.5\): expected a number in \(0, 1\]"):
        check_fbbench_args({"model": model, "data": "f.jsonl"}, tmp_path)


def test_committed_data_is_a_fresh_generation_in_the_documented_formats(tmp_path):
    committed = judge_data.HERE / "data" / "judges"
    for path in judge_data.write_data(tmp_path):
        assert path.read_text() == (committed / path.relative_to(tmp_path)).read_text(), path
    sessions = sysbench.load_sessions(committed / "heldout" / "sysbench.jsonl", need_rules=True)
    assert [s.to_json() for s in sessions] == [s.to_json() for s in sysbench.synthetic(judge_data.HELDOUT)]
    items = fbbench.load_items(committed / "heldout" / "fbbench.jsonl", need_rules=True)
    assert [it.to_json() for it in items] == [it.to_json() for it in fbbench.synthetic(judge_data.HELDOUT)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return judge_data.write_model(tmp_path_factory.mktemp("judges") / "model", num_hidden_layers=1, hidden_size=32,
                                  intermediate_size=64)


def test_a_gated_pipeline_reports_metrics_and_stops_below_its_bound(tiny_model, tmp_path):
    from orchestrator.cli import app

    doc = {"name": "judged", "recipe": "alignment", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
           "components": {"policy": {"pretrained": str(tiny_model)}}, "training": {"steps": 1},
           "phases": [{"name": "sysbench", "step": "sysbench",
                       "args": {"model": str(tiny_model), "sessions": 2, "turns": 2, "new_tokens": 4},
                       "gate": {"csr": 0.0}},
                      {"name": "fbbench", "step": "fbbench", "args": {"model": str(tiny_model), "items": 4,
                                                                      "new_tokens": 4},
                       "gate": {"score": {"min": 0.99}}}]}
    spec = tmp_path / "judged.yaml"
    spec.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "phases[1] ('fbbench'): score = " in errors[0] and "min 0.99" in errors[0]
    reported = json.loads((tmp_path / "out" / "sysbench" / "metrics.json").read_text())
    assert set(reported) >= {"csr", "isr", "ssr"} and all(0 <= v <= 1 for v in reported.values())
    rows = (tmp_path / "out" / "sysbench" / "report" / "answers.jsonl").read_text().splitlines()
    assert len(rows) == 2 and len(json.loads(rows[0])["answers"]) == 2
    assert json.loads((tmp_path / "out" / "fbbench" / "metrics.json").read_text())["score"] < 0.99


def test_sysbench_releases_convert_to_sessions_that_an_endpoint_judges(tmp_path):
    record = {"system_id": 7, "system_prompt": "you are a guide", "rounds_related": True,
              "messages": [{"role": "system", "content": "you are a guide"}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "guide hello"}, {"role": "user", "content": "more"},
                           {"role": "assistant", "content": "guide more"}],
              "prompt_infos": {"hi": {"alignment": "align", "criteria": {"1": {"criteria_id": 1, "criteria_content":
                                      "starts with guide", "criteria_type": "Role"}}},
                               "more": {"alignment": "misalign", "criteria": {"1": {"criteria_id": 1,
                                        "criteria_content": "short", "criteria_type": "Style"}}}}}
    (tmp_path / "sb.jsonl").write_text(json.dumps(sysbench.from_sysbench(record)) + "\n")
    with pytest.raises(ValueError, match="no judge endpoint"):
        sysbench.load_sessions(tmp_path / "sb.jsonl", need_rules=True)
    [s] = sysbench.load_sessions(tmp_path / "sb.jsonl", need_rules=False)
    assert s.related and [t.alignment for t in s.turns] == ["align", "misalign"]
    assert [t.reference for t in s.turns] == ["guide hello", "guide more"] and s.turns[0].criteria[0].type == "Role"
    assert sysbench.render(s, ["guide hello"]) == ("system : you are a guide user : hi assistant : guide hello "
                                                   "user : more assistant :")


def test_the_judges_pipeline_gates_declared_metrics():
    from orchestrator.pipeline import read_pipeline

    pipeline = read_pipeline(judge_data.HERE / "pipeline" / "judges-tiny.yaml")
    gated = {p.name: p.spec.gate for p in pipeline.phases if p.spec.gate}
    assert set(gated) == {"sft_sysbench", "sft_fbbench"}
    assert set(gated["sft_sysbench"]) <= set(sysbench.METRICS) and set(gated["sft_fbbench"]) <= set(fbbench.METRICS)


def test_the_model_arg_reads_a_folder_an_export_or_one_of_its_components(tmp_path):
    from recipes.alignment.judge_steps import model_folder

    for name in ("policy", "reference"):
        (tmp_path / "export" / name).mkdir(parents=True)
        (tmp_path / "export" / name / "config.json").write_text("{}")
    export = tmp_path / "export"
    assert model_folder(export / "policy", "policy") == export / "policy"  # `@dpo/model` + component, resolved
    assert model_folder(export, "reference") == export / "reference"
    assert model_folder(export, None) == export / "policy"  # a DPO export: the policy, not its frozen reference
    (export / "policy" / "config.json").unlink()
    assert model_folder(export, None) == export / "reference"  # the only one
    with pytest.raises(ValueError, match="holds 0 of them; name one with `component`"):
        model_folder(export / "policy", None)
