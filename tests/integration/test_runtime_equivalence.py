"""The runtime's first test: a distributed step equals the single-process step.

A job with 2 tasks and 3 components (one shared) is trained 3 steps by a gloo world of worker
processes following a plan, and by plain single-process training of the same model on the same
batches; per-step losses and final parameters must agree within 1e-5 (relative, float32).
"""

from __future__ import annotations

import pytest
import torch

from planner.api import plan_job
from planner.metagraph import build_metagraph
from planner.spec import parse_job
from runtime.assignment import CommSchedule, Piece

from _equivalence import STEPS, check_equivalence, plan_from_waves  # tests/integration/_equivalence.py
from _jobs import connector_job, decoder_job, diffusion_job, fusion_job, two_task_job  # tests/integration/_jobs.py


def tiny_job(num_devices: int) -> dict:
    return two_task_job(num_devices, STEPS)


def test_hand_made_plan_with_resplits_equals_single_process(tmp_path):
    job = parse_job(tiny_job(4))
    # caption.img on 2 devices, then caption.txt re-split over 4 and back to 2 devices (transfers change
    # owners), align's branches side by side; the shared txt layers live on different device sets.
    plan = plan_from_waves(job, [
        [("caption.img", 2, 2), ("align.aud", 2, 2)],
        [("caption.txt", 1, 4)],
        [("caption.txt", 1, 2), ("align.txt", 2, 2)],
    ])
    schedule = CommSchedule(plan)
    moving = [p for pieces in schedule.forward_pieces.values() for p in pieces if p.src != p.dst]
    assert moving, "the plan should move activations between devices"
    check_equivalence(job, plan, tmp_path)


def test_planner_plan_equals_single_process(tmp_path):
    job = parse_job(tiny_job(2))
    plan = plan_job(job, with_baselines=False).plan
    assert plan.cluster.devices_per_node == 2
    check_equivalence(job, plan, tmp_path)


def test_decoders_with_memory_across_waves_equal_single_process(tmp_path):
    job = parse_job(decoder_job(4, STEPS))
    # the decoders' layers split over two waves and re-split between device sets: the memory rows travel
    # with the stream; the bridges (shared by two tasks for `queries`) live where layer 0 runs
    plan = plan_from_waves(job, [
        [("classify.enc", 2, 2), ("segment.enc", 2, 1), ("describe.enc", 2, 1)],
        [("classify.queries", 1, 1), ("segment.queries", 2, 2), ("describe.tokens", 1, 1)],
        [("classify.queries", 1, 4)],
        [("describe.tokens", 1, 2)],
    ])
    check_equivalence(job, plan, tmp_path)


def test_unets_with_skips_across_waves_equal_single_process(tmp_path):
    job = parse_job(diffusion_job(4, STEPS))
    # UNet levels run in different waves on different device sets, one level split mid-way and re-split 4 -> 2:
    # the skip stack and the text context travel in the state; the conditioned UNet serves two latent sizes
    plan = plan_from_waves(job, [
        [("generate.text", 2, 2), ("generate_hires.text", 2, 1), ("denoise.prior#0", 1, 1)],
        [("generate.unet#0", 1, 2), ("generate_hires.unet#0", 1, 1), ("denoise.prior#1", 1, 1)],
        [("generate.unet#1", 1, 1), ("generate_hires.unet#1", 1, 1), ("denoise.prior#2", 1, 1)],
        [("generate.unet#2", 1, 2), ("generate_hires.unet#2", 1, 1), ("denoise.prior#3", 2, 1)],  # mid blocks first
        [("generate.unet#3", 1, 4)],
        [("generate.unet#3", 1, 2), ("generate_hires.unet#3", 2, 1), ("caption.text", 2, 1)],
        [("generate.unet#4", 2, 2), ("generate_hires.unet#4", 2, 1), ("denoise.prior#4", 2, 1)],
    ])
    check_equivalence(job, plan, tmp_path)


def test_planner_plan_of_unets_equals_single_process(tmp_path):
    job = parse_job(diffusion_job(2, STEPS))
    check_equivalence(job, plan_job(job, with_baselines=False).plan, tmp_path)


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recomputed"])
def test_shared_component_on_megatron_tensor_parallel_equals_single_process(tmp_path, recompute):
    data = tiny_job(4)
    data["components"]["txt"]["tensor_parallel"] = [2]  # the shared text tower runs on megatron-core, TP=2
    data["components"]["txt"]["recompute"] = recompute  # its TP all-reduces then run again inside backward
    job = parse_job(data)
    plan = plan_from_waves(job, [
        [("caption.img", 2, 2), ("align.aud", 2, 2)],
        [("caption.txt", 2, 4)],  # dp 2 x tp 2
        [("align.txt", 2, 2)],  # dp 1 x tp 2
    ])
    layouts = {plan.metaops[s.metaop].name: (s.dp_degree, s.tp_degree) for w in plan.waves for s in w.slices}
    assert layouts["caption.txt"] == (2, 2) and layouts["align.txt"] == (1, 2)
    check_equivalence(job, plan, tmp_path)


