"""The plan's program (planner.program): the pieces every worker executes are exactly what the simulator prices,
they move every row each receiver needs exactly once, and the rules hold on hand-made cases (no processes)."""

from __future__ import annotations

import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from planner.api import plan_job, plan_schedule
from planner.costmodel import Layout
from planner.metagraph import build_metagraph
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave, all_slices, build_ledger
from planner.plan import Plan, plan_from_json
from planner.program import assignment, backward_moves, forward_moves
from planner.schedule import Problem, Schedule, Slice, Wave
from planner.flows import Flows, boundary_time
from planner.pipeline import is_phased
from planner.spec import load_job, parse_job
from planner.sync import sync_buckets
from recipes.diffusion.models import save_towers

from conftest import random_schedule

ROOT = Path(__file__).resolve().parents[3]
JOBS = sorted(path for path in [*ROOT.glob("examples/*.yaml"), *ROOT.glob("bench/workloads/*.yaml"),
                                 *ROOT.glob("recipes/*/*.yaml"), *ROOT.glob("bench/runtime/*.yaml")]
              if not is_phased(yaml.safe_load(path.read_text())))  # one-phase jobs (a phased one's phases are jobs)


def fusion_job(after: list[str], tp: list[int] | None = None):
    return parse_job({
        "name": "fusion",
        "cluster": {"num_nodes": 1, "devices_per_node": 4, "device": "cpu"},
        "components": {
            "img": {"kind": "vit", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "patch_size": 4,
                    "image_size": 8},
            "txt": {"kind": "transformer", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "seq_len": 6,
                    "tensor_parallel": tp or [1]},
            "fuse": {"kind": "transformer", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "seq_len": 11},
        },
        "tasks": [{"name": "vqa", "batch_size": 8, "components": [
            {"component": "img"}, {"component": "txt", "after": []}, {"component": "fuse", "after": after}]}],
        "training": {"precision": "fp32"},
    })


def plan_of(job, waves) -> Plan:
    ids = {op.name: op.id for op in build_metagraph(job).metaops}
    return plan_schedule(job, Schedule(tuple(Wave(tuple(Slice(ids[n], k, d) for n, k, d in w)) for w in waves)),
                         method="hand-made")


def priced_transfer_seconds(plan: Plan, job) -> float:
    """What the plan's pieces cost under the plan's own cost model: per boundary and direction, every remote
    piece at once (planner.flows.boundary_time), summed: the simulator's transfer_s when both agree."""
    from planner.api import make_cost_model

    cost_model = make_cost_model(job)
    groups: dict[tuple[int, bool], list] = {}
    for p in plan.pieces:
        if p.src != p.dst:
            groups.setdefault((p.wave, p.backward), []).append(p)
    total = 0.0
    for pieces in groups.values():
        flows = Flows(np.array([p.src for p in pieces]), np.array([p.dst for p in pieces]),
                      np.array([p.bytes for p in pieces]))
        total += boundary_time([flows], cost_model)
    return total


