"""Checkpoints reshard: a run checkpointed under a plan for 2 workers resumes under a plan for 3 workers, whose
checkpoint then resumes under a plan for 1, and the losses and final parameters stay within 1e-5 of an uninterrupted run
(runtime.portable's layout: parameters and AdamW state, ZeRO-1 shares included, under global names)."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from orchestrator.actors import EmbeddedRay
from orchestrator.checkpoint import MANIFEST, complete_checkpoints, step_dir
from orchestrator.run import RunOptions, run_job
from planner.api import plan_job, plan_schedule
from planner.metagraph import build_metagraph
from planner.plan import plan_from_json
from planner.schedule import Schedule, Slice, Wave
from planner.spec import JobSpec, parse_job
from runtime.executor import Groups, WaveWorker
from runtime.prepare import build_payload
from runtime.local_world import free_port
from runtime.portable import PortableReader, export_state, import_state
from runtime.reference import merge_parameters

from _jobs import two_task_job  # tests/integration/_jobs.py
from _worlds import start_world  # tests/integration/_worlds.py

STEPS = 6


@pytest.fixture(scope="module")
def ray_session():
    cluster = EmbeddedRay(num_cpus=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def job_and_plan(num_workers: int):
    """The job on ``num_workers`` CPU workers with ZeRO-1 (its shares are what a reshard splits and reassembles) and
    its plan; on 3 workers the caption task (6 rows) runs data parallel on all three, so the text tower's bucket has
    3 holders and its shares start inside a parameter (the planner itself, pricing CPU sync after compute, gives
    each MetaOp a worker of its own there)."""
    spec = two_task_job(num_workers, steps=STEPS)
    spec["training"]["shard_optimizer"] = True
    spec["tasks"][0]["batch_size"] = 6
    job = parse_job(spec)
    if num_workers != 3:
        return job, plan_job(job, with_baselines=False).plan
    return job, hand_made(job, [[("caption.img", 2, 3)], [("caption.txt", 2, 3)], [("align.aud", 2, 2)],
                                [("align.txt", 2, 2)]])


def hand_made(job: JobSpec, waves: list[list[tuple[str, int, int]]]):
    """The plan of ``waves``: per wave, (MetaOp name, layers, devices) of each slice."""
    ids = {op.name: op.id for op in build_metagraph(job).metaops}
    return plan_schedule(job, Schedule(tuple(Wave(tuple(Slice(ids[n], layers, k) for n, layers, k in w))
                                             for w in waves)), method="hand-made")


def assert_close(got: dict[str, float], want: dict[str, float], what: str) -> None:
    for task, value in want.items():
        assert got[task] == pytest.approx(value, rel=1e-5, abs=1e-7), (what, task)


def test_checkpoint_resumes_under_plans_for_other_device_counts(ray_session, tmp_path, caplog):
    jobs = {n: job_and_plan(n) for n in (1, 2, 3)}
    assert len({plan.hash for _, plan in jobs.values()}) == 3
    whole = run_job(*jobs[2], options=RunOptions(steps=STEPS, out_dir=tmp_path / "whole", checkpoint_every=2,
                                                 collect_parameters=True))
    assert whole.records[-1].loss != whole.records[0].loss  # training moved the parameters
    # the 2-worker checkpoint after step 2, alone in a new folder, resumed under the plan for 3 workers up to step 4
    split = tmp_path / "split"
    shutil.copytree(step_dir(tmp_path / "whole", 2), step_dir(split, 2))
    with caplog.at_level(logging.INFO, logger="orchestrator.run"):
        three = run_job(*jobs[3], options=RunOptions(steps=4, out_dir=split, resume=True, checkpoint_every=2))
    lines = [r.getMessage() for r in caplog.records if "resharding" in r.getMessage()]
    assert len(lines) == 1 and "on 2 workers: resharding onto plan" in lines[0] and "on 3 workers" in lines[0], lines
    assert three.first_step == 2 and [r.step for r in three.records] == [2, 3]
    manifest = (step_dir(split, 4) / MANIFEST).read_text()
    assert '"o:exp_avg@' in manifest and '"s:step:' in manifest  # AdamW state travels with the parameters
    assert re.search(r'"o:exp_avg@[1-9]', manifest)  # ZeRO-1 over 3 holders: a share starts inside a parameter
    # the 3-worker checkpoint after step 4 (its ZeRO-1 slices reassembled), resumed under the plan for 1 worker
    assert [c.num_ranks for c in complete_checkpoints(split)] == [3, 2]  # step_4 (3 ranks), step_2 (2 ranks)
    one = run_job(*jobs[1], options=RunOptions(steps=STEPS, out_dir=split, resume=True, collect_parameters=True))
    assert one.first_step == 4 and [r.step for r in one.records] == [4, 5]
    for record in three.records + one.records:
        assert_close(record.loss, whole.records[record.step].loss, f"step {record.step}")
    want, got = merge_parameters(list(whole.parameters.values())), merge_parameters(list(one.parameters.values()))
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        err = float((got[name] - tensor).norm() / tensor.norm().clamp_min(1e-12))
        assert err <= 1e-5, (name, err)


# --------------------------------------------------------------------------- tensor parallelism (no Ray)


def index_of(directory: Path, num_ranks: int) -> dict[str, dict]:
    """The manifest's ``tensors`` index of the rank files in ``directory`` (what the driver builds from save())."""
    index = {}
    for rank in range(num_ranks):
        name = f"rank_{rank}.safetensors"
        with safe_open(str(directory / name), framework="pt") as handle:
            index.update({k: {"file": name, "shape": list(handle.get_slice(k).get_shape())} for k in handle.keys()})
    return index


