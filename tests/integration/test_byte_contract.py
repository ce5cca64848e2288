"""The byte contract: every message the runtime puts on the wire is one the plan priced, at the bytes it priced.

Real runs on gloo workers, counted where messages leave each process (tests/integration/_traffic.py), against what
the simulator prices for each kind of traffic: activation pieces (the plan's pieces), gradient buckets
(planner.sync.allreduce_bytes of the plan's buckets), ZeRO-1's all-gather of the updated shares
(planner.sync.gather_bytes) and weight hand-offs (the plan's handoffs). In fp32 and in bf16: activations and gradients
cross in the compute precision, parameters as the runtime holds them (float32). The planner sizes the modules as the
runtime builds them (what ``loom profile`` records), so the byte counts are exact, not modelled.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest

from planner.api import make_cost_model, plan_placed, plan_schedule
from planner.costmodel import Layout
from planner.metagraph import build_metagraph
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave
from planner.schedule import Schedule, Slice, Wave
from planner.spec import parse_job
from planner.sync import SyncBucket, allreduce_bytes, gather_bytes
from runtime.local_world import run_world
from runtime.profile_step import module_sizes

from _jobs import rollout_job, two_task_job  # tests/integration/_jobs.py
from _traffic import count_traffic, read_traffic  # tests/integration/_traffic.py

STEPS = 2


def sized_cost_model(job):
    """The job's cost model, with every module sized as the runtime builds it (as from a `loom profile` cost file)."""
    cost_model = make_cost_model(job)
    sizes = module_sizes(job)
    cost_model.module_size = lambda name: tuple(float(x) for x in sizes.get(name, (0, 0))[:2])
    cost_model.module_matrices = lambda name: float(sizes[name][2]) if name in sizes else None
    return cost_model


def hand_made(job, waves, cost_model):
    ids = {op.name: op.id for op in build_metagraph(job).metaops}
    schedule = Schedule(tuple(Wave(tuple(Slice(ids[n], layers, d) for n, layers, d in wave)) for wave in waves))
    return plan_schedule(job, schedule, cost_model, method="hand-made")


def priced(plan, cost_model, rank: int) -> Counter:
    """What the plan prices for ``rank`` per step: (kind, peer or group, bytes) -> messages."""
    out = Counter()
    for p in plan.pieces:
        if p.src == rank and p.src != p.dst:
            out["pieces", (p.dst,), p.bytes] += 1
    for b in plan.grad_buckets:
        if rank in b.devices and len(b.devices) > 1:
            sync = SyncBucket("", (0,), tuple(b.devices), 1, b.params)
            out["buckets", tuple(b.devices), allreduce_bytes(sync, cost_model)] += 1
            if cost_model.shard_optimizer:
                out["gather", tuple(b.devices), gather_bytes(sync, cost_model)] += 1
    return out


