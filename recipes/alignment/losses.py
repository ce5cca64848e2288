"""The alignment losses: reward model (Bradley-Terry + MSE to absolute scores), DPO, and GRPO's KL penalty on SFT data.

Pure functions on tensors (tested on hand-made cases in tests/unit/recipes/test_alignment_losses.py) and the loss
heads the runtime builds for a task (registered by recipes/alignment/__init__.py through runtime.heads.register_loss):

- ``reward_bt`` (:class:`RewardHead`): a task with two uses of the reward model, ``chosen`` then ``rejected`` (both
  ``after: []``: each reads its own sequence); the reward of a sequence is ``Linear(H, 1)`` on the normalised hidden
  state of its last token; the loss is Eq. 1 of Baichuan Alignment (arXiv 2410.14940, §2.1):
  ``-log sigmoid(r_w - r_l) + alpha [(r_w - s_w)^2 + (r_l - s_l)^2]``, alpha = 0 on a pair without scores.
- ``dpo`` (:class:`DPOHead`): :func:`dpo_loss` (Rafailov et al. 2023) on sequence log-probs (:func:`sequence_logprobs`)
  of the answers (through the chunked kernel unless ``training.kernels: off``). A task with four uses: the policy
  on chosen then rejected, then a frozen reference (``frozen: true``) on the same two, each ``after: []``. The head
  predicts through the policy's pretrained final norm and LM head (trained, as a next-token task's) and the
  reference's (loaded beside them, frozen, not parameters).
- :func:`sft_kl_penalty`: the KL(reference || policy) over the reference's top-k tokens per learned position
  (kernels.topk_kl, k = 500 in the report), which GRPO adds on SFT data instead of an SFT cross-entropy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kernels import backend_for, linear_logprobs, topk_kl
from planner.spec import JobSpec
from planner.usegraph import use_component
from runtime.heads import TaskHead
from runtime.pretrained import load_lm_head
from runtime.tokenizer import IGNORE_INDEX, labels_key

if TYPE_CHECKING:
    from runtime.data import TaskBatch

RM_ALPHA = 0.5  # weight of the reward model's squared error to the absolute scores (the report gives no value)
DPO_BETA = 0.1  # DPO's temperature on the log-ratio margin (the DPO paper's usual value)
SCORE_KEYS = ("score_chosen", "score_rejected")  # batch.targets: (B,) float32 absolute scores in [0, 1], NaN: none


def last_key(use: str) -> str:
    """``batch.targets`` key of the index of the last real token of each row of ``use`` ``(B,)`` long."""
    return f"last:{use}"


# --------------------------------------------------------------------------- pure losses


def reward_bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, score_chosen: torch.Tensor,
                   score_rejected: torch.Tensor, alpha: float = RM_ALPHA) -> torch.Tensor:
    """Per pair ``-log sigmoid(r_w - r_l) + alpha [(r_w - s_w)^2 + (r_l - s_l)^2]`` over rewards ``(B,)`` and
    normalised absolute scores ``(B,)``; the squared-error term is 0 on a pair whose scores are NaN (no score)."""
    bt = -F.logsigmoid(chosen - rejected)
    scored = ~(torch.isnan(score_chosen) | torch.isnan(score_rejected))
    sc, sr = torch.nan_to_num(score_chosen), torch.nan_to_num(score_rejected)
    mse = (chosen - sc) ** 2 + (rejected - sr) ** 2
    return bt + alpha * torch.where(scored, mse, torch.zeros_like(mse))


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = DPO_BETA) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair DPO loss ``-log sigmoid(margin)``, implicit reward margin) from sequence log-probs ``(B,)``:
    ``margin = beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]``; the reference is detached."""
    margin = beta * ((policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach()))
    return -F.logsigmoid(margin), margin.detach()


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                      kernels: str = "auto") -> torch.Tensor:
    """Sum over the learned tokens of each row of ``log p(labels[j + 1] | hidden[j])`` through the LM head
    ``(weight, bias)``: hidden ``(B, S, H)``, labels ``(B, S)`` with IGNORE_INDEX where nothing is learned -> ``(B,)``.
    Through kernels.linear_logprobs (chunked: never the whole logits) unless ``kernels`` (training.kernels) is
    ``off``: then the plain log-softmax of the logits."""
    targets = labels[:, 1:]
    learned = targets != IGNORE_INDEX
    index = torch.where(learned, targets, torch.zeros_like(targets))
    backend = backend_for(kernels, hidden.device)
    if backend is None:
        logits = F.linear(hidden[:, :-1], weight, bias).float()
        logp = F.log_softmax(logits, dim=-1).gather(-1, index[..., None]).squeeze(-1)
    else:
        logp = linear_logprobs(hidden[:, :-1], weight, bias, index, backend=backend)
    return (logp * learned).sum(dim=1)