def tp_worker(rank: int, world_size: int, port: int, job_json: str, plan_json: str, out: str) -> None:
    """Train steps 0-1 of a tensor-parallel plan, save this rank's portable state; then a fresh worker of the same plan
    loads every rank's files (shards re-cut from the plain layout) and both train step 2."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    job, plan, out = JobSpec.model_validate_json(job_json), plan_from_json(plan_json), Path(out)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        payload = build_payload(job, plan, rank)
        first = WaveWorker(payload, Groups.create(payload))
        for step in range(2):
            first.train_step(step)
        save_file(export_state(first), out / f"rank_{rank}.safetensors")
        dist.barrier()
        fresh = WaveWorker(payload, Groups.create(payload))
        import_state(fresh, PortableReader(out, index_of(out, world_size), "tp"))
        losses = [first.train_step(2), fresh.train_step(2)]
        torch.save({"losses": losses, "first": first.named_parameters(), "fresh": fresh.named_parameters()},
                   out / f"result_{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_state_round_trips_and_loads_without_tensor_parallelism(tmp_path):
    doc = two_task_job(4, steps=STEPS)
    doc["components"]["txt"]["tensor_parallel"] = [2]
    job = parse_job(doc)
    # the text tower TP 2 x DP 2 on 4 devices: each TP shard's ZeRO-1 bucket is shared by 2 holders, whose state the
    # checkpoint gathers before mapping the shards to the plain layout
    plan = hand_made(job, [[("caption.img", 2, 2), ("align.aud", 2, 2)], [("caption.txt", 2, 4)],
                           [("align.txt", 2, 4)]])
    assert {(s.tp_degree, s.dp_degree) for w in plan.waves for s in w.slices} == {(1, 2), (2, 2)}
    start_world(tp_worker, args=(4, free_port(), job.model_dump_json(), plan.to_json(), str(tmp_path)), nprocs=4)
    results = [torch.load(tmp_path / f"result_{r}.pt", weights_only=True) for r in range(4)]
    for result in results:  # the same plan: exact
        assert result["losses"][0] == result["losses"][1]
        for name, tensor in result["first"].items():
            assert torch.equal(tensor, result["fresh"][name]), name
    # the same files on one worker without tensor parallelism (the plain layout): step 2 within 1e-5
    single = parse_job(two_task_job(1, steps=STEPS))
    single_plan = plan_job(single, with_baselines=False).plan
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        payload = build_payload(single, single_plan, 0)
        worker = WaveWorker(payload, Groups.create(payload))
        reader = PortableReader(tmp_path, index_of(tmp_path, 4), "tp")
        import_state(worker, reader)
        assert_close(worker.train_step(2), results[0]["losses"][0], "step 2 without TP")
    finally:
        dist.destroy_process_group()
