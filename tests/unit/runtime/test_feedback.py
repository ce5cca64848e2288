"""IterComp's feedback step (runtime.feedback, runtime.vae.VaeDecoder): the frozen decoder equals diffusers' decode and
reads only its tensors, the CLIP scorer equals CLIPModel's logits, the hinge on hand-made rewards, the gradient of one
step reaches only the UNet and equals a hand-written one-step graph from the same no-gradient latents, and a short
CPU run of feedback steps raises the rewards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from runtime.feedback import (ClipScorer, FeedbackBatch, FeedbackObjective, LinearScorer, denoising_loss,
                              feedback_step, frozen, reward_hinge, sample_batch, score_x0, scorer_pixels, to_unit)
from runtime.sample import SDXL_SCHEDULE, SampleConfig, build_scheduler, diffusers_denoiser, stop_index
from runtime.vae import vae_decoder

sys.path.insert(0, str(Path(__file__).parents[3] / "examples"))
from make_models import save_clip, save_text_tower, save_unet, save_vae  # noqa: E402  (examples/make_models.py)

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = SampleConfig(steps=40, stop=(30, 39), seed=0, scheduler_config=SDXL_SCHEDULE)  # IterComp's schedule
SHAPE = (4, 8, 8)  # the tiny UNet's latents; the tiny VAE decodes them to 16 px images


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("itercomp")
    save_unet(root / "unet")
    save_vae(root / "vae")
    save_text_tower(root / "text")  # CLIPTextModel, 32 wide: the UNet's cross_attention_dim
    save_clip(root / "clip")
    return root


def clip_model(folders: Path) -> nn.Module:
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(folders / "clip").eval()


def pixel_scorer(seed: int) -> LinearScorer:
    """A frozen random linear reward of the tiny VAE's 3 x 16 x 16 images."""
    return LinearScorer(3 * 16 * 16, seed)


def _models(folders: Path, unet_seed: int = 0):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folders / "unet")
    text = frozen(CLIPTextModel.from_pretrained(folders / "text"))
    objective = FeedbackObjective(vae_decoder(str(folders / "vae")), [ClipScorer(clip_model(folders)), pixel_scorer(1)])
    return unet, text, objective


def prompts(rows: int, seed: int) -> torch.Tensor:
    """``rows`` prompts of 6 random token ids ending in end-of-text (1), where CLIP's text towers pool."""
    ids = torch.randint(2, 100, (rows, 6), generator=torch.Generator().manual_seed(seed))
    ids[:, -1] = 1
    return ids


def _batch(text: nn.Module, rows: int = 2, samples: int = 2, start: int = 0, seed: int = 5) -> FeedbackBatch:
    """Prompts as token ids (the text encoder's context for the UNet; the same ids for the CLIP scorer)."""
    ids = prompts(start + rows, seed)[start:]
    with torch.no_grad():
        context = text(input_ids=ids).last_hidden_state
    return FeedbackBatch(context, [ids, None], batch_size=rows * samples, start=start, samples=samples)


def test_the_frozen_decoder_equals_diffusers_decode_and_reads_only_its_tensors(folders, tensor_reads):
    from diffusers import AutoencoderKL

    decoder = vae_decoder(str(folders / "vae"))
    assert tensor_reads and all(n.startswith(("decoder.", "post_quant_conv.")) for n in tensor_reads)
    vae = AutoencoderKL.from_pretrained(folders / "vae")
    latents = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    want = vae.decode(latents / vae.config.scaling_factor).sample
    torch.testing.assert_close(decoder(latents), want, rtol=1e-5, atol=1e-6)
    assert want.shape == (2, 3, 16, 16) and not any(p.requires_grad for p in decoder.parameters())


