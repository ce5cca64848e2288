"""Job specs: YAML -> JobSpec, chain/branch defaults, and one-line SpecErrors with paths and suggestions."""

from __future__ import annotations

import copy
import textwrap

import pytest
import yaml

from planner.errors import SpecError
from planner.spec import ClusterSpec, JobSpec, TaskSpec, job_schema, load_job, parse_job

JOB_YAML = textwrap.dedent(
    """\
    name: demo
    cluster:
      num_nodes: 2
      devices_per_node: 4
      device: h100
      memory_gib: 40
    components:
      vision:
        kind: vit
        num_layers: 4
        hidden_size: 64
        num_heads: 4
        patch_size: 16
        image_size: 64
      text:
        kind: transformer
        num_layers: 3
        hidden_size: 64
        num_heads: 4
        seq_len: 32
        tensor_parallel: [1, 2]
      head:
        kind: mlp
        num_layers: 1
        hidden_size: 64
        frozen: true
    tasks:
      - name: caption
        batch_size: 16
        components:
          - {component: vision}
          - {component: text}
          - {component: head}
      - name: retrieval
        batch_size: 8
        loss: contrastive
        loss_weight: 0.5
        components:
          - {component: vision, after: []}
          - {component: text, after: [], seq_len: 16}
    training:
      steps: 7
      optimizer: sgd
    planner:
      time_limit_s: 1.5
    """
)


def base_job() -> dict:
    """A valid job as a plain dict (a fresh copy each call, safe to mutate)."""
    return copy.deepcopy(yaml.safe_load(JOB_YAML))


def spec_error(data: dict) -> str:
    with pytest.raises(SpecError) as info:
        parse_job(data)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- valid specs


def test_yaml_round_trips_into_jobspec(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(JOB_YAML)
    job = load_job(path)
    assert isinstance(job, JobSpec)
    assert job.name == "demo"
    assert job.cluster.num_devices == 8
    assert job.cluster.device == "h100" and job.cluster.memory_gib == 40
    assert job.cluster.inter_node_gbps == 400.0  # default kept
    assert list(job.components) == ["vision", "text", "head"]
    assert job.components["text"].tensor_parallel == [1, 2]
    assert job.components["vision"].tensor_parallel == [1]  # default
    assert job.components["head"].frozen is True
    assert [t.name for t in job.tasks] == ["caption", "retrieval"]
    assert job.tasks[1].loss == "contrastive" and job.tasks[1].loss_weight == 0.5
    assert job.tasks[0].loss == "cross_entropy" and job.tasks[0].loss_weight == 1.0
    assert job.tasks[1].components[1].seq_len == 16
    assert job.training.steps == 7 and job.training.optimizer == "sgd"
    assert job.training.shard_optimizer == "auto"  # default: the planner chooses ZeRO-1 or not
    assert job.planner.time_limit_s == 1.5 and job.planner.solver == "highs"
    # The validated model dumps back into something that validates to the same model.
    assert parse_job(job.model_dump()) == job


def test_after_defaults_to_a_chain_and_empty_list_is_a_branch():
    job = parse_job(base_job())
    caption, retrieval = job.tasks
    assert [u.after for u in caption.components] == [None, None, None]  # None = "the previous use"
    assert [u.after for u in retrieval.components] == [[], []]
    assert [u.use_name for u in caption.components] == ["vision", "text", "head"]


def test_named_uses_may_reference_each_other():
    data = base_job()
    data["tasks"][0]["components"] = [
        {"component": "text", "name": "query"},
        {"component": "text", "name": "doc", "after": []},
        {"component": "head", "after": ["query", "doc"]},
    ]
    job = parse_job(data)
    assert [u.use_name for u in job.tasks[0].components] == ["query", "doc", "head"]
    assert job.tasks[0].components[2].after == ["query", "doc"]


def test_cluster_defaults():
    cluster = ClusterSpec()
    assert cluster.num_devices == 8 and cluster.device == "a800"


def test_specs_are_immutable():
    job = parse_job(base_job())
    with pytest.raises(Exception):
        job.name = "other"


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "edit, path, suggestion",
    [
        (lambda d: d["tasks"][1]["components"][0].update(seq_lenn=3), "tasks[1].components[0].seq_lenn", "seq_len"),
        (lambda d: d["components"]["text"].update(num_layer=3), "components.text.num_layer", "num_layers"),
        (lambda d: d["cluster"].update(devices_per_nod=3), "cluster.devices_per_nod", "devices_per_node"),
        (lambda d: d["tasks"][0].update(batch_sise=3), "tasks[0].batch_sise", "batch_size"),
        (lambda d: d["training"].update(optimiser="adamw"), "training.optimiser", "optimizer"),
        (lambda d: d["planner"].update(time_limit=3), "planner.time_limit", "time_limit_s"),
        (lambda d: d.update(taks=[]), "taks", "tasks"),
    ],
)
def test_unknown_key_names_path_and_closest_key(edit, path, suggestion):
    data = base_job()
    edit(data)
    msg = spec_error(data)
    assert msg.startswith(f"{path}: unknown key"), msg
    assert f"did you mean '{suggestion}'?" in msg


