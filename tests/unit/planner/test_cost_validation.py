"""Semantic checks of a profiled cost file (planner.costfile): each kind of nonsense is one SpecError line naming the
file, the entry and the fix, before anything is fitted; a profile as `loom profile` writes it loads unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from planner.costfile import COST_FILE_VERSION, MONOTONE_NOISE_S, MONOTONE_TOLERANCE, read_cost_file
from planner.costmodel import ProfiledCostModel
from planner.devices import resolve_hardware
from planner.errors import SpecError
from planner.spec import ClusterSpec

KEY = "transformer[h=32,f=128,s=8,a=4]|bwd=2|tp=1"
# The shape `loom profile` writes (runtime.profiler.profile_job), small.
VALID = {
    "version": 1, "device": "cpu",
    "points": {KEY: [[2, 0.010], [4, 0.018], [8, 0.034]]},
    "embed": {"a.enc": [[2, 0.001], [8, 0.003]]},
    "head": {"a": [[8, 0.002]]},
    "optimizer_s_per_param": 2.5e-9,
    "links": {"p2p": [[16384, 1e-4], [1048576, 9e-4]], "allreduce": [[16384, 2e-4], [1048576, 1.5e-3]]},
    "forward": {KEY: [[8, 0.38], [2, 0.45]]},  # shares need not rise with the batch
    "calibration": {"compute": 1.1, "loss": 1.5},  # a part may be missing (1)
}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "costs.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def refusal(path: Path) -> str:
    with pytest.raises(SpecError) as err:
        read_cost_file(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def changed(**entries) -> dict:
    data = json.loads(json.dumps(VALID))
    for key, value in entries.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    return data


def test_a_profile_loads_sorted_and_unchanged(tmp_path) -> None:
    costs = read_cost_file(write(tmp_path, changed(embed={"a.enc": [[8, 0.003], [2, 0.001]]})))
    assert costs.points == {KEY: [(2.0, 0.010), (4.0, 0.018), (8.0, 0.034)]}
    assert costs.embed == {"a.enc": [(2.0, 0.001), (8.0, 0.003)]}
    assert costs.optimizer_s_per_param == 2.5e-9 and costs.links["allreduce"][1] == (1048576.0, 1.5e-3)
    assert costs.forward == {KEY: [(2.0, 0.45), (8.0, 0.38)]}
    hw = resolve_hardware(ClusterSpec(num_nodes=1, devices_per_node=2, device="cpu"))
    model = ProfiledCostModel.load(write(tmp_path, VALID), hw)
    assert model.points[KEY] == costs.points[KEY] and model.measured.head == {"a": [(8.0, 0.002)]}
    assert model.forward[KEY] == costs.forward[KEY]
    assert costs.calibration == {"compute": 1.1, "loss": 1.5}
    assert model.calibration == {"compute": 1.1, "loss": 1.5, "optimizer": 1.0}


def test_the_optional_parts_may_be_missing(tmp_path) -> None:
    costs = read_cost_file(write(tmp_path, {"points": {KEY: [[1, 0.5]]}}))
    assert costs.embed == {} and costs.links == {} and costs.optimizer_s_per_param is None and costs.forward == {}


def test_the_profiler_writes_this_version() -> None:
    from runtime.profiler import PROFILE_VERSION

    assert PROFILE_VERSION == COST_FILE_VERSION


CASES = [
    ("NaN time", {"points": {KEY: [[2, math.nan]]}}, f"points['{KEY}'][0] ([2, nan]) has nan seconds, not a time in "
     "(0, 86400]"),
    ("infinite time", {"head": {"a": [[8, math.inf]]}}, "head['a'][0] ([8, inf]) has inf seconds"),
    ("zero batch", {"points": {KEY: [[0, 0.01], [4, 0.02]]}}, f"points['{KEY}'][0] ([0, 0.01]) has local batch 0, "
     "not a whole number >= 1"),
    ("negative batch", {"embed": {"a.enc": [[-2, 0.01]]}}, "embed['a.enc'][0] ([-2, 0.01]) has local batch -2"),
    ("fractional batch", {"embed": {"a.enc": [[2.5, 0.01]]}}, "has local batch 2.5, not a whole number >= 1"),
    ("zero bytes", {"links": {"p2p": [[0, 1e-4]]}}, "links['p2p'][0] ([0, 0.0001]) has bytes 0, not a finite "
     "number > 0"),
    ("negative time", {"points": {KEY: [[2, 0.01], [4, -0.02]]}}, f"points['{KEY}'][1] ([4, -0.02]) has -0.02 seconds"),
    ("zero time", {"points": {KEY: [[2, 0.0]]}}, "has 0.0 seconds, not a time in (0, 86400]"),
    ("a time beyond a day", {"points": {KEY: [[2, 0.01], [4, 1e300]]}}, "([4, 1e+300]) has 1e+300 seconds"),
    ("a batch beyond 2^24", {"points": {KEY: [[2**30, 0.01]]}}, "has local batch 1073741824, not a whole number >= 1 "
     "up to 1.67772e+07"),
    ("an optimizer rate that overflows", {"optimizer_s_per_param": 1e300}, "optimizer_s_per_param (1e+300) is not a "
     "finite positive number of seconds per parameter"),
    ("duplicate points", {"points": {KEY: [[4, 0.01], [2, 0.005], [4, 0.012]]}}, f"points['{KEY}'] ('local batch 4 "
     "twice') has duplicate points"),
    ("time falls with the batch", {"points": {KEY: [[2, 0.01], [4, 0.02], [8, 0.005]]}}, f"points['{KEY}'] ('local "
     "batch 8: 0.005 s after local batch 4: 0.02 s') is not monotone: more work takes 75% less time"),
    ("link time falls", {"links": {"allreduce": [[16384, 0.02], [1048576, 1e-3]]}}, "links['allreduce'] ('bytes "
     "1.04858e+06: 0.001 s after bytes 16384: 0.02 s') is not monotone"),
    ("optimizer rate negative", {"optimizer_s_per_param": -1e-9}, "optimizer_s_per_param (-1e-09) is not a finite "
     "positive number"),
    ("optimizer rate a string", {"optimizer_s_per_param": "fast"}, "optimizer_s_per_param ('fast') is not a finite"),
    ("unknown key", {"pionts": {}}, "not a profiled cost file: 'pionts' is not a key of a cost file (did you mean "
     "'points'?)"),
    ("unknown link kind", {"links": {"broadcast": [[1, 1.0]]}}, "not a profiled cost file: links['broadcast'] is not "
     "a link kind"),
    ("other version", {"version": 2}, "not a profiled cost file: version (2) is not a supported version; expected 1"),
    ("version true", {"version": True}, "version (True) is not a supported version"),
    ("device a number", {"device": 3}, "device (3) is not a device name"),
    ("points missing", {"points": None}, "not a profiled cost file: points ('missing') is required"),
    ("points a list", {"points": [[1, 1.0]]}, "not a profiled cost file: points ('list') is not a mapping"),
    ("curve empty", {"points": {KEY: []}}, f"points['{KEY}'] ([]) is not a non-empty list"),
    ("curve a number", {"head": {"a": 3}}, "head['a'] ('int') is not a non-empty list"),
    ("pair of three", {"points": {KEY: [[1, 2, 3]]}}, f"points['{KEY}'][0] ([1, 2, 3]) is not a pair of numbers"),
    ("pair of strings", {"points": {KEY: [["1", "0.1"]]}}, "(['1', '0.1']) is not a pair of numbers"),
    ("boolean batch", {"points": {KEY: [[True, 0.1]]}}, "([True, 0.1]) is not a pair of numbers"),
    ("forward share above 1", {"forward": {KEY: [[8, 1.5]]}}, f"forward['{KEY}'][0] ([8, 1.5]) has share 1.5, not a "
     "share in (0, 1]"),
    ("forward share zero", {"forward": {KEY: [[8, 0]]}}, "has share 0, not a share in (0, 1]"),
    ("forward share twice", {"forward": {KEY: [[8, 0.4], [8, 0.5]]}}, f"forward['{KEY}'] ('local batch 8 twice') has "
     "duplicate points; expected one share per local batch"),
    ("forward a list", {"forward": [[8, 0.4]]}, "not a profiled cost file: forward ('list') is not a mapping"),
    ("calibration of an unknown part", {"calibration": {"compute": 1.0, "komput": 1.2}}, "not a profiled cost file: "
     "calibration['komput'] is not a calibrated part"),
    ("calibration ratio too large", {"calibration": {"loss": 17.5}}, "calibration['loss'] (17.5) is not a ratio in "
     "[0.1, 10]"),
    ("calibration ratio a string", {"calibration": {"optimizer": "1.2"}}, "calibration['optimizer'] ('1.2') is not a "
     "ratio in [0.1, 10]"),
    ("calibration a list", {"calibration": [1.2]}, "not a profiled cost file: calibration ('list') is not a mapping"),
    ("forward pair of one", {"forward": {KEY: [[8]]}}, f"forward['{KEY}'][0] ([8]) is not a pair of numbers; expected "
     "[local batch, share]"),
]


@pytest.mark.parametrize("entries, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_nonsense_is_one_line_naming_the_entry(tmp_path, entries, fragment) -> None:
    message = refusal(write(tmp_path, changed(**entries)))
    assert fragment in message, message
    assert "loom profile" in message


def test_noise_within_the_tolerance_is_accepted(tmp_path) -> None:
    """A point up to MONOTONE_TOLERANCE, or MONOTONE_NOISE_S, below the largest earlier time is measurement noise, not
    an error: a busy host's profile (an embedding at 1.85 ms for 8 samples, 0.69 ms for 16) loads."""
    lower = 0.02 * (1 - MONOTONE_TOLERANCE) * 1.01
    read_cost_file(write(tmp_path, changed(points={KEY: [[2, 0.02], [4, lower], [8, 0.05]]})))
    too_low = 0.02 * (1 - MONOTONE_TOLERANCE) * 0.99
    assert "is not monotone" in refusal(write(tmp_path, changed(points={KEY: [[2, 0.02], [4, too_low], [8, 0.05]]})))
    read_cost_file(write(tmp_path, changed(embed={"a.enc": [[4, 0.0009], [8, 0.00185], [16, 0.00069]]})))
    small = MONOTONE_NOISE_S * 0.9  # a fall of 90% but less than the absolute noise
    read_cost_file(write(tmp_path, changed(head={"a": [[2, small], [8, small / 10]]})))


