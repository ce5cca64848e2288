"""Diffusion sampling with a last step with gradient: the denoising loop of IterComp's feedback step (``mode: sample``
with ``grad_last_step``).

From Gaussian noise, a diffusers scheduler (:data:`SCHEDULERS`: DDPMScheduler or DDIMScheduler, ``set_timesteps``
over an inference schedule of ``steps`` steps) runs its timesteps without gradient up to a stop index, then the
denoiser runs once *with* gradient at the stop timestep and :func:`predict_x0` turns its prediction into the clean
latents x0 from the scheduler's own ``alphas_cumprod`` (equal to ``scheduler.step(...).pred_original_sample``, which
IterComp decodes; arXiv 2410.07171, YangLing0818/IterComp ``feedback_train.py``: a 40-step DDPM schedule, the stop a
random index in 30..39). The no-gradient steps hold no graph: the gradient of anything computed from x0 reaches the
denoiser's parameters through the last call only.

Reproducible per row whatever the worker: every sample's randomness (its initial noise and DDPM's per-step variance
noise) comes from its own generator seeded by (seed, step, task, global input row, sample index)
(:func:`row_generators`), drawn row by row (diffusers' ``randn_tensor`` over a list of generators), so a worker holding
rows [a, b) of a batch draws exactly what a single process holding the whole batch draws for them. The stop index is
one seeded draw per (seed, step, task) (:func:`stop_index`): every row of a step stops at the same timestep, as in
IterComp, so the rows batch together in one denoiser call.

A denoiser is any ``(latents (B, C, H, W), timesteps (B,), context (B, L, W) or None) -> prediction (B, C, H, W)``;
:func:`diffusers_denoiser` wraps a diffusers UNet2DConditionModel, :func:`layer_denoiser` Loom's own unet2d modules
(Loom's kind or a pretrained UNet's blocks). A sample use without ``grad_last_step`` is :func:`sample_without_grad`.
Imports diffusers only when a scheduler is built.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from runtime.modules import stable_seed

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
SCHEDULERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}  # stateless per step: any row subset, any order
PREDICTIONS = ("epsilon", "v_prediction", "sample")
# SDXL's scheduler/scheduler_config.json: the training schedule IterComp's DDPMScheduler samples with
SDXL_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                     steps_offset=1, timestep_spacing="leading", num_train_timesteps=1000)


@dataclass(frozen=True)
class SampleConfig:
    """How a sample use denoises: ``scheduler`` (a key of :data:`SCHEDULERS`) over an inference schedule of ``steps``
    timesteps; the step with gradient is at an index drawn uniformly from ``stop`` = (first, last), inclusive (IterComp:
    40 steps, 30..39); ``seed`` seeds the stop draws and every row's noise. ``scheduler_config``: keyword arguments of
    the scheduler's constructor (its training schedule: ``num_train_timesteps``, ``beta_schedule``, ``clip_sample``,
    ...), used when ``scheduler_path`` (a diffusers scheduler folder, e.g. SDXL's ``scheduler/``) is None."""

    steps: int = 40
    stop: tuple[int, int] = (30, 39)
    seed: int = 0
    scheduler: str = "ddpm"
    scheduler_path: str | None = None
    scheduler_config: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"sample.scheduler: '{self.scheduler}' is not a scheduler Loom samples with; use one of "
                             f"{sorted(SCHEDULERS)}.")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sample.steps: {self.steps!r} is not a positive number of inference steps; give one "
                             "(IterComp: 40).")
        first, last = self.stop
        if not (0 <= first <= last < self.steps):
            raise ValueError(f"sample.stop: {list(self.stop)} is not a range of step indices within "
                             f"0..{self.steps - 1}; give [first, last] with 0 <= first <= last < steps (IterComp: "
                             "[30, 39] of 40).")


