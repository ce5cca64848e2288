"""planner.pipeline: a phased job's spec (phase names, tasks or a step, references to earlier phases' artifacts)
checked as one SpecError line naming phases[i], and each trained phase as the JobSpec it plans as."""

from __future__ import annotations

import copy

import pytest

from planner.errors import SpecError
from planner.pipeline import (
    TRAINED_WRITES, artifact_path, is_phased, parse_pipeline, parse_reference, phase_document,
)
from planner.spec import parse_job

STEPS = {"average": ("model",), "rank": ("dataset",)}
TASK = {"name": "cls", "batch_size": 4, "loss": "cross_entropy", "components": [{"component": "enc"}]}
JOB = {
    "name": "three",
    "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
    "components": {
        "enc": {"kind": "transformer", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "seq_len": 6},
        "other": {"kind": "mlp", "num_layers": 1, "hidden_size": 16},
    },
    "training": {"steps": 5, "lr": 0.01},
    "phases": [
        {"name": "a", "tasks": [TASK]},
        {"name": "pick", "step": "rank", "args": {"from": "@a/checkpoint"}},
        {"name": "b", "tasks": [{**TASK, "data": {"format": "text", "path": "@pick/dataset/train.jsonl"}}],
         "training": {"steps": 3}},
    ],
}


def doc_with(**changes) -> dict:
    doc = copy.deepcopy(JOB)
    for index, phase in changes.items():
        doc["phases"][int(index[1:])] = phase
    return doc


def error_of(doc: dict) -> str:
    with pytest.raises(SpecError) as info:
        parse_pipeline(doc, STEPS)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_three_phases_become_two_jobs_and_a_step():
    pipeline = parse_pipeline(copy.deepcopy(JOB), STEPS)
    assert [p.name for p in pipeline.phases] == ["a", "pick", "b"]
    a, pick, b = pipeline.phases
    assert a.writes == TRAINED_WRITES and pick.writes == ("dataset",) and pick.job is None
    assert a.job.name == "three.a" and b.job.name == "three.b"
    assert a.job.training.steps == 5 and b.job.training.steps == 3 and b.job.training.lr == 0.01  # override, kept
    assert list(a.job.components) == ["enc"]  # only the components its tasks use
    # plan time: the dataset does not exist; its path is where the artifact will be under out/<job>
    assert b.job.tasks[0].data.path.endswith("out/three/pick/dataset/train.jsonl")


def test_a_job_without_phases_is_not_a_pipeline_and_a_phased_one_is_not_a_job():
    plain = {k: v for k, v in JOB.items() if k != "phases"} | {"tasks": [TASK]}
    assert not is_phased(plain) and is_phased(JOB)
    assert parse_job(plain).name == "three"
    with pytest.raises(SpecError, match="phases: a phased job"):
        parse_job(copy.deepcopy(JOB))


@pytest.mark.parametrize("phase, expected", [
    ({"name": "b", "tasks": [TASK], "components": {"enc": {"pretrained": "@zz/model"}}},
     "phases[2].components.enc.pretrained ('@zz/model'): no phase is named 'zz'"),
    ({"name": "b", "step": "average", "args": {"models": ["@a/model", "@pick/model"]}},
     "phases[2].args.models[1] ('@pick/model'): phase 'pick' writes no artifact 'model'; it writes 'dataset'"),
    ({"name": "b", "step": "average", "args": {"models": ["@b/model"]}},
     "phases[2].args.models[0] ('@b/model') reads its own artifact: a cycle in the phase order"),
    ({"name": "b", "step": "rank", "args": {"x": "@a/model/enc/extra"}}, None),  # a sub path is fine
    ({"name": "b", "step": "rnak"}, "phases[2].step ('rnak') is not a registered step; did you mean 'rank'?"),
    ({"name": "b", "step": "rank", "tasks": [TASK]},
     "phases[2]: phase 'b' has both `tasks` and `step`; a phase either trains tasks or runs one step"),
    ({"name": "b"}, "phases[2]: phase 'b' has neither `tasks` nor `step`"),
    ({"name": "a", "tasks": [TASK]}, "phases[2].name ('a') is not unique (also phases[0].name)"),
    ({"name": "b/..", "tasks": [TASK]}, "phases[2].name: ('b/..') is not a safe phase name"),
    ({"name": "logs", "tasks": [TASK]}, "phases[2].name: ('logs') is not a safe phase name"),
    ({"name": "b", "tasks": [TASK], "components": {"ecn": {"lr": 0.1}}},
     "phases[2].components.ecn: not a component of the job (declare components once at the top); did you mean "
     "'enc'?"),
    ({"name": "b", "tasks": [TASK], "training": {"stpes": 3}}, "phases[2] ('b'): training.stpes: unknown key"),
    ({"name": "b", "tasks": [TASK], "components": {"enc": {"pretrained": "@a/model"}}},
     "component 'enc' is declared without `pretrained:` at the top, so Loom has no shape to plan it with"),
    ({"name": "b", "tasks": [TASK], "colour": 1}, "phases[2].colour: unknown key"),
    ({"name": "b", "tasks": [TASK], "args": {"x": 1}}, "phase 'b' trains tasks but has `args`"),
    ({"name": "b", "step": "rank", "args": {"x": "@a"}}, "phases[2].args.x ('@a') is not a reference"),
    ({"name": "b", "step": "rank", "args": {"x": "@a/model/../../../../etc"}},
     "phases[2].args.x ('@a/model/../../../../etc') leads out of the artifact"),
])
def test_bad_phases_are_one_line_naming_the_phase(phase, expected):
    doc = doc_with(p2=phase)
    if expected is None:
        assert parse_pipeline(doc, STEPS).phases[2].spec.args == phase["args"]
        return
    assert expected in error_of(doc)


