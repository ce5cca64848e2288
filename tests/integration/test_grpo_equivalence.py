"""One GRPO iteration over tiny llama models on a gloo world equals the same iteration in one process: rollouts generated
on one worker, the reward model and the reference on another, the policy's update on two (data parallel 2: the rows
re-split, a group of samples spanning both shards); identical sampled tokens, losses within 1e-5, gradients within
1e-5 relative; and the generating worker receives the updated LM head it decodes with (the hand-off), so the second
iteration's rollouts still match. The same holds with the rollout decoded tensor-parallel (runtime.tp_decode): on a
pool of its own, colocated with the policy's TP-2 training, fed by TP-2 trainers at rollout_lag 1, and a TP-1 decode
fed by TP-2 trainers; and a ``weights_from`` copy on the TP decode's devices takes the layers as it holds them (whole,
or its own TP shard), not the decode's shard."""

from __future__ import annotations

import pytest
import torch

from planner.api import plan_placed
from planner.costmodel import Layout
from planner.metagraph import build_metagraph
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave
from planner.plan import micro_batch_walk
from planner.spec import parse_job
from runtime.assignment import CommSchedule
from runtime.local_world import run_world
from runtime.reference import ReferenceTrainer, merge_parameters
from runtime.rollout import Roles

from _equivalence import (  # tests/integration/_equivalence.py
    LATER_GRAD_RTOL, RTOL, _compare_modules, check_equivalence, placed_plan,
)

STEPS = 2
PROMPT, NEW = 6, 5


def grpo_job(batch_size: int = 12, **training):
    llama = {"kind": "llama", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 40,
             "seq_len": PROMPT + NEW}
    return parse_job({
        "name": "grpo", "cluster": {"num_nodes": 1, "devices_per_node": 4, "device": "cpu"},
        "components": {"policy": llama, "reference": {**llama, "frozen": True},
                       "reward": {**llama, "num_layers": 1, "hidden_size": 16, "num_heads": 2, "num_kv_heads": 1}},
        # 12 samples in groups of 4: the policy's two shards hold rows 0-5 and 6-11, so group 4-7 spans both
        "tasks": [{"name": "grpo", "batch_size": batch_size, "loss": "grpo", "components": [
            {"component": "policy", "name": "rollout", "mode": "generate", "seq_len": PROMPT, "new_tokens": NEW,
             "samples": 4, "temperature": 1.0},
            {"component": "reward", "mode": "forward", "after": ["rollout"]},
            {"component": "reference", "mode": "forward", "after": ["rollout"]},
            {"component": "policy", "after": ["rollout"]},
        ]}],
        "training": {"steps": STEPS, "lr": 1e-2, "precision": "fp32", **training},
    })


def world_and_reference(job, plan, tmp_path, steps: int = STEPS, after_step=None):
    """Train ``plan`` ``steps`` steps on a gloo world and in one process; each step's GRPO losses must agree within
    RTOL (``after_step(reference)`` is called after each of the reference's steps). Returns the world's result, the
    reference and the rollout MetaOp's id."""
    world = run_world(job, plan, steps, tmp_path, keep_gradients=True)
    reference = ReferenceTrainer(job)
    for step in range(steps):
        want = reference.train_step(step, keep_gradients=step == steps - 1)["grpo"]
        got = world.losses[step]["grpo"]
        assert abs(got - want) <= RTOL * max(abs(want), 1e-3), (step, got, want)
        if after_step is not None:
            after_step(reference)
    return world, reference, next(op.id for op in plan.metaops if op.use == "rollout")


