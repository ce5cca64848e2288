"""Placement on real nodes: `loom run --address` on a Ray cluster of two nodes that this module starts on this machine.

The cluster (``ray.cluster_utils.Cluster``: a head and a worker node, 2 CPUs each, a private temp dir) lives for the
module; the nodes take this host's own address, which Linux routes over loopback (Ray turns a 127.0.0.1 address
into the host's address when a driver joins, so nodes bound to 127.0.0.1 cannot be joined). Checked: a plan for
2 nodes x 2 devices trains with every plan node's ranks on one Ray node of their own and no tensor-parallel group
across nodes; a plan for more nodes than the cluster has, or for nodes bigger than its nodes, is refused in one line
before anything is reserved; a placement group Ray cannot place in time is refused, not waited on; a plan for 2
nodes on the embedded one-node cluster is refused before any Ray process starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from typer.testing import CliRunner

import orchestrator.actors
from orchestrator.cli import app
from orchestrator.placement import groups_across_nodes
from orchestrator.run import RunInputError, RunOptions, run_job
from planner.api import plan_schedule
from planner.metagraph import build_metagraph
from planner.schedule import Schedule, Slice, Wave
from planner.spec import parse_job

from _jobs import two_task_job  # tests/integration/_jobs.py

CPUS_PER_NODE = 2
ENV = {"RAY_AUTH_MODE": "disabled"}  # a cluster private to the test: no token file under ~/.ray


def job_doc(num_nodes: int, devices_per_node: int, tensor_parallel: bool = True) -> dict:
    """The two-task job (2 steps) on ``num_nodes`` x ``devices_per_node`` devices, its shared text tower tensor
    parallel (TP 2) unless told otherwise."""
    data = two_task_job(devices_per_node, steps=2)
    data["cluster"]["num_nodes"] = num_nodes
    if tensor_parallel:
        data["components"]["txt"]["tensor_parallel"] = [2]
    return data


def job_on(num_nodes: int, devices_per_node: int, tensor_parallel: bool = True):
    return parse_job(job_doc(num_nodes, devices_per_node, tensor_parallel))


def plan_for(job, waves: list[list[tuple[str, int, int]]]):
    """A Plan of a hand-made schedule (waves of (MetaOp name, layers, devices)): no solver, the same plan each time."""
    ids = {op.name: op.id for op in build_metagraph(job).metaops}
    schedule = Schedule(tuple(Wave(tuple(Slice(ids[name], layers, n) for name, layers, n in wave)) for wave in waves))
    return plan_schedule(job, schedule, method="hand-made")


# every MetaOp on one plan node's 2 devices; the text tower's slices are tensor parallel, one TP group per node
WAVES = [[("caption.img", 2, 2), ("align.aud", 2, 2)], [("caption.txt", 2, 2), ("align.txt", 2, 2)]]


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a worker node of CPUS_PER_NODE CPUs each; everything (address file included) in a private temp dir."""
    temp = tempfile.mkdtemp(prefix="loom-nodes-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    saved = {key: os.environ.get(key) for key in [*ENV, "RAY_TMPDIR"]}
    os.environ.update(ENV, RAY_TMPDIR=temp)
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=CPUS_PER_NODE, include_dashboard=False)
        cluster.add_node(num_cpus=CPUS_PER_NODE)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp, ignore_errors=True)
        assert not cluster.list_all_nodes()


@pytest.fixture
def restored_logging():
    """The CLI puts a handler on the root logger that writes to CliRunner's stream, closed once the call returns."""
    root, ours = logging.getLogger(), logging.getLogger("orchestrator")
    handlers, root_level, our_level = root.handlers[:], root.level, ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(root_level)
    ours.setLevel(our_level)