def check_program(plan: Plan) -> None:
    """Every device of a consumer (only the first of each TP group for the loss stage) receives each of its rows of
    every input exactly once; every device of a training producer receives the gradient of each of its rows once
    per edge; local pieces move nothing; bytes are rows x the shape's elements x the same element size (8 for a
    generate use's token ids, which send no gradient back)."""
    slices = {(k, i): s for k, w in enumerate(plan.waves) for i, s in enumerate(w.slices)}
    edges = Counter()
    element = set()
    for p in plan.pieces:
        src, dst = slices[p.producer], slices[p.target]
        batch = plan.metaops[src.metaop].batch_size
        holder = src if p.backward else dst
        device = p.dst
        rank = holder.devices.index(device) // holder.tp_degree
        per = batch // holder.dp_degree
        assert rank * per <= p.start < p.stop <= (rank + 1) * per, p
        if p.src == p.dst:
            assert p.bytes == 0
        elif plan.metaops[src.metaop].mode == "generate":  # packed rollout rows, float32 whatever the precision
            op = plan.metaops[src.metaop]
            assert p.bytes == (p.stop - p.start) * op.out_bytes_per_sample and not p.backward
        else:
            element.add(p.bytes / ((p.stop - p.start) * int(np.prod(p.shape))))
        for row in range(p.start, p.stop):
            edges[(p.backward, p.producer, p.consumer, p.target, p.input, device, row)] += 1
    assert set(edges.values()) <= {1}, "a row moved twice to one device"
    assert len(element) <= 1, f"pieces priced at several element sizes: {element}"
    # completeness: forward, every receiver holds every row of its rank once per input
    for (backward, producer, consumer, target, inp) in {k[:5] for k in edges}:
        s = slices[target] if not backward else slices[producer]
        batch = plan.metaops[slices[producer].metaop].batch_size
        lead_only = consumer is None and not backward
        for i, device in enumerate(s.devices):
            if lead_only and i % s.tp_degree:
                continue
            r = i // s.tp_degree
            per = batch // s.dp_degree
            got = [row for row in range(r * per, (r + 1) * per)
                   if edges.get((backward, producer, consumer, target, inp, device, row))]
            assert len(got) == per, f"device {device} misses rows of {producer} -> {target} (backward={backward})"


def check_buckets(plan: Plan, job) -> None:
    """The sync groups the simulator priced are the plan's buckets the runtime all-reduces (those the planner sizes),
    in the same order; every layer shard's holders are the devices that run that layer at that TP position; and the
    memory ledger's buckets (the baselines' sync model) hold each layer on the same devices."""
    from planner.api import make_cost_model

    grad_bytes = make_cost_model(job).grad_bytes
    synced = [(tuple(b.devices), grad_bytes * b.params) for b in plan.grad_buckets if len(b.devices) > 1 and b.params > 0]
    assert sorted((tuple(g.devices), g.bytes) for g in plan.sync_groups) == sorted(synced)
    runs: dict[tuple[str, int, int], set[int]] = {}
    for w in plan.waves:
        for s in w.slices:
            group = plan.metaops[s.metaop].param_group
            for i, d in enumerate(s.devices):
                for layer in range(s.first_layer, s.first_layer + s.num_layers):
                    runs.setdefault((group, layer, i % s.tp_degree), set()).add(d)
    held = {(h.name, h.layer, h.shard): set(h.devices) for h in plan.holdings if ":" not in h.name}
    assert held == runs
    members = [m for b in plan.grad_buckets for m in b.members]
    assert len(members) == len(set(members))  # a shard is in one bucket
    trainable = {(h.name, h.layer, h.shard) for h in plan.holdings if h.trainable}
    assert set(members) == trainable
    cost_model = make_cost_model(job)
    placed = PlacedSchedule(tuple(PlacedWave(tuple(
        PlacedSlice(s.metaop, s.first_layer, s.num_layers, tuple(s.devices), Layout(s.dp_degree, s.tp_degree))
        for s in w.slices)) for w in plan.waves))
    problem = Problem.build(build_metagraph(job), cost_model)
    for bucket in sync_buckets(build_ledger(problem, all_slices(placed), cost_model)):
        for layer in bucket.layers:
            holders = set().union(*(devs for (g, j, _), devs in held.items() if (g, j) == (bucket.param_group, layer)))
            assert holders == set(bucket.devices), (bucket.param_group, layer)