def counted(out_dir, rank: int) -> Counter:
    """What ``rank`` sent per step over ``STEPS`` steps (every step sends the same): kind, peer or group, bytes."""
    out = Counter()
    for m in read_traffic(out_dir, rank):
        if m["kind"] in ("pieces", "buckets", "gather", "handoff"):
            where = (m["peer"],) if "peer" in m else tuple(m["group"])
            out[m["kind"], where, float(m["bytes"])] += 1
    assert all(n % STEPS == 0 for n in out.values()), out
    return Counter({k: n // STEPS for k, n in out.items()})


def handoff_bytes(plan, out_dir, senders, wire: str = "torch.float32") -> tuple[Counter, Counter]:
    """(priced, sent): the hand-off bytes per receiving device and step, as the plan prices them and as ``senders``
    (ranks) sent them at the channel (every one as ``wire``: float32, or bytes packing a decode copy's matrices in
    the compute precision beside float32 vectors, runtime.tp_decode.pack_wire)."""
    want, sent = Counter(), Counter()
    for h in plan.handoffs:
        want[h.device] += h.bytes
    for rank in senders:
        for m in read_traffic(out_dir, rank):
            if m["kind"] == "handoff":
                sent[m["peer"]] += m["bytes"] / STEPS
                assert m["dtype"] == wire
    return want, sent


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero1_run_sends_exactly_the_priced_bytes(tmp_path, precision):
    data = two_task_job(2, STEPS)
    data["training"].update(precision=precision, shard_optimizer=True)
    job = parse_job(data)
    cost_model = sized_cost_model(job)
    # the shared text tower data parallel over both devices (one ZeRO-1 bucket over (0, 1)), the image tower on one
    # device feeding it (pieces forward and gradients back), the audio tower on the other
    plan = hand_made(job, [[("caption.img", 2, 1), ("align.aud", 2, 1)], [("caption.txt", 2, 2)],
                           [("align.txt", 2, 2)]], cost_model)
    assert cost_model.weight_bytes == (4 if precision == "fp32" else 2) and cost_model.param_bytes_moved == 4
    run_world(job, plan, STEPS, tmp_path, setup=functools.partial(count_traffic, str(tmp_path)))
    for rank in range(2):
        want, got = priced(plan, cost_model, rank), counted(tmp_path, rank)
        kinds = {k for k, _, _ in want}
        assert {"pieces", "buckets", "gather"} <= kinds, f"rank {rank}: the plan should move all three: {want}"
        assert got == want, f"rank {rank}: sent {sorted(got - want)}, priced but not sent {sorted(want - got)}"
    wire = {m["kind"]: m["dtype"] for m in read_traffic(tmp_path, 0)}
    compute = "torch.float32" if precision == "fp32" else "torch.bfloat16"
    assert (wire["pieces"], wire["buckets"], wire["gather"]) == (compute, compute, "torch.float32")


def test_pieces_land_in_receives_posted_a_boundary_ahead(tmp_path):
    """On gloo every boundary's receives are posted once the boundary before it is done (runtime.transfers
    ._post_receives), while the wave between them computes: a message that reaches a worker blocked in its receive
    right after milliseconds of compute costs ~3 ms on this kind of VM (bench.gloo_idle). The plan's first boundary
    moves nothing, so no piece here is received by a receive posted at its own boundary; the sends still pair up
    (the run finishes and sends what the plan priced)."""
    job = parse_job(two_task_job(2, STEPS))
    cost_model = sized_cost_model(job)
    plan = hand_made(job, [[("caption.img", 2, 1), ("align.aud", 2, 1)], [("caption.txt", 2, 2)],
                           [("align.txt", 2, 2)]], cost_model)
    run_world(job, plan, STEPS, tmp_path, setup=functools.partial(count_traffic, str(tmp_path)))
    receives = [m for rank in range(2) for m in read_traffic(tmp_path, rank) if m["kind"] == "receive"]
    assert receives and {m["posted_by"] for m in receives} == {"_post_receives"}, receives
    assert sum(m["bytes"] for m in receives) == STEPS * sum(p.bytes for p in plan.pieces if p.src != p.dst)


def handoff_job(precision: str):
    llama = {"kind": "llama", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "vocab_size": 32, "seq_len": 8}
    return parse_job({
        "name": "handoff", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"policy": llama, "copy": {**llama, "weights_from": "policy"}},
        "tasks": [{"name": "train", "batch_size": 4, "loss": "lm", "components": [{"component": "policy"}]},
                  {"name": "score", "batch_size": 4, "loss": "lm", "components": [
                      {"component": "copy", "mode": "forward"}]}],
        "training": {"steps": STEPS, "lr": 1e-2, "precision": precision},
    })


@pytest.mark.parametrize("precision", ["bf16"])
def test_weight_hand_off_sends_exactly_the_priced_bytes(tmp_path, precision):
    job = handoff_job(precision)
    cost_model = sized_cost_model(job)
    plan = hand_made(job, [[("train.policy", 2, 1), ("score.copy", 2, 1)]], cost_model)
    copy = next(s for w in plan.waves for s in w.slices if plan.metaops[s.metaop].component == "copy")
    receiver, = copy.devices
    run_world(job, plan, STEPS, tmp_path, setup=functools.partial(count_traffic, str(tmp_path)))
    want, sent = handoff_bytes(plan, tmp_path, range(2))
    assert set(want) == {receiver}
    assert sent == want


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_generating_device_receives_exactly_the_priced_weights(tmp_path, precision):
    """The rollouts decode on device 0, the policy trains on device 1: after every step device 0 receives the
    policy's layers and the task's LM head (the implicit hand-off), at the priced bytes: float32, or under bf16 the
    matrices in bf16 (device 0 keeps a copy only to decode with, runtime.rollout.lower_matrices) beside float32 norms
    and biases. The policy's input module it holds under the plan (the generate MetaOp's first slice runs it), so it
    steps it in its gradient bucket instead."""
    job = parse_job(rollout_job(steps=STEPS, precision=precision))
    sizes = module_sizes(job)
    ops = {op.use: op for op in build_metagraph(job).metaops}
    placed = PlacedSchedule(tuple(PlacedWave((PlacedSlice(ops[use].id, 0, 1, (d,), Layout(1, 1)),))
                                  for use, d in (("rollout", 0), ("reward", 1), ("policy", 1))))
    plan = plan_placed(job, placed, sized_cost_model(job), method="hand-made")
    run_world(job, plan, STEPS, tmp_path, setup=functools.partial(count_traffic, str(tmp_path)))
    low = precision != "fp32"
    want, sent = handoff_bytes(plan, tmp_path, [1], "torch.uint8" if low else "torch.float32")
    params, _, matrices = (a + b for a, b in zip(sizes["policy"], sizes["head:grpo"]))  # one layer and the head
    assert 0 < matrices < params
    assert (want, sent) == (Counter({0: 4 * params - (2 * matrices if low else 0)}),) * 2, (want, sent)


def run_rollout_job(tmp_path, **settings):
    """rollout_job (with ``settings``) run for STEPS steps with its traffic counted, the rollouts decoded on device 0
    and read by the frozen reward model on device 1 (the policy trains on device 0): its plan, cost model and the
    rollout's pieces that cross devices."""
    job = parse_job(rollout_job(steps=STEPS, **settings))
    ops = {op.use: op for op in build_metagraph(job).metaops}
    placed = PlacedSchedule((PlacedWave((PlacedSlice(ops["rollout"].id, 0, 1, (0,), Layout(1, 1)),)),
                             PlacedWave((PlacedSlice(ops["reward"].id, 0, 1, (1,), Layout(1, 1)),
                                         PlacedSlice(ops["policy"].id, 0, 1, (0,), Layout(1, 1))))))
    cost_model = sized_cost_model(job)
    plan = plan_placed(job, placed, cost_model, method="hand-made")
    run_world(job, plan, STEPS, tmp_path, setup=functools.partial(count_traffic, str(tmp_path)))
    rollout = [p for p in plan.pieces if p.src != p.dst and plan.waves[p.producer[0]].slices[p.producer[1]].metaop
               == ops["rollout"].id]
    return plan, cost_model, rollout


@pytest.mark.parametrize("precision, lag", [("fp32", 0), ("bf16", 1)])
def test_rollout_rows_cross_at_the_priced_bytes(tmp_path, precision, lag):
    """The rollouts decode on device 0 and the frozen reward model reads them on device 1: the rows cross as the
    runtime packs them (float32 whatever the precision: the P + N token ids, the N-wide generated mask and, with
    rollout_lag 1, the N behaviour log-probabilities), at the bytes the plan prices for those pieces."""
    plan, cost_model, rollout = run_rollout_job(tmp_path, precision=precision, rollout_lag=lag)
    prompt, new = 3, 3
    row = 4 * (prompt + (3 if lag else 2) * new)  # float32: tokens (P + N), mask (N), log-probabilities (N, lag 1)
    assert [(p.src, p.dst, p.backward, p.bytes) for p in rollout] == [(0, 1, False, 4 * row)]
    for rank in range(2):
        want, got = priced(plan, cost_model, rank), counted(tmp_path, rank)
        got_pieces = Counter({k: n for k, n in got.items() if k[0] == "pieces"})
        want_pieces = Counter({k: n for k, n in want.items() if k[0] == "pieces"})
        assert got_pieces == want_pieces, f"rank {rank}: sent {sorted(got_pieces - want_pieces)}, priced but not " \
                                          f"sent {sorted(want_pieces - got_pieces)}"
    wire = [m["dtype"] for m in read_traffic(tmp_path, 0) if m["kind"] == "pieces"]
    assert wire and set(wire) == {"torch.float32"}


@pytest.mark.parametrize("pipelined", [False, True])
def test_rows_decoded_for_every_micro_batch_cross_once_a_step_at_the_priced_bytes(tmp_path, pipelined):
    """With grad_accum_steps 2 the rollouts are decoded once, both micro-batches' rows in the first: they also cross
    then, both micro-batches' pieces in one exchange (planner.simulator.walk prices it so), so the reading devices meet
    the decoding one once a step; each micro-batch's pieces are the plan's, at its bytes, and the later micro-batch's
    wait on the receiver until it runs."""
    plan, cost_model, rollout = run_rollout_job(tmp_path, grad_accum_steps=2, pipeline_micro_batches=pipelined)
    assert [(p.src, p.dst) for p in rollout] == [(0, 1)]
    for rank in range(2):
        want = Counter({k: 2 * n for k, n in priced(plan, cost_model, rank).items() if k[0] == "pieces"})
        got = Counter({k: n for k, n in counted(tmp_path, rank).items() if k[0] == "pieces"})
        assert got == want, (rank, got, want)
    receives = [m for m in read_traffic(tmp_path, 1) if m["kind"] == "receive" and m["peer"] == 0]
    assert [m["posted_by"] for m in receives] == ["_exchange_decoded"] * 2 * STEPS
    assert {m["bytes"] for m in receives} == {rollout[0].bytes}


def test_tensor_parallel_decode_receives_exactly_the_priced_shards(tmp_path):
    """The rollouts decode at tensor_parallel 2 on devices 0-1 (runtime.tp_decode), the policy trains on device 2:
    after every step each decoding device receives its TP rank's shard of the policy's layer (its two norms whole,
    the projections halved: planner.generation.decode_shard_params) and the whole LM head, at the priced bytes."""
    data = rollout_job(steps=STEPS)
    data["cluster"]["devices_per_node"] = 3
    data["components"]["policy"]["tensor_parallel"] = [1, 2]
    job = parse_job(data)
    sizes = module_sizes(job)
    ops = {op.use: op for op in build_metagraph(job).metaops}
    placed = PlacedSchedule((PlacedWave((PlacedSlice(ops["rollout"].id, 0, 1, (0, 1), Layout(1, 2)),)),
                             PlacedWave((PlacedSlice(ops["reward"].id, 0, 1, (2,), Layout(1, 1)),)),
                             PlacedWave((PlacedSlice(ops["policy"].id, 0, 1, (2,), Layout(1, 1)),))))
    plan = plan_placed(job, placed, sized_cost_model(job), method="hand-made")
    run_world(job, plan, STEPS, tmp_path, setup=functools.partial(count_traffic, str(tmp_path)))
    want, sent = handoff_bytes(plan, tmp_path, [2])
    hidden = job.components["policy"].hidden_size
    shard = (sizes["policy"][0] - 2 * hidden) / 2 + 2 * hidden  # the layer's norms whole, its projections halved
    assert (want, sent) == (Counter({0: 4 * (shard + sizes["head:grpo"][0]),
                                     1: 4 * (shard + sizes["head:grpo"][0])}),) * 2, (want, sent)


def gathered_bytes(plan, out_dir, ranks) -> tuple[Counter, Counter]:
    """(priced, gathered): per device and step, the bytes of the all-gathers of tensor-parallel layers that the
    hand-offs' senders run first, as the plan prices them (plan.handoff_gathers) and as ``ranks`` gathered them
    (every member's part, float32)."""
    want, got = Counter(), Counter()
    for g in plan.handoff_gathers:
        for d in g.devices:
            want[d] += g.bytes
    for rank in ranks:
        for m in read_traffic(out_dir, rank):
            if m["kind"] == "handoff_gather":
                got[rank] += m["bytes"] / STEPS
                assert m["dtype"] == "torch.float32"
    return want, got


def tp_rollout_job(devices: int):
    data = rollout_job(steps=STEPS)
    data["cluster"]["devices_per_node"] = devices
    data["components"]["policy"]["tensor_parallel"] = [1, 2]
    return parse_job(data)


@pytest.mark.parametrize("decode_tp", [1, 2])
def test_tensor_parallel_trainers_gather_exactly_the_priced_bytes(tmp_path, decode_tp):
    """The policy trains at tensor_parallel 2 on devices 2-3. Decoding at tensor_parallel 1 on device 0 takes the
    whole layer, so the trainers' TP group first gathers it (runtime.tp_decode.needs_gather): each of them gathers
    the layer's split parameters (all but its two norms), as plan.handoff_gathers prices them; decoding at
    tensor_parallel 2 on 0-1 each device takes its own shard from the trainer of that shard: nothing is gathered or
    priced. The hand-off bytes themselves are the priced ones either way, and the gathers add their
    CostModel.allgather_time to predicted.handoff_s."""
    from planner.handoff import hand_off_seconds, HandOff

    job = tp_rollout_job(4)
    sizes = module_sizes(job)
    ops = {op.use: op for op in build_metagraph(job).metaops}
    decoders = (0,) if decode_tp == 1 else (0, 1)
    placed = PlacedSchedule((PlacedWave((PlacedSlice(ops["rollout"].id, 0, 1, decoders, Layout(1, decode_tp)),)),
                             PlacedWave((PlacedSlice(ops["reward"].id, 0, 1, (1,), Layout(1, 1)),)),
                             PlacedWave((PlacedSlice(ops["policy"].id, 0, 1, (2, 3), Layout(1, 2)),))))
    cost_model = sized_cost_model(job)
    plan = plan_placed(job, placed, cost_model, method="hand-made")
    run_world(job, plan, STEPS, tmp_path, setup=functools.partial(count_traffic, str(tmp_path)))
    want, got = gathered_bytes(plan, tmp_path, range(4))
    split = sizes["policy"][0] - 2 * job.components["policy"].hidden_size  # the layer but its norms
    assert (want, got) == ((Counter({2: 4 * split, 3: 4 * split}),) * 2 if decode_tp == 1 else (Counter(),) * 2)
    priced, sent = handoff_bytes(plan, tmp_path, [2, 3])
    assert priced == sent and set(sent) == set(decoders)
    offs = [HandOff(**h.model_dump()) for h in plan.handoffs]
    alone = hand_off_seconds(offs, cost_model, 4)
    gather_s = cost_model.allgather_time(4 * split, 2, cross_node=False) if decode_tp == 1 else 0.0
    assert plan.predicted.handoff_s == pytest.approx(alone + gather_s, rel=1e-12)


@pytest.mark.parametrize("trainer_tp", [2, 1])
def test_weights_from_across_tensor_parallel_layouts_moves_exactly_the_priced_bytes(tmp_path, trainer_tp):
    """components.copy.weights_from: policy, the two in different layouts. The policy trained at tensor_parallel 2
    on devices 0-1 and the copy scoring whole on device 1: the lowest holder (device 0) sends every layer whole
    after the TP group gathered it, and the copy also takes the policy's input module. The policy trained whole on
    device 0 and the copy at tensor_parallel 2 on devices 1-2: device 0 cuts each copy device its TP rank's shard
    (the two norms whole, the rest halved), nothing is gathered. The bytes gathered and sent are the priced ones."""
    data = handoff_job("fp32").model_dump(exclude_defaults=True)
    data["cluster"]["devices_per_node"] = 3
    data["components"]["policy"]["tensor_parallel"] = [1, 2]
    data["components"]["copy"]["tensor_parallel"] = [1, 2]
    job = parse_job(data)
    sizes = module_sizes(job)
    hidden = job.components["policy"].hidden_size
    ops = {op.use: op for op in build_metagraph(job).metaops}
    trainers, copies = ((0, 1), (1,)) if trainer_tp == 2 else ((0,), (1, 2))
    placed = PlacedSchedule((
        PlacedWave((PlacedSlice(ops["policy"].id, 0, 2, trainers, Layout(1, len(trainers))),)),
        PlacedWave((PlacedSlice(ops["copy"].id, 0, 2, copies, Layout(1, len(copies))),))))
    plan = plan_placed(job, placed, sized_cost_model(job), method="hand-made")
    run_world(job, plan, STEPS, tmp_path, setup=functools.partial(count_traffic, str(tmp_path)))
    split = sizes["policy"][0] - 2 * hidden  # a layer but its two norms
    want, got = gathered_bytes(plan, tmp_path, range(3))
    assert want == got == (Counter({0: 2 * 4 * split, 1: 2 * 4 * split}) if trainer_tp == 2 else Counter())
    priced, sent = handoff_bytes(plan, tmp_path, [0])
    layer = sizes["policy"][0] if trainer_tp == 2 else split / 2 + 2 * hidden  # whole, or a TP rank's shard
    # two layers and the input module (the copy's first slice runs its own)
    assert priced == sent == Counter({d: 4 * (2 * layer + sizes["embed:policy"][0]) for d in copies})