def build_scheduler(config: SampleConfig):
    """The diffusers scheduler of ``config`` with its inference timesteps set (``set_timesteps(config.steps)``); a
    ValueError naming the field for a configuration :func:`predict_x0` cannot follow (dynamic thresholding, a learned
    variance that needs a 2x-wide model output, an unknown prediction type)."""
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[config.scheduler])
    if config.scheduler_path is not None:
        scheduler = cls.from_pretrained(config.scheduler_path)
    else:
        try:
            scheduler = cls(**config.scheduler_config)
        except TypeError as err:
            raise ValueError(f"sample.scheduler_config: {err}; give keyword arguments of {cls.__name__}.") from None
    cfg = scheduler.config
    if cfg.thresholding:
        raise ValueError("sample.scheduler_config.thresholding: True (dynamic thresholding) is not supported; "
                         "set it to false or use clip_sample.")
    if cfg.prediction_type not in PREDICTIONS:
        raise ValueError(f"sample.scheduler_config.prediction_type: '{cfg.prediction_type}' is not one of "
                         f"{list(PREDICTIONS)}.")
    if str(getattr(cfg, "variance_type", "fixed_small")).startswith("learned"):
        raise ValueError(f"sample.scheduler_config.variance_type: '{cfg.variance_type}' needs a model predicting its "
                         "variance, which Loom's denoisers do not; use fixed_small.")
    scheduler.set_timesteps(config.steps)
    return scheduler


def stop_index(config: SampleConfig, step: int, task: str) -> int:
    """The index into the schedule's timesteps of the step with gradient at training ``step`` of ``task``: uniform
    over ``config.stop`` (inclusive), the same on every worker."""
    return random.Random(stable_seed("sample-stop", config.seed, step, task)).randint(*config.stop)


def row_generators(seed: int, step: int, task: str, rows: Sequence[tuple[int, int]]) -> list[torch.Generator]:
    """One CPU generator per sample ``(global input row, sample index)`` at training ``step`` of ``task``: the source of
    all of that sample's noise, so any worker holding it draws the same numbers."""
    return [torch.Generator().manual_seed(stable_seed("sample", seed, step, task, row, k)) for row, k in rows]


