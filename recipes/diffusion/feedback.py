"""IterComp's feedback step as a trained phase: the rows of a ``loss: feedback`` task and the ``reward_model`` scorer.

A feedback task of a ``recipe: diffusion`` job (docs/recipes/diffusion.md, "The feedback step as a trained phase")
reads one root token use (the prompt, encoded by the frozen text tower the UNet cross-attends to) and samples one
image per row. :func:`feedback_batch` gives row ``r`` of step ``s`` the prompt the driver's ``feedback`` step draws for
it (recipes.diffusion.generator.training_prompt with the job's seed + 1: the categories in turn), its tokens under
the prompt use, and its category's index in ``targets["category"]``. A denoising task beside it (loss mse on the same
UNet, IterComp's ``--apply_pre_loss``) gets the same prompts drawn exactly (:func:`denoise_batch`).

A ``reward_model`` scorer (runtime.feedback.register_scorer) is one category's reward model of a trained reward-model
job: ``spec`` names that job (itercomp-tiny.yaml's tasks), ``model`` its weights (a model.pt, or the phase reference
``@rm/checkpoint``), ``args.category`` the category. It scores a row of its category with that model's normalised
reward (recipes.diffusion.scorers.RewardModels: the prompt's tokens from the batch) and gives other rows the margin,
so that they get no push from it, as the driver's step does: the three categories' prompts are disjoint.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from planner.components import resolve_shape
from planner.spec import JobSpec
from planner.usegraph import root_uses
from recipes.diffusion.generator import LATENT, exact_latents, training_prompt
from recipes.diffusion.shapes import CATEGORIES, tokenize
from runtime.data import TaskBatch
from runtime.feedback import MARGIN

CATEGORY = "category"  # targets key: each row's category index in CATEGORIES


def prompt_use(job, t: int) -> tuple[str, int]:
    """(name, token count) of feedback task ``t``'s one root token use (the prompt); a ValueError otherwise."""
    task = job.tasks[t]
    roots = [u for u, use in enumerate(task.components)
             if use.use_name in root_uses(job, t) and job.components[use.component].kind != "unet2d"]
    if len(roots) != 1:
        raise ValueError(f"tasks[{t}] ('{task.name}'): a feedback task of recipe diffusion reads one root prompt use "
                         f"(a text tower the UNet cross-attends to); it has {len(roots)}. See "
                         "recipes/diffusion/itercomp-pipeline-tiny.yaml.")
    use = task.components[roots[0]]
    shape = resolve_shape(job.components[use.component], use.component, use, f"tasks[{t}].components[{roots[0]}]")
    return use.use_name, shape.seq_len


def _prompts(job, t: int, step: int, start: int, stop: int) -> tuple[list, dict[str, torch.Tensor]]:
    """The prompts of rows [start, stop) at ``step`` and the inputs of the task's prompt use (their tokens)."""
    name, seq_len = prompt_use(job, t)
    prompts = [training_prompt(job.training.seed + 1, step, row, CATEGORIES) for row in range(start, stop)]
    ids = np.stack([tokenize(p.text, seq_len) for p in prompts]) if prompts else np.zeros((0, seq_len), np.int64)
    return prompts, {name: torch.from_numpy(ids)}


def feedback_batch(job: JobSpec, t: int, step: int, start: int, stop: int) -> TaskBatch:
    """Rows [start, stop) of feedback task ``t`` at ``step`` (module docstring)."""
    prompts, inputs = _prompts(job, t, step, start, stop)
    category = torch.tensor([CATEGORIES.index(p.category) for p in prompts], dtype=torch.long)
    return TaskBatch(inputs, torch.zeros(len(prompts)), len(prompts), first_row=start, targets={CATEGORY: category})


