"""`loom plan` end to end in-process (typer's CliRunner) on a small two-task job."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app, configure_logging
from planner.plan import Plan, plan_from_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def job_file(tmp_path_factory, small_job_text: str) -> Path:
    path = tmp_path_factory.mktemp("plan") / "small.yaml"
    path.write_text(small_job_text)
    return path


@pytest.fixture(scope="module")
def json_run(job_file: Path, tmp_path_factory):
    """One `loom plan --output json --save --gantt png --gantt html` run, shared by the tests below."""
    out = tmp_path_factory.mktemp("out")
    saved, png, page = out / "plan.json", out / "chart.png", out / "chart.html"
    result = CliRunner().invoke(app, [
        "plan", str(job_file), "--output", "json", "--save", str(saved), "--gantt", str(png), "--gantt", str(page),
    ])
    assert result.exit_code == 0, result.output
    return result, saved, png, page


def test_json_stdout_is_exactly_the_plan(json_run) -> None:
    result, saved, _, _ = json_run
    plan = plan_from_json(result.stdout)  # verifies version and content hash
    assert plan.job == "small-two-task"
    assert result.stdout == plan.to_json()  # nothing else on stdout
    assert saved.read_text() == result.stdout


def test_json_is_byte_identical_across_runs(json_run, job_file: Path) -> None:
    again = CliRunner().invoke(app, ["plan", str(job_file), "-o", "json"])
    assert again.exit_code == 0, again.output
    assert again.stdout == json_run[0].stdout


def test_progress_goes_to_stderr(json_run) -> None:
    result = json_run[0]
    assert "MetaGraph" in result.stderr  # the planner's first progress step, logged (not a terminal)
    assert "Traceback" not in result.stderr


def test_gantt_files(json_run) -> None:
    result, _, png, page = json_run
    plan = plan_from_json(result.stdout)
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert png.stat().st_size > 5000
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text
    for wave in plan.waves:  # every slice has a hover title naming its MetaOp and wave
        for s in wave.slices:
            assert f"{plan.metaops[s.metaop].name} (task {plan.metaops[s.metaop].task}), wave {wave.index}" in text


def test_table_mentions_every_wave_metaop_and_baseline(json_run, job_file: Path) -> None:
    plan = plan_from_json(json_run[0].stdout)
    result = CliRunner().invoke(app, ["plan", str(job_file)])
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert plan.waves and plan.baselines
    for wave in plan.waves:
        assert f"Wave {wave.index}:" in table
    assert f"Wave {len(plan.waves)}:" not in table
    for op in plan.metaops:
        assert op.name in table
    for name, seconds in plan.baselines.items():
        speedup = seconds / plan.predicted.iteration_time_s
        assert any(name in line and f"{speedup:.2f}x" in line for line in table.splitlines()), name
    assert "predicted iteration" in table and plan.solver.status in table
    assert "planning time" in table


def test_cluster_override_changes_the_plan(job_file: Path, tmp_path: Path, json_run) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"cluster": {"num_nodes": 1, "devices_per_node": 4, "device": "h100"}}))
    result = CliRunner().invoke(app, ["plan", str(job_file), "--cluster", str(cluster), "-o", "json",
                                      "--no-baselines"])
    assert result.exit_code == 0, result.output
    plan = plan_from_json(result.stdout)
    assert plan.cluster.devices_per_node == 4
    assert all(d < 4 for w in plan.waves for s in w.slices for d in s.devices)


def test_planning_error_is_one_error_line(tmp_path: Path, small_job_text: str) -> None:
    """A valid spec that cannot be planned (one layer needs more memory than a device has)."""
    doc = yaml.safe_load(small_job_text)
    doc["cluster"]["memory_gib"] = 0.001
    job = tmp_path / "tiny-memory.yaml"
    job.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["plan", str(job)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0]
    assert "GiB" in errors[0]
    assert result.stdout == ""


def test_a_plan_that_more_micro_batches_would_speed_up_says_so(tmp_path: Path) -> None:
    """bench/pipeline's 70B LLM (pipeline stages) at one micro-batch: the table ends with the hint; as JSON, stdout
    stays the plan and the hint goes to the log (planner.accumhint)."""
    doc = yaml.safe_load((Path(__file__).resolve().parents[3] / "bench/pipeline/sft-70b-64.yaml").read_text())
    doc["training"]["grad_accum_steps"] = 1
    job = tmp_path / "sft.yaml"
    job.write_text(yaml.safe_dump(doc))
    text = CliRunner().invoke(app, ["plan", str(job), "--no-baselines"])
    assert text.exit_code == 0, text.output
    hint = text.stdout.strip().splitlines()[-1]
    assert hint.startswith("hint: training.grad_accum_steps: ") and "(micro-batches pipelined)" in hint
    as_json = CliRunner().invoke(app, ["plan", str(job), "--no-baselines", "-o", "json"])
    assert plan_from_json(as_json.stdout).predicted.iteration_time_s > 0
    assert hint in as_json.stderr


def test_costs_file_and_no_baselines(job_file: Path, tmp_path: Path) -> None:
    """A profiled cost file switches the plan's cost model (MetaOps it lacks fall back to analytic);
    --no-baselines leaves the baselines out."""
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"version": 1, "device": "h100", "points": {}}))
    result = CliRunner().invoke(app, ["plan", str(job_file), "--costs", str(costs), "-o", "json", "--no-baselines"])
    assert result.exit_code == 0, result.output
    plan = plan_from_json(result.stdout)
    assert plan.cost_model == "profiled"
    assert plan.baselines == {}


def test_bad_costs_file_is_one_error_line(job_file: Path, tmp_path: Path) -> None:
    costs = tmp_path / "costs.json"
    costs.write_text("not json")
    result = CliRunner().invoke(app, ["plan", str(job_file), "--costs", str(costs)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "costs.json" in result.stderr


def test_schema_is_json_with_every_section_and_describes_every_shipped_job() -> None:
    import jsonschema
    import yaml

    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    one, phased = schema["$defs"]["JobSpec"], schema["$defs"]["PhasedJob"]
    assert set(one["properties"]) == {
        "name", "cluster", "components", "tasks", "training", "planner", "recipe", "data_dir"}
    assert set(phased["properties"]) == set(one["properties"]) - {"tasks"} | {"phases"}
    assert one["additionalProperties"] is False and "gate" in schema["$defs"]["PhaseSpec"]["properties"]
    root = Path(__file__).parents[3]
    jobs = [*root.glob("examples/**/*.yaml"), *root.glob("recipes/*/*.yaml"), *root.glob("recipes/*/pipeline/*.yaml")]
    documents = [yaml.safe_load(p.read_text()) for p in jobs]
    jobs = [p for p, doc in zip(jobs, documents) if "components" in doc]  # not cluster or shapes files
    assert any("phases" in yaml.safe_load(p.read_text()) for p in jobs) and len(jobs) > 10
    for path in jobs:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)  # raises, naming the field, if the schema lags
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "x", "components": {}, "phases": [{"name": "a", "gate": {"m": "high"}}]}, schema)


@pytest.mark.parametrize("example", sorted(Path(__file__).parents[3].joinpath("examples").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_examples_validate(example: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(example)])
    assert result.exit_code == 0, result.output
    assert "valid." in result.stdout


def test_three_examples_exist() -> None:
    names = {p.stem for p in Path(__file__).parents[3].joinpath("examples").glob("*.yaml")}
    assert {"medical-unimed", "diffusion-itercomp", "alignment-baichuan"} <= names


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("loom ")


def test_plan_model_roundtrip_is_stable(json_run) -> None:
    """The JSON the CLI prints re-serialises to the same bytes (sorted keys, sealed hash)."""
    plan = plan_from_json(json_run[0].stdout)
    assert Plan.model_validate(json.loads(plan.to_json())).to_json() == json_run[0].stdout


def test_configure_logging_levels_and_single_handler() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("orchestrator").level)
    try:
        configure_logging(verbose=True)
        configure_logging(verbose=True)
        ours = [h for h in root.handlers if h not in saved[0]]
        assert len(ours) == 1  # calling again replaces, never stacks handlers
        assert root.level == logging.DEBUG
        configure_logging(verbose=False)
        assert root.level == logging.WARNING
        assert logging.getLogger("orchestrator").getEffectiveLevel() == logging.INFO
        assert logging.getLogger("planner.solver").getEffectiveLevel() == logging.WARNING
    finally:
        for handler in [h for h in root.handlers if h not in saved[0]]:
            root.removeHandler(handler)
        root.setLevel(saved[1])
        logging.getLogger("orchestrator").setLevel(saved[2])