@pytest.mark.parametrize("path", JOBS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_the_simulator_prices_exactly_the_pieces_of_every_shipped_job(path, tmp_path):
    if path.parent == ROOT / "recipes" / "diffusion":  # its towers come from `python -m recipes.diffusion.models`, not
        save_towers(tmp_path / "models")               # setup: a copy of the job beside random ones
        path = Path(shutil.copy(path, tmp_path))
    job = load_job(path)
    plan = plan_job(job).plan
    check_program(plan)
    # the standing rule (planner.candidates): Loom is never predicted slower than a baseline whose plan fits
    fitting = {name: t for name, t in plan.baselines.items() if name not in plan.baseline_notes}
    assert fitting and all(plan.predicted.iteration_time_s <= t * (1 + 1e-9) for t in fitting.values()), fitting
    # every boundary's pieces priced together (the plan's per-wave numbers); the iteration's critical path crosses
    # some of these boundaries once per micro-batch, the timeline never waiting longer at one than all its pieces
    # take together
    recorded = sum(w.transfer_in_s + w.transfer_back_s for w in plan.waves) + plan.predicted.loss_transfer_in_s \
        + plan.predicted.loss_transfer_back_s
    assert priced_transfer_seconds(plan, job) == pytest.approx(recorded, rel=1e-9, abs=1e-12)
    assert plan.predicted.transfer_s <= job.training.grad_accum_steps * recorded * (1 + 1e-9)
    forward = {}
    for p in plan.pieces:
        if not p.backward:
            key = (len(plan.waves) - 1 if p.wave == -1 else p.wave - 1, p.producer, p.target)
            forward[key] = forward.get(key, 0.0) + p.bytes
    check_buckets(plan, job)
    # the critical path's compute passes each wave once forward and once backward: never more than the slowest
    # forward and the slowest backward of every wave, and the loss stage, per micro-batch
    pred = plan.predicted
    slowest = sum(max(s.forward_s for s in w.slices) + max(s.time_s - s.forward_s for s in w.slices)
                  for w in plan.waves)
    assert pred.compute_s <= job.training.grad_accum_steps * (slowest + pred.loss_s) * (1 + 1e-9)
    assert all(0 <= s.forward_s <= s.time_s <= w.duration_s * (1 + 1e-12) for w in plan.waves for s in w.slices)
    for t in plan.transfers:  # the simulator's transfers are the plan's forward pieces, edge by edge
        got = sum(b for (w, prod, tgt), b in forward.items()
                  if w == t.after_wave and plan.waves[prod[0]].slices[prod[1]].metaop == t.src_metaop
                  and plan.waves[tgt[0]].slices[tgt[1]].metaop == t.dst_metaop)
        assert got == pytest.approx(t.bytes)


@pytest.mark.parametrize("seed", range(6))
def test_random_schedules_of_small_jobs_price_exactly_their_pieces(seed):
    rng = random.Random(seed)
    path = rng.choice([p for p in JOBS if "cpu" in p.stem or p.stem in ("hetero", "unimed-tiny")])
    job = load_job(path)
    from planner.api import make_cost_model

    problem = Problem.build(build_metagraph(job), make_cost_model(job))
    plan = plan_schedule(job, random_schedule(problem, rng), method="random")
    check_program(plan)
    check_buckets(plan, job)
    assert priced_transfer_seconds(plan, job) == pytest.approx(plan.predicted.transfer_s, rel=1e-9, abs=1e-12)


def test_tensor_parallel_then_data_parallel_on_the_same_devices():
    """TP=2 on [0, 1], then DP=2 on [0, 1]: both devices already hold every row forward (0 bytes), but backward
    each of them needs the gradient of all rows, and half of them were computed on the other device."""
    job = fusion_job(["img", "txt"], tp=[2])
    plan = plan_of(job, [[("vqa.txt", 1, 2), ("vqa.img", 1, 2)], [("vqa.fuse", 2, 4)]])
    txt = next(s for s in plan.waves[0].slices if plan.metaops[s.metaop].name == "vqa.txt")
    assert (txt.dp_degree, txt.tp_degree) == (1, 2)
    moves = forward_moves((0, 1), Layout(1, 2), (0, 1), Layout(2, 1), 8)
    assert not moves.remote.any()
    back = backward_moves((0, 1), Layout(1, 2), (0, 1), Layout(2, 1), 8)
    remote = sorted(zip(back.senders[back.remote].tolist(), back.receivers[back.remote].tolist(),
                        back.starts[back.remote].tolist(), back.stops[back.remote].tolist()))
    assert remote == [(0, 1, 0, 4), (1, 0, 4, 8)]
    check_program(plan)


def test_a_fusion_receives_every_row_of_every_input_from_its_owner():
    job = fusion_job(["img", "txt"])
    plan = plan_of(job, [[("vqa.img", 1, 2), ("vqa.txt", 1, 1)], [("vqa.fuse", 1, 4)], [("vqa.fuse", 1, 2)]])
    fuse = next((1, i) for i, s in enumerate(plan.waves[1].slices))
    img, txt = (0, 0), (0, 1)
    pieces = [p for p in plan.pieces if p.wave == 1 and not p.backward]
    assert {(p.input, p.producer) for p in pieces} == {(0, img), (1, txt)}
    devices = plan.waves[1].slices[0].devices
    for i, producer in enumerate([img, txt]):
        owner_slice = plan.waves[0].slices[producer[1]]
        for r, device in enumerate(devices):  # dp 4: device d needs samples [2r, 2r + 2)
            rows = [(p.start, p.stop, p.src) for p in pieces if p.input == i and p.dst == device]
            assert [(a, b) for a, b, _ in rows] == [(2 * r, 2 * r + 2)]
            assert rows[0][2] == owner_slice.devices[(2 * r) // (8 // owner_slice.dp_degree)]
    # backward: every producer device gets the gradient of its rows from the consumer rank that read them
    back = [p for p in plan.pieces if p.wave == 1 and p.backward]
    assert {(p.src, p.dst, p.start, p.stop) for p in back if p.input == 1} == {(d, 2, 2 * r, 2 * r + 2)
                                                                               for r, d in enumerate(devices)}
    assert fuse == (1, 0)


def test_pieces_survive_the_json_round_trip():
    job = fusion_job(["txt", "img"])
    plan = plan_of(job, [[("vqa.img", 1, 2), ("vqa.txt", 1, 2)], [("vqa.fuse", 2, 4)]])
    assert plan_from_json(plan.to_json()).pieces == plan.pieces
    assert {p.input for p in plan.pieces if p.wave == 1} == {0, 1}


def test_every_rank_gets_exactly_its_part_of_the_program():
    """A worker receives its Assignment: the pieces it sends or receives, the shards it holds, the buckets it is in;
    together the assignments hold the whole program, and each round-trips through JSON."""
    job = load_job(ROOT / "examples/vlm-cpu.yaml")
    plan = plan_job(job, with_baselines=False).plan
    ranks = range(plan.cluster.num_nodes * plan.cluster.devices_per_node)
    parts = [plan_from_json(assignment(plan, r).to_json()) for r in ranks]
    for r, part in zip(ranks, parts):
        assert part.rank == r and part.process_groups == plan.process_groups and part.waves == plan.waves
        assert part.pieces == [p for p in plan.pieces if r in (p.src, p.dst)]
        assert all(r in h.devices for h in part.holdings) and all(r in b.devices for b in part.grad_buckets)
    assert {p for part in parts for p in part.pieces} == set(plan.pieces)
    assert {(h.name, h.layer, h.shard) for part in parts for h in part.holdings} == \
        {(h.name, h.layer, h.shard) for h in plan.holdings}


@pytest.mark.parametrize("forward_last", [False, True])
def test_a_layer_is_trainable_when_any_use_trains_it_whatever_the_wave_order(forward_last):
    """One component, a train use in one task and a forward use (its weights out of autograd) in another, on both
    devices: its layers and input module train (holdings, buckets), whichever of the two slices comes last."""
    llama = {"kind": "llama", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "vocab_size": 32, "seq_len": 8}
    job = parse_job({
        "name": "shared", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"lm": llama},
        "tasks": [{"name": "train", "batch_size": 4, "loss": "lm", "components": [{"component": "lm"}]},
                  {"name": "score", "batch_size": 4, "loss": "lm", "components": [
                      {"component": "lm", "mode": "forward"}]}],
        "training": {"steps": 1},
    })
    waves = [[("train.lm", 1, 2)], [("score.lm", 1, 2)]]
    plan = plan_of(job, waves[::-1] if forward_last is False else waves)
    held = {(h.name, h.layer): h for h in plan.holdings}
    assert held[("lm", 0)].trainable and held[("embed:lm", 0)].trainable, plan.holdings
    assert any(b.devices == [0, 1] for b in plan.grad_buckets)
