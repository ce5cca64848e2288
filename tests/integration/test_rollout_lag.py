"""``training.rollout_lag: 1`` (one-step off-policy rollouts): three GRPO steps over tiny llama models on a gloo world
(rollouts on worker 0, reward and reference on worker 1, the update data parallel on workers 2-3) equal the same
steps in one process with the same lag: identical sampled tokens and behaviour log-probabilities, losses within
1e-5, gradients within 1e-5 relative. And the lag is real: step k decodes with the weights step k-1 started from
(steps 0 and 1 with the initial ones, step 2 with those the generating worker received after step 0)."""

from __future__ import annotations

import torch

from runtime.data import task_batch
from runtime.grpo import grpo_losses
from runtime.reference import ReferenceTrainer
from runtime.rollout import behaviour_logprobs, unpack

from _equivalence import _compare_modules, placed_plan  # tests/integration/_equivalence.py
from test_grpo_equivalence import NEW, PROMPT, compare_uneven, grpo_job, uneven_job, world_and_reference

STEPS = 3


def test_lagged_rollouts_split_over_workers_equal_one_process(tmp_path):
    job = grpo_job(rollout_lag=1, steps=STEPS)
    plan = placed_plan(job, [[("rollout", [0])], [("reward", [1]), ("policy", [2, 3])], [("reference", [1])]])
    lagged = []
    rollout_op = next(op.id for op in plan.metaops if op.use == "rollout")
    world, reference, _ = world_and_reference(job, plan, tmp_path, STEPS,
                                              lambda ref: lagged.append(ref.last_rollouts[rollout_op].clone()))
    first, rows = world.rollouts[0][rollout_op]  # the last step's rollouts, with their behaviour log-probabilities
    assert first == 0 and rows.shape[1] == PROMPT + 3 * NEW
    assert torch.equal(rows[:, :PROMPT + 2 * NEW], lagged[-1][:, :PROMPT + 2 * NEW])  # tokens, which count
    assert torch.allclose(behaviour_logprobs(rows, PROMPT, NEW), behaviour_logprobs(lagged[-1], PROMPT, NEW),
                          rtol=0, atol=1e-5)
    for rank, grads in world.gradients.items():
        _compare_modules(grads, reference.last_gradients, f"rank {rank} gradient of")
    for rank, params in world.parameters.items():
        _compare_modules(params, reference.named_parameters(), f"rank {rank}")

    # step 0 decodes with the initial weights, step 1 with them again (the lag), step 2 with step 1's (handed over)
    initial = ReferenceTrainer(grpo_job(steps=STEPS))  # on-policy, never stepped: the initial weights
    for step in range(STEPS):
        initial.forward(0, task_batch(job, 0, step, 0, job.tasks[0].batch_size), step)
        same = torch.equal(lagged[step][:, :PROMPT + 2 * NEW], initial.last_rollouts[rollout_op])
        assert same == (step < 2), step
    assert torch.equal(behaviour_logprobs(rows, PROMPT, NEW) == 0, ~unpack(rows, PROMPT, NEW)[1])

    # worker 0 runs only the generation: it decodes step k+1's rollouts in a thread while the others train step k. The
    # decode starts before the trainers' loss (which needs the rows it sends after starting it), and in some step it is
    # still running when a trainer already holds its rows (a decode done before sending would end first)
    overlapped = []
    for step, ranks in enumerate(world.timings):
        start, end = (ranks[0]["start_unix"] + t for t in ranks[0]["ahead"])
        trainer = ranks[2]
        loss_end = max(trainer["start_unix"] + e for part, _, _, e in trainer["spans"] if part == "loss")
        rows_in = min(trainer["start_unix"] + e for part, wave, _, e in trainer["spans"]
                      if part == "transfer_forward" and wave == 1)
        assert start < loss_end, (step, start, loss_end)
        overlapped.append((end - rows_in, end - start))
    assert any(late > 0 for late, _ in overlapped), overlapped


