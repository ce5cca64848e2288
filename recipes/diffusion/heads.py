"""The reward models' head and pairwise loss (IterComp's, after ImageReward).

A reward model scores a (prompt, image) pair: ``r(c, x) = MLP(mean of LayerNorm(h) over the prompt's positions)``
where ``h`` is the output of the leaf use fed by the image and the prompt (a scoring transformer reading the frozen
image tower's tokens, then the frozen text tower's: the prompt's are the last ``seq_len`` positions of its prompt
use). As ImageReward reads its text encoder's output after it has cross-attended to the image, the reward reads the
prompt's tokens after they have attended to the image's. The MLP is
``Linear(H, H) -> GELU -> Linear(H, H/4) -> GELU -> Linear(H/4, 1)``. Each task's head is its own (one reward model
per category). The loss of a (better, worse) pair is
``-log sigmoid(r(c, x_better) - r(c, x_worse))`` (``softplus(r_worse - r_better)``), IterComp's and ImageReward's
Bradley-Terry loss; a pair is ranked right when ``r(c, x_better) > r(c, x_worse)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from planner.spec import JobSpec
from planner.usegraph import use_component
from recipes.diffusion.data import LOSSES, pair_layout
from runtime.data import TaskBatch
from runtime.heads import TaskHead


class PairwiseRewardHead(TaskHead):
    """One category's reward head: :meth:`rewards` per image of a pair, ``forward`` the pairwise loss ``(B,)``."""

    def __init__(self, task: str, better: str, worse: str, hidden_size: int, prompt_len: int):
        super().__init__(task, [better, worse], hidden_size)
        self.prompt_len = prompt_len
        quarter = max(hidden_size // 4, 1)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, quarter),
                                 nn.GELU(), nn.Linear(quarter, 1))

    def reward(self, h: torch.Tensor) -> torch.Tensor:
        """``r`` ``(B,)`` of a leaf output ``h`` ``(B, S, H)``."""
        return self.mlp(self.normed(h[:, -self.prompt_len:]).mean(dim=1)).squeeze(-1)

    def rewards(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r(c, x_better), r(c, x_worse))``, ``(B,)`` each."""
        return self.reward(outputs[self.leaves[0]]), self.reward(outputs[self.leaves[1]])

    def forward(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        better, worse = self.rewards(outputs)
        return pairwise_loss(better, worse)


def pairwise_loss(better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """``-log sigmoid(better - worse)`` per pair, computed stably as ``softplus(worse - better)``."""
    return F.softplus(worse - better)


def build_reward_head(job: JobSpec, task_index: int, leaves: list[str]) -> PairwiseRewardHead:
    """The head of a reward-model task (ValueError from :func:`recipes.diffusion.data.pair_layout` when the task does
    not fit)."""
    layout = pair_layout(job, task_index)
    widths = {use_component(job, task_index, leaf)[1].hidden_size for leaf in leaves}
    if len(widths) != 1:
        raise ValueError(f"tasks[{task_index}] ('{job.tasks[task_index].name}'): its two leaf uses have widths "
                         f"{sorted(widths)}; score both images with one component.")
    return PairwiseRewardHead(job.tasks[task_index].name, layout.better_leaf, layout.worse_leaf, widths.pop(),
                              layout.seq_len)


LOSS_FACTORIES = {name: build_reward_head for name in LOSSES}
