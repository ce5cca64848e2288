"""IterComp's iteration as phase steps (docs/job-spec.md "Phases"; the pipeline: ``itercomp-pipeline-tiny.yaml``).

* ``denoise``: the base text-to-image model (recipes.diffusion.generator): a UNet folder trained on the renderer's
  exact images, the stand-in for SDXL's pretraining. Writes ``model`` (``export/unet``).
* ``feedback``: IterComp's multi-reward feedback learning (runtime.feedback.feedback_step: denoise without gradient
  to a seeded late step, one step with gradient to x0, score x0 with the frozen reward models, ``1e-3 * sum_k
  ReLU(2 - r_k)``, plus the denoising loss on exact images, IterComp's ``--apply_pre_loss``). Each sample is scored by
  its prompt's category's reward model (recipes.diffusion.scorers; the other models add nothing for it: our
  categories' prompts are disjoint). Writes ``model`` and reports, before and after, per category the oracle's score
  and the reward of the UNet's samples of held-out prompts.
* ``compare``: the same report for two UNets (``before``, ``after``: e.g. the base model and a trained ``feedback``
  phase's, docs/recipes/diffusion.md "The feedback step as a trained phase"), without training.
* ``regenerate``: the UNet's samples join the gallery: per prompt the five generators' images and the UNet's, ranked
  by the oracle (exact here; IterComp ranks new images by reward), written as a gallery folder (``data``).
* ``reward_update``: the reward models retrained from their weights on the regenerated gallery (the second
  iteration's reward-model phase); reports their accuracy on held-out pairs with a new image and on the synthetic
  held-out pairs, before and after. Writes ``rm/model.pt``.

Steps run in the ``loom run`` driver, in one process; the planned, multi-worker feedback step is a trained phase
(the runtime's ``loss: feedback`` with the recipe's ``reward_model`` scorers, recipes.diffusion.feedback).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipes.diffusion import generator, oracle
from recipes.diffusion.shapes import CATEGORIES

log = logging.getLogger("loom.recipes.diffusion")
FEEDBACK_METRICS = tuple(f"{kind}_{c}_{when}" for when in ("before", "after") for kind in ("oracle", "reward")
                         for c in CATEGORIES) + ("train_reward_first", "train_reward_last")
UPDATE_METRICS = tuple(f"{kind}_{c}_{when}" for when in ("before", "after") for kind in ("new", "gallery")
                       for c in CATEGORIES)


# --------------------------------------------------------------------------- argument checks (torch-free)

NON_NEGATIVE = ("pre_loss",)  # numbers that may be 0 (every other number must be positive)
CHOICES = {"schedule": ("constant", "cosine")}


def _checker(step: str, required: dict[str, type], optional: dict[str, type]):
    def check(args: dict[str, Any], base: Path | None) -> None:
        known = {**required, **optional}
        for key in args:
            if key not in known:
                raise ValueError(f"{key}: unknown argument of step '{step}'; it takes {', '.join(known)}.")
        for key in required:
            if key not in args:
                raise ValueError(f"{key}: required argument of step '{step}' is missing. Add it.")
        for key, kind in known.items():
            if key not in args:
                continue
            value = args[key]
            ok = isinstance(value, kind) and not isinstance(value, bool) if kind is not bool else isinstance(value, bool)
            zero_ok = key in NON_NEGATIVE
            if not ok or (kind in (int, float) and (value < 0 or (value == 0 and not zero_ok))):
                sign = ("non-negative " if zero_ok else "positive ") if kind in (int, float) else ""
                raise ValueError(f"{key} ({value!r}): step '{step}' expects a {sign}{kind.__name__}. Fix the value.")
            if key in CHOICES and value not in CHOICES[key]:
                raise ValueError(f"{key} ({value!r}): step '{step}' expects one of {', '.join(CHOICES[key])}.")
            if key in ("unet", "text", "spec", "before", "after") and not value.startswith("@"):
                path = Path(value) if Path(value).is_absolute() or base is None else base / value
                if not path.exists():
                    raise ValueError(f"{key} ({value!r}): no such file or folder. Point it at one.")
    return check


MODELS = dict(unet=str, text=str)
REWARDS = dict(spec=str, rm=str)
check_denoise = _checker("denoise", MODELS, dict(steps=int, batch=int, lr=float, seed=int, schedule=str))
check_feedback = _checker("feedback", {**MODELS, **REWARDS}, dict(
    steps=int, batch=int, lr=float, seed=int, denoise_steps=int, stop_first=int, pre_loss=float, eval_prompts=int))
check_regenerate = _checker("regenerate", MODELS, dict(prompts=int, heldout_prompts=int, samples=int, seed=int,
                                                       denoise_steps=int))
check_reward_update = _checker("reward_update", dict(**REWARDS, data=str), dict(steps=int, lr=float, eval_pairs=int))
check_compare = _checker("compare", dict(before=str, after=str, text=str, **REWARDS), dict(
    seed=int, denoise_steps=int, eval_prompts=int))
COMPARE_METRICS = FEEDBACK_METRICS[:-2]


# --------------------------------------------------------------------------- steps

def _load_unet(path: Path):
    """The UNet at ``path``: a UNet folder, or a model artifact holding one as ``unet/``."""
    return generator.load_unet(path / "unet" if (path / "unet").is_dir() else path)


def _unet(ctx):
    return _load_unet(ctx.path(ctx.args["unet"]))


def _save_unet(ctx, unet) -> None:
    unet.save_pretrained(ctx.artifact("model") / "unet")


def denoise_step(ctx) -> dict[str, float]:
    """Step ``denoise``: the base UNet trained on exact images (``steps``, ``batch``, ``lr``, ``seed``; ``schedule``:
    the lr ``constant`` (default) or ``cosine``, decayed to 0 over the steps)."""
    a = ctx.args
    unet, text = _unet(ctx), generator.load_text(ctx.path(a["text"]))
    losses = generator.pretrain(unet, text, a.get("steps", 300), a.get("batch", 16), a.get("lr", 1e-3),
                                a.get("seed", 0), CATEGORIES, log.info, cosine=a.get("schedule") == "cosine")
    _save_unet(ctx, unet)
    tail = max(len(losses) // 10, 1)
    return {"loss_first": float(np.mean(losses[:tail])), "loss_last": float(np.mean(losses[-tail:]))}


def eval_prompts(seed: int, count: int) -> list:
    """The first ``count`` held-out prompts of each category (recipes.diffusion.gallery's held-out stream)."""
    from recipes.diffusion.gallery import synthetic_entry

    return [synthetic_entry(seed, "heldout", c, i).prompt for c in CATEGORIES for i in range(count)]


def sample_scores(unet, text, rewards, prompts, steps: int, seed: int) -> tuple[dict[str, float], np.ndarray]:
    """Per category ``oracle_<c>`` and ``reward_<c>`` means of the UNet's samples of ``prompts``, and the images."""
    images = generator.sample_images(unet, text, prompts, steps, seed)
    out = {}
    for c in CATEGORIES:
        rows = [i for i, p in enumerate(prompts) if p.category == c]
        out[f"oracle_{c}"] = float(np.mean([oracle.score(images[i], prompts[i]) for i in rows]))
        with torch.no_grad():
            out[f"reward_{c}"] = float(rewards.reward(torch.from_numpy(images[rows]), [prompts[i] for i in rows],
                                                      c).mean())
    return out, images


def _reward_models(ctx, data_dir=None):
    from recipes.diffusion.scorers import RewardModels, load_job

    return RewardModels(load_job(ctx.path(ctx.args["spec"]), data_dir), ctx.path(ctx.args["rm"]))


def feedback_update(unet, text, rewards, prompts, scheduler, config, step: int, optimizer,
                    pre_loss: float = 1.0, reward_weight: float = 1.0) -> torch.Tensor:
    """One optimizer step of IterComp's feedback on ``prompts`` (runtime.feedback.feedback_step: x0 from a last
    denoising step with gradient, scored by each prompt's category's reward model, hinge ``1e-3 * ReLU(2 - r)``), plus
    ``pre_loss`` times the denoising loss on the latents of exact images of the prompts; the rewards ``(B,)`` of each
    sample's own category, before the step. ``reward_weight`` scales the hinges (0: the denoising loss alone, a
    control). ``rewards``: one RewardModels, or a sequence of them (an ensemble: each
    member is one more reward model of the sum, as IterComp sums its models' hinges; the rewards returned are the
    members' mean)."""
    from runtime.feedback import FeedbackBatch, FeedbackObjective, denoising_loss, feedback_step as one_step
    from runtime.sample import diffusers_denoiser

    members = list(rewards) if isinstance(rewards, (list, tuple)) else [rewards]
    denoiser = diffusers_denoiser(unet.train())
    scorers = [_category_scorer(member, c, prompts) for member in members for c in CATEGORIES]
    objective = FeedbackObjective(generator.Decoder(), scorers)  # the frozen "VAE decoder": 16 -> 32 px
    states = generator.context(text, prompts)
    train = generator.TRAIN_SCHEDULE["num_train_timesteps"]

    def denoising():
        images = generator.exact_latents(prompts, np.random.default_rng(step))
        gen = torch.Generator().manual_seed(step)
        noise = torch.randn(images.shape, generator=gen)
        timesteps = torch.randint(0, train, (len(prompts),), generator=gen)
        return pre_loss * denoising_loss(denoiser, scheduler, images, noise, timesteps, states).mean()

    result = one_step(denoiser, scheduler, objective, FeedbackBatch(states, [None] * len(scorers), len(prompts)),
                      config, (3, generator.LATENT, generator.LATENT), step, "feedback")
    loss = reward_weight * result.loss + (denoising() if pre_loss > 0 else 0.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    unet.eval()
    own = torch.stack([torch.tensor([p.category == c for p in prompts]) for c in CATEGORIES] * len(members))
    return result.rewards.detach().T[own.T].reshape(len(prompts), len(members)).mean(dim=1)


def feedback_step(ctx) -> dict[str, float]:
    """Step ``feedback`` (module docstring)."""
    from runtime.sample import build_scheduler

    a = ctx.args
    seed, steps, batch, denoise = a.get("seed", 0), a.get("steps", 40), a.get("batch", 12), a.get("denoise_steps", 20)
    unet, text, rewards = _unet(ctx), generator.load_text(ctx.path(a["text"])), _reward_models(ctx)
    prompts = eval_prompts(seed, a.get("eval_prompts", 16))
    before, images_before = sample_scores(unet, text, rewards, prompts, denoise, seed)
    config = generator.sample_config(denoise, (a.get("stop_first", denoise * 3 // 4), denoise - 1), seed)
    scheduler = build_scheduler(config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=a.get("lr", 1e-4), weight_decay=0.0)
    history = []
    for step in range(steps):
        batch_prompts = generator.training_prompts(seed + 1, step, batch, CATEGORIES)
        history.append(float(feedback_update(unet, text, rewards, batch_prompts, scheduler, config, step, optimizer,
                                             a.get("pre_loss", 1.0)).mean()))
        if (step + 1) % max(steps // 10, 1) == 0:
            log.info("feedback step %d/%d: own-category reward %.3f", step + 1, steps,
                     np.mean(history[-max(steps // 10, 1):]))
    after, images_after = sample_scores(unet, text, rewards, prompts, denoise, seed)
    _save_unet(ctx, unet)
    tail = max(steps // 10, 1)
    return (_before_after(ctx, (before, images_before), (after, images_after), a.get("eval_prompts", 16))
            | {"train_reward_first": float(np.mean(history[:tail])), "train_reward_last": float(np.mean(history[-tail:]))})


def _before_after(ctx, before: tuple[dict, np.ndarray], after: tuple[dict, np.ndarray], columns: int) -> dict:
    """The metrics of :func:`sample_scores` before and after (``<metric>_before``, ``<metric>_after``); the sample grids
    written as ``samples_before.png`` and ``samples_after.png`` in the phase's folder (a category per row)."""
    from PIL import Image

    for name, (_, images) in (("before", before), ("after", after)):
        tiles = generator.grid(images, columns)
        Image.fromarray(tiles).resize((tiles.shape[1] * 3, tiles.shape[0] * 3), Image.NEAREST).save(
            ctx.out_dir / f"samples_{name}.png")
    return {f"{k}_before": v for k, v in before[0].items()} | {f"{k}_after": v for k, v in after[0].items()}


def compare_step(ctx) -> dict[str, float]:
    """Step ``compare`` (module docstring)."""
    a = ctx.args
    seed, denoise = a.get("seed", 0), a.get("denoise_steps", 20)
    text, rewards = generator.load_text(ctx.path(a["text"])), _reward_models(ctx)
    prompts = eval_prompts(seed, a.get("eval_prompts", 16))
    scores = [sample_scores(_load_unet(ctx.path(a[which])), text, rewards, prompts, denoise, seed)
              for which in ("before", "after")]
    return _before_after(ctx, *scores, a.get("eval_prompts", 16))


def _category_scorer(rewards, category: str, prompts):
    """Scorer of ``category``: its model's normalised reward on rows of its category, the margin (no push) on others."""
    rows = [i for i, p in enumerate(prompts) if p.category == category]

    def score(images: torch.Tensor, _inputs) -> torch.Tensor:
        out = torch.full((images.shape[0],), 2.0, dtype=images.dtype)
        if rows:
            out = out.index_put((torch.tensor(rows),), rewards.reward(images[rows], [prompts[i] for i in rows],
                                                                      category).to(images.dtype))
        return out
    return score


def regenerate_step(ctx) -> dict[str, float]:
    """Step ``regenerate`` (module docstring)."""
    from recipes.diffusion.folder import save_split
    from recipes.diffusion.gallery import rank, synthetic_entry

    a = ctx.args
    seed, samples = a.get("seed", 0), a.get("samples", 2)
    unet, text = _unet(ctx), generator.load_text(ctx.path(a["text"]))
    metrics = {}
    for split, count in (("train", a.get("prompts", 32)), ("heldout", a.get("heldout_prompts", 16))):
        entries = [synthetic_entry(seed, split, c, i) for c in CATEGORIES for i in range(count)]
        images = generator.sample_images(unet, text, [e.prompt for e in entries], a.get("denoise_steps", 20),
                                         seed + (split == "heldout"), samples)
        rankings = [rank(e.prompt, e.images + list(images[i * samples:(i + 1) * samples]))
                    for i, e in enumerate(entries)]
        save_split(ctx.artifact("data"), split, rankings)
        metrics[f"{split}_oracle_new"] = float(np.mean([oracle.score(images[i], entries[i // samples].prompt)
                                                        for i in range(len(images))]))
    return metrics


def new_image_pairs(rankings, old: int) -> list:
    """The (ranking, better, worse) pairs of ``rankings`` with an image of index >= ``old`` (a new one)."""
    from recipes.diffusion.gallery import pairs

    return [(r, b, w) for r in rankings for b, w in pairs(r.places) if max(b, w) >= old]


def reward_update_step(ctx) -> dict[str, float]:
    """Step ``reward_update`` (module docstring)."""
    from recipes.diffusion.data import heldout_rows, pair_layout
    from recipes.diffusion.evaluate import pair_metrics
    from recipes.diffusion.folder import load_split
    from recipes.diffusion.gallery import GENERATORS
    from recipes.diffusion.scorers import load_job, model_file
    from runtime.reference import MODEL_FILE, ReferenceTrainer, load_model, save_model

    a = ctx.args
    job = load_job(ctx.path(a["spec"]), ctx.path(a["data"]))
    job = job.model_copy(update={"training": job.training.model_copy(update={"lr": a.get("lr", 1e-3),
                                                                            "steps": a.get("steps", 100)})})
    trainer = ReferenceTrainer(job)
    trainer.load_parameters(load_model(model_file(ctx.path(a["rm"]))))
    count = a.get("eval_pairs", 256)
    rows = {}
    for t in range(len(job.tasks)):
        category = pair_layout(job, t).category
        rows[t] = {"new": new_image_pairs(load_split(job.data_dir, "heldout", category), len(GENERATORS))[:count],
                   "gallery": heldout_rows(job.training.seed, category, count)}

    def measure(when: str) -> dict[str, float]:
        with torch.no_grad():
            return {f"{kind}_{pair_layout(job, t).category}_{when}": pair_metrics(job, trainer, t, r)["accuracy"]
                    for t, by_kind in rows.items() for kind, r in by_kind.items()}

    metrics = measure("before")
    for step in range(job.training.steps):
        losses = trainer.train_step(step)
        if (step + 1) % max(job.training.steps // 10, 1) == 0:
            log.info("reward_update step %d/%d: %s", step + 1, job.training.steps,
                     ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))
    metrics |= measure("after")
    target = ctx.artifact("rm")
    target.mkdir(parents=True, exist_ok=True)
    save_model(target / MODEL_FILE, [trainer.named_parameters()])
    return metrics