def test_clipped_ratio_matches_on_policy_at_ratio_one_and_stops_outside_the_clip():
    torch.manual_seed(0)
    logp = (-torch.rand(4, 3)).requires_grad_()
    generated = torch.tensor([[1, 1, 0]] * 4, dtype=torch.bool)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    on = grpo_losses(logp, None, advantages, generated, beta=0.0)
    (g_on,) = torch.autograd.grad(on.sum(), logp)
    off = grpo_losses(logp, None, advantages, generated, beta=0.0, behaviour=logp.detach())
    (g_off,) = torch.autograd.grad(off.sum(), logp)
    assert torch.allclose(on, off) and torch.allclose(g_on, g_off)
    # the policy moved up by 0.5 nats on every token since the rollouts: a positive advantage's ratio 1.65 is clipped
    # (no gradient), a negative one's is not
    off = grpo_losses(logp, None, advantages, generated, beta=0.0, behaviour=logp.detach() - 0.5)
    (g,) = torch.autograd.grad(off.sum(), logp)
    assert g[advantages > 0].abs().max() == 0 and g[advantages < 0][:, :2].abs().min() > 0


def test_lagged_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """One worker (every use on device 0): a run checkpointed after step 1 (the portable checkpoint, and the per-rank
    state_dict) and resumed in a new worker gives the uninterrupted run's losses and weights. The checkpoint holds the
    rollouts decoded ahead for step 2 (with the weights step 1 started from); decoding them again after the restart
    would use step 2's weights."""
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from runtime.executor import Groups, WaveWorker
    from runtime.local_world import free_port
    from runtime.portable import PortableReader, export_state, import_state
    from runtime.prepare import build_payload

    job = grpo_job(rollout_lag=1, steps=4)
    job = job.model_copy(update={"cluster": job.cluster.model_copy(update={"devices_per_node": 1})})
    plan = placed_plan(job, [[("rollout", [0])], [("reward", [0])], [("reference", [0])], [("policy", [0])]])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker process runs (runtime.host); more only oversubscribe the shared cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    payload = build_payload(job, plan, 0)
    try:
        whole = WaveWorker(payload, Groups.create(payload))
        want = [whole.train_step(step) for step in range(4)]
        first = WaveWorker(payload, Groups.create(payload))
        assert [first.train_step(step) for step in range(2)] == want[:2]
        save_file(export_state(first), tmp_path / "rank_0.safetensors")
        index = {k: {"file": "rank_0.safetensors", "shape": list(t.shape)}
                 for k, t in load_file(tmp_path / "rank_0.safetensors").items()}
        assert any(k.startswith("a:grpo/rollout@2:") for k in index), sorted(index)[:5]
        portable = WaveWorker(payload, Groups.create(payload))
        import_state(portable, PortableReader(tmp_path, index, "checkpoint"))
        pickled = WaveWorker(payload, Groups.create(payload))
        pickled.load_state_dict(first.state_dict())
        fresh = WaveWorker(payload, Groups.create(payload))  # its weights only: the rows decoded again
        fresh.load_state_dict({**first.state_dict(), "rollouts_ahead": {}})
        for resumed in (portable, pickled):
            assert [resumed.train_step(step) for step in (2, 3)] == want[2:]
            for name, tensor in whole.named_parameters().items():
                assert torch.equal(tensor, resumed.named_parameters()[name]), name
        assert fresh.train_step(2) != want[2]  # what the checkpoint's rows are for
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)


def test_lagged_rollouts_with_uneven_row_shares_equal_one_process(tmp_path):
    """The 4-on-12 shape of bench.rl's 7B/16 plan in small: generation alone on worker 0 (decoding a step ahead), the
    reward model on workers 1-2 (5 + 5 rows), the reference on 3, the update on 1-3 (4 + 3 + 3 rows): three lagged
    steps equal one process with the same lag."""
    job = uneven_job(rollout_lag=1, steps=STEPS)
    plan = placed_plan(job, [[("rollout", [0])], [("reward", [1, 2]), ("reference", [3])], [("policy", [1, 2, 3])]])
    assert {plan.metaops[s.metaop].use: s.rows for w in plan.waves for s in w.slices}["policy"] == [4, 3, 3]
    world, reference, rollout_op = world_and_reference(job, plan, tmp_path, STEPS)
    first, rows = world.rollouts[0][rollout_op]
    assert first == 0 and torch.equal(rows[:, :PROMPT + 2 * NEW],
                                      reference.last_rollouts[rollout_op][:, :PROMPT + 2 * NEW])
    assert world.timings[-1][0]["ahead"]  # worker 0 decoded ahead in its thread (generation on a pool of its own)
    compare_uneven(world, reference)