def test_unknown_key_far_from_any_field_lists_valid_keys():
    data = base_job()
    data["cluster"]["zzzzzz"] = 1
    msg = spec_error(data)
    assert msg.startswith("cluster.zzzzzz: unknown key")
    assert "did you mean" not in msg
    assert "'devices_per_node'" in msg and "'num_nodes'" in msg


def test_several_errors_are_counted_in_one_line():
    data = base_job()
    data["cluster"]["devices_per_nod"] = 3
    data["components"]["text"]["num_layer"] = 3
    msg = spec_error(data)
    assert "(and 1 more error)" in msg


# --------------------------------------------------------------------------- missing and invalid values


@pytest.mark.parametrize(
    "edit, path",
    [
        (lambda d: d["tasks"][0].pop("batch_size"), "tasks[0].batch_size"),
        (lambda d: d["components"]["vision"].pop("num_layers"), "components.vision.num_layers"),
        (lambda d: d["components"]["text"].pop("kind"), "components.text.kind"),
        (lambda d: d["tasks"][1]["components"][0].pop("component"), "tasks[1].components[0].component"),
        (lambda d: d.pop("name"), "name"),
        (lambda d: d.pop("tasks"), "tasks"),
    ],
)
def test_missing_required_field(edit, path):
    data = base_job()
    edit(data)
    msg = spec_error(data)
    assert msg.startswith(f"{path}: required field is missing"), msg


def test_out_of_range_value_names_path_and_value():
    data = base_job()
    data["tasks"][0]["batch_size"] = 0
    msg = spec_error(data)
    assert msg.startswith("tasks[0].batch_size (0)"), msg
    assert "greater than or equal to 1" in msg


def test_bad_literal_names_path():
    data = base_job()
    data["planner"]["solver"] = "gurobi"
    msg = spec_error(data)
    assert msg.startswith("planner.solver ('gurobi')"), msg


def test_empty_task_list_is_an_error():
    data = base_job()
    data["tasks"] = []
    assert spec_error(data).startswith("tasks ")


def test_top_level_must_be_a_mapping():
    with pytest.raises(SpecError, match="top level must be a mapping"):
        parse_job([1, 2, 3])


# --------------------------------------------------------------------------- references and names


def test_duplicate_task_name():
    data = base_job()
    data["tasks"][1]["name"] = "caption"
    msg = spec_error(data)
    assert msg.startswith("tasks[1].name ('caption') is not unique (also tasks[0].name)"), msg


def test_duplicate_use_name_within_a_task():
    data = base_job()
    data["tasks"][0]["components"].append({"component": "text"})
    msg = spec_error(data)
    assert msg.startswith("tasks[0].components[3].name ('text') is used twice in task 'caption'"), msg
    assert "name:" in msg  # says how to fix it


def test_same_component_twice_with_distinct_names_is_fine():
    data = base_job()
    data["tasks"][0]["components"].append({"component": "text", "name": "text2"})
    job = parse_job(data)
    assert [u.use_name for u in job.tasks[0].components][-1] == "text2"


def test_unknown_component_reference_suggests_closest():
    data = base_job()
    data["tasks"][0]["components"][1]["component"] = "txet"
    msg = spec_error(data)
    assert "tasks[0].components[1].component ('txet') is not a component of this job" in msg
    assert "did you mean 'text'?" in msg


def test_after_must_name_an_earlier_use():
    data = base_job()
    data["tasks"][0]["components"][2]["after"] = ["txt"]
    msg = spec_error(data)
    assert msg.startswith("tasks[0].components[2].after ('txt') is not an earlier use in task 'caption'"), msg
    assert "did you mean 'text'?" in msg


def test_after_may_not_name_a_later_use():
    data = base_job()
    data["tasks"][0]["components"][0]["after"] = ["text"]
    msg = spec_error(data)
    assert "tasks[0].components[0].after ('text')" in msg


# --------------------------------------------------------------------------- files


