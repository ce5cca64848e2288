"""Bounded spec input (issue 12): what `load_job` refuses before anything is planned, each as one SpecError line
that names the file or field, the value and the limit. Binary and non-UTF-8 files, deep nesting, duplicate keys,
a top level that is not a mapping, oversized files, and the limits on counts and sizes (planner.spec.MAX_*)."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml

from planner import spec, spec_file
from planner.errors import SpecError
from planner.spec import load_job, parse_job
from planner.spec_file import load_yaml

BASE = {
    "name": "limits",
    "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
    "components": {"t": {"kind": "transformer", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "seq_len": 4}},
    "tasks": [{"name": "a", "batch_size": 4, "components": [{"component": "t"}]}],
}


def write(tmp_path: Path, text: str | bytes, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def refusal(path: Path) -> str:
    """The one-line message load_job refuses ``path`` with (within 10 s: nothing here may hang)."""
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        load_job(path)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "\n" not in message
    return message


def job_with(**changes) -> dict:
    """BASE with ``changes`` applied: {"components.t.num_layers": 9} sets one nested key."""
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return data


def test_the_base_job_is_valid(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, yaml.safe_dump(BASE)))
    assert job.components["t"].num_layers == 2


# --------------------------------------------------------------------------- the file itself


def test_duplicate_key_names_key_and_lines(tmp_path: Path) -> None:
    text = yaml.safe_dump(BASE, sort_keys=False).replace("num_layers: 2\n", "num_layers: 2\n    num_layers: 3\n")
    path = write(tmp_path, text)
    first = text.splitlines().index("    num_layers: 2") + 1
    message = refusal(path)
    assert message == (f"{path}: line {first + 1}: key 'num_layers' is given twice in one mapping (first at line "
                       f"{first}); YAML keeps only the last. Remove one of them.")


def test_duplicate_top_level_key(tmp_path: Path) -> None:
    text = yaml.safe_dump(BASE) + "name: other\n"
    assert "key 'name' is given twice" in refusal(write(tmp_path, text))


def test_merge_keys_and_anchors_still_load(tmp_path: Path) -> None:
    """`<<: *anchor` is not a duplicate key, and aliases (used by examples/diffusion-itercomp.yaml) still work."""
    text = ("name: anchors\ncomponents:\n  t: &t {kind: transformer, num_layers: 2, hidden_size: 16, num_heads: 2}\n"
            "  u:\n    <<: *t\n    num_layers: 3\n  v: *t\n"
            "tasks:\n  - {name: a, batch_size: 4, components: [{component: u, seq_len: 4}]}\n")
    job = load_job(write(tmp_path, text))
    assert (job.components["u"].num_layers, job.components["u"].hidden_size) == (3, 16)


def test_deep_nesting_is_one_line(tmp_path: Path) -> None:
    message = refusal(write(tmp_path, "[" * (spec_file.MAX_SPEC_BYTES - 1)))
    assert message.endswith(f"line 1: the YAML nests deeper than {spec_file.MAX_YAML_DEPTH} levels; a job spec nests "
                            "about 5. Fix the brackets or indentation.")
    assert "nests deeper" in refusal(write(tmp_path, "a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 200))))


def test_binary_file(tmp_path: Path) -> None:
    elf = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4
    message = refusal(write(tmp_path, elf))
    assert message.startswith(str(tmp_path / "job.yaml") + ": not a UTF-8 text file (byte ")
    assert "binary file (it holds NUL bytes)" in refusal(write(tmp_path, b"name: x\x00\x00\n"))


def test_latin1_file(tmp_path: Path) -> None:
    message = refusal(write(tmp_path, "name: caf\u00e9\n".encode("latin-1")))
    assert message.endswith("not a UTF-8 text file (byte 9 is 0xe9); give the job's YAML file.")


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "", "42\n"])
def test_top_level_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert refusal(path) == (f"{path}: the top level must be a mapping with keys name, cluster, components, tasks.")


def test_oversized_file(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(BASE) + "#" * spec_file.MAX_SPEC_BYTES)
    assert refusal(path).startswith(f"{path}: {path.stat().st_size} bytes is too large for a job spec (at most ")


def test_syntax_error_keeps_line_and_column(tmp_path: Path) -> None:
    assert refusal(write(tmp_path, "name: [x\n")).endswith("not valid YAML at line 2, column 1. Fix the syntax.")


def test_cluster_file_is_checked_too(tmp_path: Path) -> None:
    job = write(tmp_path, yaml.safe_dump(BASE))
    cluster = write(tmp_path, "num_nodes: 1\nnum_nodes: 2\n", "cluster.yaml")
    with pytest.raises(SpecError, match=r"cluster.yaml: line 2: key 'num_nodes' is given twice"):
        load_yaml(cluster)
    with pytest.raises(SpecError, match="given twice"):
        load_job(job, cluster)


# --------------------------------------------------------------------------- limits


def limit_error(data: dict) -> str:
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        parse_job(data)
    assert time.perf_counter() - start < 10
    return str(info.value)


def test_a_billion_layers_is_refused_at_validation() -> None:
    assert limit_error(job_with(**{"components.t.num_layers": 1_000_000_000})) == (
        f"components.t.num_layers (1000000000) is over the limit of {spec.MAX_LAYERS_PER_COMPONENT} layers per "
        "component that keeps planning bounded. Use a smaller value (see docs/job-spec.md, Limits).")


def test_layers_at_the_limit_are_valid() -> None:
    assert parse_job(job_with(**{"components.t.num_layers": spec.MAX_LAYERS_PER_COMPONENT})).components["t"]


def test_a_million_devices_is_refused() -> None:
    message = limit_error(job_with(**{"cluster.num_nodes": 125_000, "cluster.devices_per_node": 8}))
    assert message.startswith(f"cluster.num_nodes * cluster.devices_per_node (1000000) is over the limit of "
                              f"{spec.MAX_DEVICES} devices")
    assert parse_job(job_with(**{"cluster.num_nodes": spec.MAX_DEVICES // 8, "cluster.devices_per_node": 8}))


def test_total_layers_over_tasks() -> None:
    per = spec.MAX_LAYERS_PER_COMPONENT
    tasks = [{"name": f"t{i}", "batch_size": 4, "components": [{"component": "t"}]}
             for i in range(spec.MAX_TOTAL_LAYERS // per + 1)]
    message = limit_error(job_with(**{"components.t.num_layers": per, "tasks": tasks}))
    assert message.startswith(f"the job's layers (num_layers summed over every task's uses) "
                              f"({per * len(tasks)}) is over the limit of {spec.MAX_TOTAL_LAYERS} layers in one job")


def test_counts_are_checked_before_the_fields() -> None:
    """A 20,000-entry task list is refused by its count at once, not compared name by name."""
    tasks = [{"name": f"t{i}", "batch_size": 4, "components": [{"component": "t"}]} for i in range(20_000)]
    assert limit_error(job_with(tasks=tasks)) == (
        f"tasks (20000 entries) is over the limit of {spec.MAX_TASKS} tasks; the planner's work grows with them. "
        "Split the job (see docs/job-spec.md, Limits).")
    uses = [{"component": "t", "name": f"u{i}", "after": []} for i in range(20_000)]
    assert limit_error(job_with(**{"tasks.0.components": uses})).startswith(
        f"tasks[0].components (20000 entries) is over the limit of {spec.MAX_USES_PER_TASK} uses in one task")
    components = {f"c{i}": dict(BASE["components"]["t"]) for i in range(spec.MAX_COMPONENTS + 1)}
    assert limit_error(job_with(components=components)).startswith(
        f"components ({spec.MAX_COMPONENTS + 1} entries) is over the limit of {spec.MAX_COMPONENTS} components")


@pytest.mark.parametrize(("key", "limit", "path"), [
    ("tasks.0.batch_size", spec.MAX_BATCH_SIZE, "tasks[0].batch_size"),
    ("tasks.0.components.0.seq_len", spec.MAX_SEQ_LEN, "tasks[0].components[0].seq_len"),
    ("components.t.seq_len", spec.MAX_SEQ_LEN, "components.t.seq_len"),
    ("components.t.hidden_size", spec.MAX_WIDTH, "components.t.hidden_size"),
])
def test_size_limits_name_the_field(key: str, limit: int, path: str) -> None:
    assert limit_error(job_with(**{key: limit + 1})).startswith(f"{path} ({limit + 1}) is over the limit of {limit} ")
    assert parse_job(job_with(**{key: limit}))


UNET = {"kind": "unet2d", "num_layers": 1, "hidden_size": 8, "num_heads": 2, "in_channels": 4}


def unet_job(channel_mults: list[int]) -> dict:
    """BASE with a unet2d on images of the largest side, whose 2^16 allows the most levels (17)."""
    return job_with(**{"components.u": {**UNET, "channel_mults": channel_mults},
                       "tasks": [{"name": "d", "batch_size": 4, "loss": "mse",
                                  "components": [{"component": "u", "image_size": spec.MAX_IMAGE_SIZE}]}]})


def test_unet_levels_are_bounded_like_a_vaes() -> None:
    """channel_mults had no length limit while the planner's blocks grow with it: a 5,000-level list was refused
    only by its use's image_size ("divisible by 2^4999"), and not at all by a component no task uses. The limit is
    a VAE's and a pretrained UNet's (planner.pretrained.check_config_levels): one level more than the halvings of the
    largest image."""
    assert spec.MAX_LEVELS == 17 and 2 ** (spec.MAX_LEVELS - 1) == spec.MAX_IMAGE_SIZE
    assert parse_job(unet_job([1] * spec.MAX_LEVELS)).components["u"].channel_mults == [1] * spec.MAX_LEVELS
    for levels in (spec.MAX_LEVELS + 1, 5_000):
        assert limit_error(unet_job([1] * levels)) == (
            f"components.u.channel_mults ({levels} levels) is over the limit of {spec.MAX_LEVELS} resolution levels "
            f"that keeps planning bounded (each level halves the image side; an image of at most "
            f"{spec.MAX_IMAGE_SIZE} pixels has {spec.MAX_LEVELS}). Use fewer levels (see docs/job-spec.md, Limits).")
    unused = job_with(**{"components.u": {**UNET, "channel_mults": [1] * 5_000}})
    assert "components.u.channel_mults (5000 levels) is over the limit" in limit_error(unused)


def test_unet_level_widths_are_whole_and_bounded() -> None:
    """A multiplier of 0 or below made a level of no channels, and one of 10^8 a level far over MAX_WIDTH; both
    validated."""
    assert limit_error(unet_job([0, 1])) == ("components.u.channel_mults[0] (0): input should be greater than or "
                                              "equal to 1. Fix the value in the spec.")
    assert limit_error(unet_job([1, -2])).startswith("components.u.channel_mults[1] (-2): input should be greater")
    wide = spec.MAX_WIDTH // UNET["hidden_size"]
    assert parse_job(unet_job([1, wide]))
    assert limit_error(unet_job([1, wide + 1])) == (
        f"components.u.hidden_size x max(channel_mults) ({UNET['hidden_size'] * (wide + 1)}) is over the limit of "
        f"{spec.MAX_WIDTH} channels that keeps planning bounded. Use a smaller value (see docs/job-spec.md, Limits).")


def test_examples_are_within_the_limits() -> None:
    root = Path(__file__).resolve().parents[3]
    for path in sorted((root / "examples").glob("*.yaml")) + sorted((root / "bench" / "workloads").glob("*.yaml")):
        load_job(path)  # raises on a limit


def test_uses_over_all_tasks() -> None:
    """Tasks within the per-task limits whose uses add up to more MetaOps than MAX_USES are refused."""
    per_task = spec.MAX_USES // 16 + 1
    tasks = [{"name": f"t{i}", "batch_size": 4,
              "components": [{"component": "t", "name": f"u{j}"} for j in range(per_task)]} for i in range(16)]
    assert per_task <= spec.MAX_USES_PER_TASK and len(tasks) <= spec.MAX_TASKS
    assert limit_error(job_with(**{"components.t.num_layers": 1}, tasks=tasks)) == (
        f"tasks[*].components ({16 * per_task} uses in all) is over the limit of {spec.MAX_USES} component uses in "
        "one job; the planner's work grows with them. Split the job (see docs/job-spec.md, Limits).")


# --------------------------------------------------------------------------- planning within its time limit

# The limit counts the planning process's CPU time (a busy machine must not change plans); the work done after it,
# one LP round and placing, simulating and packing one plan, took ~0.3-1.5 s of CPU at these sizes.
PLANNING_MARGIN_S = 5.0


def many_tasks_job(num_nodes: int, time_limit_s: float) -> dict:
    """16 tasks x 4 uses x 64 layers (64 MetaOps, 4,096 layers) on ``num_nodes`` x 8 H100s. Without the backstop,
    local search and candidate placement alone took 20-150 s at such sizes whatever the time limit."""
    components = {f"c{i}": {"kind": "transformer", "num_layers": 64, "hidden_size": 64, "num_heads": 4,
                            "seq_len": 512} for i in range(4)}
    tasks = [{"name": f"t{j}", "batch_size": 64, "components": [{"component": f"c{(j + k) % 4}"} for k in range(4)]}
             for j in range(16)]
    return {"name": "many-tasks", "cluster": {"num_nodes": num_nodes, "devices_per_node": 8, "device": "h100"},
            "components": components, "tasks": tasks, "planner": {"time_limit_s": time_limit_s}}


def timed_plan(data: dict):
    from planner.api import plan_job

    messages: list[str] = []
    start, start_cpu = time.perf_counter(), time.process_time()
    outcome = plan_job(parse_job(data), progress=messages.append)
    wall = time.perf_counter() - start
    assert wall < 60, (wall, messages)  # 20-150 s before the backstop, on an idle machine
    return time.process_time() - start_cpu, messages, outcome.plan


def assert_covers_every_layer(plan) -> None:
    done = {op.id: 0 for op in plan.metaops}
    for wave in plan.waves:
        for piece in wave.slices:
            done[piece.metaop] += piece.num_layers
    assert done == {op.id: op.num_layers for op in plan.metaops}


def test_planning_stops_at_its_time_limit() -> None:
    limit = 0.05
    seconds, messages, plan = timed_plan(many_tasks_job(128, limit))
    assert seconds < limit + PLANNING_MARGIN_S, messages
    assert any("time limit" in m and "skipped" in m for m in messages), messages  # the backstop did the stopping
    assert_covers_every_layer(plan)


def test_the_largest_cluster_plans_within_its_time_limit() -> None:
    """The largest cluster the limits allow (a million devices is refused above): a two-task VLM on 16,384 H100s."""
    data = {"name": "largest", "cluster": {"num_nodes": spec.MAX_DEVICES // 8, "devices_per_node": 8, "device": "h100"},
            "components": {"vit": {"kind": "vit", "num_layers": 24, "hidden_size": 1024, "num_heads": 16,
                                   "patch_size": 14, "image_size": 224},
                           "llm": {"kind": "llama", "num_layers": 32, "hidden_size": 4096, "num_heads": 32,
                                   "num_kv_heads": 8, "seq_len": 2048, "vocab_size": 32000,
                                   "tensor_parallel": [1, 2, 4, 8]}},  # 7B at TP 1 holds 70 GiB of fp32 state + cast
            "tasks": [{"name": "cap", "batch_size": 512, "components": [{"component": "vit"}, {"component": "llm"}]},
                      {"name": "lm", "batch_size": 1024, "components": [{"component": "llm"}]}],
            "planner": {"time_limit_s": 0.05}}
    seconds, messages, plan = timed_plan(data)
    assert seconds < 0.05 + PLANNING_MARGIN_S, messages
    assert plan.cluster.num_nodes * plan.cluster.devices_per_node == spec.MAX_DEVICES
    assert_covers_every_layer(plan)


@pytest.mark.parametrize("text, expected", [
    ("cluster: {num_nodes: 1, devices_per_node: 2, device: cpu}\nfoo: 1\n", "foo: unknown key beside `cluster:`"),
    ("{}\n", "the cluster section is empty"),
    ("", "the cluster section is empty"),
    ("cluster: {}\n", "the cluster section is empty"),
    ("cluster:\n", "the cluster section is empty"),
    ("[1, 2]\n", "the cluster section is a list, not a mapping"),
])
def test_a_cluster_file_is_one_nonempty_section(tmp_path: Path, text: str, expected: str) -> None:
    job = write(tmp_path, yaml.safe_dump(BASE))
    cluster = write(tmp_path, text, "cluster.yaml")
    with pytest.raises(SpecError) as info:
        load_job(job, cluster)
    assert str(info.value).startswith(f"{cluster}: {expected}"), info.value
    assert "\n" not in str(info.value)