def test_grpo_iteration_split_over_workers_equals_one_process(tmp_path):
    job = grpo_job()
    plan = placed_plan(job, [[("rollout", [0])], [("reward", [1]), ("policy", [2, 3])], [("reference", [1])]])
    devices = {plan.metaops[s.metaop].use: s.devices for w in plan.waves for s in w.slices}
    generator, = devices["rollout"]
    assert devices["reward"] == devices["reference"] and generator not in devices["reward"] + devices["policy"]
    assert len(devices["policy"]) == 2 and not set(devices["policy"]) & set(devices["reward"])

    world, reference, rollout_op = world_and_reference(job, plan, tmp_path)
    first, rows = world.rollouts[generator][rollout_op]  # the last step's rollouts
    assert first == 0 and torch.equal(rows, reference.last_rollouts[rollout_op])
    tokens = rows[:, PROMPT:PROMPT + NEW]
    assert len({tuple(r.tolist()) for r in tokens[:4]}) > 1  # a group's samples differ
    assert torch.equal(rows[0, :PROMPT], rows[3, :PROMPT]) and not torch.equal(rows[0, :PROMPT], rows[4, :PROMPT])

    ref_params = reference.named_parameters()
    for rank, params in world.parameters.items():
        _compare_modules(params, ref_params, f"rank {rank}")
    # the generating worker holds the policy's updated LM head, which it does not train (handed over after each step)
    head = {n for n in world.parameters[generator] if n.startswith("head:grpo/0/policy.")}
    assert head and not head & set(world.gradients[generator])
    initial = ReferenceTrainer(job).named_parameters()
    assert all(not torch.equal(world.parameters[generator][n], initial[n]) for n in head)
    # it decodes with the policy's own layers (never the planner's one-layer stand-in of the generate use), and holds
    # them as the trainers stepped them
    layers = {n for n in world.parameters[generator] if n.startswith("policy/")}
    trainer = devices["policy"][0]
    assert layers and not layers & set(world.gradients[generator])
    assert all(torch.equal(world.parameters[generator][n], world.parameters[trainer][n]) for n in layers)
    assert any(not torch.equal(world.parameters[generator][n], initial[n]) for n in layers)
    assert not any("@generate" in n for params in world.parameters.values() for n in params)
    for rank, grads in world.gradients.items():
        _compare_modules(grads, reference.last_gradients, f"rank {rank} gradient of")
    trained = {n for rank, grads in world.gradients.items() for n in grads}
    assert {n for n in reference.last_gradients} == trained
    assert not any(n.startswith(("reward/", "reference/", "embed:reward", "embed:reference")) for n in trained)
    assert any(n.startswith("embed:policy") for n in trained) and any(n.startswith("policy/") for n in trained)


@pytest.mark.parametrize("pipelined, lag", [(False, 0), (True, 0), (True, 1)])
def test_rollouts_decoded_once_for_micro_batches_pipelined_over_stages_equal_one_process(pipelined, lag, tmp_path):
    """training.grad_accum_steps 2 with a generate use: the rollout worker decodes both micro-batches' rows at once in
    the first (planner.generation.decode_batches) and hands each micro-batch its own; the reward model and the
    reference score each micro-batch on worker 1; the policy's update runs as two stages (layer 0 on worker 2, layer 1
    on worker 3), its micro-batches in order or pipelined (stage 0 runs micro-batch 1 while stage 1 runs 0). Each
    micro-batch holds two whole groups, so losses and gradients equal one process's (which decodes each micro-batch on
    its own: a row's tokens depend only on its seed), and so do the last micro-batch's rollouts; one step off-policy
    (rollout_lag 1) too, every micro-batch's rows decoded with the weights the step before started from."""
    job = grpo_job(batch_size=16, grad_accum_steps=2, pipeline_micro_batches=pipelined, rollout_lag=lag)
    ops = {op.use: op for op in build_metagraph(job).metaops}

    def on(use: str, devices: tuple[int, ...], first: int = 0, layers: int | None = None) -> PlacedSlice:
        return PlacedSlice(ops[use].id, first, ops[use].num_layers if layers is None else layers, devices,
                           Layout(len(devices), 1))

    plan = plan_placed(job, PlacedSchedule((PlacedWave((on("rollout", (0,)),)),
                                            PlacedWave((on("reward", (1,)), on("policy", (2,), 0, 1))),
                                            PlacedWave((on("reference", (1,)), on("policy", (3,), 1, 1))))),
                       method="hand-made")
    walk = CommSchedule(plan, 2, *micro_batch_walk(plan, job.training)).walk
    assert (walk.index(("forward", 1, 1)) < walk.index(("backward", 0, 2))) == pipelined  # every forward first
    world, reference, rollout_op = world_and_reference(job, plan, tmp_path)
    first, rows = world.rollouts[0][rollout_op]  # the last step's last micro-batch
    want, tokens = reference.last_rollouts[rollout_op], PROMPT + 2 * NEW  # tokens and mask, then behaviour log-probs
    assert first == 0 and rows.shape == want.shape == (8, tokens + lag * NEW)
    assert torch.equal(rows[:, :tokens], want[:, :tokens])
    torch.testing.assert_close(rows[:, tokens:], want[:, tokens:], rtol=RTOL, atol=RTOL)  # rows decoded beside others
    compare_uneven(world, reference)