def test_load_job_replaces_cluster(tmp_path):
    job_path = tmp_path / "job.yaml"
    job_path.write_text(JOB_YAML)
    wrapped = tmp_path / "wrapped.yaml"
    wrapped.write_text("cluster:\n  num_nodes: 4\n  devices_per_node: 2\n  device: a100\n")
    bare = tmp_path / "bare.yaml"
    bare.write_text("num_nodes: 3\ndevices_per_node: 8\ndevice: cpu\n")

    job = load_job(job_path, cluster=wrapped)
    assert (job.cluster.num_nodes, job.cluster.devices_per_node, job.cluster.device) == (4, 2, "a100")
    assert job.cluster.memory_gib is None  # the job's cluster section is replaced, not merged
    job = load_job(job_path, cluster=bare)
    assert (job.cluster.num_nodes, job.cluster.devices_per_node, job.cluster.device) == (3, 8, "cpu")
    # Everything else is untouched.
    assert job.tasks == load_job(job_path).tasks


def test_load_job_cluster_file_errors_name_the_path(tmp_path):
    job_path = tmp_path / "job.yaml"
    job_path.write_text(JOB_YAML)
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_nodez: 3\n")
    with pytest.raises(SpecError, match=r"cluster\.num_nodez: unknown key; did you mean 'num_nodes'\?"):
        load_job(job_path, cluster=bad)


def test_load_job_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_job(tmp_path / "nope.yaml")


def test_load_job_bad_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntasks: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML at line") as info:
        load_job(path)
    assert "\n" not in str(info.value)


def test_load_job_runs_component_checks(tmp_path):
    data = base_job()
    data["components"]["text"]["kind"] = "transformr"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match="did you mean 'transformer'"):
        load_job(path)


def test_job_schema_is_a_json_schema():
    schema = job_schema()
    assert schema["type"] == "object"
    assert "tasks" in schema["properties"] and "components" in schema["properties"]
    assert set(schema["required"]) >= {"name", "components", "tasks"}
    # Nested models are described too, with each field's description.
    defs = schema["$defs"]
    assert "seq_len" in defs["TaskComponentSpec"]["properties"]
    assert defs["ComponentSpec"]["properties"]["num_layers"]["description"]


def test_upstream_names_default_is_the_previous_use() -> None:
    """The default `after:` rule, written once (TaskSpec.upstream_names): the previous use, none for the first,
    the list as given otherwise ([] for an independent branch)."""
    task = TaskSpec.model_validate({"name": "t", "batch_size": 2, "components": [
        {"component": "vision"}, {"component": "text"}, {"component": "text", "name": "side", "after": []},
        {"component": "text", "name": "fused", "after": ["side", "vision"]}]})
    assert [task.upstream_names(u) for u in range(4)] == [[], ["vision"], [], ["side", "vision"]]


