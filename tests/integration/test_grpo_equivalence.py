"""One GRPO iteration over tiny llama models on a gloo world equals the same iteration in one process: rollouts generated
on one worker, the reward model and the reference on another, the policy's update on two (data parallel 2: the rows
re-split, a group of samples spanning both shards); identical sampled tokens, losses within 1e-5, gradients within
1e-5 relative; and the generating worker receives the updated LM head it decodes with (the hand-off), so the second
iteration's rollouts still match."""

from __future__ import annotations

import torch

from planner.spec import parse_job
from runtime.local_world import run_world
from runtime.reference import ReferenceTrainer

from _equivalence import RTOL, _compare_modules, check_equivalence, placed_plan  # tests/integration/_equivalence.py

STEPS = 2
PROMPT, NEW = 6, 5


def grpo_job(**training):
    llama = {"kind": "llama", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 40,
             "seq_len": PROMPT + NEW}
    return parse_job({
        "name": "grpo", "cluster": {"num_nodes": 1, "devices_per_node": 4, "device": "cpu"},
        "components": {"policy": llama, "reference": {**llama, "frozen": True},
                       "reward": {**llama, "num_layers": 1, "hidden_size": 16, "num_heads": 2, "num_kv_heads": 1}},
        # 12 samples in groups of 4: the policy's two shards hold rows 0-5 and 6-11, so group 4-7 spans both
        "tasks": [{"name": "grpo", "batch_size": 12, "loss": "grpo", "components": [
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


def compare_uneven(world, reference) -> None:
    """Every rank's parameters and last gradients against one process; the loss head's frozen parts (reference,
    reward) report zero gradients on a loss of several shards, which one process leaves out."""
    ref_params = reference.named_parameters()
    for rank, params in world.parameters.items():
        _compare_modules(params, ref_params, f"rank {rank}")
    for rank, grads in world.gradients.items():
        assert all(not g.any() for n, g in grads.items() if n not in reference.last_gradients), rank
        _compare_modules({n: g for n, g in grads.items() if n in reference.last_gradients}, reference.last_gradients,
                         f"rank {rank} gradient of")
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