@pytest.fixture
def nothing_reserved(monkeypatch):
    """Fails the test if the run reserves nodes or starts an actor (a refusal must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the run reserved nodes or started actors before refusing")

    monkeypatch.setattr(orchestrator.actors, "reserve_nodes", refuse)
    monkeypatch.setattr(orchestrator.actors, "create_actors", refuse)


def test_each_plan_node_runs_on_a_ray_node_of_its_own(two_nodes, tmp_path):
    job = job_on(num_nodes=2, devices_per_node=CPUS_PER_NODE)
    plan = plan_for(job, WAVES)
    groups = {tuple(s.devices[i:i + s.tp_degree]) for w in plan.waves for s in w.slices if s.tp_degree > 1
              for i in range(0, len(s.devices), s.tp_degree)}
    # the planner's side: TP groups on both plan nodes, each inside one (device d is on plan node d // 2)
    assert {tuple(d // CPUS_PER_NODE for d in g) for g in groups} == {(0, 0), (1, 1)}, groups

    result = run_job(job, plan, options=RunOptions(address=two_nodes.address, out_dir=tmp_path / "out",
                                                   checkpoint_every=0))

    assert len(result.records) == 2 and all(r.loss for r in result.records)
    nodes = result.worker_nodes  # rank -> the Ray node its actor reported
    ray_nodes = {n.node_id for n in two_nodes.list_all_nodes()}
    assert len(nodes) == 4 and set(nodes) == ray_nodes, (nodes, ray_nodes)
    assert nodes[0] == nodes[1] != nodes[2] == nodes[3], nodes
    assert groups_across_nodes(groups, nodes) == []
    assert not ray.is_initialized()  # the driver left the cluster it joined


def test_more_plan_nodes_than_cluster_nodes_is_refused_in_one_line(two_nodes, tmp_path, nothing_reserved):
    job = job_on(num_nodes=3, devices_per_node=CPUS_PER_NODE)  # 6 workers: the cluster has 4 CPUs in 2 nodes
    plan = plan_for(job, WAVES)
    with pytest.raises(RunInputError) as refused:
        run_job(job, plan, options=RunOptions(address=two_nodes.address, out_dir=tmp_path / "out"))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"--address ({two_nodes.address}): "), message
    assert "needs 3 Ray nodes with 2 CPUs each" in message and "only 2 have that many" in message
    assert not ray.is_initialized()


def test_plan_nodes_bigger_than_the_cluster_nodes_are_refused_by_the_cli(two_nodes, tmp_path, nothing_reserved,
                                                                          restored_logging):
    doc = job_doc(num_nodes=1, devices_per_node=2 * CPUS_PER_NODE)  # 4 CPUs in total, but not on one node
    plan_path = tmp_path / "plan.json"
    plan_for(parse_job(doc), WAVES).save(plan_path)
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = CliRunner().invoke(app, ["run", str(job_path), "--plan", str(plan_path), "--address",
                                      two_nodes.address, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, (result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()  # log lines may come first; the error line is the last, and alone
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.stderr, result.stderr
    assert "needs 1 Ray node with 4 CPUs each" in errors[0] and "only 0 have that many" in errors[0], errors[0]
    assert not ray.is_initialized()


def test_a_placement_ray_cannot_grant_in_time_is_refused(two_nodes, tmp_path, monkeypatch):
    """Both nodes are big enough, but one is busy: the group waits for the timeout, then is removed and refused."""
    created = []
    monkeypatch.setattr(orchestrator.actors, "create_actors", lambda *a, **k: created.append(a) or [])
    ray.init(address=two_nodes.address, logging_level="WARNING", log_to_driver=False)
    before = {g["name"] for g in placement_group_table().values()}  # earlier runs' groups, removed
    busy = placement_group([{"CPU": CPUS_PER_NODE}])  # one node's CPUs, held by someone else
    try:
        assert busy.wait(30)
        job = job_on(num_nodes=2, devices_per_node=CPUS_PER_NODE)
        with pytest.raises(RunInputError, match=r"did not reserve 2 nodes x 2 workers .* within 2 s"):
            run_job(job, plan_for(job, WAVES), options=RunOptions(out_dir=tmp_path / "out", placement_timeout_s=2))
        assert not created
        states = {g["name"]: g["state"] for g in placement_group_table().values()}
        assert [s for name, s in states.items() if name.startswith("loom-") and name not in before] == ["REMOVED"], \
            states
    finally:
        remove_placement_group(busy)
        ray.shutdown()


def test_a_plan_for_two_nodes_is_refused_on_the_embedded_cluster(tmp_path, nothing_reserved):
    job = job_on(num_nodes=2, devices_per_node=1, tensor_parallel=False)
    refusal = r"^--plan: cluster.num_nodes \(2\): .* one-node Ray .* devices_per_node: 2"
    with pytest.raises(RunInputError, match=refusal):
        run_job(job, plan_for(job, [[("caption.img", 2, 1), ("align.aud", 2, 1)],
                                    [("caption.txt", 2, 1), ("align.txt", 2, 1)]]),
                options=RunOptions(out_dir=tmp_path / "out"))
    assert not ray.is_initialized()