def initial_latents(shape: Sequence[int], generators: list[torch.Generator],
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """``(B, *shape)`` standard Gaussian latents on ``device``, row i drawn on the CPU from ``generators[i]`` (as
    diffusers' ``randn_tensor`` draws over a list of CPU generators), so every device starts from the same noise."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(device)


def diffusers_denoiser(unet: torch.nn.Module) -> Denoiser:
    """A diffusers UNet2DConditionModel as a denoiser (its ``.sample``; the context is ``encoder_hidden_states``)."""
    return lambda latents, timesteps, context: unet(latents, timesteps, encoder_hidden_states=context).sample


def layer_denoiser(embed: torch.nn.Module, layers: Sequence[torch.nn.Module], norm_out: torch.nn.Module,
                   conv_out: torch.nn.Module, side: int) -> Denoiser:
    """Loom's unet2d modules as a denoiser: the use's input module (runtime.unet.UNetInput: latents, timesteps,
    context -> the flat state), every layer of its segments in order (runtime.unet.UNetLayer, at latent ``side``),
    then the denoising prediction GroupNorm -> SiLU -> conv (runtime.heads.DenoisingHead's ``norm_out`` and
    ``conv_out``; a pretrained UNet's ``conv_norm_out`` and ``conv_out``). A sample use is one MetaOp, so one worker
    holds all of them."""

    def denoise(latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        state = embed(latents, timesteps, context)
        context_len = 0 if context is None else context.shape[1]
        for layer in layers:
            state = layer(state, side=side, context_len=context_len)
        h = state.reshape(state.shape[0], -1, side, side)
        return conv_out(torch.nn.functional.silu(norm_out(h)))

    return denoise


def _device(device: torch.device | str | None, context: torch.Tensor | None) -> torch.device | str:
    """Where a sample runs: ``device`` when given, else the context's device, else the CPU."""
    return device if device is not None else context.device if context is not None else "cpu"


def _timesteps(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Timestep ``t`` for every row of ``like``, on its device (a UNet moves only 0-d timesteps itself)."""
    return t.reshape(1).expand(like.shape[0]).to(like.device, torch.long)


def denoise_to(denoiser: Denoiser, scheduler, latents: torch.Tensor, context: torch.Tensor | None, stop: int,
               generators: list[torch.Generator]) -> torch.Tensor:
    """The latents after the scheduler's first ``stop`` timesteps from ``latents``, without gradient (no graph is
    kept). DDPM's variance noise of row i comes from ``generators[i]``."""
    with torch.no_grad():
        for t in scheduler.timesteps[:stop]:
            model_in = scheduler.scale_model_input(latents, t)
            prediction = denoiser(model_in, _timesteps(t, latents), context)
            latents = scheduler.step(prediction, t, latents, generator=generators).prev_sample
    return latents


def predict_x0(scheduler, prediction: torch.Tensor, latents: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """The clean latents x0 the scheduler predicts from the denoiser's ``prediction`` for ``latents`` at timestep ``t``,
    from its ``alphas_cumprod`` (a = abar_t): epsilon (x - sqrt(1 - a) eps) / sqrt(a), v_prediction sqrt(a) x -
    sqrt(1 - a) v, sample the prediction itself; clipped to +-clip_sample_range when the scheduler clips. Equal to
    ``scheduler.step(prediction, t, latents).pred_original_sample``, differentiable in ``prediction``."""
    cfg = scheduler.config
    a = scheduler.alphas_cumprod[int(t)].to(prediction.device, prediction.dtype)
    if cfg.prediction_type == "epsilon":
        x0 = (latents - (1 - a) ** 0.5 * prediction) / a ** 0.5
    elif cfg.prediction_type == "v_prediction":
        x0 = a ** 0.5 * latents - (1 - a) ** 0.5 * prediction
    else:
        x0 = prediction
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    return x0


@dataclass
class GradSample:
    """What a sample use with ``grad_last_step`` hands on: ``latents`` x_t entering the step with gradient (no graph),
    its schedule ``index`` and ``timestep``, the denoiser's ``prediction`` there and ``x0`` (both carrying the
    gradient to the denoiser's parameters)."""

    latents: torch.Tensor
    index: int
    timestep: int
    prediction: torch.Tensor
    x0: torch.Tensor


def sample_with_grad_last(denoiser: Denoiser, scheduler, context: torch.Tensor | None, shape: Sequence[int],
                          stop: int, generators: list[torch.Generator],
                          device: torch.device | str | None = None) -> GradSample:
    """One sample per generator: noise ``(B, *shape)`` (``shape`` = latent channels, side, side) denoised without
    gradient through the first ``stop`` timesteps of ``scheduler`` (:func:`denoise_to`), then one denoiser call with
    gradient at timestep ``scheduler.timesteps[stop]`` and its x0 (:func:`predict_x0`). On ``device`` (default: the
    context's, else the CPU); the noise is drawn on the CPU whatever the device."""
    latents = initial_latents(shape, generators, _device(device, context))
    latents = denoise_to(denoiser, scheduler, latents, context, stop, generators)
    t = scheduler.timesteps[stop]
    prediction = denoiser(scheduler.scale_model_input(latents, t), _timesteps(t, latents), context)
    return GradSample(latents, stop, int(t), prediction, predict_x0(scheduler, prediction, latents, t))


def sample_without_grad(denoiser: Denoiser, scheduler, context: torch.Tensor | None, shape: Sequence[int],
                        generators: list[torch.Generator], device: torch.device | str | None = None) -> torch.Tensor:
    """A sample use without ``grad_last_step``: noise ``(B, *shape)`` denoised through every timestep of ``scheduler``
    without gradient, the final latents (detached: nothing flows back through them). Row i's noise from
    ``generators[i]``, as in :func:`sample_with_grad_last`."""
    latents = initial_latents(shape, generators, _device(device, context))
    return denoise_to(denoiser, scheduler, latents, context, len(scheduler.timesteps), generators)
