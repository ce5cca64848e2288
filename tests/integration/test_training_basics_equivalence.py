"""Training basics on a gloo world equal single-process training step by step (issue 11, item 5).

Gradient clipping by global norm (every parameter counted once: replicated over data-parallel holders and
ZeRO-1 buckets, or split over tensor-parallel ranks), gradient accumulation over micro-batches, a learning-rate
schedule with warmup, no weight decay on 1-d parameters, a per-component learning rate and a frozen component,
all at once, against runtime.reference (which clips with torch.nn.utils.clip_grad_norm_ and runs the whole
batch's micro-batches one after the other). check_equivalence compares the per-step losses, the final
parameters and the last step's (clipped) gradients within 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.recipes import load_recipe
from planner.plan import micro_batch_walk, zero_sharded
from planner.spec import parse_job
from runtime.assignment import CommSchedule, Piece
from runtime.local_world import run_world
from runtime.reference import ReferenceTrainer

from _equivalence import STEPS, check_equivalence, placed_plan  # tests/integration/_equivalence.py
from _jobs import two_task_job  # tests/integration/_jobs.py
from test_runtime_equivalence import plan_from_waves

CLIP = 0.05  # well under the unclipped norm (asserted), so clipping changes every step


def basics_job(**training) -> dict:
    data = two_task_job(4, STEPS)
    data["training"].update(grad_clip=CLIP, grad_accum_steps=2, weight_decay=0.1, **training)
    data["components"]["txt"]["lr"] = 3e-3  # the shared tower trains slower than training.lr (1e-2)
    data["components"]["aud"]["frozen"] = True
    return data


def unclipped_norm(data: dict) -> float:
    """The global gradient norm of the job's first step, from a reference that does not clip."""
    job = parse_job({**data, "training": {**data["training"], "grad_clip": None}})
    reference = ReferenceTrainer(job)
    reference.train_step(0, keep_gradients=True)
    return float(torch.cat([g.reshape(-1) for g in reference.last_gradients.values()]).norm())


def test_clipping_accumulation_and_cosine_schedule_equal_single_process(tmp_path):
    data = basics_job(lr_schedule="cosine", warmup_steps=1, min_lr_ratio=0.1)
    assert unclipped_norm(data) > 3 * CLIP
    job = parse_job(data)
    # micro-batches of 4 (caption) and 2 (align) rows; caption.txt re-split over 4 devices and back to 2: the shared
    # txt layers sit in buckets of 2 and 4 holders whose ZeRO-1 shares mix 2-d weights, biases and norms
    plan = plan_from_waves(job, [
        [("caption.img", 2, 2), ("align.aud", 2, 2)],
        [("caption.txt", 1, 4)],
        [("caption.txt", 1, 2), ("align.txt", 2, 2)],
    ])
    assert {op.batch_size for op in plan.metaops if op.task == "caption"} == {4}  # the planner's micro-batch
    check_equivalence(job, plan, tmp_path)


@pytest.mark.parametrize("pipelined", [False, True])
def test_clipping_over_tensor_parallel_ranks_equals_single_process(pipelined, tmp_path):
    """Megatron-core TP layers over both orders of the two micro-batches (pipelined: a TP group's collectives of
    micro-batch 1's forward interleave with the other waves' micro-batch 0, the same order on every rank)."""
    data = basics_job(lr_schedule="linear", warmup_steps=2, pipeline_micro_batches=pipelined)
    data["components"]["txt"]["tensor_parallel"] = [2]  # the shared text tower on megatron-core, TP=2
    job = parse_job(data)
    plan = plan_from_waves(job, [
        [("caption.img", 2, 2), ("align.aud", 2, 2)],
        [("caption.txt", 2, 4)],  # dp 2 x tp 2: norms and row-parallel biases replicated over both TP ranks
        [("align.txt", 2, 2)],  # dp 1 x tp 2
    ])
    assert {s.tp_degree for s in plan.waves[1].slices} == {2}
    check_equivalence(job, plan, tmp_path)


def test_bf16_world_sends_the_plans_two_byte_pieces_and_tracks_the_reference(tmp_path):
    """bf16 on CPU: forward under autocast on every worker, pieces sent in bf16 at exactly the plan's bytes (which
    price 2-byte activations), and the losses those of the single-process bf16 run up to bf16's rounding (the
    distributed run also rounds the pieces it sends)."""
    data = two_task_job(2, STEPS)  # 2 workers: the cheapest world that moves pieces between devices
    data["training"]["precision"] = "bf16"
    job = parse_job(data)
    plan = plan_from_waves(job, [
        [("caption.img", 2, 1), ("align.aud", 2, 1)],
        [("caption.txt", 2, 2)],  # reads img's rows from one device on both
        [("align.txt", 2, 2)],
    ])
    load_recipe(job)
    world = run_world(job, plan, STEPS, tmp_path)
    reference, fp32 = ReferenceTrainer(job), ReferenceTrainer(parse_job(two_task_job(2, STEPS)))
    for step in range(STEPS):
        want, full = reference.train_step(step), fp32.train_step(step)
        for task, value in want.items():
            assert abs(world.losses[step][task] - value) <= 2e-2 * abs(value), (step, task)
        assert want != full  # bf16 is not fp32 in disguise
    for rank in range(2):
        want = sorted((p.model_dump_json(), p.bytes) for p in plan.pieces if p.src == rank and p.src != p.dst)
        got = sorted((Piece.model_validate(d).model_dump_json(), float(n)) for d, n in world.sent[rank])
        assert got == want and got, f"rank {rank} sent other pieces than its plan's"
    assert all(p.bytes == 2 * (p.stop - p.start) * math.prod(p.shape) for p in plan.pieces if p.src != p.dst)