def denoise_batch(job: JobSpec, t: int, step: int, start: int, stop: int) -> TaskBatch:
    """Rows [start, stop) of a denoising task (loss mse on the UNet cross-attending to the prompt use; IterComp's
    ``--apply_pre_loss`` beside the feedback task): the same prompts as the feedback task's rows, each drawn exactly
    by the renderer and encoded to latents (recipes.diffusion.generator.exact_latents), noised at a uniform DDPM
    timestep (runtime.data.NOISE, the schedule the runtime's synthetic latents use); seeded per (seed, step, row)."""
    from runtime.data import NOISE
    from runtime.modules import stable_seed
    from runtime.unet import NUM_TIMESTEPS, noise_key, timesteps_key

    prompts, inputs = _prompts(job, t, step, start, stop)
    unet = next(u.use_name for u in job.tasks[t].components if job.components[u.component].kind == "unet2d")
    rows = []
    for row, prompt in zip(range(start, stop), prompts):
        seed = stable_seed("diffusion-denoise", job.training.seed, step, row)
        x0 = exact_latents([prompt], np.random.default_rng(seed))[0]
        gen = torch.Generator().manual_seed(seed)
        timestep = int(torch.randint(0, NUM_TIMESTEPS, (1,), generator=gen))
        eps = torch.randn(x0.shape, generator=gen)
        rows.append((NOISE.noised(x0, eps, timestep), torch.tensor(timestep), eps))
    noisy, timesteps, noise = (torch.stack(c) for c in zip(*rows)) if rows else \
        (torch.empty(0, 3, LATENT, LATENT), torch.empty(0, dtype=torch.long), torch.empty(0, 3, LATENT, LATENT))
    return TaskBatch({**inputs, unet: noisy}, torch.zeros(len(prompts)), len(prompts), first_row=start,
                     targets={timesteps_key(unet): timesteps, noise_key(unet): noise})


class RewardScorer(nn.Module):
    """One category's frozen reward model as a feedback scorer (module docstring)."""

    def __init__(self, rewards, category: str, prompt: str):
        super().__init__()
        self.rewards, self.category, self.prompt = rewards, category, prompt
        self.models = nn.ModuleList(rewards.trainer.modules.values())  # frozen with the scorer (runtime.feedback)

    def forward(self, images: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        rows = torch.nonzero(batch.targets[CATEGORY] == CATEGORIES.index(self.category)).flatten()
        out = torch.full((images.shape[0],), MARGIN, dtype=images.dtype, device=images.device)
        if len(rows):
            r = self.rewards.reward_ids(images[rows], batch.inputs[self.prompt][rows], self.category)
            out = out.index_put((rows,), r.to(images.dtype))
        return out


def check_reward_scorer(scorer, job, t: int) -> None:
    """A ``reward_model`` scorer names a category, a reward-model spec with that category's task, and weights (a
    phase reference is the pipeline's to resolve; a literal path must exist)."""
    from pathlib import Path

    from recipes.diffusion.data import pair_layout
    from recipes.diffusion.scorers import load_job, model_file

    category = scorer.args.get("category")
    if category not in CATEGORIES or set(scorer.args) != {"category"}:
        raise ValueError(f"args ({scorer.args}): give only category, one of {', '.join(CATEGORIES)}.")
    if not scorer.spec or not Path(scorer.spec).is_file():
        raise ValueError(f"spec ({scorer.spec}): no such file; name the reward models' job spec "
                         "(recipes/diffusion/itercomp-tiny.yaml).")
    rm_job = load_job(scorer.spec)
    if category not in {pair_layout(rm_job, i).category for i in range(len(rm_job.tasks))}:
        raise ValueError(f"spec ({scorer.spec}) has no reward-model task of category '{category}'.")
    if not scorer.model:
        raise ValueError("model is missing; name the reward models' model.pt or '@<phase>/checkpoint'.")
    if not scorer.model.startswith("@"):
        try:
            model_file(scorer.model)
        except FileNotFoundError as exc:
            raise ValueError(f"model: {exc}") from None
    prompt_use(job, t)


def build_reward_scorer(scorer, job, t: int, pixels: int) -> RewardScorer:
    """The frozen reward model of ``scorer`` (runtime.feedback.register_scorer's factory)."""
    from recipes.diffusion.scorers import RewardModels, load_job

    return RewardScorer(RewardModels(load_job(scorer.spec), scorer.model), scorer.args["category"],
                        prompt_use(job, t)[0])