def test_bf16_decode_copies_hold_their_matrices_in_bf16_and_decode_as_one_process(tmp_path):
    """bf16: the generating worker holds the policy's layers and LM head only to decode with (received after every
    step): their linear weights in bf16 (runtime.rollout.lower_matrices), norms and embeddings float32. Autocast
    computes a linear layer from the bf16 cast of its weight either way, so the step's rollouts equal one process's
    (which decodes with float32 weights) token for token; after the hand-off the copy holds the trainers' weights
    rounded to bf16, the trainers keep float32, and the merge a checkpoint or an export makes takes the float32
    replica."""
    job = grpo_job(precision="bf16", steps=1)
    plan = placed_plan(job, [[("rollout", [0])], [("reward", [1]), ("policy", [2, 3])], [("reference", [1])]])
    assert Roles.build(job, plan).decode_copies == {**{("policy", i): (0,) for i in range(2)}, ("head:grpo", 0): (0,)}
    world = run_world(job, plan, 1, tmp_path)
    reference = ReferenceTrainer(job)
    want = reference.train_step(0)["grpo"]
    assert abs(world.losses[0]["grpo"] - want) <= 2e-2 * max(abs(want), 1e-3)
    rollout_op = next(op.id for op in plan.metaops if op.use == "rollout")
    first, rows = world.rollouts[0][rollout_op]
    assert first == 0 and torch.equal(rows, reference.last_rollouts[rollout_op])
    copy, trainer = world.parameters[0], world.parameters[2]
    matrices = [n for n in copy if n.startswith("policy/") and n.endswith("_proj.weight")]
    assert matrices and all(copy[n].dtype == torch.bfloat16 for n in matrices)
    assert all(torch.equal(copy[n], trainer[n].to(torch.bfloat16)) for n in matrices)  # the step's hand-off
    assert all(copy[n].dtype == torch.float32 for n in copy if "norm" in n or n.startswith("embed:"))
    norms = [n for n in copy if n.startswith("policy/") and "norm" in n]  # handed off in float32 beside the matrices
    assert norms and all(torch.equal(copy[n], trainer[n]) for n in norms)
    assert all(trainer[n].dtype == torch.float32 for n in trainer)
    merged = merge_parameters([world.parameters[r] for r in sorted(world.parameters)])
    assert all(t.dtype == torch.float32 for t in merged.values()) and set(matrices) <= set(merged)
    assert all(torch.equal(merged[n], trainer[n]) for n in matrices)


def test_weights_from_hands_the_trained_weights_over_after_every_step(tmp_path):
    """components.copy.weights_from: policy, the two on different workers: the copy (a forward use, so untrained)
    scores its task with the policy's weights of the step before, as in one process."""
    llama = {"kind": "llama", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "vocab_size": 32, "seq_len": 8}
    job = parse_job({
        "name": "handoff", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"policy": llama, "copy": {**llama, "weights_from": "policy"}},
        "tasks": [{"name": "train", "batch_size": 4, "loss": "lm", "components": [{"component": "policy"}]},
                  {"name": "score", "batch_size": 4, "loss": "lm", "components": [
                      {"component": "copy", "mode": "forward"}]}],
        "training": {"steps": 3, "lr": 1e-2, "precision": "fp32"},
    })
    plan = placed_plan(job, [[("policy", [0]), ("copy", [1])]])
    world = check_equivalence(job, plan, tmp_path)
    assert torch.equal(world.parameters[1]["copy/1/down_proj.weight"], world.parameters[0]["policy/1/down_proj.weight"])


