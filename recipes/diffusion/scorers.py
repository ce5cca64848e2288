"""The trained reward models as frozen scorers of a generator's images (IterComp's feedback step reads them).

:class:`RewardModels` rebuilds a reward-model job (its spec: the tasks of ``itercomp-tiny.yaml``) in one process
(runtime.reference.ReferenceTrainer, the modules every worker builds), loads the weights a run of it wrote
(``model.pt``: a trained phase's ``OUT/<phase>/model.pt``, found from its ``@<phase>/checkpoint`` reference), and
freezes them. :meth:`RewardModels.reward` scores ``(images in [0, 1], prompts)`` of one category with that category's
model, differentiably in the images (the towers and scoring layers are frozen; the gradient passes through them).
Rewards are normalised per model by the mean and standard deviation of its rewards on the held-out gallery's images
(IterComp's margin 2 applies to normalised rewards): 0 is a typical gallery image, 2 is two deviations better.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from planner.spec import JobSpec
from recipes.diffusion.data import pair_layout
from recipes.diffusion.gallery import synthetic_entry
from recipes.diffusion.shapes import Prompt, tokenize
from runtime.data import TaskBatch
from runtime.init_from import model_file_of
from runtime.reference import ReferenceTrainer, load_model

NORM_PROMPTS = 24  # held-out gallery prompts per category whose images set a model's reward scale


def model_file(path: str | Path) -> Path:
    """The ``model.pt`` a path names (runtime.init_from.model_file_of: the file itself, or the first one in the folder
    or up to two folders above, so a trained phase's ``@<phase>/checkpoint`` finds ``OUT/<phase>/model.pt``)."""
    return model_file_of(path)


def load_job(spec: str | Path, data_dir: str | Path | None = None) -> JobSpec:
    """The reward-model job of spec file ``spec`` (a one-phase job), with ``data_dir`` when given."""
    import yaml

    from planner.spec import parse_job

    data = yaml.safe_load(Path(spec).read_text())
    if data_dir is not None:
        data["data_dir"] = str(data_dir)
    return parse_job(data, source=str(spec), base=Path(spec).resolve().parent)


class RewardModels:
    """One frozen reward model per category of ``job``'s tasks, weights from ``model`` (a model.pt or ``export``)."""

    def __init__(self, job: JobSpec, model: str | Path | None = None, normalise: bool = True):
        self.job = job
        self.trainer = ReferenceTrainer(job)
        if model is not None:
            self.trainer.load_parameters(load_model(model_file(model)))
        for module in self.trainer.modules.values():
            module.requires_grad_(False).eval()
        self.tasks = {pair_layout(job, t).category: t for t in range(len(job.tasks))}
        self.scale = {c: (0.0, 1.0) for c in self.tasks}
        if normalise:
            self.normalise()

    def normalise(self) -> None:
        """Set each model's reward scale to the mean and standard deviation of its raw rewards on the held-out
        gallery's images (again after its weights change)."""
        self.scale = {c: (0.0, 1.0) for c in self.tasks}
        for category in self.tasks:
            images, prompts = [], []
            for i in range(NORM_PROMPTS):
                entry = synthetic_entry(self.job.training.seed, "heldout", category, i)
                images += entry.images
                prompts += [entry.prompt] * len(entry.images)
            with torch.no_grad():
                r = self.reward(torch.from_numpy(np.stack(images)), prompts, category)
            self.scale[category] = (float(r.mean()), float(r.std()) or 1.0)

    def reward(self, images: torch.Tensor, prompts: list[Prompt], category: str) -> torch.Tensor:
        """``(B,)`` normalised rewards of ``images`` ``(B, 3, I, I)`` in [0, 1] for ``prompts`` (all of
        ``category``), differentiable in ``images``."""
        layout = pair_layout(self.job, self.tasks[category])
        ids = torch.from_numpy(np.stack([tokenize(p.text, layout.seq_len) for p in prompts]))
        return self.reward_ids(images, ids, category)

    def reward_ids(self, images: torch.Tensor, ids: torch.Tensor, category: str) -> torch.Tensor:
        """:meth:`reward` of prompts given as token ids ``(B, S)`` (recipes.diffusion.shapes.tokenize; S = the
        model's prompt length)."""
        t = self.tasks[category]
        layout = pair_layout(self.job, t)
        if ids.shape[1] != layout.seq_len:
            raise ValueError(f"prompt ids of {ids.shape[1]} tokens; the {category} reward model reads "
                             f"{layout.seq_len}. Give the prompt use seq_len {layout.seq_len}.")
        x = images * 2.0 - 1.0
        if x.shape[-1] != layout.side:
            x = torch.nn.functional.interpolate(x, size=(layout.side, layout.side), mode="bilinear", antialias=True)
        batch = TaskBatch({layout.better: x, layout.worse: x, layout.prompt: ids.to(torch.long)},
                          torch.zeros(len(ids)), len(ids))
        r = self.trainer.head(t).reward(self.trainer.forward(t, batch)[layout.better_leaf])
        mean, std = self.scale[category]
        return (r - mean) / std

    def parameters(self) -> dict[str, torch.Tensor]:
        return self.trainer.named_parameters()
