"""`loom validate` (and `loom plan` option parsing) on malformed input: one `error:` line, exit code 2.

Each case starts from a valid spec, breaks one thing, and checks that the single error line names
the offending field path (and, for misspellings, the suggestion), with no traceback.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app

BASE = {
    "name": "base",
    "cluster": {"num_nodes": 1, "devices_per_node": 8, "device": "h100"},
    "components": {
        "encoder": {"kind": "vit", "num_layers": 4, "hidden_size": 256, "num_heads": 4, "patch_size": 16,
                    "image_size": 224},
        "decoder": {"kind": "transformer", "num_layers": 2, "hidden_size": 256, "num_heads": 4, "seq_len": 32},
        "head": {"kind": "mlp", "num_layers": 1, "hidden_size": 256},
    },
    "tasks": [
        {"name": "caption", "batch_size": 16,
         "components": [{"component": "encoder"}, {"component": "decoder"}, {"component": "head"}]},
    ],
}


def _set(path: str, value: object) -> Callable[[dict], None]:
    """A mutation that sets ``a.b[0].c`` to ``value``."""
    def mutate(doc: dict) -> None:
        *parents, last = _parts(path)
        target = doc
        for part in parents:
            target = target[part]
        target[last] = value
    return mutate


def _drop(path: str) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        *parents, last = _parts(path)
        target = doc
        for part in parents:
            target = target[part]
        del target[last]
    return mutate


def _parts(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for piece in path.replace("]", "").split("."):
        name, *indices = piece.split("[")
        parts.append(name)
        parts.extend(int(i) for i in indices)
    return parts


def _duplicate_task(doc: dict) -> None:
    doc["tasks"].append(copy.deepcopy(doc["tasks"][0]))


def _unet_use(doc: dict) -> None:
    doc["components"]["unet"] = {"kind": "unet2d", "num_layers": 1, "hidden_size": 32, "image_size": 30}
    doc["tasks"][0]["components"].append({"component": "unet", "after": []})


# (case id, mutation, substrings the error line must contain: the field path first)
SPEC_CASES = [
    ("unknown-top-level-key", _set("trainng", {}), ["trainng", "did you mean 'training'"]),
    ("misspelt-cluster-key", _set("cluster.devices_per_nod", 8), ["cluster.devices_per_nod", "'devices_per_node'"]),
    ("misspelt-component-key", _set("components.encoder.num_head", 4), ["components.encoder.num_head", "'num_heads'"]),
    ("misspelt-task-key", _set("tasks[0].batchsize", 4), ["tasks[0].batchsize", "'batch_size'"]),
    ("misspelt-use-key", _set("tasks[0].components[0].image_sise", 4),
     ["tasks[0].components[0].image_sise", "'image_size'"]),
    ("misspelt-training-key", _set("training", {"stepz": 3}), ["training.stepz", "'steps'"]),
    ("wrong-type-batch", _set("tasks[0].batch_size", "many"), ["tasks[0].batch_size", "'many'", "integer"]),
    ("negative-batch", _set("tasks[0].batch_size", -4), ["tasks[0].batch_size", "-4"]),
    ("zero-nodes", _set("cluster.num_nodes", 0), ["cluster.num_nodes", "(0)"]),
    ("non-positive-memory", _set("cluster.memory_gib", 0), ["cluster.memory_gib"]),
    ("negative-lr", _set("training", {"lr": -1}), ["training.lr", "-1"]),
    ("bad-optimizer", _set("training", {"optimizer": "adam"}), ["training.optimizer", "'adam'", "adamw"]),
    ("bad-solver", _set("planner", {"solver": "gurobi"}), ["planner.solver", "'gurobi'"]),
    ("frozen-not-bool", _set("components.decoder.frozen", "maybe"), ["components.decoder.frozen", "boolean"]),
    ("missing-job-name", _drop("name"), ["name: required field is missing"]),
    ("missing-num-layers", _drop("components.encoder.num_layers"), ["components.encoder.num_layers", "missing"]),
    ("missing-batch-size", _drop("tasks[0].batch_size"), ["tasks[0].batch_size", "missing"]),
    ("empty-task-list", _set("tasks", []), ["tasks", "at least 1"]),
    ("task-without-components", _set("tasks[0].components", []), ["tasks[0].components", "at least 1"]),
    ("components-is-a-list", _set("components", [1, 2]), ["components", "dictionary"]),
    ("unknown-kind", _set("components.encoder.kind", "vitt"),
     ["components.encoder.kind", "'vitt'", "did you mean 'vit'"]),
    ("unknown-component-reference", _set("tasks[0].components[1].component", "decodr"),
     ["tasks[0].components[1].component", "'decodr'", "did you mean 'decoder'"]),
    ("duplicate-task-name", _duplicate_task, ["tasks[0].name", "'caption'", "not unique"]),
    ("duplicate-use-name", _set("tasks[0].components[2]", {"component": "decoder"}),
     ["tasks[0].components[2].name", "'decoder'", "twice"]),
    ("after-names-later-use", _set("tasks[0].components[1].after", ["head"]),
     ["tasks[0].components[1].after", "'head'", "not an earlier use"]),
    ("first-use-has-after", _set("tasks[0].components[0].after", ["decoder"]),
     ["tasks[0].components[0].after", "'decoder'"]),
    ("vit-image-not-multiple-of-patch", _set("components.encoder.image_size", 225),
     ["tasks[0].components[0].image_size", "(225)", "patch_size", "224"]),
    ("vit-missing-patch-size", _drop("components.encoder.patch_size"), ["components.encoder.patch_size", "vit"]),
    ("transformer-missing-num-heads", _drop("components.decoder.num_heads"),
     ["components.decoder.num_heads", "transformer"]),
    ("transformer-missing-seq-len", _drop("components.decoder.seq_len"), ["tasks[0].components[1].seq_len"]),
    ("root-decoder-missing-cross-seq-len",
     lambda doc: (_set("components.decoder.kind", "decoder")(doc), _set("tasks[0].components[1].after", [])(doc)),
     ["components.decoder.cross_seq_len", "no upstream use"]),
    ("unet-image-not-divisible", _unet_use, ["tasks[0].components[3].image_size", "(30)", "divisible"]),
    ("tensor-parallel-not-power-of-two", _set("components.decoder.tensor_parallel", [3]),
     ["components.decoder.tensor_parallel", "(3)", "power of two"]),
    ("tensor-parallel-not-dividing-heads", _set("components.decoder.tensor_parallel", [8]),
     ["components.decoder.tensor_parallel", "(8)", "num_heads"]),
    ("unknown-device", _set("cluster.device", "h1000"), ["cluster.device", "'h1000'", "did you mean 'h100'"]),
    ("several-errors-one-line", lambda d: (d.pop("name"), d["cluster"].update(num_nodes=-1)), ["more error"]),
]


def _assert_one_error_line(result, expected: list[str]) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: "), line
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    return line


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_base_spec_is_valid(runner: CliRunner, tmp_path: Path) -> None:
    """The cases below break a spec that is valid on its own, so each error comes from its one change."""
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "1 task, 3 components" in result.stdout
    assert "8 devices" in result.stdout


@pytest.mark.parametrize("mutate, expected", [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES])
def test_malformed_spec(runner: CliRunner, tmp_path: Path, mutate, expected) -> None:
    doc = copy.deepcopy(BASE)
    mutate(doc)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    _assert_one_error_line(runner.invoke(app, ["validate", str(path)]), expected)


@pytest.mark.parametrize("text, expected", [
    ("name: x\ncomponents: {a: {kind: vit\n", ["job.yaml", "not valid YAML", "line"]),
    ("name: x\n  bad indent: [\n", ["job.yaml", "not valid YAML", "line"]),
    ("", ["job.yaml", "top level must be a mapping"]),
    ("- name: x\n- name: y\n", ["job.yaml", "top level must be a mapping"]),
    ("just a string\n", ["job.yaml", "top level must be a mapping"]),
], ids=["yaml-unclosed-brace", "yaml-bad-indent", "empty-file", "top-level-list", "top-level-scalar"])
def test_malformed_file(runner: CliRunner, tmp_path: Path, text: str, expected: list[str]) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    _assert_one_error_line(runner.invoke(app, ["validate", str(path)]), expected)


def test_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    _assert_one_error_line(runner.invoke(app, ["validate", str(missing)]), ["nope.yaml", "does not exist"])


def test_directory_instead_of_file(runner: CliRunner, tmp_path: Path) -> None:
    _assert_one_error_line(runner.invoke(app, ["validate", str(tmp_path)]), [str(tmp_path), "directory"])


def test_bad_cluster_file(runner: CliRunner, tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(BASE))
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"cluster": {"nodes": 2}}))
    result = runner.invoke(app, ["validate", str(job), "--cluster", str(cluster)])
    _assert_one_error_line(result, ["cluster.nodes", "did you mean 'num_nodes'"])


def test_cluster_file_replaces_cluster(runner: CliRunner, tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(BASE))
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"num_nodes": 4, "devices_per_node": 8, "device": "a800"}))
    result = runner.invoke(app, ["validate", str(job), "--cluster", str(cluster)])
    assert result.exit_code == 0, result.output
    assert "32 devices (4 x 8 a800" in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["--output", "xml"], ["--output", "'xml'"]),
    (["--gantt", "chart.pdf"], ["--gantt", "chart.pdf"]),
    (["--save", "no/such/dir/plan.json"], ["--save", "no/such/dir"]),
    (["--costs", "missing-costs.json"], ["--costs", "missing-costs.json"]),
    (["--unknown-flag"], ["--unknown-flag"]),
], ids=["bad-output", "bad-gantt-suffix", "save-dir-missing", "costs-missing", "unknown-option"])
def test_bad_plan_options(runner: CliRunner, tmp_path: Path, args: list[str], expected: list[str]) -> None:
    """Option errors are caught while parsing, before any planning starts."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(BASE))
    _assert_one_error_line(runner.invoke(app, ["plan", str(job), *args]), expected)


def test_unknown_command_suggests(runner: CliRunner) -> None:
    _assert_one_error_line(runner.invoke(app, ["plna"]), ["plna", "plan"])


def test_missing_argument(runner: CliRunner) -> None:
    _assert_one_error_line(runner.invoke(app, ["validate"]), ["Missing argument"])


def test_unexpected_exceptions_are_not_swallowed(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    """Only user errors become one line; a bug keeps its exception (CliRunner records it)."""
    import orchestrator.recipes

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(orchestrator.recipes, "load_job", broken)  # the CLI's way to read a job
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(BASE))
    result = runner.invoke(app, ["validate", str(job)])
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)