def uneven_job(**training):
    """:func:`grpo_job` with 10 samples in groups of 5 (so 3 ranks share them 4-3-3)."""
    job = grpo_job(**training)
    return job.model_copy(update={"tasks": [job.tasks[0].model_copy(update={
        "batch_size": 10, "components": [u.model_copy(update={"samples": 5}) if u.mode == "generate" else u
                                         for u in job.tasks[0].components]})]})


def compare_uneven(world, reference, grad_rtol: float = RTOL) -> None:
    """Every rank's parameters and last gradients (within ``grad_rtol``) against one process; the loss head's frozen
    parts (reference, reward) report zero gradients on a loss of several shards, which one process leaves out."""
    ref_params = reference.named_parameters()
    for rank, params in world.parameters.items():
        _compare_modules(params, ref_params, f"rank {rank}")
    for rank, grads in world.gradients.items():
        assert all(not g.any() for n, g in grads.items() if n not in reference.last_gradients), rank
        _compare_modules({n: g for n, g in grads.items() if n in reference.last_gradients}, reference.last_gradients,
                         f"rank {rank} gradient of", grad_rtol)
    assert {n for grads in world.gradients.values() for n in grads} >= set(reference.last_gradients)


def test_uneven_row_shares_equal_one_process(tmp_path):
    """Uneven data-parallel row shares (planner.rows): 10 samples in groups of 5; the reward model on 2 workers (rows
    0-4, 5-9), the policy's update on 3 (rows 0-3, 4-6, 7-9: the first rank one row more), so the rollouts and the
    reward scores re-split unevenly, both groups span two policy shards and the loss gathers shards of different
    sizes. Identical rollouts, losses within 1e-5 and gradients within 1e-5 relative of one process, and the plan
    records the shares."""
    job = uneven_job()
    plan = placed_plan(job, [[("rollout", [0])], [("reward", [1, 2]), ("reference", [0])], [("policy", [1, 2, 3])]])
    shares = {plan.metaops[s.metaop].use: s.rows for w in plan.waves for s in w.slices}
    assert shares == {"rollout": [10], "reward": [5, 5], "reference": [10], "policy": [4, 3, 3]}
    moved = {(p.start, p.stop) for p in plan.pieces if not p.backward and p.dst in (1, 2, 3) and p.src != p.dst}
    assert {(4, 5), (7, 10)} <= moved  # reward rows 0-4 | 5-9 (devices 1, 2) re-split for the policy's 0-3 | 4-6 | 7-9

    world, reference, rollout_op = world_and_reference(job, plan, tmp_path)
    first, rows = world.rollouts[0][rollout_op]
    assert first == 0 and torch.equal(rows, reference.last_rollouts[rollout_op])
    compare_uneven(world, reference)


def test_hand_off_from_a_trainer_in_the_receivers_node_equals_one_process(tmp_path):
    """A generation pool spread over two nodes (planner.rlbaselines.pool_order): rollouts on devices 0 and 2 (one per
    node of 2), the policy's update on 1 and 3. Each generating device receives the updated weights from the trainer
    in its own node (planner.handoff.sender: NVLink, as the planner prices it), not all from device 1; the second
    step's rollouts, decoded with the handed-off weights, and the losses and parameters equal one process."""
    from runtime.rollout import Roles

    job = grpo_job()
    job = job.model_copy(update={"cluster": job.cluster.model_copy(update={"num_nodes": 2, "devices_per_node": 2})})
    plan = placed_plan(job, [[("rollout", [0, 2])], [("reward", [1]), ("reference", [3])], [("policy", [1, 3])]])
    senders = {(dst, src) for _, _, src, dst in Roles.build(job, plan).hand_offs}
    assert senders == {(0, 1), (2, 3)}

    world, reference, rollout_op = world_and_reference(job, plan, tmp_path)
    for generator in (0, 2):
        first, rows = world.rollouts[generator][rollout_op]
        assert torch.equal(rows, reference.last_rollouts[rollout_op][first:first + len(rows)])
    compare_uneven(world, reference)


