"""Diffusion sampling with a last step with gradient (runtime.sample): x0 from the scheduler's alphas equals diffusers'
``pred_original_sample``, sampling is reproducible per row whatever rows share the batch, the stop step is a seeded
draw in its range, the no-gradient steps keep no graph, and bad settings are one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from planner.spec import parse_job
from runtime.reference import ReferenceTrainer
from runtime.sample import (SDXL_SCHEDULE, SampleConfig, build_scheduler, denoise_to, diffusers_denoiser,
                            initial_latents, layer_denoiser, predict_x0, row_generators, sample_with_grad_last,
                            sample_without_grad, stop_index)

sys.path.insert(0, str(Path(__file__).parents[3] / "examples"))
from make_models import save_unet  # noqa: E402  (examples/make_models.py)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (4, 8, 8)  # the tiny UNet's latents


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_unet(tmp_path_factory.mktemp("unet") / "unet")


@pytest.fixture(scope="module")
def unet(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder).eval()


def loom_denoiser(unet: dict) -> tuple:
    """(Loom's modules of a unet2d fed by a 32-wide text encoder, composed by layer_denoiser; the single-process
    trainer holding them) for component ``unet``."""
    text = {"kind": "transformer", "num_layers": 1, "hidden_size": 32, "num_heads": 2, "seq_len": 5, "vocab_size": 20}
    job = parse_job({"name": "sd", "components": {"unet": unet, "text": text}, "training": {"precision": "fp32"},
                     "tasks": [{"name": "gen", "batch_size": 2, "loss": "mse",
                                "components": [{"component": "text"}, {"component": "unet"}]}]})
    ref = ReferenceTrainer(job)
    ops = [op for op in ref.graph.ops_of_task("gen") if op.component == "unet"]
    layers = [ref.modules[(op.param_group, i)] for op in ops for i in range(op.num_layers)]
    head = ref.head(0)
    return layer_denoiser(ref.modules[("embed:unet", 0)], layers, head.norm_out, head.conv_out, 8), ref


def _context(rows: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, 5, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction, clip", [("epsilon", False), ("epsilon", True), ("v_prediction", False),
                                              ("sample", False)])
def test_x0_from_the_alphas_equals_the_schedulers_pred_original_sample(name, prediction, clip):
    config = SampleConfig(steps=40, scheduler=name,
                          scheduler_config=SDXL_SCHEDULE | {"prediction_type": prediction, "clip_sample": clip})
    scheduler = build_scheduler(config)
    gen = torch.Generator().manual_seed(0)
    latents, output = torch.randn(3, *SHAPE, generator=gen), torch.randn(3, *SHAPE, generator=gen)
    for t in scheduler.timesteps[[0, 20, 39]]:
        want = scheduler.step(output, t, latents, generator=gen).pred_original_sample
        got = predict_x0(scheduler, output, latents, t)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        if clip:
            assert float(got.abs().max()) <= 1.0
    if prediction != "sample":  # x0 depends on the timestep's alphas
        assert not torch.allclose(predict_x0(scheduler, output, latents, scheduler.timesteps[0]),
                                  predict_x0(scheduler, output, latents, scheduler.timesteps[39]))


def test_the_stop_step_is_a_seeded_draw_over_its_range_the_same_on_every_call():
    config = SampleConfig(steps=40, stop=(30, 39), seed=3)
    draws = [stop_index(config, step, "feedback") for step in range(200)]
    assert draws == [stop_index(config, step, "feedback") for step in range(200)]
    assert set(draws) == set(range(30, 40))  # every index of the range, nothing outside it
    assert draws != [stop_index(SampleConfig(seed=4), step, "feedback") for step in range(200)]
    assert draws != [stop_index(config, step, "other") for step in range(200)]


def test_a_rows_samples_do_not_depend_on_which_rows_share_its_batch(unet):
    """Rows 2..3 sampled alone (a worker holding them) equal rows 2..3 of the whole batch of 4: the same initial noise,
    the same DDPM variance noise per step, the same latents at the stop step and the same x0."""
    config = SampleConfig(steps=40, stop=(30, 39), scheduler_config=SDXL_SCHEDULE)
    scheduler = build_scheduler(config)
    denoiser, context = diffusers_denoiser(unet), _context(4)
    stop = stop_index(config, 7, "gen")
    rows = [(r, 0) for r in range(4)]
    whole = sample_with_grad_last(denoiser, scheduler, context, SHAPE, stop, row_generators(0, 7, "gen", rows))
    part = sample_with_grad_last(denoiser, scheduler, context[2:], SHAPE, stop, row_generators(0, 7, "gen", rows[2:]))
    torch.testing.assert_close(part.latents, whole.latents[2:], rtol=1e-5, atol=1e-5)  # batched float sums
    torch.testing.assert_close(part.x0, whole.x0[2:], rtol=1e-5, atol=1e-5)
    again = sample_with_grad_last(denoiser, scheduler, context, SHAPE, stop, row_generators(0, 7, "gen", rows))
    assert torch.equal(again.latents, whole.latents) and torch.equal(again.x0, whole.x0)
    other = sample_with_grad_last(denoiser, scheduler, context, SHAPE, stop, row_generators(0, 8, "gen", rows))
    assert not torch.allclose(other.latents, whole.latents)  # another step draws other noise
    assert (whole.index, whole.timestep) == (stop, int(scheduler.timesteps[stop]))


def test_the_steps_without_gradient_keep_no_graph_and_the_last_step_has_one(unet):
    config = SampleConfig(steps=10, stop=(6, 9), scheduler="ddim", scheduler_config=SDXL_SCHEDULE)
    scheduler = build_scheduler(config)
    gens = row_generators(0, 0, "gen", [(0, 0), (0, 1)])
    result = sample_with_grad_last(diffusers_denoiser(unet), scheduler, _context(2), SHAPE, 6, gens)
    assert result.latents.grad_fn is None and not result.latents.requires_grad
    assert result.x0.requires_grad and result.prediction.requires_grad
    # DDIM (eta 0) draws nothing after the initial noise: the same latents from the same initial noise by hand
    start = initial_latents(SHAPE, row_generators(0, 0, "gen", [(0, 0), (0, 1)]))
    torch.testing.assert_close(denoise_to(diffusers_denoiser(unet), scheduler, start, _context(2), 6, []),
                               result.latents)


def test_loom_unet2d_modules_sample_as_the_diffusers_model_does(folder, unet):
    """layer_denoiser over Loom's blocks of a pretrained UNet predicts what UNet2DConditionModel predicts, so the
    sampler gives the same x0 through either; on Loom's own unet2d kind the x0's gradient reaches every layer."""
    config = SampleConfig(steps=10, stop=(6, 9), scheduler_config=SDXL_SCHEDULE)
    scheduler, context = build_scheduler(config), _context(2)
    denoiser, _ = loom_denoiser({"pretrained": str(folder)})
    x, t = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x, t, context), unet(x, t, encoder_hidden_states=context).sample,
                                   rtol=1e-5, atol=1e-6)
    gens = lambda: row_generators(0, 1, "gen", [(0, 0), (1, 0)])  # noqa: E731
    ours = sample_with_grad_last(denoiser, scheduler, context, SHAPE, 7, gens())
    theirs = sample_with_grad_last(diffusers_denoiser(unet), scheduler, context, SHAPE, 7, gens())
    torch.testing.assert_close(ours.x0, theirs.x0, rtol=1e-5, atol=1e-5)

    own, ref = loom_denoiser({"kind": "unet2d", "num_layers": 1, "hidden_size": 8, "channel_mults": [1, 2],
                              "num_heads": 2, "in_channels": 4, "image_size": 8})
    sample_with_grad_last(own, scheduler, context, SHAPE, 7, gens()).x0.square().sum().backward()
    unet_params = [(name, p) for (group, _), m in ref.modules.items() if group.startswith(("unet", "embed:unet"))
                   for name, p in m.named_parameters()]
    assert unet_params and all(p.grad is not None for _, p in unet_params)


def test_sampling_without_gradient_is_the_grad_path_stepped_to_the_end(unet):
    """A sample use without grad_last_step: every timestep without gradient. From the same noise it equals stopping
    at the last index with gradient and taking the scheduler's step from that prediction (DDIM: no step noise)."""
    config = SampleConfig(steps=8, stop=(7, 7), scheduler="ddim", scheduler_config=SDXL_SCHEDULE)
    scheduler, denoiser, context = build_scheduler(config), diffusers_denoiser(unet), _context(2)
    gens = lambda: row_generators(0, 2, "gen", [(0, 0), (1, 0)])  # noqa: E731
    final = sample_without_grad(denoiser, scheduler, context, SHAPE, gens())
    assert not final.requires_grad and final.shape == (2, *SHAPE)
    last = sample_with_grad_last(denoiser, scheduler, context, SHAPE, 7, gens())
    stepped = scheduler.step(last.prediction.detach(), scheduler.timesteps[7], last.latents).prev_sample
    torch.testing.assert_close(final, stepped, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(final, last.latents)


@pytest.mark.parametrize("fields, message", [
    (dict(scheduler="euler"), "sample.scheduler: 'euler' is not a scheduler Loom samples with; use one of ['ddim', "
                              "'ddpm']."),
    (dict(steps=0), "sample.steps: 0 is not a positive number of inference steps"),
    (dict(steps=40, stop=(30, 40)), "sample.stop: [30, 40] is not a range of step indices within 0..39"),
    (dict(stop=(5, 4)), "sample.stop: [5, 4] is not a range"),
])
def test_bad_sample_settings_are_one_line(fields, message):
    with pytest.raises(ValueError) as err:
        SampleConfig(**fields)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("config, message", [
    ({"thresholding": True}, "sample.scheduler_config.thresholding: True (dynamic thresholding) is not supported"),
    ({"variance_type": "learned_range"}, "sample.scheduler_config.variance_type: 'learned_range' needs a model"),
    ({"no_such_field": 1}, "sample.scheduler_config: DDPMScheduler.__init__() got an unexpected keyword argument "
                           "'no_such_field'; give keyword arguments of DDPMScheduler."),
])
def test_a_scheduler_configuration_x0_cannot_follow_is_one_line(config, message):
    with pytest.raises(ValueError) as err:
        build_scheduler(SampleConfig(scheduler_config=config))
    assert message in str(err.value) and "\n" not in str(err.value)
