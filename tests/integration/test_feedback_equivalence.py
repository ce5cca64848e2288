"""One IterComp feedback step planned and placed (the sample use of Loom's unet2d on one worker, the loss with the
frozen VAE decoder and two frozen scorers on another) equals the same step in one process
(runtime.feedback.feedback_step over the same modules): the same x0, loss within 1e-5, every gradient (the UNet's
layers, its input module and output layer) within 1e-5 relative. A text-conditioned step (the text tower's states
sent to the sampling workers, the context's gradient back) equals runtime.reference's one process the same way."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from planner.spec import parse_job
from runtime.data import synthetic_batch
from runtime.feedback import FeedbackBatch, feedback_step
from runtime.local_world import run_world
from runtime.reference import ReferenceTrainer
from runtime.sample import build_scheduler
from runtime.sampleop import build_modules, denoiser_of, latent_shape, sample_config

from _equivalence import RTOL, _compare_modules, check_equivalence, placed_plan  # tests/integration/_equivalence.py

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from make_models import save_vae  # noqa: E402  (examples/make_models.py)

BATCH, SAMPLES = 4, 2


def feedback_job(vae: Path, devices: int = 2, **training):
    """A 2-level unet2d on 8x8 latents sampled 6 steps (the step with gradient seeded in 3..5), 2 samples per input
    row; a frozen text tower as a second leaf puts the loss on its worker."""
    unet = {"kind": "unet2d", "num_layers": 1, "hidden_size": 8, "channel_mults": [1, 2], "in_channels": 4,
            "image_size": 8}
    text = {"kind": "transformer", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "vocab_size": 32, "seq_len": 4,
            "frozen": True}
    return parse_job({
        "name": "feedback", "cluster": {"num_nodes": 1, "devices_per_node": devices, "device": "cpu"},
        "components": {"unet": unet, "text": text},
        "tasks": [{"name": "fb", "batch_size": BATCH, "loss": "feedback",
                   "feedback": {"vae": str(vae), "scorers": [{"seed": 1}, {"seed": 2, "gain": 4.0}]},
                   "components": [
                       {"component": "unet", "mode": "sample", "denoise_steps": 6, "stop_steps": [3, 5],
                        "grad_last_step": True, "samples": SAMPLES},
                       {"component": "text", "mode": "forward", "after": []}]}],
        "training": {"steps": 1, "lr": 1e-3, "precision": "fp32", **training},
    })


def one_process(job, step: int = 0):
    """feedback_step over modules built as the workers build them; returns (result, gradients by worker name)."""
    sample = _sample_op(job)
    modules = build_modules(job, sample)
    head = modules[("head:fb", 0)]
    config = sample_config(job, sample)
    result = feedback_step(denoiser_of(job, sample, lambda n, i: modules[(n, i)]), build_scheduler(config),
                           head.objective(), FeedbackBatch(None, [None, None], BATCH, samples=SAMPLES),
                           config, latent_shape(job, sample), step, "fb")
    result.loss.backward()
    grads = {f"{name}/{layer}/{p}": t.grad for (name, layer), m in modules.items()
             for p, t in m.named_parameters() if t.grad is not None}
    return result, grads


def _sample_op(job):
    from planner.metagraph import build_metagraph

    return next(op for op in build_metagraph(job).metaops if op.mode == "sample")


@pytest.mark.parametrize("samplers", [[0], [0, 1]])
def test_feedback_step_split_over_workers_equals_one_process(tmp_path, samplers):
    """The sample use on ``samplers`` (data parallel: each samples its rows), the loss on the next worker."""
    loss_worker = len(samplers)
    job = feedback_job(save_vae(tmp_path / "vae"), devices=loss_worker + 1)
    plan = placed_plan(job, [[("unet", samplers)], [("text", [loss_worker])]])
    world = run_world(job, plan, 1, tmp_path / "run", keep_gradients=True)
    want, want_grads = one_process(job)

    sample = next(op.id for op in plan.metaops if op.mode == "sample")
    rows = BATCH // len(samplers)
    for i, rank in enumerate(samplers):
        first, x0 = world.rollouts[rank][sample]
        assert first == i * rows and x0.shape == (rows, 4 * 8 * 8)
        assert torch.allclose(x0, want.sample.x0.detach().flatten(1)[first:first + rows], atol=1e-5, rtol=0)
    assert want.sample.index in (3, 4, 5)
    got, loss = world.losses[0]["fb"], float(want.loss.detach())
    assert abs(got - loss) <= 1e-5 * max(abs(loss), 1e-3), (got, loss)
    assert loss > 0  # the hinge is active: the gradient is not trivially zero

    for rank in samplers:  # every sampling worker holds and trains every UNet module, summed over the samplers
        grads = world.gradients[rank]
        assert set(grads) == set(want_grads)
        assert any(n.startswith("unet#") for n in grads) and "head:fb/0/conv_out.weight" in grads
        _compare_modules(grads, want_grads, f"rank {rank} gradient of")
    # the loss worker's copy of the UNet's output layer took the same (all-reduced) gradient; nothing of the VAE or
    # the scorers trains
    loss_side = world.gradients[loss_worker]
    assert set(loss_side) == {n for n in want_grads if n.startswith("head:fb/")}
    _compare_modules(loss_side, want_grads, "loss worker's gradient of")
    assert RTOL <= 1e-5


def test_reference_trainer_runs_the_feedback_step(tmp_path):
    """The single-process trainer (runtime.reference: `loom evaluate`, the equivalence helpers) holds the sample use's
    real modules and computes feedback_step's loss and gradients."""
    job = feedback_job(save_vae(tmp_path / "vae"))
    want, want_grads = one_process(job)
    reference = ReferenceTrainer(job)
    got = reference.train_step(0, keep_gradients=True)["fb"]
    assert abs(got - float(want.loss.detach())) <= 1e-6 * float(want.loss.detach())
    assert set(reference.last_gradients) == set(want_grads)
    _compare_modules(reference.last_gradients, want_grads, "reference gradient of")