def tp_job(**training):
    """:func:`grpo_job` with the policy allowed tensor_parallel 2 (4 heads, 2 key/value groups: one group a rank)."""
    job = grpo_job(**training)
    policy = job.components["policy"].model_copy(update={"tensor_parallel": [1, 2]})
    return job.model_copy(update={"components": {**job.components, "policy": policy}})


def check_tp_rollouts(world, reference, rollout_op, decoders, grad_rtol: float = RTOL) -> None:
    """Every decoding rank's last rollouts equal one process's rows, the same tokens (both ranks of a TP group decode
    the same rows) and log-probabilities within 1e-5,
    and every rank's parameters and last gradients equal one process's (:func:`compare_uneven`)."""
    exact = PROMPT + 2 * NEW  # the tokens and which count; with rollout_lag 1 their log-probabilities follow,
    # which the TP ranks' partial sums round differently
    for rank in decoders:
        first, rows = world.rollouts[rank][rollout_op]
        want = reference.last_rollouts[rollout_op][first:first + len(rows)]
        assert torch.equal(rows[:, :exact], want[:, :exact]), rank
        assert torch.allclose(rows[:, exact:], want[:, exact:], atol=1e-5), rank
    compare_uneven(world, reference, grad_rtol)


def test_rollouts_decoded_at_tensor_parallel_2_equal_one_process(tmp_path):
    """The rollout decodes at tensor_parallel 2 on devices 0-1 (one TP group, each rank a megatron-core shard of every
    policy layer and a KV cache of its own heads: runtime.tp_decode), the policy trains data parallel on 2-3 and hands
    each decoding rank its shard after every step (cut from the whole layer): the sampled tokens of both steps, the
    losses and the gradients equal one process."""
    from runtime.rollout import Roles

    job = tp_job()
    plan = placed_plan(job, [[("rollout", [0, 1], 2)], [("reward", [2]), ("policy", [3])], [("reference", [2])]])
    roles = Roles.build(job, plan)
    assert roles.tp_decode == {0: (0, 1), 1: (0, 1)}
    layer_offs = [(k, src, dst) for k, _, src, dst in roles.hand_offs if k[0] == "policy"]
    assert {dst for _, _, dst in layer_offs} == {0, 1} and {src for _, src, _ in layer_offs} == {3}
    world, reference, rollout_op = world_and_reference(job, plan, tmp_path)
    check_tp_rollouts(world, reference, rollout_op, (0, 1))
    assert not any(n.startswith("policy/") for n in world.gradients[0])  # the decoders train nothing of it


def test_colocated_tensor_parallel_decode_uses_the_trained_shards(tmp_path):
    """verl's colocated shape at tensor_parallel 2: the rollout decodes and the policy trains on all 4 devices in the
    same TP groups (0-1, 2-3), so each rank decodes with the shards it trains and no layer is handed off; rollouts,
    losses and gradients equal one process."""
    from runtime.rollout import Roles

    job = tp_job()
    plan = placed_plan(job, [[("rollout", [0, 1, 2, 3], 2)], [("reward", [0, 1]), ("reference", [2, 3])],
                             [("policy", [0, 1, 2, 3], 2)]])
    roles = Roles.build(job, plan)
    assert not [k for k, *_ in roles.hand_offs if k[0] == "policy"]
    world, reference, rollout_op = world_and_reference(job, plan, tmp_path)
    check_tp_rollouts(world, reference, rollout_op, (0, 1, 2, 3))


