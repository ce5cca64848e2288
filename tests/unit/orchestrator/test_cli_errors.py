"""`loom validate` (and `loom plan` option parsing) on malformed input: one `error:` line, exit code 2.

Each case starts from a valid spec, breaks one thing, and checks that the single error line names
the offending field path (and, for misspellings, the suggestion), with no traceback.
"""

from __future__ import annotations

import copy
import os
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


# --------------------------------------------------------------------------- bounded input (issue 12)


@pytest.mark.parametrize("content, expected", [
    (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), ["job.yaml", "not a UTF-8 text file"]),
    (b"name: x\x00\x00\n", ["job.yaml", "binary file"]),
    (b"[" * 10_000, ["job.yaml", "nests deeper than"]),
    (b"name: a\nname: b\n", ["job.yaml", "line 2: key 'name' is given twice", "first at line 1"]),
], ids=["binary", "nul-bytes", "deep-nesting", "duplicate-key"])
def test_hostile_file(runner: CliRunner, tmp_path: Path, content: bytes, expected: list[str]) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    for command in ("validate", "plan"):
        _assert_one_error_line(runner.invoke(app, [command, str(path)]), expected)


def test_a_file_that_is_no_regular_file_or_holds_code_tags_is_named_as_such(runner: CliRunner, tmp_path: Path) -> None:
    """A device or pipe is no missing file, a binary --cluster/--shapes file no job spec, a tag that would construct
    a Python object no syntax error: each message says what is wrong."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(BASE))
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo)):
        _assert_one_error_line(runner.invoke(app, ["validate", path]), [
            f"error: {path}: not a regular file (a device, pipe or socket); give the job's YAML file."])
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    _assert_one_error_line(runner.invoke(app, ["validate", str(job), "--cluster", str(binary)]), [
        "not a UTF-8 text file", "give the --cluster YAML file (a `cluster:` section or its fields)."])
    _assert_one_error_line(runner.invoke(app, ["plan", str(job), "--shapes", str(binary)]), [
        "not a UTF-8 text file", "give the --shapes file (YAML or JSON; docs/shapes.md)."])
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("name: !!python/object/apply:os.system [echo]\n")
    _assert_one_error_line(runner.invoke(app, ["validate", str(tagged)]), [
        f"error: {tagged}: the tag '!!python/object/apply:os.system' at line 1, column 7 is not allowed; a job spec "
        "holds plain data (mappings, lists, strings, numbers). Remove the tag."])
    tagged.write_text("cluster: !local {num_nodes: 1}\n")
    _assert_one_error_line(runner.invoke(app, ["validate", str(job), "--cluster", str(tagged)]), [
        "the tag '!local' at line 1, column 10 is not allowed; a cluster file holds plain data"])


@pytest.mark.parametrize("mutate, expected", [
    (_set("components.decoder.num_layers", 1_000_000_000), ["components.decoder.num_layers (1000000000)", "1024"]),
    (lambda d: d["cluster"].update(num_nodes=125_000, devices_per_node=8),
     ["cluster.num_nodes * cluster.devices_per_node (1000000)", "16384 devices"]),
    (_set("tasks[0].batch_size", 10**9), ["tasks[0].batch_size (1000000000)", "limit"]),
], ids=["billion-layers", "million-devices", "huge-batch"])
def test_sizes_over_the_limits(runner: CliRunner, tmp_path: Path, mutate, expected: list[str]) -> None:
    """Refused by `validate` and by `plan` at once (planning a billion layers grew to 7.9 GB before)."""
    import time

    doc = copy.deepcopy(BASE)
    mutate(doc)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    start = time.perf_counter()
    for command in ("validate", "plan"):
        _assert_one_error_line(runner.invoke(app, [command, str(path)]), expected)
    assert time.perf_counter() - start < 30  # two CLI calls on a possibly busy machine; planning them took minutes


@pytest.mark.parametrize("job_id", ["../../api/jobs", "raysubmit_x/../../secret", "a/b", "..", "_hidden", "x?y=1",
                                    "a\\b", "id with space", "%2e%2e", "a" * 200, ""])
@pytest.mark.parametrize("command", ["status", "logs", "stop"])
def test_unsafe_job_id_is_refused_before_any_request(runner: CliRunner, command: str, job_id: str,
                                                     monkeypatch) -> None:
    """The id is checked before the address is even parsed: no request is made (requests.get would fail the test)."""
    import requests

    def no_request(*args, **kwargs):
        raise AssertionError("a request was made")

    monkeypatch.setattr(requests, "get", no_request)
    result = runner.invoke(app, [command, job_id, "--address", "http://127.0.0.1:9"])
    _assert_one_error_line(result, ["JOB_ID", "is not a Ray job id", "A-Z a-z 0-9 _ . -"])


def test_a_safe_job_id_reaches_the_address_check(runner: CliRunner) -> None:
    result = runner.invoke(app, ["status", "raysubmit_a1B2c3D4e5F6g7H8", "--address", "127.0.0.1:8265"])
    _assert_one_error_line(result, ["--address", "has no scheme"])


CPU_JOB = {
    "name": "tiny-cpu",
    "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
    "components": {"t": {"kind": "transformer", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "seq_len": 4}},
    "tasks": [{"name": "a", "batch_size": 2, "loss": "mse", "components": [{"component": "t"}]}],
    "training": {"steps": 1, "precision": "fp32"},
    "planner": {"time_limit_s": 1},
}


def _run_at(runner: CliRunner, tmp_path: Path, address: str):
    import time

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(CPU_JOB))
    start = time.perf_counter()
    result = runner.invoke(app, ["run", str(job), "--address", address, "--out", str(tmp_path / "out")])
    return result, time.perf_counter() - start


def _gcs_host() -> str:
    """The host Ray connects to for 127.0.0.1 (it replaces loopback by this machine's node IP)."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address("127.0.0.1:1").rpartition(":")[0].strip("[]")


def test_run_address_with_nothing_listening_fails_fast(runner: CliRunner, tmp_path: Path) -> None:
    """Ray alone retries a dead GCS address for minutes; `loom run --address` answers in one line, exit 2."""
    import socket

    with socket.socket() as probe:  # a port nobody listens on: bound, never listening
        probe.bind((_gcs_host(), 0))
        port = probe.getsockname()[1]
        result, seconds = _run_at(runner, tmp_path, f"127.0.0.1:{port}")
    line = _assert_one_error_line_after_logs(result, [f"--address (127.0.0.1:{port}", "cannot connect to",
                                                      "ray start --head"])
    assert seconds < 45, (seconds, line)  # planning included; Ray alone retried for over 2 minutes
    assert not (tmp_path / "out").exists()


def test_run_address_that_is_not_a_gcs_times_out(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    """Something listens (here a socket that never speaks gRPC): refused once CONNECT_TIMEOUT_S has passed."""
    import socket

    import orchestrator.actors

    monkeypatch.setattr(orchestrator.actors, "CONNECT_TIMEOUT_S", 2.0)
    with socket.socket() as server:
        server.bind((_gcs_host(), 0))
        server.listen(8)
        port = server.getsockname()[1]
        result, seconds = _run_at(runner, tmp_path, f"127.0.0.1:{port}")
    _assert_one_error_line_after_logs(result, ["accepts connections but is not a Ray GCS", "within 2 s"])
    assert 2 <= seconds < 45


def test_run_address_malformed(runner: CliRunner, tmp_path: Path) -> None:
    result, seconds = _run_at(runner, tmp_path, "not-an-address")
    _assert_one_error_line_after_logs(result, ["--address ('not-an-address') is not HOST:PORT"])


def _assert_one_error_line_after_logs(result, expected: list[str]) -> str:
    """`loom run` logs its planning on stderr first: the last line is the one `error:` line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for text in expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    return errors[0]


# --------------------------------------------------------------------------- outputs and option values (QA pass)


@pytest.mark.parametrize("args, expected", [
    (["plan", "job.yaml", "--save", "job.yaml"], ["--save (job.yaml) is the same file as JOB.yaml"]),
    (["plan", "job.yaml", "--save", "link.yaml"], ["--save (link.yaml) is the same file as JOB.yaml (job.yaml)"]),
    (["plan", "job.yaml", "--save", "../run/job.yaml"], ["--save", "is the same file as JOB.yaml"]),
    (["plan", "job.yaml", "--costs", "costs.json", "--save", "costs.json"], ["--save", "same file as --costs"]),
    (["plan", "job.yaml", "--cluster", "job.yaml", "--gantt", "job.yaml.html", "--save", "job.yaml.html"],
     ["--gantt (job.yaml.html) is the same file as --save"]),
    (["profile", "job.yaml", "-o", "job.yaml"], ["--output (job.yaml) is the same file as JOB.yaml"]),
    (["eval", "job.yaml", "-o", "link.yaml"], ["--output (link.yaml) is the same file as JOB.yaml"]),
], ids=["plan-save-spec", "plan-save-symlink", "plan-save-relative", "plan-save-costs", "plan-gantt-save",
        "profile-output-spec", "eval-output-symlink"])
def test_an_output_that_is_an_input_or_another_output_is_refused(runner: CliRunner, tmp_path: Path, monkeypatch,
                                                                 args: list[str], expected: list[str]) -> None:
    """Refused before any work: the spec (and the cost file) keep their bytes."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    Path("job.yaml").write_text(yaml.safe_dump(BASE))
    Path("link.yaml").symlink_to("job.yaml")
    Path("costs.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    line = _assert_one_error_line(runner.invoke(app, args), [*expected, "Give", "another file name"])
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before, line


@pytest.mark.parametrize("args, expected", [
    (["run", "job.yaml", "--out", ""], ["--out", "'' names no folder"]),
    (["run", "job.yaml", "--address", ""], ["--address", "'' names no cluster"]),
    (["run", "job.yaml", "--object-store-from", "inf"], ["--object-store-from", "inf is not a finite number"]),
    (["run", "job.yaml", "--object-store-from", "1e999"], ["--object-store-from", "inf is not a finite number"]),
    (["submit", "job.yaml", "--address", ""], ["--address is empty"]),
    (["logs", "raysubmit_a1B2c3D4e5F6g7H8", "--address", " "], ["--address is empty"]),
    (["status", "raysubmit_a1B2c3D4e5F6g7H8", "--address", "http://[::1"], ["'http://[::1') is not a URL"]),
    (["stop", "raysubmit_a1B2c3D4e5F6g7H8", "--address", "http://h:99999"], ["is not a URL", "Port out of range"]),
    (["eval", "job.yaml", "--samples", "99999999999999999999"], ["--samples", "65536"]),
    (["eval", "job.yaml", "--samples", "0"], ["--samples"]),
    (["eval", "job.yaml", "-o", "."], ["--output", "is a directory"]),
    (["run", "job.yaml", "--address", "10.0.0.1:99999"], ["--address", "'10.0.0.1:99999': port '99999' is not a "
                                                         "port number (1-65535)"]),
    (["run", "job.yaml", "--address", "head:abc"], ["--address", "port 'abc' is not a port number"]),
    (["run", "job.yaml", "--address", "head:"], ["--address", "port '' is not a port number"]),
], ids=["run-empty-out", "run-empty-address", "object-store-inf", "object-store-overflow", "submit-empty-address",
        "logs-blank-address", "status-malformed-ipv6", "stop-port-out-of-range", "eval-samples-huge",
        "eval-samples-zero", "eval-output-directory", "run-port-out-of-range", "run-port-not-a-number",
        "run-port-empty"])
def test_option_values_refused_before_any_work(runner: CliRunner, tmp_path: Path, monkeypatch, args: list[str],
                                               expected: list[str]) -> None:
    """Each is refused before the job is even loaded (load_job would fail the test): no Ray, no evaluation."""
    import orchestrator.recipes

    def no_load(*a, **k):
        raise AssertionError("the job was loaded")

    monkeypatch.chdir(tmp_path)
    Path("job.yaml").write_text(yaml.safe_dump(CPU_JOB))
    monkeypatch.setattr(orchestrator.recipes, "load_job", no_load)
    if args[0] == "submit":
        import orchestrator.submit

        monkeypatch.setattr(orchestrator.submit, "load_job", no_load)
    _assert_one_error_line(runner.invoke(app, args), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


@pytest.mark.parametrize("out", ["afile/sub", "/proc/self", "/proc/self/x"],
                         ids=["parent-is-a-file", "proc", "under-proc"])
def test_unwritable_out_is_refused_before_planning(runner: CliRunner, tmp_path: Path, monkeypatch, out: str) -> None:
    """Before: planning and the Ray start ran first (about 17 s), and /proc/self was said not to exist."""
    import planner.api

    if out.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")

    def no_planning(*a, **k):
        raise AssertionError("planned")

    monkeypatch.setattr(planner.api, "plan_job", no_planning)
    monkeypatch.chdir(tmp_path)
    Path("job.yaml").write_text(yaml.safe_dump(CPU_JOB))
    Path("afile").write_text("")
    line = _assert_one_error_line_after_logs(runner.invoke(app, ["run", "job.yaml", "--out", out]), [f"--out ({out})"])
    assert ("afile is a file" in line) if out == "afile/sub" else ("cannot write" in line and "exist" not in line)


def test_more_local_workers_than_the_machine_starts_is_refused_before_planning(runner: CliRunner, tmp_path: Path,
                                                                               monkeypatch) -> None:
    """`loom run` without --address or --plan: the plan it makes is for the job's cluster, so a cluster of more devices
    than this machine starts workers for is refused from the spec; it was refused after planning (many seconds)."""
    import planner.api

    def no_planning(*a, **k):
        raise AssertionError("planned")

    monkeypatch.setattr(planner.api, "plan_job", no_planning)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.chdir(tmp_path)
    doc = copy.deepcopy(CPU_JOB)
    doc["cluster"]["devices_per_node"] = 64
    Path("job.yaml").write_text(yaml.safe_dump(doc))
    _assert_one_error_line(runner.invoke(app, ["run", "job.yaml", "--out", "out"]), [
        "job 'tiny-cpu': cluster (1 node(s) x 64 devices) needs 64 worker processes", "2 CPU cores, at most 8"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


def test_a_job_of_several_nodes_is_refused_before_planning_without_address(runner: CliRunner, tmp_path: Path,
                                                                          monkeypatch) -> None:
    """`loom run` without --address starts a one-node Ray cluster: a job of 2 nodes is refused from the spec, before
    it is planned (it was refused once the plan was made, when the cluster started)."""
    import planner.api

    def no_planning(*a, **k):
        raise AssertionError("planned")

    monkeypatch.setattr(planner.api, "plan_job", no_planning)
    monkeypatch.chdir(tmp_path)
    doc = copy.deepcopy(CPU_JOB)
    doc["cluster"].update(num_nodes=2, devices_per_node=1)
    Path("job.yaml").write_text(yaml.safe_dump(doc))
    _assert_one_error_line(runner.invoke(app, ["run", "job.yaml", "--out", "out"]), [
        "job 'tiny-cpu': cluster.num_nodes (2)", "one-node Ray cluster", "num_nodes: 1 and devices_per_node: 2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


@pytest.mark.parametrize("address", ["http://user:s3cret@127.0.0.1:8265", "user:s3cret@127.0.0.1:8265",
                                     "https://s3cret@head:8265"])
def test_an_address_with_credentials_is_refused_without_repeating_them(runner: CliRunner, address: str) -> None:
    result = runner.invoke(app, ["status", "raysubmit_a1B2c3D4e5F6g7H8", "--address", address])
    line = _assert_one_error_line(result, ["--address", "carries a user name or password", "***@"])
    assert "s3cret" not in result.stderr + result.stdout, line