def test_the_clip_scorer_is_clipmodels_image_text_logit(folders):
    model = clip_model(folders)
    ids = prompts(3, 0)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    want = model(input_ids=ids, pixel_values=scorer_pixels(images, 16)).logits_per_image.diagonal()
    torch.testing.assert_close(ClipScorer(model)(images, ids), want, rtol=1e-5, atol=1e-6)
    # preprocessing: a 32 px image is resized (bicubic) to the scorer's 16 px; a [0, 1] image is CLIP-normalised
    assert scorer_pixels(torch.rand(1, 3, 32, 40), 16).shape == (1, 3, 16, 16)
    torch.testing.assert_close(scorer_pixels(torch.full((1, 3, 16, 16), 0.48145466), 16)[0, 0],
                               torch.zeros(16, 16), atol=1e-6, rtol=0)


def test_the_reward_hinge_on_hand_made_rewards():
    rewards = torch.tensor([[0.5, 2.5, -1.0], [2.0, 1.0, 3.0]])  # K = 2 models, 3 samples
    torch.testing.assert_close(reward_hinge(rewards), 1e-3 * torch.tensor([1.5 + 0.0, 0.0 + 1.0, 3.0 + 0.0]))
    torch.testing.assert_close(reward_hinge(rewards, margin=1.0, scale=1.0), torch.tensor([0.5, 0.0, 2.0]))
    torch.testing.assert_close(to_unit(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])),
                               torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_denoising_loss_is_the_mse_against_the_schedulers_target(folders):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folders / "unet")
    gen = torch.Generator().manual_seed(0)
    latents, noise, context = torch.randn(2, *SHAPE, generator=gen), torch.randn(2, *SHAPE, generator=gen), \
        torch.randn(2, 5, 32, generator=gen)
    t = torch.tensor([10, 700])
    for prediction in ("epsilon", "v_prediction"):
        scheduler = build_scheduler(SampleConfig(scheduler_config=SDXL_SCHEDULE | {"prediction_type": prediction}))
        a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
        want = ((unet(noisy, t, encoder_hidden_states=context).sample - target) ** 2).mean(dim=(1, 2, 3))
        got = denoising_loss(diffusers_denoiser(unet), scheduler, latents, noise, t, context)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_one_feedback_step_trains_only_the_unet_and_equals_a_hand_written_one_step_graph(folders):
    """The step's UNet gradients equal those of a graph written by hand from the no-gradient latents it stopped at
    (the UNet's one call, x0 from the alphas, diffusers' AutoencoderKL.decode, the scorers, the hinge): the steps
    without gradient contribute nothing. The VAE, the text encoder and the scorers get no gradient and do not change
    under an optimizer step over everything."""
    from diffusers import AutoencoderKL

    unet, text, objective = _models(folders)
    scheduler, batch = build_scheduler(CONFIG), _batch(text)
    frozen_params = [p for m in (text, objective.vae, *objective.scorers) for p in m.parameters()]
    before = [p.detach().clone() for p in frozen_params]
    result = feedback_step(diffusers_denoiser(unet), scheduler, objective, batch, CONFIG, SHAPE, step=3, task="fb")
    assert result.sample.index == stop_index(CONFIG, 3, "fb") and result.rewards.shape == (2, 4)
    result.loss.backward()
    got = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    assert len(got) == len(list(unet.parameters())) and sum(float(g.abs().sum()) for g in got.values()) > 0
    assert all(p.grad is None for p in frozen_params)
    torch.optim.AdamW([p for m in (unet, text, objective.vae, *objective.scorers) for p in m.parameters()],
                      lr=1e-2).step()
    assert all(torch.equal(p, b) for p, b in zip(frozen_params, before))

    # by hand, from the same latents, with the UNet's weights before the step
    unet0, _, _ = _models(folders)
    vae = AutoencoderKL.from_pretrained(folders / "vae").requires_grad_(False)
    x, t = result.sample.latents, result.sample.timestep
    context = batch.context.repeat_interleave(2, dim=0)
    eps = unet0(x, torch.full((4,), t), encoder_hidden_states=context).sample
    a = scheduler.alphas_cumprod[t]
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    images = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    ids = batch.scorer_inputs[0].repeat_interleave(2, dim=0)
    rewards = torch.stack([objective.scorers[0](images, ids), objective.scorers[1](images, None)])
    loss = (1e-3 * torch.relu(2 - rewards).sum(dim=0)).mean()
    torch.testing.assert_close(loss, result.loss.detach(), rtol=1e-5, atol=1e-9)
    loss.backward()
    for name, p in unet0.named_parameters():
        torch.testing.assert_close(p.grad, got[name], rtol=1e-4, atol=1e-9, msg=name)