def test_lm_head_gradient_buffers_with_accumulation_clipping_and_zero_equal_single_process(tmp_path):
    """The next-token head's output projection keeps a persistent gradient buffer on the workers (runtime.optim:
    the loss kernel adds into it; ``training.kernels: auto``), the single-process reference none: over micro-batches,
    clipping, and a head replicated on two devices (a gradient bucket summed into the buffer, ZeRO-1 shares of it),
    the world still equals the reference step by step."""
    from _jobs import connector_job

    data = connector_job(4, STEPS)
    data["tasks"] = [t for t in data["tasks"] if t["name"] != "match"]  # the llama's next-token and regression uses
    data["training"].update(grad_clip=CLIP, grad_accum_steps=2, shard_optimizer=True, kernels="auto")
    job = parse_job(data)
    plan = plan_from_waves(job, [
        [("caption.img", 2, 2), ("rate.img", 2, 2)],
        [("caption.lm", 2, 2), ("rate.lm", 2, 2)],  # dp 2: head:caption on both of its devices
        [("rate.score", 2, 2)],
    ])
    heads = [b for b in plan.grad_buckets if any(name == "head:caption" for name, _, _ in b.members)]
    assert heads and all(len(b.devices) == 2 for b in heads)
    check_equivalence(job, plan, tmp_path)


@pytest.mark.parametrize("kernels", ["auto", "off"])
def test_infonce_over_micro_batches_split_over_shards_equals_single_process(kernels, tmp_path):
    """InfoNCE couples the rows of a batch; with ``grad_accum_steps`` 2 each micro-batch is its own batch (2 of the
    4 rows), and with the loss on two devices each shard scores its one row among the micro-batch's gathered rows
    (runtime.data.TaskBatch.rows_in_gathered; before, the second micro-batch asked for rows 2-3 of 2, on one
    device as on two)."""
    from _jobs import connector_job

    data = connector_job(2, STEPS)
    data["tasks"] = [t for t in data["tasks"] if t["name"] == "match"]
    data["training"].update(grad_accum_steps=2, kernels=kernels)
    job = parse_job(data)
    plan = plan_from_waves(job, [[("match.img", 2, 2)], [("match.lm", 2, 2)]])
    # the image tower's embedding gradient sums each row's share through the gathered batch's backward, in another
    # order than one process: 1.3e-5 relative seen (a wrong row would be O(1))
    check_equivalence(job, plan, tmp_path, grad_rtol=3e-5)


def test_a_plan_that_drops_zero1_for_an_auto_job_trains_as_one_process(tmp_path):
    """training.shard_optimizer: auto, and a plan that chose to step without ZeRO-1 (Plan.shard_optimizer false): the
    workers, each holder stepping all its parameters (runtime.executor builds its optimizer by
    planner.plan.zero_sharded, tests/unit/planner/test_zero_choice.py), train as one process does."""
    data = two_task_job(2, STEPS)  # 2 workers: the cheapest world with buckets of several holders
    data["training"]["shard_optimizer"] = "auto"
    job = parse_job(data)
    plan = plan_from_waves(job, [
        [("caption.img", 2, 1), ("align.aud", 2, 1)],
        [("caption.txt", 2, 2)],  # the shared txt layers held by both devices
        [("align.txt", 2, 2)],
    ])
    assert any(len(b.devices) == 2 for b in plan.grad_buckets)
    assert plan.shard_optimizer is True  # placed with ZeRO-1, as the planner searches
    unsharded = plan.model_copy(update={"shard_optimizer": False}).sealed()
    assert zero_sharded(unsharded, job.training) is False and unsharded.hash != plan.hash
    check_equivalence(job, unsharded, tmp_path)


@pytest.mark.parametrize("pipelined, one_f_one_b", [(True, False), ("auto", False), (True, True)])
def test_pipelined_micro_batches_equal_single_process(pipelined, one_f_one_b, tmp_path):
    """``training.pipeline_micro_batches``: each task's two towers on devices of their own (a two-stage pipeline per
    task, the shared text tower's buckets over devices 2 and 3), four micro-batches walked pipelined
    (planner.phases.step_walk: stage 0 starts micro-batch j + 1 while stage 1 runs j; GPipe's every backward after
    every forward, or 1F1B's backward of micro-batch 0 before the forward of 2 when the plan says ``one_f_one_b``).
    The same gradients accumulate in the same order, so the world equals the single-process reference; with auto the
    plan records the order it was priced with and the workers follow the plan."""
    data = basics_job(pipeline_micro_batches=pipelined)
    data["training"]["grad_accum_steps"] = 4  # micro-batches of 2 (caption) and 1 (align) rows
    job = parse_job(data)
    plan = placed_plan(job, [[("caption.img", [0]), ("align.aud", [1])], [("caption.txt", [2]), ("align.txt", [3])]])
    if pipelined == "auto" or one_f_one_b:
        plan = plan.model_copy(update={"pipelined": True if pipelined == "auto" else None,
                                       "one_f_one_b": one_f_one_b or None}).sealed()
    walk = CommSchedule(plan, 4, *micro_batch_walk(plan, job.training)).walk
    assert walk[:3] == (("forward", 0, 0), ("forward", 0, 1), ("forward", 1, 0))  # micro-batch 1 beside 0
    assert (walk.index(("backward", 0, 0)) < walk.index(("forward", 2, 0))) is one_f_one_b
    check_equivalence(job, plan, tmp_path)