def test_every_reader_of_after_agrees_with_upstream_names() -> None:
    """The MetaGraph's dependencies and the planner's upstream indices follow TaskSpec.upstream_names on every
    example (runtime.modules.upstream_uses calls it directly)."""
    from pathlib import Path

    from planner.components import upstream_indices
    from planner.metagraph import build_metagraph

    examples = sorted((Path(__file__).parents[3] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        job = load_job(path)
        graph = build_metagraph(job)
        for t, task in enumerate(job.tasks):
            for u, use in enumerate(task.components):
                names = task.upstream_names(u)
                assert [task.components[i].use_name for i in upstream_indices(job, t, u)] == names
                first = next(op for op in graph.metaops if op.task == task.name and op.use == use.use_name)
                assert sorted(graph.metaops[d].use for d in first.deps) == sorted(names), (path.name, first.name)


def test_a_relative_data_dir_is_read_from_the_spec_files_folder(tmp_path) -> None:
    data = yaml.safe_load(JOB_YAML) | {"recipe": "medical", "data_dir": "../real"}
    (tmp_path / "jobs").mkdir()
    path = tmp_path / "jobs" / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_job(path).data_dir == str((tmp_path / "jobs" / ".." / "real").absolute())
    assert parse_job(data).data_dir == "../real"  # no spec file: as given, from the cwd


def test_a_data_dir_without_a_recipe_is_refused() -> None:
    """Only a recipe's dataset reads data_dir (the built-in synthetic data and a task's `data:` do not): without
    `recipe:` it was checked to be a folder and then ignored, the job training on synthetic data."""
    data = yaml.safe_load(JOB_YAML) | {"data_dir": "/data/real"}
    with pytest.raises(SpecError) as err:
        parse_job(data)
    assert str(err.value) == ("data_dir (/data/real) is read only by a recipe's dataset, and this job has no "
                              "`recipe:`, so it would be ignored. Set `recipe:` (docs/recipes/), give each task its "
                              "files under `data:` (docs/data.md), or remove data_dir.")


def test_after_may_not_name_a_use_twice():
    data = base_job()
    data["tasks"][0]["components"][1]["after"] = ["vision", "vision"]  # the planner would add one constraint twice
    msg = spec_error(data)
    assert msg.startswith("tasks[0].components[1].after ('vision') names the same use twice in task 'caption'"), msg
    assert "Remove the repeat" in msg


@pytest.mark.parametrize("name", ["vision", "text"])
def test_hidden_size_must_split_into_heads(name):
    data = base_job()
    data["components"][name]["num_heads"] = 7  # 64 / 7: attention reshapes to (heads, hidden / heads) in a worker
    msg = spec_error(data)
    assert msg.startswith(f"components.{name}.hidden_size (64) is not divisible by num_heads (7)"), msg


def test_hidden_size_must_split_into_heads_for_every_kind_with_heads():
    from planner.kinds import KINDS

    with_heads = [name for name, kind in KINDS.items() if "num_heads" in kind.requires]
    assert {"transformer", "vit", "llama", "decoder"} <= set(with_heads)
    for kind in with_heads:
        data = base_job()
        data["components"]["text"] |= {"kind": kind, "hidden_size": 160, "num_heads": 7}
        assert "is not divisible by num_heads (7)" in spec_error(data), kind


@pytest.mark.parametrize("path, value", [
    ("training.lr", float("inf")), ("training.lr", "1e999"), ("training.weight_decay", float("inf")),
    ("training.lr", float("nan")), ("tasks[0].loss_weight", float("inf")), ("cluster.memory_gib", float("inf")),
    ("planner.time_limit_s", float("inf")),
])
def test_non_finite_numbers_are_refused_naming_the_field(path, value):
    data = base_job()
    section, key = path.rsplit(".", 1)
    node = data["tasks"][0] if section == "tasks[0]" else data[section]
    node[key] = value
    msg = spec_error(data)
    assert msg.startswith(f"{path} ("), msg
    assert "finite number" in msg


@pytest.mark.parametrize("path, value", [
    ("components.text.num_layers", True), ("cluster.devices_per_node", False), ("training.lr", True),
    ("tasks[0].batch_size", True), ("components.text.tensor_parallel", [1, True]),
])
def test_a_boolean_where_a_number_is_expected_is_refused(path, value):
    """pydantic's lax mode reads YAML's true/false as 1/0 (`num_layers: true` was one layer)."""
    data = base_job()
    *parents, key = path.split(".")
    node = data
    for part in parents:
        node = node["tasks"][0] if part == "tasks[0]" else node[part]
    node[key] = value
    msg = spec_error(data)
    assert msg.startswith(f"{path}: "), msg
    assert "boolean where a number is expected" in msg or "true or false where numbers are expected" in msg


def test_booleans_stay_booleans():
    data = base_job()
    data["components"]["text"]["frozen"] = True
    data["training"]["shard_optimizer"] = False
    job = parse_job(data)
    assert job.components["text"].frozen is True and job.training.shard_optimizer is False


def test_yaml_infinity_is_refused(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(JOB_YAML.replace("optimizer: sgd", "optimizer: sgd\n  lr: .inf"))
    with pytest.raises(SpecError, match=r"^training.lr \(inf\): input should be a finite number"):
        load_job(path)


def test_a_vanishing_device_memory_is_refused():
    data = base_job()
    data["cluster"]["memory_gib"] = 1e-300
    assert spec_error(data).startswith("cluster.memory_gib (1e-300): input should be greater than or equal to")


def test_an_empty_tensor_parallel_list_is_refused():
    data = base_job()
    data["components"]["text"]["tensor_parallel"] = []
    assert spec_error(data).startswith("components.text.tensor_parallel (list): list should have at least 1 item")


def test_an_empty_channel_mults_list_is_refused():
    """`channel_mults: []` names no resolution level; it was read as the default levels ([1, 2, 4, 4]), as if left
    out."""
    data = base_job()
    data["components"]["unet"] = {"kind": "unet2d", "num_layers": 1, "hidden_size": 8, "num_heads": 2, "image_size": 16}
    assert parse_job(data).components["unet"].channel_mults is None  # left out: the default
    data["components"]["unet"]["channel_mults"] = []
    assert spec_error(data).startswith("components.unet.channel_mults (list): list should have at least 1 item")


def test_tensor_parallel_needs_a_degree_that_fits_one_node():
    data = base_job()
    data["cluster"]["devices_per_node"] = 2
    data["components"]["text"]["tensor_parallel"] = [4]  # the planner skips it: no layout, "nan GiB per device"
    msg = spec_error(data)
    assert msg.startswith("components.text.tensor_parallel ([4]) has no degree up to cluster.devices_per_node (2)")
    data["components"]["text"]["tensor_parallel"] = [1, 4]  # 4 is skipped, 1 plans
    parse_job(data)
