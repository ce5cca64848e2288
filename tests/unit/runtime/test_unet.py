"""runtime.unet: the unet2d state layout, skip connections, resolution-independent parameters, its data, head and
the pre-run checks of unet uses."""

from __future__ import annotations

import pytest
import torch

from planner.errors import SpecError
from planner.metagraph import build_metagraph
from planner.spec import parse_job
from runtime.checks import check_runnable, feature_shape
from runtime.data import synthetic_batch
from runtime.embeddings import build_embed, use_input
from runtime.heads import build_head
from runtime.modules import build_layer, layer_kwargs
from runtime.unet import StateLayout, groups, noise_key, timesteps_key

UNET = {"kind": "unet2d", "num_layers": 1, "hidden_size": 8, "channel_mults": [1, 2], "num_heads": 2,
        "in_channels": 2, "image_size": 8}
TEXT = {"kind": "transformer", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "seq_len": 5, "vocab_size": 20}


def job_of(tasks: list[dict], **components: dict):
    return parse_job({"name": "u", "components": {"unet": UNET, "text": TEXT} | components, "tasks": tasks})


@pytest.fixture(scope="module")
def job():
    return job_of([
        {"name": "gen", "batch_size": 3, "loss": "mse", "components": [{"component": "text"}, {"component": "unet"}]},
        {"name": "big", "batch_size": 2, "loss": "mse",
         "components": [{"component": "text"}, {"component": "unet", "image_size": 16}]},
    ])


def chain(job, task: str):
    """(MetaOps of the task's unet use, its embed, the layers of each MetaOp)."""
    ops = [op for op in build_metagraph(job).metaops if op.task == task and op.component == "unet"]
    return ops, build_embed(job, "unet"), [[build_layer(job, op, i) for i in range(op.num_layers)] for op in ops]


def test_state_layout_round_trips():
    layout = StateLayout((4, 3), 5, (2, 6), ((4, 3), (8, 2)))
    h, time, ctx, skips = torch.randn(2, 4, 3, 3), torch.randn(2, 5), torch.randn(2, 2, 6), [
        torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)]
    x = StateLayout.pack(h, time, ctx, skips)
    assert x.shape == (2, layout.numel)
    h2, time2, ctx2, skips2 = layout.unpack(x)
    for a, b in zip([h, time, ctx, *skips], [h2, time2, ctx2, *skips2]):
        assert torch.equal(a, b)


def test_groups_leave_two_channels_per_group():
    assert [groups(c) for c in (320, 64, 8, 6, 2)] == [32, 32, 4, 1, 1]


def run_use(job, task: str, batch):
    """The task's unet use run block by block from its text context; returns (state after every block, output)."""
    ops, embed, layers = chain(job, task)
    context = torch.randn(batch.num_samples, 5, 16, requires_grad=True)
    x = use_input(job, ops[0], embed, context, batch)
    states = [x]
    for op, op_layers in zip(ops, layers):
        for layer in op_layers:
            x = layer(x, **layer_kwargs(job, op))
            states.append(x)
    return ops, states, context


def test_states_match_the_planned_boundaries_at_every_side(job):
    for task, side in (("gen", 8), ("big", 16)):
        batch = synthetic_batch(job, [x.name for x in job.tasks].index(task), 0, 0, 2)
        ops, states, _ = run_use(job, task, batch)
        want = [feature_shape(job, ops[0], 0)] + [feature_shape(job, op, i + 1)
                                                   for op in ops for i in range(op.num_layers)]
        assert [tuple(s.shape[1:]) for s in states] == want
        assert states[-1].shape == (2, 8 * side * side)  # the output: c0 channels at full resolution


def test_skip_connections_reach_the_up_path(job):
    batch = synthetic_batch(job, 0, 0, 0, 2)
    ops, states, context = run_use(job, "gen", batch)
    # the last block concatenates conv_in's output, pushed first: the state's bottom skip
    last_state = states[-2].detach().requires_grad_(True)
    layer = build_layer(job, ops[-1], ops[-1].num_layers - 1)
    layer(last_state, **layer_kwargs(job, ops[-1])).sum().backward()
    skip0 = last_state.grad[:, -8 * 8 * 8:]
    assert skip0.abs().sum() > 0
    # and the output depends on the text context through cross-attention
    states[-1].sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0


def test_denoising_head_scores_noise_prediction(job):
    batch = synthetic_batch(job, 0, 0, 0, 3)
    assert batch.inputs["unet"].shape == (3, 2, 8, 8)
    assert batch.targets[timesteps_key("unet")].dtype == torch.long
    assert batch.targets[noise_key("unet")].shape == (3, 2, 8, 8)
    head = build_head(job, 0)
    out = torch.randn(3, 8 * 8 * 8)
    losses = head({"unet": out}, batch)
    assert losses.shape == (3,) and (losses > 0).all()
    # a shard of the batch is the same rows
    shard = synthetic_batch(job, 0, 0, 1, 3)
    assert torch.equal(shard.inputs["unet"], batch.inputs["unet"][1:])
    assert torch.equal(shard.targets[noise_key("unet")], batch.targets[noise_key("unet")][1:])


def test_unet_checks_are_one_line_spec_errors():
    mixed = job_of([
        {"name": "a", "batch_size": 2, "loss": "mse", "components": [{"component": "text"}, {"component": "unet"}]},
        {"name": "b", "batch_size": 2, "loss": "mse", "components": [{"component": "unet"}]},
    ])
    with pytest.raises(SpecError, match=r"tasks\[1\].components\[0\] \('unet'\) is a root use of a unet2d"):
        build_embed(mixed, "unet")
    feeding = job_of([{"name": "a", "batch_size": 2, "loss": "mse",
                       "components": [{"component": "unet"}, {"component": "text", "seq_len": 64}]}])
    with pytest.raises(SpecError, match=r"tasks\[0\].components\[1\] \('text'\) reads the output of unet2d use 'unet'"):
        check_runnable(feeding, build_metagraph(feeding))
    def two_texts(width: int):
        return job_of([{"name": "a", "batch_size": 2, "loss": "mse", "components": [
            {"component": "text"}, {"component": "text2", "after": []},
            {"component": "unet", "after": ["text", "text2"]}]}], text2=TEXT | {"hidden_size": width})

    check_runnable(two_texts(16), build_metagraph(two_texts(16)))  # a context of both texts' tokens
    with pytest.raises(SpecError, match=r"\('unet'\) attends to 'text' \(16 wide\), 'text2' \(32 wide\) concatenated"):
        check_runnable(two_texts(32), build_metagraph(two_texts(32)))
    classify = job_of([{"name": "a", "batch_size": 2, "loss": "cross_entropy", "components": [{"component": "unet"}]}])
    with pytest.raises(ValueError, match=r"trains with loss 'mse'"):
        build_head(classify, 0)
