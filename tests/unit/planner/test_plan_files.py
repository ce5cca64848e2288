"""Plan files as a user hands them to Loom (`loom run --plan`, `loom submit --plan`, a resumed run's or `loom gantt`'s
OUT/plan.json): bytes that are no plan are one SpecError naming the file (planner.jsonfile)."""

from __future__ import annotations

import dataclasses

import pytest

import planner.plan
from planner.api import plan_job
from planner.errors import SpecError
from planner.plan import load_plan
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
