"""A phased job in the orchestrator, without Ray: the step registry and the built-in `average`, `loom validate` and
`loom plan` of a phased job (one error line and exit 2 for bad phases), and what `loom run` refuses in OUT before
anything runs (an earlier run's phases without --resume/--overwrite, a finished phase of another spec)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.pipeline import PHASE_MARKER, PipelineRunner, phase_hash, read_pipeline
from orchestrator.run import RunOptions
from orchestrator.run_inputs import RunInputError
from orchestrator.steps import STEPS, StepContext, check_average, registered_steps
from planner.errors import SpecError
from planner.pipeline import EXPORT_DIR
from runtime.export import EXPORT_DIR as RUNTIME_EXPORT_DIR

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
from make_models import save_llama  # noqa: E402  (examples/make_models.py)


def phased_job(models: Path) -> dict:
    """sft -> average(sft's model, the base) -> tune from the average: the shape of examples/phases-cpu.yaml."""
    task = {"name": "chat", "batch_size": 4, "loss": "lm", "components": [{"component": "lm"}]}
    return {
        "name": "three", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"lm": {"pretrained": str(models / "base"), "seq_len": 8}},
        "training": {"steps": 2, "lr": 0.01, "precision": "fp32", "checkpoint_every": 1},
        "planner": {"time_limit_s": 2},
        "phases": [
            {"name": "sft", "tasks": [task]},
            {"name": "merge", "step": "average",
             "args": {"component": "lm", "models": ["@sft/model", str(models / "base")]}},
            {"name": "tune", "components": {"lm": {"pretrained": "@merge/model"}}, "tasks": [task],
             "training": {"steps": 3}},
        ],
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_llama(root / "base", num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    save_llama(root / "other", seed=1, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    return root


def write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_export_folder_names_agree():
    assert EXPORT_DIR == RUNTIME_EXPORT_DIR  # planner.pipeline keeps a torch-free copy


def test_average_is_the_weighted_mean_in_the_first_models_format(models, tmp_path):
    args = {"component": "lm", "models": [str(models / "base"), str(models / "other")], "weights": [1, 3]}
    check_average(args, None)
    STEPS["average"].run(StepContext("merge", args, tmp_path))
    out = tmp_path / "export" / "lm"
    merged, a, b = (load_file(str(f / "model.safetensors")) for f in (out, models / "base", models / "other"))
    assert set(merged) == set(a) and len(merged) > 10
    for name in a:
        torch.testing.assert_close(merged[name], (a[name] + 3 * b[name]) / 4, rtol=0, atol=1e-7)
    assert json.loads((out / "config.json").read_text()) == json.loads((models / "base" / "config.json").read_text())


@pytest.mark.parametrize("args, expected", [
    ({"component": "lm", "models": ["@a/model"]}, "models (['@a/model']): expected a list of 2 or more"),
    ({"models": ["@a/model", "@b/model"]}, "component: required"),
    ({"component": "lm", "models": ["@a/model", "nowhere"]}, "models[1] ('nowhere'): no such folder"),
    ({"component": "lm", "models": ["@a/model", "@b/model"], "weights": [0, 0]}, "weights ([0, 0]): expected 2"),
    ({"component": "lm", "models": ["@a/model", "@b/model"], "wieghts": [1, 1]}, "wieghts: unknown argument"),
])
def test_average_args_are_checked(args, expected, tmp_path):
    with pytest.raises(ValueError) as info:
        check_average(args, tmp_path)
    assert expected in str(info.value)


def test_registry_lists_the_builtin_step():
    assert registered_steps()["average"] == ("model",)


def test_validate_and_plan_a_phased_job(models, tmp_path):
    job = write(tmp_path / "job.yaml", phased_job(models))
    result = CliRunner().invoke(app, ["validate", str(job)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"{job}: valid. three: 3 phases" and lines[2] == "  merge: step 'average' (writes model)"
    assert lines[1].startswith("  sft: three.sft: 1 task") and lines[3].endswith(", 3 steps")
    result = CliRunner().invoke(app, ["plan", str(job), "--save", str(tmp_path / "plan.json"), "--no-baselines"])
    assert result.exit_code == 0, result.output
    assert "phase 2/3 merge: step 'average' in the driver process" in result.stdout
    assert "phase 3/3 tune: 3 steps" in result.stdout and "three.tune" in result.stdout
    plans = {p: json.loads((tmp_path / f"plan.{p}.json").read_text()) for p in ("sft", "tune")}
    assert plans["sft"]["job"] == "three.sft" and plans["tune"]["job"] == "three.tune"
    assert not (tmp_path / "plan.merge.json").exists()
    result = CliRunner().invoke(app, ["plan", str(job), "--output", "json", "--no-baselines"])
    assert result.exit_code == 0 and json.loads(result.stdout) == plans  # one object: trained phase -> its Plan


def test_the_example_validates():
    example = Path(__file__).resolve().parents[3] / "examples" / "phases" / "phases-cpu.yaml"
    result = CliRunner().invoke(app, ["validate", str(example)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].endswith("valid. phases-cpu: 3 phases")


def test_a_model_artifact_is_planned_with_its_declared_shape(models, tmp_path):
    pipeline = read_pipeline(write(tmp_path / "job.yaml", phased_job(models)))
    tune = pipeline.phase("tune").job.components["lm"]
    assert tune.pretrained == str((models / "base").resolve())  # no artifact exists yet: the declared folder
    assert (tune.kind, tune.num_layers, tune.hidden_size) == ("llama", 2, 32)


def test_a_bad_phase_is_one_error_line_and_exit_2(models, tmp_path):
    doc = phased_job(models)
    doc["phases"][1]["step"] = "averge"
    job = write(tmp_path / "job.yaml", doc)
    for command in (["validate", str(job)], ["plan", str(job)], ["run", str(job), "--out", str(tmp_path / "o")]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [
            "error: phases[1].step ('averge') is not a registered step; did you mean 'average'?"]
    assert not (tmp_path / "o").exists()
    doc["phases"][1]["step"] = "average"
    doc["phases"][1]["args"]["models"][0] = "@tune/model"
    result = CliRunner().invoke(app, ["run", str(write(tmp_path / "job.yaml", doc))])
    assert result.exit_code == 2 and "reads a later phase's (phases[2]) artifact: a cycle" in result.stderr


def test_an_average_written_as_an_unknown_component_is_refused_by_validate(models, tmp_path):
    """A later phase reads `@merge/model` as its own component's folder: a name that is no component of the job
    would be found missing only then."""
    doc = phased_job(models)
    doc["phases"][1]["args"]["component"] = "zzz"
    job = write(tmp_path / "job.yaml", doc)
    for command in (["validate", str(job)], ["run", str(job), "--out", str(tmp_path / "o")]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [
            "error: phases[1].args.component ('zzz'): not a component of the job (step 'average' writes its model "
            "under that name, for later phases to read); valid names: 'lm'"]
    assert not (tmp_path / "o").exists()
    assert STEPS["average"].component_args == ("component",)


@pytest.mark.parametrize("reads_artifacts", [False, True])
def test_a_phases_plain_data_dir_must_exist_before_anything_runs(models, tmp_path, reads_artifacts):
    """A plain data_dir is checked by validate and before a run claims OUT, also in a phase whose tasks read an
    earlier phase's artifact (those are checked when the phase starts)."""
    doc = phased_job(models) | {"recipe": "alignment"}
    doc["phases"][2]["data_dir"] = "nowhere"
    if reads_artifacts:
        doc["phases"][2]["tasks"] = [{**doc["phases"][2]["tasks"][0], "data": {"format": "text",
                                                                           "path": "@sft/model/rows.jsonl"}}]
    job = write(tmp_path / "job.yaml", doc)
    for command in (["validate", str(job)], ["run", str(job), "--out", str(tmp_path / "o")]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [
            f"error: phases[2] ('tune'): data_dir ({tmp_path / 'nowhere'}): no such folder; it holds the recipe's "
            "real data, one subfolder per split (docs/recipes/<recipe>.md). Fix the path, or remove data_dir for "
            "synthetic data."]
    assert not (tmp_path / "o").exists()


def test_a_data_dir_reference_is_resolved_when_its_phase_starts_and_must_exist(models, tmp_path):
    doc = phased_job(models) | {"recipe": "alignment"}
    doc["phases"][2]["data_dir"] = "@merge/model/rows"
    pipeline = read_pipeline(write(tmp_path / "job.yaml", doc))
    runner = PipelineRunner(pipeline, RunOptions(out_dir=tmp_path / "out"))
    runner.check()  # the artifact does not exist before its phase runs: not checked yet
    shutil.copytree(models / "base", tmp_path / "out" / "merge" / "export" / "lm")
    (tmp_path / "out" / "merge" / PHASE_MARKER).write_text(json.dumps({"artifacts": {"model": "export"}}))
    missing = tmp_path / "out" / "merge" / "export" / "rows"
    with pytest.raises(RunInputError, match=rf"^phases\[2\] \('tune'\): data_dir \({missing}\): no such folder; "):
        runner.run_trained(pipeline.phase("tune"), tmp_path / "out" / "tune")
    assert not (tmp_path / "out" / "tune").exists()


def test_a_top_level_data_dir_reference_is_refused_naming_the_phase_field(models, tmp_path):
    """A top-level data_dir is every phase's: a reference there was resolved for each phase (even for the phase it
    names, or a phase that does not exist), then `loom validate` said "no such folder" and `loom plan` planned it."""
    doc = phased_job(models) | {"data_dir": "@merge/model"}
    job = write(tmp_path / "job.yaml", doc)
    for command in (["validate", str(job)], ["plan", str(job)], ["run", str(job), "--out", str(tmp_path / "o")]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [
            "error: data_dir ('@merge/model'): a top-level data_dir is shared by every phase and cannot read a "
            "phase's artifact (references are resolved per phase only). Override it in the phase that reads it "
            "(phases[i].data_dir)."]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("out", ["afile", "afile/sub", "/proc/self", "/sys/loom-out"])
def test_an_unwritable_out_of_a_phased_job_is_refused_before_its_phases_are_checked(models, tmp_path, monkeypatch,
                                                                                     out):
    """As for a one-phase run (orchestrator.outdir.check_out_dir): before, the phases were checked first and the folder
    only when claimed (/proc/self: 'cannot open its lock file ... No such file or directory')."""
    import orchestrator.pipeline

    if out.startswith(("/proc", "/sys")) and not Path(out).parent.is_dir():
        pytest.skip(f"no {Path(out).parent} on this system")

    def unchecked(*args, **kwargs):
        raise AssertionError("a phase was checked before --out")

    monkeypatch.setattr(orchestrator.pipeline, "check_runnable_job", unchecked)
    monkeypatch.chdir(tmp_path)
    job = write(tmp_path / "job.yaml", phased_job(models))
    Path("afile").write_text("")
    result = CliRunner().invoke(app, ["run", str(job), "--out", out])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --out ({out})"), line
    expected = {"afile": "is a file; give a directory", "afile/sub": "afile is a file, so the folder cannot be created"}
    assert expected.get(out, "cannot write") in line and "No such file" not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "job.yaml"]


def finish(runner: PipelineRunner, name: str, spec: str | None = None) -> None:
    phase = runner.pipeline.phase(name)
    folder = runner.out_dir / name
    folder.mkdir(parents=True)
    (folder / PHASE_MARKER).write_text(json.dumps({"spec": spec or phase_hash(phase), "artifacts": {}}))


def test_run_refuses_what_would_lose_or_mix_finished_phases(models, tmp_path):
    pipeline = read_pipeline(write(tmp_path / "job.yaml", phased_job(models)))
    out = tmp_path / "out"
    finish(PipelineRunner(pipeline, RunOptions(out_dir=out)), "sft")
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(RunInputError, match=r"holds phases of an earlier run \(sft: finished\)"):
        PipelineRunner(pipeline, RunOptions(out_dir=out)).check()
    resumed = PipelineRunner(pipeline, RunOptions(out_dir=out, resume=True))
    resumed.check()
    assert resumed.finished == 1  # sft is skipped, merge runs next
    for empty in (tmp_path / "none", tmp_path / "empty"):  # nothing to resume: said, as a single job's --resume
        if empty.name == "empty":
            empty.mkdir()
        with pytest.raises(RunInputError, match=r"--resume: --out \(.*\) holds no phase of an earlier run"):
            PipelineRunner(pipeline, RunOptions(out_dir=empty, resume=True)).check()
        assert not (tmp_path / "none").exists()
    (out / "tune" / "ckpt" / "step_1").mkdir(parents=True)  # a later phase's results with merge unfinished
    with pytest.raises(RunInputError, match="phase 'tune' holds results .* the earlier phase 'merge' is unfinished"):
        PipelineRunner(pipeline, RunOptions(out_dir=out, resume=True)).check()
    (out / "sft" / PHASE_MARKER).write_text(json.dumps({"spec": "another", "artifacts": {}}))
    with pytest.raises(RunInputError, match=r"phases\[0\] \('sft'\) finished under another spec"):
        PipelineRunner(pipeline, RunOptions(out_dir=out, resume=True)).check()
    doc = phased_job(models)
    doc["phases"][2]["tasks"] = [{**doc["phases"][2]["tasks"][0], "loss": "nonsense"}]
    with pytest.raises(RunInputError, match=r"^phases\[2\] \('tune'\): .*nonsense"):
        PipelineRunner(read_pipeline(write(tmp_path / "bad.yaml", doc)), RunOptions(out_dir=tmp_path / "o")).check()
    assert not (tmp_path / "o").exists()
    with pytest.raises(RunInputError, match="--steps: a phased job"):
        PipelineRunner(pipeline, RunOptions(out_dir=out, steps=3)).check()
    assert sorted(p.name for p in out.rglob("*")) == sorted(before + ["tune", "ckpt", "step_1"])  # nothing deleted


def test_a_step_that_writes_nothing_is_an_error(models, tmp_path):
    from orchestrator.steps import register_step

    register_step("noop-test", lambda ctx: None, writes=("model",))
    try:
        doc = phased_job(models)
        doc["phases"][1] = {"name": "merge", "step": "noop-test"}
        pipeline = read_pipeline(write(tmp_path / "job.yaml", doc))
        runner = PipelineRunner(pipeline, RunOptions(out_dir=tmp_path / "out"))
        with pytest.raises(SpecError, match="step 'noop-test' did not write its artifact 'model'"):
            runner.run_step(pipeline.phase("merge"), tmp_path / "out" / "merge")
    finally:
        STEPS.pop("noop-test")


def test_a_gated_evaluation_step_reports_metrics_and_stops_the_run_below_its_bound(models, tmp_path):
    from orchestrator.pipeline import METRICS_FILE, GateFailed, summary_lines
    from orchestrator.steps import register_step

    register_step("score-test", lambda ctx: {"accuracy": ctx.args["value"], "error": 0.25}, writes=(),
                  metrics=("accuracy", "error"))
    try:
        doc = phased_job(models)
        doc["phases"][1:] = [{"name": "eval", "step": "score-test", "args": {"value": 0.4},
                              "gate": {"accuracy": 0.3, "error": {"max": 0.5}}}]
        runner = PipelineRunner(read_pipeline(write(tmp_path / "ok.yaml", doc)), RunOptions(out_dir=tmp_path / "a"))
        done = runner.run_step(runner.pipeline.phase("eval"), tmp_path / "a" / "eval")
        assert done.metrics == {"accuracy": 0.4, "error": 0.25}
        assert json.loads((tmp_path / "a" / "eval" / METRICS_FILE).read_text()) == done.metrics
        runner.result.phases.append(done)
        assert summary_lines(runner.result) == ["three.eval: step 'score-test' wrote no artifacts; metrics "
                                                "accuracy 0.4, error 0.25"]
        doc["phases"][1]["gate"] = {"accuracy": {"min": 0.5}}
        runner = PipelineRunner(read_pipeline(write(tmp_path / "low.yaml", doc)), RunOptions(out_dir=tmp_path / "b"))
        with pytest.raises(GateFailed, match=r"^phases\[1\] \('eval'\): accuracy = 0.4 is below the gate's min 0.5"):
            runner.run_step(runner.pipeline.phase("eval"), tmp_path / "b" / "eval")
        assert (tmp_path / "b" / "eval" / METRICS_FILE).is_file() and not (tmp_path / "b" / "eval" / PHASE_MARKER).exists()
        for gate, message in [({"acuracy": 0.5}, r"phases\[1\].gate.acuracy: step 'score-test' reports no metric "
                                                 r"'acuracy'; did you mean 'accuracy'"),
                              ({"accuracy": {"min": 2, "max": 1}}, "min \\(2\\) is above max \\(1\\)"),
                              ({"accuracy": {}}, "a gate needs `min`, `max` or both")]:
            doc["phases"][1]["gate"] = gate
            with pytest.raises(SpecError, match=message):
                read_pipeline(write(tmp_path / "bad.yaml", doc))
        doc["phases"][0]["gate"] = {"accuracy": 0.5}
        with pytest.raises(SpecError, match="trains tasks but has `gate`"):
            read_pipeline(write(tmp_path / "bad.yaml", doc))
    finally:
        STEPS.pop("score-test")


def test_a_gate_on_a_step_that_reports_no_metrics_is_refused_before_anything_runs(models, tmp_path):
    doc = phased_job(models)
    doc["phases"][1]["gate"] = {"x": 1}  # the built-in average declares that it reports none
    with pytest.raises(SpecError, match=r"phases\[1\].gate.x: step 'average' reports no metric 'x'; it reports no "
                                        "metrics, so it cannot be gated"):
        read_pipeline(write(tmp_path / "gated.yaml", doc))
