"""IterComp's feedback step as a planned DAG: the loss ``itercomp_feedback`` over the reward models' MetaOps.

The task (docs/recipes/diffusion.md, "The feedback step as a planned DAG"; itercomp-pipeline-tiny.yaml's `feedback`
phase) runs every part of the three reward models as uses the planner places and prices: the frozen text tower
(the prompt, mode forward), the UNet sampled after it (mode sample, grad_last_step), the frozen vision tower reading
the samples as its images (after: [<the sample use>], runtime.sampleop.sample_pixels: the reward_model scorer's
preprocessing), and one scoring transformer per category, named by its category (``attribute``, ``spatial``,
``nonspatial``), mode forward, after the image and the prompt (``seq_len``: both together), whose component starts
from the reward-model run's weights (``init_from: "@rm/checkpoint"``, runtime.init_from). The gradient passes
through all of them to x0 and the UNet; none of their weights trains.

The head (:class:`FeedbackRewardHead`) is what stays of the reward models after their layers: per category the
trained score head of that run (its task ``<category>``'s ``head:<category>``: LayerNorm, mean over the prompt's
positions, MLP; recipes.diffusion.heads.PairwiseRewardHead), frozen, read from the file the category's scoring
component starts from; each reward normalised by the mean and standard deviation of that model's rewards on the
held-out gallery's images (recipes.diffusion.scorers.RewardModels.normalise, the reward_model scorer's); a row is
scored by its category's model only (the others give the margin, as the scorer does); per sample
``scale * sum_k ReLU(margin - r_k)`` (runtime.feedback.reward_hinge, IterComp's margin 2 and scale 1e-3, or
``loss_args`` ``margin`` and ``scale``). The sampled UNet's output layer lives in the head too (runtime.heads).
"""

from __future__ import annotations

import torch
from torch import nn

from planner.spec import JobSpec
from planner.usegraph import leaf_uses, upstream_uses
from recipes.diffusion.feedback import CATEGORY, prompt_use
from recipes.diffusion.shapes import CATEGORIES
from runtime.data import TaskBatch
from runtime.feedback import MARGIN, SCALE, reward_hinge
from runtime.heads import TaskHead

LOSS = "itercomp_feedback"
OPTIONS = {"margin": MARGIN, "scale": SCALE}


def _path(job, t: int) -> str:
    return f"tasks[{t}] ('{job.tasks[t].name}')"


def dag_layout(job: JobSpec, t: int) -> tuple[str, str, dict[str, str]]:
    """(the prompt use, the image use, category -> its scoring use's component) of feedback task ``t`` (module
    docstring); a ValueError, one line, naming what the task lacks."""
    task = job.tasks[t]
    prompt = prompt_use(job, t)[0]
    uses = {u.use_name: u for u in task.components}
    leaves, ups = leaf_uses(job, t), upstream_uses(task)
    if sorted(leaves) != sorted(CATEGORIES):
        raise ValueError(f"{_path(job, t)}: loss {LOSS} reads one scoring use per category, named "
                         f"{', '.join(CATEGORIES)}, as its leaves; its leaves are {leaves}. Name each category's "
                         "scoring use after it (see recipes/diffusion/itercomp-pipeline-tiny.yaml).")
    images = {name for name, use in uses.items() if any(uses[up].mode == "sample" for up in ups[name])}
    for category in CATEGORIES:
        if len(ups[category]) != 2 or ups[category][1] != prompt or ups[category][0] not in images:
            raise ValueError(f"{_path(job, t)}: scoring use '{category}' reads {ups[category]}; it reads the image "
                             f"use (after: [<the sample use>]) then the prompt, after: [<image>, {prompt}], as the "
                             "reward models were trained.")
        if uses[category].mode != "forward" or job.components[uses[category].component].init_from is None:
            raise ValueError(f"{_path(job, t)}: scoring use '{category}' runs the trained reward model: mode forward, "
                             f"and its component '{uses[category].component}' with init_from (the reward-model run's "
                             "'@<phase>/checkpoint').")
    image = ups[CATEGORIES[0]][0]
    return prompt, image, {c: uses[c].component for c in CATEGORIES}


def check_feedback_loss(job: JobSpec, t: int) -> None:
    """What ``loss: itercomp_feedback`` needs of task ``t`` (:func:`dag_layout`, ``loss_args``), checked before
    anything runs."""
    dag_layout(job, t)
    bad = sorted(set(job.tasks[t].loss_args) - set(OPTIONS))
    if bad or any(not isinstance(v, (int, float)) or v < 0 for v in job.tasks[t].loss_args.values()):
        raise ValueError(f"{_path(job, t)}.loss_args ({job.tasks[t].loss_args}): loss {LOSS} takes margin and scale, "
                         "numbers >= 0 (defaults 2 and 1e-3, IterComp's).")


