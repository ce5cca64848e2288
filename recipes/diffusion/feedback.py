"""IterComp's feedback step as a trained phase: the rows of a ``loss: feedback`` task and the ``reward_model`` scorer.

A feedback task of a ``recipe: diffusion`` job (docs/recipes/diffusion.md, "The feedback step as a trained phase")
reads one root token use (the prompt, encoded by the frozen text tower the UNet cross-attends to) and samples one
image per row. :func:`feedback_batch` gives row ``r`` of step ``s`` the prompt the driver's ``feedback`` step draws for
it (recipes.diffusion.generator.training_prompt with the job's seed + 1: the categories in turn), its tokens under
the prompt use, and its category's index in ``targets["category"]``.

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
from recipes.diffusion.generator import training_prompt
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


def feedback_batch(job: JobSpec, t: int, step: int, start: int, stop: int) -> TaskBatch:
    """Rows [start, stop) of feedback task ``t`` at ``step`` (module docstring)."""
    name, seq_len = prompt_use(job, t)
    prompts = [training_prompt(job.training.seed + 1, step, row, CATEGORIES) for row in range(start, stop)]
    ids = np.stack([tokenize(p.text, seq_len) for p in prompts]) if prompts else np.zeros((0, seq_len), np.int64)
    category = torch.tensor([CATEGORIES.index(p.category) for p in prompts], dtype=torch.long)
    return TaskBatch({name: torch.from_numpy(ids)}, torch.zeros(len(prompts)), len(prompts), first_row=start,
                     targets={CATEGORY: category})


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