def sft_kl_penalty(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ref_logits: torch.Tensor,
                   learned: torch.Tensor, k: int, backend: str | None = None) -> torch.Tensor:
    """GRPO's penalty on SFT data, per row: the mean over ``learned`` positions ``(B, P)`` of KL(q || pi), ``q`` the
    reference's distribution renormalised over its top-``k`` tokens (``ref_logits`` ``(B, P, V)``, detached) and
    ``pi`` the policy's softmax of ``F.linear(hidden, weight, bias)`` (``hidden`` ``(B, P, H)``). With k = V it is
    the full KL(ref || policy)."""
    top, index = ref_logits.detach().float().topk(min(k, ref_logits.shape[-1]), dim=-1)
    per_position = topk_kl(hidden, weight, bias, top, index, backend=backend)
    mask = learned.to(per_position.dtype)
    return (per_position * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


# --------------------------------------------------------------------------- heads


class RewardHead(TaskHead):
    """``reward_bt``: the reward model's scalar head on the last token of each of its two leaves (chosen, rejected),
    trained with :func:`reward_bt_loss`; :meth:`rewards` is what the evaluator and GRPO's scorer read."""

    def __init__(self, task: str, leaves: list[str], hidden_size: int, alpha: float = RM_ALPHA):
        super().__init__(task, leaves, hidden_size)
        self.alpha = alpha
        self.out = nn.Linear(hidden_size, 1, bias=True)

    def reward(self, hidden: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The reward ``(B,)`` of sequences whose hidden states are ``hidden`` ``(B, S, H)``, read at ``last``."""
        at = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.out(self.normed(at)).squeeze(-1).float()

    def rewards(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward of the chosen sequences, of the rejected ones), each ``(B,)``."""
        chosen, rejected = self.leaves
        return (self.reward(outputs[chosen], batch.targets[last_key(chosen)]),
                self.reward(outputs[rejected], batch.targets[last_key(rejected)]))

    def forward(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        chosen, rejected = self.rewards(outputs, batch)
        return reward_bt_loss(chosen, rejected, *(batch.targets[k] for k in SCORE_KEYS), self.alpha)


def reward_head(job: JobSpec, task_index: int, leaves: list[str]) -> RewardHead:
    """The ``reward_bt`` head of task ``task_index``: a ValueError unless it has exactly two leaves (chosen, then
    rejected) of one component."""
    task = job.tasks[task_index]
    components = {use_component(job, task_index, leaf)[0] for leaf in leaves}
    if len(leaves) != 2 or len(components) != 1:
        raise ValueError(f"tasks[{task_index}] ('{task.name}'): loss reward_bt needs two leaf uses of one reward "
                         f"model (chosen, then rejected, each with `after: []`), got {leaves}; add "
                         "`{component: rm, name: chosen, after: []}` and `{component: rm, name: rejected, after: []}`.")
    return RewardHead(task.name, leaves, use_component(job, task_index, leaves[0])[1].hidden_size)


class DPOHead(TaskHead):
    """``dpo``: leaves (policy chosen, policy rejected, reference chosen, reference rejected); per pair
    :func:`dpo_loss` of the answers' summed log-probs (``labels:<use>``: the answer tokens, as a preference source
    marks them). :meth:`load_pretrained` (runtime.heads.build_head calls it) gives the policy's final norm and LM head
    as this head's parameters, and keeps the reference's frozen outside the parameters (never trained or exported)."""

    def __init__(self, task: str, leaves: list[str], hidden_size: int, vocab_size: int, beta: float = DPO_BETA,
                 kernels: str = "auto"):
        super().__init__(task, leaves, hidden_size)
        self.beta, self.kernels = beta, kernels
        self.out = nn.Linear(hidden_size, vocab_size, bias=False)
        self.reference: tuple[nn.Module, ...] = ()  # (module with the reference's norm and out), unregistered

    def load_pretrained(self, job: JobSpec, task_index: int) -> DPOHead:
        policy, reference = (use_component(job, task_index, self.leaves[i])[1] for i in (0, 2))
        load_lm_head(policy, self)
        holder = nn.Module()
        holder.kernels = self.kernels  # the reference's final norm runs as the policy's does (same rounding)
        self.reference = (load_lm_head(reference, holder).requires_grad_(False),)
        return self

    def logprobs(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> list[torch.Tensor]:
        """Summed answer log-probs ``(B,)`` of each leaf, in leaf order (the reference's without gradient)."""
        out = []
        for i, leaf in enumerate(self.leaves):
            labels = batch.targets[labels_key(leaf)]
            if i < 2:
                out.append(sequence_logprobs(self.normed(outputs[leaf]), self.out.weight, self.out.bias, labels,
                                             self.kernels))
                continue
            ref = self.reference[0].to(outputs[leaf].device)
            with torch.no_grad():
                out.append(sequence_logprobs(ref.norm(outputs[leaf]), ref.out.weight, ref.out.bias, labels,
                                             self.kernels))
        return out

    def forward(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        return dpo_loss(*self.logprobs(outputs, batch), beta=self.beta)[0]


def dpo_head(job: JobSpec, task_index: int, leaves: list[str]) -> DPOHead:
    """The ``dpo`` head of task ``task_index``: a ValueError unless its leaves are two uses of a pretrained policy
    then two of a frozen pretrained reference of the same width and vocabulary."""
    task = job.tasks[task_index]
    comps = [use_component(job, task_index, leaf) for leaf in leaves]
    ok = (len(leaves) == 4 and comps[0][0] == comps[1][0] != comps[2][0] == comps[3][0]
          and all(c.pretrained for _, c in comps) and comps[2][1].frozen
          and comps[0][1].hidden_size == comps[2][1].hidden_size and comps[0][1].vocab_size == comps[2][1].vocab_size)
    if not ok:
        raise ValueError(f"tasks[{task_index}] ('{task.name}'): loss dpo needs four leaf uses, each `after: []`: a "
                         "pretrained policy on chosen then rejected answers, then a frozen pretrained reference "
                         f"(`frozen: true`, same width and vocabulary) on the same two; got {leaves} of "
                         f"{[name for name, _ in comps]}.")
    policy = comps[0][1]
    return DPOHead(task.name, leaves, policy.hidden_size, policy.vocab_size, kernels=job.training.kernels)


LOSS_FACTORIES = {"reward_bt": reward_head, "dpo": dpo_head}