def test_a_feedback_step_split_across_workers_equals_the_one_process_step(folders):
    """Sampling on two workers (input rows 0 and 1, 2 samples each, each worker its own copy of the UNet) and scoring
    on a third (the VAE and the scorers), which receives their x0 without graph and sends back the gradient of its
    loss share: losses and rewards equal the one-process step's within 1e-5, and the UNet gradients summed over the
    sampling workers (their data-parallel all-reduce) within 1e-5 relative (of each tensor's norm)."""
    from diffusers import UNet2DConditionModel

    unet, text, objective = _models(folders)
    scheduler, batch = build_scheduler(CONFIG), _batch(text)
    whole = feedback_step(diffusers_denoiser(unet), scheduler, objective, batch, CONFIG, SHAPE, step=3, task="fb")
    whole.loss.backward()

    workers = []
    for start in (0, 1):
        copy = UNet2DConditionModel.from_pretrained(folders / "unet")
        part = FeedbackBatch(batch.context[start:start + 1], [batch.scorer_inputs[0][start:start + 1], None],
                             batch_size=4, start=start, samples=2)
        workers.append((copy, sample_batch(diffusers_denoiser(copy), scheduler, part, CONFIG, SHAPE, 3, "fb")))
    x0 = torch.cat([sample.x0.detach() for _, sample in workers])  # what the scoring worker receives
    scored = score_x0(x0, objective, [batch.scorer_inputs[0].repeat_interleave(2, dim=0), None], batch_size=4)
    torch.testing.assert_close(scored.loss, whole.loss.detach(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(scored.rewards, whole.rewards.detach(), rtol=1e-5, atol=1e-5)
    for i, (_, sample) in enumerate(workers):
        sample.x0.backward(scored.grad_x0[2 * i:2 * i + 2])
    split = [dict(copy.named_parameters()) for copy, _ in workers]
    worst = 0.0
    for name, p in unet.named_parameters():
        summed = split[0][name].grad + split[1][name].grad
        worst = max(worst, float((summed - p.grad).norm() / p.grad.norm().clamp_min(1e-30)))
    print(f"worst relative gradient difference {worst:.2e}")
    assert worst < 1e-5, worst


def test_a_short_feedback_run_raises_the_rewards(folders):
    """6 AdamW steps (lr 1e-3) of feedback (a 10-step DDPM schedule, the grad step at 6..9) from two frozen random
    linear scorers of the decoded image (a reachable optimum: each pixel pushed toward the sign of its weights): the
    mean reward of held-out samples (seeds the run never trains on) rises and their feedback loss falls."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folders / "unet")
    objective = FeedbackObjective(vae_decoder(str(folders / "vae")), [pixel_scorer(1), pixel_scorer(2)])
    config = SampleConfig(steps=10, stop=(6, 9), seed=0, scheduler_config=SDXL_SCHEDULE)
    scheduler, denoiser = build_scheduler(config), diffusers_denoiser(unet)
    context = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(9))
    train, held = FeedbackBatch(context[:2], [None, None], 2), FeedbackBatch(context, [None, None], 4)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)

    def held_out() -> tuple[float, float]:
        with torch.no_grad():
            result = feedback_step(denoiser, scheduler, objective, held, config, SHAPE, 10_000, "fb")
        return float(result.rewards.mean()), float(result.loss)

    (start, start_loss), trained = held_out(), []
    for step in range(6):
        result = feedback_step(denoiser, scheduler, objective, train, config, SHAPE, step, "fb")
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trained.append(round(float(result.rewards.detach().mean()), 3))
    end, end_loss = held_out()
    print(f"held-out mean reward {start:.3f} -> {end:.3f}, loss {start_loss:.5f} -> {end_loss:.5f}; training {trained}")
    assert end > start + 0.5 and end_loss < start_loss, (start, end, start_loss, end_loss)