def conditioned_job(vae: Path | None, text_mode: str, scorers: list | None = None):
    """A text-to-image feedback step: the UNet cross-attends to a text tower's output (``text_mode``: train or
    forward), one sample per row; a frozen probe tower as a second leaf puts the loss on another worker. Without a
    ``vae`` the UNet denoises 3-channel pixels."""
    unet = {"kind": "unet2d", "num_layers": 1, "hidden_size": 8, "channel_mults": [1, 2],
            "in_channels": 4 if vae else 3, "image_size": 8}
    tower = {"kind": "transformer", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "vocab_size": 32, "seq_len": 4}
    return parse_job({
        "name": "feedback-text", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"unet": unet, "text": tower, "probe": {**tower, "frozen": True}},
        "tasks": [{"name": "fb", "batch_size": BATCH, "loss": "feedback",
                   "feedback": {"vae": str(vae) if vae else None, "scorers": scorers or [{"seed": 1}]},
                   "components": [
                       {"component": "text", "mode": text_mode},
                       {"component": "unet", "mode": "sample", "denoise_steps": 6, "stop_steps": [3, 5],
                        "grad_last_step": True, "after": ["text"]},
                       {"component": "probe", "mode": "forward", "after": []}]}],
        "training": {"steps": 1, "lr": 1e-3, "precision": "fp32"},
    })


@pytest.mark.parametrize("text_mode", ["train", "forward"])
def test_text_conditioned_feedback_step_over_workers_equals_one_process(tmp_path, text_mode):
    """The text tower on worker 0 sends its states to the sampling workers (both: each samples its rows, cross-attending
    to them), x0 goes to the loss on worker 0 and its gradient back; a trained tower gets the context's gradient of the
    step with gradient. Losses, parameters and gradients equal one process's (runtime.reference)."""
    job = conditioned_job(save_vae(tmp_path / "vae"), text_mode)
    plan = placed_plan(job, [[("text", [0])], [("unet", [0, 1])], [("probe", [0])]])
    # one step, as above: the second step's gradients are about a hundredth of the first's, and the float32 noise of
    # the sampling loop is 1-4e-5 of them (measured), where the first step's is 2-4e-6
    world = check_equivalence(job, plan, tmp_path / "run", steps=1)
    trained = {n for n in world.gradients[0] if n.startswith("text")}
    assert bool(trained) == (text_mode == "train")
    assert all(float(g.abs().sum()) > 0 for n, g in world.gradients[0].items() if n.startswith("text"))



class PromptedScorer(torch.nn.Module):
    """A registered scorer kind that reads its rows' prompts: a linear reward of the image whose sign is the parity of
    the sum of the row's text tokens, so a row scored with another row's prompt gets another loss and gradient."""

    def __init__(self, pixels: int, seed: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(pixels, generator=torch.Generator().manual_seed(seed)))

    def forward(self, images: torch.Tensor, batch) -> torch.Tensor:
        sign = 1.0 - 2.0 * (batch.inputs["text"].sum(1) % 2).float()
        return 8.0 * sign * ((images.flatten(1) - 0.5) @ self.weight) / self.weight.numel() ** 0.5


def register_prompted(job) -> None:
    """Every process's setup (check_equivalence): the ``prompted`` kind, its seed from ``args``."""
    from runtime.feedback import register_scorer

    register_scorer("prompted", lambda spec, job, t, pixels: PromptedScorer(pixels, spec.args["seed"]))


def test_a_registered_scorer_reads_the_prompts_of_its_rows_in_pixel_space(tmp_path):
    """No VAE (the UNet denoises pixels) and a scorer kind registered in every process, reading each row's prompt from
    the loss host's batch: the distributed step equals one process, so every row was scored with its own prompt."""
    job = conditioned_job(None, "forward", [{"kind": "prompted", "args": {"seed": 3}}, {"seed": 1}])
    plan = placed_plan(job, [[("text", [0])], [("unet", [0, 1])], [("probe", [0])]])
    parity = synthetic_batch(job, 0, 0, 0, BATCH).inputs["text"].sum(1) % 2
    assert 0 < int(parity.sum()) < BATCH  # both signs occur: a row scored with another's prompt would differ
    world = check_equivalence(job, plan, tmp_path / "run", steps=1, setup=register_prompted)
    assert world.losses[0]["fb"] > 0
