"""A cost file's ``device`` (the device kind `loom profile` ran on): an unknown kind is refused, and read for a job
(planner.costfile.read_cost_file with the job's cluster.device) a file profiled on another kind is refused, one line
naming both: its seconds are not the job's devices' seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.costfile import read_cost_file
from planner.errors import SpecError

POINTS = {"transformer[h=32,f=128,s=8,a=4]|bwd=2|tp=1": [[2, 0.010], [4, 0.018]]}


def write(tmp_path: Path, **device) -> Path:
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"version": 1, "points": POINTS, **device}))
    return path


def refusal(path: Path, device: str | None = None) -> str:
    with pytest.raises(SpecError) as info:
        read_cost_file(path, device)
    message = str(info.value)
    assert message.startswith(f"{path}: device (") and "\n" not in message and "loom profile" in message, message
    return message


@pytest.mark.parametrize("device", [None, "cpu"])
def test_an_unknown_device_kind_is_refused(tmp_path: Path, device: str | None) -> None:
    message = refusal(write(tmp_path, device="zzz"), device)
    assert "('zzz') is not a known device kind; valid names: 'a100'" in message, message
    assert "did you mean 'h100'?" in refusal(write(tmp_path, device="h10"))


def test_a_file_profiled_on_another_device_kind_is_refused_for_the_job(tmp_path: Path) -> None:
    path = write(tmp_path, device="h100")
    message = refusal(path, "cpu")
    assert "('h100') is not the job's cluster.device ('cpu')" in message and "profiled on cpu" in message, message
    assert read_cost_file(path, "h100").device == "h100"
    assert read_cost_file(path).device == "h100"  # no job to compare with


def test_a_file_that_names_no_device_is_taken_as_it_is(tmp_path: Path) -> None:
    assert read_cost_file(write(tmp_path), "cpu").device == ""
