"""IterComp's multi-reward feedback objective, and one feedback step computed in a single process (the reference a
planned, multi-worker feedback step must reproduce).

The step (arXiv 2410.07171; YangLing0818/IterComp ``feedback_train.py`` ``_reward_loss``): only the UNet trains. From
noise, denoise without gradient to a seeded late step, take one step with gradient and predict x0
(runtime.sample), decode x0 with a frozen AutoencoderKL decoder (runtime.vae.VaeDecoder: no weight gradient, but the
gradient passes through it), map the image to [0, 1], score it with K frozen reward models, and minimise per sample
``scale * sum_k ReLU(margin - r_k)`` (margin 2, scale 1e-3; :func:`reward_hinge`), averaged over the batch, optionally
plus the ordinary denoising loss (:func:`denoising_loss`; IterComp's ``--apply_pre_loss``).

A reward model (a *scorer*) is any module ``(images (B, 3, H, W) in [0, 1], its per-row inputs or None) -> (B,)``
whose parameters are frozen; :class:`ClipScorer` scores image-text agreement with a transformers CLIPModel, with
IterComp's preprocessing (bicubic resize and centre crop to the scorer's side, CLIP's normalisation;
:func:`scorer_pixels`). Per-sample losses are returned so that a caller holding some rows sums them and divides by
the task's batch size, as every Loom task loss does (runtime.reference.ReferenceTrainer.task_loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.sample import Denoiser, GradSample, SampleConfig, row_generators, sample_with_grad_last, stop_index

Scorer = Callable[[torch.Tensor, Any], torch.Tensor]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's (and IterComp's reward models') image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MARGIN, SCALE = 2.0, 1e-3  # IterComp: lambda = 2 on normalised rewards, grad_scale 1e-3


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """A VAE's decoded images (about [-1, 1]) as [0, 1] pixels: ``(x / 2 + 0.5).clamp(0, 1)``, as diffusers' image
    processor and IterComp do."""
    return (images / 2 + 0.5).clamp(0, 1)


def scorer_pixels(images: torch.Tensor, side: int, mean: Sequence[float] = CLIP_MEAN,
                  std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """``(B, 3, H, W)`` images in [0, 1] as a scorer's input: the shorter side resized to ``side`` (bicubic,
    antialiased), centre-cropped to ``side`` x ``side``, normalised by ``mean`` / ``std`` per channel (IterComp's
    Resize(224, BICUBIC), CenterCrop(224), Normalize). Differentiable."""
    h, w = images.shape[-2:]
    if min(h, w) != side:
        scale = side / min(h, w)
        images = F.interpolate(images, size=(max(side, round(h * scale)), max(side, round(w * scale))),
                               mode="bicubic", align_corners=False, antialias=True)
        h, w = images.shape[-2:]
    top, left = (h - side) // 2, (w - side) // 2
    images = images[..., top:top + side, left:left + side]
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def frozen(module: nn.Module) -> nn.Module:
    """``module`` with every parameter out of training (``requires_grad`` False) and in eval mode; gradients still
    pass through it to its inputs."""
    module.requires_grad_(False)
    return module.eval()


class ClipScorer(nn.Module):
    """A frozen transformers CLIPModel as a reward model: the image-text agreement ``exp(logit_scale) *
    cos(image embedding, text embedding)`` (the diagonal of CLIPModel's ``logits_per_image``) of each image with its
    row's token ids ``(B, T)``, the image preprocessed by :func:`scorer_pixels` to the vision tower's side."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = frozen(model)
        self.side = model.config.vision_config.image_size

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        pixels = scorer_pixels(images, self.side)
        image = F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text = F.normalize(self.model.get_text_features(input_ids=input_ids).pooler_output, dim=-1)
        return self.model.logit_scale.exp() * (image * text).sum(-1)


class LinearScorer(nn.Module):
    """A frozen random linear reward of the [0, 1] image, ``gain * sum(w * (x - 0.5)) / sqrt(n)`` with ``w`` standard
    normal from ``seed`` over ``pixels`` = C * H * W values: a scorer whose optimum a generator can reach (each pixel
    toward the sign of its weight), for smoke runs and tests where the rewards must rise. Ignores its inputs."""

    def __init__(self, pixels: int, seed: int, gain: float = 8.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(pixels, generator=torch.Generator().manual_seed(seed)))
        self.gain = gain
        frozen(self)

    def forward(self, images: torch.Tensor, inputs: Any = None) -> torch.Tensor:
        return (images.flatten(1) - 0.5) @ self.weight * self.gain / self.weight.numel() ** 0.5


ScorerFactory = Callable[[Any, Any, int, int], nn.Module]
_SCORERS: dict[str, tuple[ScorerFactory, Callable[[Any, Any, int], None] | None]] = {}


def register_scorer(kind: str, factory: ScorerFactory, check: Callable[[Any, Any, int], None] | None = None) -> None:
    """Make scorer ``kind`` available to ``tasks[].feedback.scorers``: ``factory(scorer spec, job, task index,
    pixels)`` builds the frozen scorer, a module ``(images (B, 3, H, W) in [0, 1], the rows' runtime.data.TaskBatch)
    -> (B,)`` (``pixels``: C * H * W of the decoded images); ``check(scorer spec, job, task index)``, when given, raises
    a ValueError for arguments it cannot serve, before anything runs (check_scorers prefixes the scorer's path).
    Recipes call this on import."""
    assert kind != "linear", "scorer kind linear is built in"
    _SCORERS[kind] = (factory, check)


def check_scorers(job, task_index: int) -> None:
    """Every scorer of task ``task_index``'s ``feedback:`` is a known kind whose check passes; a ValueError (one line)
    otherwise."""
    for k, scorer in enumerate(job.tasks[task_index].feedback.scorers):
        if scorer.kind != "linear" and scorer.kind not in _SCORERS:
            known = ", ".join(["linear", *sorted(_SCORERS)])
            raise ValueError(f"tasks[{task_index}].feedback.scorers[{k}].kind ('{scorer.kind}') is not a scorer kind; "
                             f"known: {known} (a recipe registers its kinds: set the job's `recipe:`).")
        check = _SCORERS.get(scorer.kind, (None, None))[1]
        if check is not None:
            try:
                check(scorer, job, task_index)
            except ValueError as exc:
                raise ValueError(f"tasks[{task_index}].feedback.scorers[{k}] ({scorer.kind}): {exc}") from None


def build_scorer(scorer, job, task_index: int, pixels: int) -> nn.Module:
    """The frozen scorer of ``scorer`` (a planner.spec.ScorerSpec) in task ``task_index`` scoring images of ``pixels``
    values."""
    if scorer.kind == "linear":
        return LinearScorer(pixels, scorer.seed, scorer.gain)
    return frozen(_SCORERS[scorer.kind][0](scorer, job, task_index, pixels))


def reward_hinge(rewards: torch.Tensor, margin: float = MARGIN, scale: float = SCALE) -> torch.Tensor:
    """Per-sample feedback loss ``scale * sum_k ReLU(margin - rewards[k])`` of rewards ``(K, B)`` -> ``(B,)``: each
    reward model pushes its score above ``margin`` and stops pushing once it is there."""
    return scale * F.relu(margin - rewards).sum(dim=0)


@dataclass
class FeedbackObjective:
    """What scores a predicted x0: the frozen ``vae`` decoder (runtime.vae.VaeDecoder or any latents -> [-1, 1] images
    module) and the K frozen ``scorers``; ``margin`` and ``scale`` of :func:`reward_hinge`."""

    vae: nn.Module
    scorers: Sequence[Scorer]
    margin: float = MARGIN
    scale: float = SCALE


def feedback_losses(x0: torch.Tensor, objective: FeedbackObjective,
                    scorer_inputs: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0 ``(B, L, h, h)`` -> (per-sample losses ``(B,)``, rewards ``(K, B)``, the [0, 1] images): decoded by the VAE,
    scored by scorer k with ``scorer_inputs[k]`` (its rows' inputs, e.g. token ids, or None), :func:`reward_hinge`.
    The gradient flows back through the scorers and the VAE to x0."""
    if len(scorer_inputs) != len(objective.scorers):
        raise ValueError(f"scorer_inputs: {len(scorer_inputs)} inputs for {len(objective.scorers)} scorers; give one "
                         "per scorer (None for a scorer that reads the image alone).")
    images = to_unit(objective.vae(x0))
    rewards = torch.stack([scorer(images, inputs).float().reshape(-1)
                           for scorer, inputs in zip(objective.scorers, scorer_inputs)])
    return reward_hinge(rewards, objective.margin, objective.scale), rewards, images


@dataclass
class Scored:
    """The scoring side of a feedback step split across workers (:func:`score_x0`): this part's ``loss`` share (its
    per-sample ``losses`` summed over the task's batch size), ``rewards`` ``(K, B)`` and ``grad_x0``, the gradient of
    the share with respect to the x0 it was given, which the sampling side backpropagates (``x0.backward(grad_x0)``)."""

    loss: torch.Tensor
    losses: torch.Tensor
    rewards: torch.Tensor
    grad_x0: torch.Tensor


def score_x0(x0: torch.Tensor, objective: FeedbackObjective, scorer_inputs: Sequence[Any],
             batch_size: int) -> Scored:
    """Score x0 received from the worker that sampled it (a copy without graph) and return the gradient to send back:
    :func:`feedback_losses` of these rows, their sum over ``batch_size``, and its gradient with respect to ``x0``. The
    sampling side's ``x0.backward(grad_x0)`` then gives its denoiser exactly the gradient of the one-process step."""
    x0 = x0.detach().requires_grad_(True)
    losses, rewards, _ = feedback_losses(x0, objective, scorer_inputs)
    loss = losses.sum() / batch_size
    (grad,) = torch.autograd.grad(loss, x0)
    return Scored(loss.detach(), losses.detach(), rewards.detach(), grad)


def denoising_loss(denoiser: Denoiser, scheduler, latents: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """The ordinary per-sample denoising loss ``(B,)``: the mean squared error of the denoiser's prediction on
    ``scheduler.add_noise(latents, noise, timesteps)`` against the scheduler's target (the noise for epsilon
    prediction, ``get_velocity`` for v_prediction, the latents for sample)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = denoiser(noisy, timesteps, context)
    kind = scheduler.config.prediction_type
    target = {"epsilon": lambda: noise, "sample": lambda: latents,
              "v_prediction": lambda: scheduler.get_velocity(latents, noise, timesteps)}[kind]()
    return ((prediction.float() - target.float()) ** 2).flatten(1).mean(dim=1)


def sample_rows(start: int, stop: int, samples: int) -> list[tuple[int, int]]:
    """The samples ``(global input row, sample index)`` of input rows [start, stop), ``samples`` per row, in the
    order a sample use lays them out (a row's samples adjacent)."""
    return [(row, k) for row in range(start, stop) for k in range(samples)]


@dataclass
class FeedbackBatch:
    """Input rows [``start``, ``start`` + ``rows``) of a feedback step's batch of ``batch_size`` samples (``samples``
    per input row): the UNet's ``context`` per input row ``(rows, L, W)`` (the frozen text encoder's output; None for
    an unconditional UNet) and each scorer's inputs per input row (a tensor, or None). ``rows`` defaults to the
    context's rows, else to the whole batch."""

    context: torch.Tensor | None
    scorer_inputs: Sequence[Any]
    batch_size: int
    start: int = 0
    samples: int = 1
    rows: int | None = None

    def __post_init__(self):
        if self.rows is None:
            self.rows = self.context.shape[0] if self.context is not None else self.batch_size // self.samples


@dataclass
class FeedbackResult:
    """One feedback step's ``loss`` (this batch's share of the task loss: its per-sample losses summed over
    ``batch_size``), the per-sample ``losses`` and ``rewards`` ``(K, B)``, the ``images`` scored, and the ``sample``."""

    loss: torch.Tensor
    losses: torch.Tensor
    rewards: torch.Tensor
    images: torch.Tensor
    sample: GradSample


def _per_sample(x: Any, samples: int) -> Any:
    return x.repeat_interleave(samples, dim=0) if isinstance(x, torch.Tensor) and samples > 1 else x


def sample_batch(denoiser: Denoiser, scheduler, batch: FeedbackBatch, config: SampleConfig,
                 latent_shape: Sequence[int], step: int, task: str) -> GradSample:
    """The sampling side of a feedback step: ``batch``'s samples (``latent_shape`` = latent channels, side, side),
    each input row's context repeated over its samples, denoised without gradient to :func:`stop_index` and one step
    with gradient to x0 (runtime.sample.sample_with_grad_last)."""
    rows = sample_rows(batch.start, batch.start + batch.rows, batch.samples)
    generators = row_generators(config.seed, step, task, rows)
    return sample_with_grad_last(denoiser, scheduler, _per_sample(batch.context, batch.samples), latent_shape,
                                 stop_index(config, step, task), generators)


def feedback_step(denoiser: Denoiser, scheduler, objective: FeedbackObjective, batch: FeedbackBatch,
                  config: SampleConfig, latent_shape: Sequence[int], step: int, task: str,
                  pre_loss: Callable[[], torch.Tensor] | None = None) -> FeedbackResult:
    """One IterComp feedback step in one process, up to the loss (call ``.backward()`` on ``result.loss``; only the
    denoiser's parameters receive gradients when the VAE and scorers are frozen): :func:`sample_batch`, then
    :func:`feedback_losses` of its x0, the per-sample losses summed over ``batch.batch_size``, plus ``pre_loss()``
    (e.g. a weighted :func:`denoising_loss` share) when given."""
    sample = sample_batch(denoiser, scheduler, batch, config, latent_shape, step, task)
    inputs = [_per_sample(x, batch.samples) for x in batch.scorer_inputs]
    losses, rewards, images = feedback_losses(sample.x0, objective, inputs)
    loss = losses.sum() / batch.batch_size
    if pre_loss is not None:
        loss = loss + pre_loss()
    return FeedbackResult(loss, losses, rewards, images, sample)


class FeedbackHead(nn.Module):
    """The built-in ``loss: feedback`` head (IterComp's reward feedback on a sample use with ``grad_last_step``).

    It owns the sampled UNet's output layer (``norm_out``: GroupNorm, SiLU, ``conv_out``: the prediction; the
    sample use's devices hold a copy and train it, runtime.sampleop) and, once :meth:`load_pretrained` ran, the frozen
    VAE decoder of ``tasks[].feedback.vae`` (none: x0 is the image) and the frozen scorers (:func:`build_scorer`).
    ``forward(outputs, batch)``: the sample leaf's flattened x0 ``(B, C * h * w)`` -> per-sample
    :func:`reward_hinge` losses, each scorer given the rows' ``batch`` (a registered scorer reads its prompts there);
    other leaves are not read. The last call's rewards ``(K, B)`` are kept in :attr:`last_rewards`."""

    def __init__(self, task: str, leaf: str, channels: int, latent: tuple[int, int, int], spec):
        super().__init__()
        from runtime import unet

        self.task, self.leaves, self.leaf, self.latent, self.spec = task, [leaf], leaf, tuple(latent), spec
        self.norm_out = nn.GroupNorm(unet.groups(channels), channels, eps=1e-5)
        self.conv_out = nn.Conv2d(channels, latent[0], kernel_size=3, padding=1)
        self.vae: nn.Module | None = None
        self.scorers = nn.ModuleList()
        self.last_rewards: torch.Tensor | None = None

    def load_pretrained(self, job, task_index: int) -> FeedbackHead:
        """Load the frozen VAE decoder and build the scorers (after the runtime initialised the trained part)."""
        from planner.vae_config import resolve_vae
        from runtime.vae import vae_decoder

        from runtime.checks import feedback_leaf

        comp = job.components[next(u.component for u in job.tasks[task_index].components
                                   if u.use_name == feedback_leaf(job, task_index))]
        if comp.pretrained:  # a diffusers UNet's own conv_norm_out and conv_out
            from runtime import unet_pretrained

            unet_pretrained.load_head(comp, self)
        if self.spec.vae is None:  # pixel-space diffusion: x0 is the image
            self.vae, pixels = nn.Identity(), self.latent[0] * self.latent[1] ** 2
        else:
            info = resolve_vae(self.spec.vae, f"tasks[{task_index}].feedback.vae")
            self.vae = vae_decoder(self.spec.vae)
            pixels = info.image_channels * (self.latent[1] * info.factor) ** 2
        self.scorers = nn.ModuleList(build_scorer(s, job, task_index, pixels) for s in self.spec.scorers)
        return self

    def objective(self) -> FeedbackObjective:
        return FeedbackObjective(self.vae, list(self.scorers), self.spec.margin, self.spec.scale)

    def forward(self, outputs: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        x0 = outputs[self.leaf].reshape(-1, *self.latent)
        losses, rewards, _ = feedback_losses(x0, self.objective(), [batch] * len(self.scorers))
        self.last_rewards = rewards.detach()
        return losses