def test_llama_on_megatron_tensor_parallel_equals_single_process(tmp_path):
    data = fusion_job(4, STEPS)
    data["components"]["fuse"]["tensor_parallel"] = [2]  # causal GQA (4 heads, 2 kv groups) and SwiGLU, TP=2
    job = parse_job(data)
    plan = plan_from_waves(job, [
        [("vqa.img", 2, 2), ("vqa.txt", 2, 1), ("tag.img", 2, 1)],
        [("vqa.fuse", 2, 4)],  # dp 2 x tp 2
    ])
    assert [s.tp_degree for s in plan.waves[1].slices] == [2]
    check_equivalence(job, plan, tmp_path)


def test_infonce_over_sharded_batches_equals_single_process(tmp_path):
    data = tiny_job(4)
    data["tasks"][1]["loss"] = "infonce"  # every row's negatives are the whole batch's other rows
    job = parse_job(data)
    # align's loss runs where its later branch ends (align.txt, dp 2): each shard scores its 2 rows against all 4,
    # gathering the pooled rows of both branches (aud's arrive from other devices)
    plan = plan_from_waves(job, [
        [("caption.img", 2, 2), ("align.aud", 2, 2)],
        [("caption.txt", 2, 2), ("align.txt", 2, 2)],
    ])
    schedule = CommSchedule(plan)
    assert {h.task: schedule.slices[h.host].dp_degree for h in schedule.loss_hosts}["align"] == 2
    check_equivalence(job, plan, tmp_path)


def test_decoders_on_megatron_tensor_parallel_equal_single_process(tmp_path):
    data = decoder_job(4, STEPS)
    for name in ("queries", "tokens"):  # T5's decoder layer: a query decoder (unmasked) and a causal token decoder
        data["components"][name]["tensor_parallel"] = [2]
    job = parse_job(data)
    plan = plan_from_waves(job, [
        [("classify.enc", 2, 2), ("segment.enc", 2, 1), ("describe.enc", 2, 1)],
        [("classify.queries", 2, 2), ("segment.queries", 2, 2)],  # dp 1 x tp 2 each
        [("describe.tokens", 2, 4)],  # dp 2 x tp 2
    ])
    assert {s.tp_degree for w in plan.waves[1:] for s in w.slices} == {2}
    check_equivalence(job, plan, tmp_path)


def test_worker_state_round_trip_resumes_exactly(tmp_path):
    """A worker restored from another's state_dict continues exactly as the original (single rank)."""
    import torch.distributed as dist

    from runtime.executor import Groups, WaveWorker
    from runtime.local_world import free_port
    from runtime.prepare import build_payload

    job = parse_job(tiny_job(1))
    plan = plan_job(job, with_baselines=False).plan
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        payload = build_payload(job, plan, 0)
        first = WaveWorker(payload, Groups.create(payload))
        first.train_step(0)
        saved = first.state_dict()
        second = WaveWorker(payload, Groups.create(payload))
        second.load_state_dict(saved)
        assert first.train_step(1) == second.train_step(1)
        for name, tensor in first.named_parameters().items():
            assert torch.equal(tensor, second.named_parameters()[name]), name
    finally:
        dist.destroy_process_group()


def test_fusion_of_two_towers_across_waves_equals_single_process(tmp_path):
    job = parse_job(fusion_job(4, STEPS))
    # the towers run on 2 and 1 devices, the fusion's first layer on 4 (its input rows re-split from both
    # towers), its second layer on 2; `img` is shared with the tag task, which runs beside the towers
    plan = plan_from_waves(job, [
        [("vqa.img", 2, 2), ("vqa.txt", 2, 1), ("tag.img", 2, 1)],
        [("vqa.fuse", 1, 4)],
        [("vqa.fuse", 1, 2)],
    ])
    schedule = CommSchedule(plan)
    fused = [p for p in schedule.forward_pieces[1] if p.src != p.dst]
    assert {p.input for p in fused} == {0, 1}, "the fusion should receive rows of both towers from other devices"
    check_equivalence(job, plan, tmp_path)


