"""Plan files as a user hands them to Loom (`loom run --plan`, `loom submit --plan`, a resumed run's or `loom gantt`'s
OUT/plan.json): bytes that are no plan are one SpecError naming the file (planner.jsonfile), and a plan written
before a field with a default was added still matches its content hash, read as what it was planned with."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

import planner.plan
from planner.api import plan_job
from planner.errors import SpecError
from planner.plan import load_plan, plan_from_json, zero_sharded
from planner.spec import parse_job


def tiny_job(**training) -> dict:
    return {"name": "tiny", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
            "components": {"c": {"kind": "mlp", "num_layers": 2, "hidden_size": 8}},
            "tasks": [{"name": "t", "batch_size": 4, "components": [{"component": "c"}]}],
            "planner": {"time_limit_s": 1.0}, "training": training}


@pytest.fixture(scope="module")
def plan_text() -> str:
    return plan_job(parse_job(tiny_job()), with_baselines=False).plan.to_json()


def refusal(path) -> str:
    with pytest.raises(SpecError) as info:
        load_plan(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("content, fragment", [
    (bytes(range(128, 256)) * 3, "not a Loom plan (not UTF-8 text)"),
    (b"[" * 100_000 + b"]" * 100_000, "not a Loom plan (nested too deeply)"),
    (b"{oops", "not a Loom plan (not JSON)"),
], ids=["binary", "deeply nested", "not JSON"])
def test_bytes_that_are_no_plan_are_one_line(tmp_path, content: bytes, fragment: str) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(content)
    message = refusal(path)
    assert fragment in message and "loom plan" in message, message


def test_a_plan_file_larger_than_any_plan_is_refused_unread(tmp_path, plan_text, monkeypatch) -> None:
    path = tmp_path / "p.json"
    path.write_text(plan_text)
    monkeypatch.setattr(planner.plan, "PLAN_FILE", dataclasses.replace(planner.plan.PLAN_FILE, max_bytes=100))
    assert f"{len(plan_text.encode())} bytes, more than 100" in refusal(path)
    assert "no such plan file" in refusal(tmp_path / "absent.json")
    assert "is a directory" in refusal(tmp_path)
    if Path("/dev/zero").exists():  # read, it never ends (its size is 0): refused before reading
        assert "not a regular file (a device, pipe or socket), not a plan file" in refusal(Path("/dev/zero"))


@pytest.mark.parametrize("command", [["run"], ["submit", "--address", "http://127.0.0.1:9"]], ids=["run", "submit"])
def test_a_plan_given_with_the_plan_option_that_does_not_load_is_named_by_the_option(tmp_path, plan_text, monkeypatch,
                                                                                     command: list[str]) -> None:
    """`loom run --plan` and `loom submit --plan`: a file that is no plan is one `error: --plan PATH: ...` line, exit 2,
    nothing started or sent (the line began with the path alone and did not say which input it was)."""
    from typer.testing import CliRunner

    from orchestrator.cli import app

    job = tmp_path / "job.json"
    job.write_text(json.dumps(tiny_job()))
    monkeypatch.setattr(planner.plan, "PLAN_FILE", dataclasses.replace(planner.plan.PLAN_FILE, max_bytes=1000))
    cases = [("{oops", "not a Loom plan (not JSON)"),
             (json.dumps({"version": planner.plan.PLAN_VERSION}), "field required. Re-run `loom plan`"),
             (plan_text, f"not a Loom plan: {len(plan_text.encode())} bytes, more than 1000")]
    for i, (text, fragment) in enumerate(cases):
        path = tmp_path / f"p{i}.json"
        path.write_text(text)
        extra = ["--out", str(tmp_path / "out")] if command == ["run"] else []
        result = CliRunner().invoke(app, [command[0], str(job), *command[1:], "--plan", str(path), *extra])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, (result.stderr, result.exception)
        assert lines[0].startswith(f"error: --plan {path}: ") and fragment in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def older_plan(plan_text: str) -> dict:
    """The plan as a Loom before Plan.shard_optimizer wrote it: no such key, and the hash of what it did write."""
    data = json.loads(plan_text)
    del data["shard_optimizer"]
    body = {key: value for key, value in data.items() if key != "hash"}
    data["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    return data


def test_a_plan_written_before_shard_optimizer_loads_as_planned(tmp_path, plan_text) -> None:
    """Plan.shard_optimizer came without a PLAN_VERSION bump; an older plan's hash covers the keys it has. It used to be
    refused as edited (the hash was recomputed over the model's dump, which adds the new key), which blocked resuming
    older runs. Missing, it reads as None: the job's own setting, which is what the plan was made with."""
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(older_plan(plan_text), indent=1))
    plan = load_plan(path)
    assert plan.shard_optimizer is None
    for setting, sharded in ((True, True), ("auto", True), (False, False)):
        assert zero_sharded(plan, parse_job(tiny_job(shard_optimizer=setting)).training) is sharded


def test_a_really_edited_plan_is_still_refused(plan_text) -> None:
    """Dropping the key but keeping the hash the file was sealed with, or adding it to an older plan, is an edit."""
    data = json.loads(plan_text)
    del data["shard_optimizer"]
    with pytest.raises(SpecError, match="does not match the content; the file was edited"):
        plan_from_json(json.dumps(data))
    data = older_plan(plan_text)
    data["shard_optimizer"] = False
    with pytest.raises(SpecError, match="does not match the content; the file was edited"):
        plan_from_json(json.dumps(data))
    data = older_plan(plan_text)
    data["predicted"]["iteration_time_s"] *= 0.5
    with pytest.raises(SpecError, match="does not match the content; the file was edited"):
        plan_from_json(json.dumps(data))