@pytest.mark.parametrize("text, fragment", [
    ("not json {", "not a profiled cost file (not JSON)"),
    ("[" * 100000, "not a profiled cost file (nested too deeply)"),
    ("[1, 2]", "not a profiled cost file: the file ('list') is not a JSON object"),
    ("NaN", "the file ('float') is not a JSON object"),
])
def test_text_that_is_no_cost_file(tmp_path, text, fragment) -> None:
    assert fragment in refusal(write(tmp_path, text))


def test_binary_and_missing_files(tmp_path) -> None:
    path = tmp_path / "costs.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert "not a profiled cost file (not UTF-8 text)" in refusal(path)
    assert "no such cost file" in refusal(tmp_path / "absent.json")
    assert "is a directory" in refusal(tmp_path)


def test_loom_plan_costs_refuses_in_one_line(tmp_path) -> None:
    """In-process CLI: `loom plan --costs` with a NaN point is exit 2 and one `error:` line, never a traceback."""
    from typer.testing import CliRunner

    from orchestrator.cli import app

    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({
        "name": "costed", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"enc": {"kind": "transformer", "num_layers": 2, "hidden_size": 32, "num_heads": 4,
                               "seq_len": 8}},
        "tasks": [{"name": "a", "batch_size": 4, "components": [{"component": "enc"}]}],
        "planner": {"time_limit_s": 1}}))
    costs = write(tmp_path, changed(points={KEY: [[2, math.nan]]}))
    result = CliRunner().invoke(app, ["plan", str(job), "--costs", str(costs)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, (result.stderr, result.exception)
    assert lines[0].startswith(f"error: {costs}: points['{KEY}'][0] ([2, nan]) has nan seconds")