def test_the_runtime_sends_exactly_the_plans_pieces(tmp_path):
    """The plan is each worker's program: counted where they leave a worker, the pieces sent (and their bytes)
    are exactly the plan's remote pieces, which the simulator priced. The text tower runs TP=2 on two devices
    whose rows the fusion then reads data-parallel on four: forward those two devices use their own rows, backward
    each needs the gradient of every row, half of them from the other."""
    data = fusion_job(4, STEPS)
    data["components"]["txt"]["tensor_parallel"] = [2]
    data["training"]["precision"] = "fp32"  # what the CPU runtime computes in, so the priced bytes are the sent ones
    job = parse_job(data)
    plan = plan_from_waves(job, [
        [("vqa.txt", 2, 2), ("vqa.img", 2, 2)],
        [("vqa.fuse", 1, 4)],
        [("vqa.fuse", 1, 2), ("tag.img", 2, 2)],
    ])
    txt = next(s for s in plan.waves[0].slices if plan.metaops[s.metaop].name == "vqa.txt")
    assert (txt.dp_degree, txt.tp_degree) == (1, 2)
    into_fuse = [p for p in plan.pieces if p.wave == 1 and p.producer == (0, 0)]
    assert all(p.src == p.dst for p in into_fuse if not p.backward and p.dst in txt.devices)
    assert any(p.src != p.dst and p.dst in txt.devices for p in into_fuse if p.backward)
    world = check_equivalence(job, plan, tmp_path)
    for rank in range(4):
        want = sorted((p.model_dump_json(), p.bytes) for p in plan.pieces if p.src == rank and p.src != p.dst)
        got = sorted((Piece.model_validate(d).model_dump_json(), float(n)) for d, n in world.sent[rank])
        assert got == want, f"rank {rank} sent other pieces than its plan's"


def test_decoder_attending_to_two_towers_across_waves_equals_single_process(tmp_path):
    data = fusion_job(4, STEPS)
    # a token decoder whose memory is both towers' tokens (text, then image: its after: order)
    data["components"]["fuse"] = {"kind": "decoder", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "seq_len": 4,
                                  "vocab_size": 20}
    job = parse_job(data)
    plan = plan_from_waves(job, [
        [("vqa.img", 2, 2), ("vqa.txt", 2, 1), ("tag.img", 2, 1)],
        [("vqa.fuse", 1, 4)],
        [("vqa.fuse", 1, 2)],
    ])
    check_equivalence(job, plan, tmp_path)


def test_planner_plan_with_fusion_equals_single_process(tmp_path):
    job = parse_job(fusion_job(2, STEPS))
    plan = plan_job(job, with_baselines=False).plan
    assert len(plan.metaops[[op.name for op in plan.metaops].index("vqa.fuse")].deps) == 2
    check_equivalence(job, plan, tmp_path)


def test_recomputed_components_train_exactly_as_without(tmp_path):
    data = tiny_job(2)
    data["components"]["txt"]["recompute"] = True  # activation checkpointing on the shared tower
    job = parse_job(data)
    plan = plan_from_waves(job, [
        [("caption.img", 2, 1), ("align.aud", 2, 1)],
        [("caption.txt", 2, 2)],
        [("align.txt", 2, 2)],
    ])
    assert all(op.recompute for op in build_metagraph(job).metaops if op.component == "txt")
    check_equivalence(job, plan, tmp_path)  # the reference runs without recompute


def test_connectors_between_towers_of_different_widths_equal_single_process(tmp_path):
    data = connector_job(4, STEPS)
    data["components"]["lm"]["tensor_parallel"] = [2]  # the projector and text embedding feed a TP=2 llama
    job = parse_job(data)
    plan = plan_from_waves(job, [
        [("caption.img", 2, 2), ("rate.img", 2, 1), ("match.img", 2, 1)],
        [("caption.lm", 1, 4)],  # dp 2 x tp 2; its second layer runs in the next wave, rows re-split
        [("caption.lm", 1, 2), ("rate.lm", 2, 2)],
        [("rate.score", 2, 2), ("match.lm", 2, 2)],  # the llama as a root: token ids in, TP=2
    ])
    assert {s.tp_degree for w in plan.waves[1:3] for s in w.slices} == {2} == {plan.waves[3].slices[1].tp_degree}
    check_equivalence(job, plan, tmp_path)


def test_planner_plan_with_connectors_equals_single_process(tmp_path):
    job = parse_job(connector_job(2, STEPS))
    check_equivalence(job, plan_job(job, with_baselines=False).plan, tmp_path)


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_plan_with_phases_equals_single_process(pipelined, tmp_path):
    """The sequential baseline's schedule as Loom adopts it (planner.candidates), exactly as planner.baselines places it:
    tasks in turn as phases, so each device runs caption's forward, loss and backward, then align's; the shared text
    tower's gradient is final only after align's backward (the runtime's task-parallel shapes, each task on its own
    devices without a barrier, are what every plan above already runs). Pipelined: two micro-batches walked phase by
    phase (planner.phases.step_walk), each phase's tensors released per micro-batch after its backward."""
    from planner.api import make_cost_model, plan_placed
    from planner.baselines import sequential_schedule
    from planner.schedule import Problem

    data = tiny_job(4)
    if pipelined:
        data["training"].update(grad_accum_steps=2, pipeline_micro_batches=True)
    job = parse_job(data)
    cost_model = make_cost_model(job)
    plan = plan_placed(job, sequential_schedule(Problem.build(build_metagraph(job), cost_model)), cost_model,
                       method="sequential")
    assert plan.phases == [0, 2]  # caption's two waves, then align's
    check_equivalence(job, plan, tmp_path)