def test_a_later_phase_is_a_cycle_naming_the_order():
    doc = copy.deepcopy(JOB)
    doc["phases"][0] = {"name": "a", "tasks": [TASK], "components": {"enc": {"pretrained": "@b/model"}}}
    message = error_of(doc)
    assert message.startswith("phases[0].components.enc.pretrained ('@b/model') reads a later phase's (phases[2]) "
                               "artifact: a cycle in the phase order"), message
    assert "Move phase 'b' before phases[0]" in message


@pytest.mark.parametrize("change, expected", [
    ({"tasks": [TASK]}, "tasks: a phased job lists its tasks under each phase"),
    ({"phases": []}, "phases: expected a non-empty list"),
    ({"components": {"enc": {**JOB["components"]["enc"], "pretrained": "@a/model"}}},
     "components.enc.pretrained ('@a/model'): a top-level component is shared by every phase"),
    # phase_document copies it into every phase, whose own data_dir check then said "no such folder" (validate) or
    # nothing at all (plan; '@nosuch/model' too)
    ({"data_dir": "@a/model"}, "data_dir ('@a/model'): a top-level data_dir is shared by every phase and cannot read "
     "a phase's artifact (references are resolved per phase only). Override it in the phase that reads it "
     "(phases[i].data_dir)."),
    ({"data_dir": "@nosuch/model"}, "data_dir ('@nosuch/model'): a top-level data_dir is shared by every phase"),
])
def test_bad_top_level_sections(change, expected):
    assert expected in error_of({**copy.deepcopy(JOB), **change})


def test_phase_document_keeps_weight_sources_and_overrides():
    doc = copy.deepcopy(JOB)
    doc["components"]["copy"] = {**doc["components"]["enc"], "weights_from": "enc"}
    pipeline = parse_pipeline(doc, STEPS)
    spec = pipeline.phases[0].spec.model_copy(update={
        "tasks": [{**TASK, "components": [{"component": "copy"}]}], "components": {"copy": {"lr": 0.5}}})
    out = phase_document(pipeline.doc, spec)
    assert set(out["components"]) == {"copy", "enc"} and out["components"]["copy"]["lr"] == 0.5
    assert out["name"] == "three.a" and "phases" not in out


def test_artifact_paths():
    out = parse_reference("@sft/model", "x")
    assert artifact_path("/o", out, "lm").as_posix() == "/o/sft/export/lm"
    assert artifact_path("/o", parse_reference("@sft/model/vis", "x"), "lm").as_posix() == "/o/sft/export/vis"
    assert artifact_path("/o", parse_reference("@sft/checkpoint", "x"), checkpoint="ckpt/step_6").as_posix() == \
        "/o/sft/ckpt/step_6"
    assert artifact_path("/o", parse_reference("@g/dataset/a.jsonl", "x")).as_posix() == "/o/g/dataset/a.jsonl"


@pytest.mark.parametrize("weights", [[float("inf"), 1], [float("nan"), 1], [1e308, 1e308], [True, 1], [0, 0],
                                     [-1, 2], [1]])
def test_average_weights_are_finite_non_negative_with_a_finite_positive_sum(weights):
    """An inf weight makes every averaged tensor inf / inf = NaN: refused before anything runs."""
    from planner.pipeline import check_average

    args = {"component": "enc", "models": ["@a/model", "@b/model"], "weights": weights}
    with pytest.raises(ValueError, match=r"^weights \(.*\): expected 2 finite numbers >= 0"):
        check_average(args, None)
    check_average(args | {"weights": [0, 1e300]}, None)