def reward_job(job: JobSpec, t: int) -> JobSpec:
    """The reward-model job whose run the scoring components of feedback task ``t`` start from: per category a pair
    task named after it (itercomp-tiny.yaml's: the image tower twice, the prompt, the category's scoring component
    after each image and the prompt) over this job's components, without ``init_from``; the same module names as that
    run's, so its model file loads whole (recipes.diffusion.scorers.RewardModels)."""
    from planner.spec import parse_job

    prompt, image, scorers = dag_layout(job, t)
    task = job.tasks[t]
    uses = {u.use_name: u for u in task.components}
    vision, text = uses[image].component, uses[prompt].component
    names = {vision, text, *scorers.values()}
    components = {n: job.components[n].model_dump(exclude_none=True, exclude={"init_from"}) for n in names}
    tasks = [{"name": c, "batch_size": 1, "loss": f"itercomp_{c}", "components": [
        {"component": vision, "name": "better"}, {"component": vision, "name": "worse", "after": []},
        {"component": text, "name": "prompt", "after": [], "seq_len": uses[prompt].seq_len},
        {"component": scorers[c], "name": "score_better", "after": ["better", "prompt"], "seq_len": uses[c].seq_len},
        {"component": scorers[c], "name": "score_worse", "after": ["worse", "prompt"], "seq_len": uses[c].seq_len}]}
        for c in CATEGORIES]
    return parse_job({"name": "reward-models", "recipe": "diffusion", "cluster": job.cluster.model_dump(),
                      "components": components, "tasks": tasks,
                      "training": {"seed": job.training.seed, "precision": job.training.precision}})


class FeedbackRewardHead(TaskHead):
    """The head of loss ``itercomp_feedback`` (module docstring): ``forward(outputs, batch)`` -> per-sample hinge
    ``(B,)``; the last call's rewards ``(K, B)`` (the margin where a category's model does not score a row) are kept
    in :attr:`last_rewards`."""

    def __init__(self, task: str, hidden_size: int, prompt_len: int, margin: float, scale: float):
        super().__init__(task, list(CATEGORIES))
        from recipes.diffusion.heads import PairwiseRewardHead

        # frozen copies of the reward models' score heads, loaded by load_pretrained (their shapes: the rm run's)
        self.score = nn.ModuleDict({c: PairwiseRewardHead(c, "better", "worse", hidden_size, prompt_len)
                                    for c in CATEGORIES})
        self.margin, self.scale = margin, scale
        # per category (mean, std) of its model's raw rewards on the held-out gallery: set by load_pretrained
        self.norms = [(0.0, 1.0)] * len(CATEGORIES)
        self.last_rewards: torch.Tensor | None = None

    def load_pretrained(self, job: JobSpec, t: int) -> FeedbackRewardHead:
        """Every category's score head from the model file its scoring component starts from, frozen, and its
        reward scale on the held-out gallery of this job's seed (a pipeline's phases share the top-level seed, so
        it is the reward models' own; the reward_model scorer uses its spec's) (runtime.heads.build_head calls this
        after initialising the head)."""
        from recipes.diffusion.scorers import RewardModels

        _, _, scorers = dag_layout(job, t)
        files = {job.components[name].init_from for name in scorers.values()}
        for init_from in sorted(files):
            models = RewardModels(reward_job(job, t), init_from)
            for i, c in enumerate(CATEGORIES):
                if job.components[scorers[c]].init_from == init_from:
                    self.score[c].load_state_dict(models.trainer.modules[("head:" + c, 0)].state_dict())
                    self.norms[i] = models.scale[c]
        self.score.requires_grad_(False).eval()
        return self

    def forward(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        category = batch.targets[CATEGORY]
        rows = []
        for i, c in enumerate(CATEGORIES):
            mean, std = self.norms[i]
            r = (self.score[c].reward(outputs[c]).float() - mean) / std
            rows.append(torch.where(category == i, r, torch.full_like(r, self.margin)))
        rewards = torch.stack(rows)
        self.last_rewards = rewards.detach()
        return reward_hinge(rewards, self.margin, self.scale)


def build_feedback_head(job: JobSpec, t: int, leaves: list[str]) -> FeedbackRewardHead:
    """The head of a task with loss ``itercomp_feedback`` (runtime.heads.register_loss's factory)."""
    _, _, scorers = dag_layout(job, t)
    task = job.tasks[t]
    widths = {job.components[name].hidden_size for name in scorers.values()}
    if len(widths) != 1:
        raise ValueError(f"{_path(job, t)}: the scoring components have widths {sorted(widths)}; the reward models "
                         "score at one width.")
    options = {**OPTIONS, **task.loss_args}
    return FeedbackRewardHead(task.name, widths.pop(), prompt_use(job, t)[1], float(options["margin"]),
                              float(options["scale"]))