def test_tensor_parallel_decode_from_tensor_parallel_trainers_with_rollout_lag_1(tmp_path):
    """Trainers at the decode's degree: the policy trains at tensor_parallel 2 on devices 2-3 and hands each decoding
    rank (0-1, TP 2) its own shard, one step off-policy (rollout_lag 1: the decode of step k+1 runs during step k, in
    a thread on the generation's own pool); rollouts, losses and gradients equal one process."""
    from runtime.rollout import Roles

    job = tp_job(rollout_lag=1)
    plan = placed_plan(job, [[("rollout", [0, 1], 2)], [("reward", [2]), ("reference", [3])],
                             [("policy", [2, 3], 2)]])
    senders = {(src, dst) for k, _, src, dst in Roles.build(job, plan).hand_offs if k[0] == "policy"}
    assert senders == {(2, 0), (3, 1)}  # TP rank r's shard from the trainer of shard r
    # 3 steps: step 2's rows are the first decoded with handed-off weights (W_1, during step 1); its gradients come
    # after two AdamW updates, compared at LATER_GRAD_RTOL (_equivalence.py says why; measured 1.2e-5 here)
    world, reference, rollout_op = world_and_reference(job, plan, tmp_path, steps=3)
    check_tp_rollouts(world, reference, rollout_op, (0, 1), LATER_GRAD_RTOL)


def test_decode_at_tensor_parallel_1_from_tensor_parallel_2_trainers(tmp_path):
    """The rollout decodes data parallel on device 0 while the policy trains at tensor_parallel 2 on devices 2-3:
    after every step the trainers' TP group gathers each layer whole (runtime.tp_decode.needs_gather) and one of them
    sends it; rollouts, losses and gradients equal one process."""
    from runtime.rollout import Roles

    job = tp_job()
    plan = placed_plan(job, [[("rollout", [0])], [("reward", [1]), ("policy", [2, 3], 2)], [("reference", [1])]])
    roles = Roles.build(job, plan)
    assert not roles.tp_decode and {dst for k, _, _, dst in roles.hand_offs if k[0] == "policy"} == {0}
    world, reference, rollout_op = world_and_reference(job, plan, tmp_path)
    check_tp_rollouts(world, reference, rollout_op, (0,))


def weights_from_tp_job(reference_tp: list[int] = (1,), **training):
    """:func:`tp_job` whose reference takes the policy's weights after every step (``weights_from: policy``), as a
    reference refreshed from the trainer or a second scorer of the current policy would, at the tensor-parallel
    degrees ``reference_tp``."""
    job = tp_job(**training)
    reference = job.components["reference"].model_copy(update={"weights_from": "policy",
                                                               "tensor_parallel": list(reference_tp)})
    return job.model_copy(update={"components": {**job.components, "reference": reference}})


@pytest.mark.parametrize("reference_tp", [1, 2])
def test_weights_from_receiver_on_a_tensor_parallel_decoding_device_takes_its_own_layout(tmp_path, reference_tp):
    """The rollout decodes at tensor_parallel 2 on devices 0-1, and the reference (a ``weights_from: policy``
    receiver) runs on the same devices: at tensor_parallel 1 on device 0 its layers are whole, so the trainer on
    device 3 sends them whole (before the fix: the TP shard device 0 decodes the policy with, into a whole-layer
    buffer, and step 1's loss came out 0.054 against 0.032); at tensor_parallel 2 on 0-1 each device takes its own
    shard of the reference. The reference scores with the policy's weights of the step before, as in one process."""
    from runtime.rollout import Roles

    job = weights_from_tp_job([1, 2] if reference_tp == 2 else [1])
    devices = [0] if reference_tp == 1 else [0, 1]
    plan = placed_plan(job, [[("rollout", [0, 1], 2)], [("reward", [2]), ("policy", [3])],
                             [("reference", devices, reference_tp)]])
    roles = Roles.build(job, plan)
    assert roles.tp_decode == {0: (0, 1), 1: (0, 1)}
    offs = {(k, src, dst) for k, _, src, dst in roles.hand_offs if k[0] == "reference"}
    assert offs == {(("reference", j), 3, d) for j in range(2) for d in devices}
    held = {(k, d): roles._shard_of(k, d) for k, _, d in offs}
    assert set(held.values()) == ({None} if reference_tp == 1 else {(2, 0), (2, 1)})
    world, reference, rollout_op = world_and_reference(job, plan, tmp_path)
    check_tp_rollouts(world, reference, rollout_op, (0, 1))
    if reference_tp == 1:
        received = {n: p for n, p in world.parameters[0].items() if n.startswith("reference/")}
        assert received and all(torch.equal(p, world.parameters[3]["policy/" + n.removeprefix("reference/")])
                                for n, p in received.items())
