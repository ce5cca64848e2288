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
- ``sft_kl`` (:class:`SFTKLHead`): GRPO's penalty on SFT data (the report's, "a KL penalty on SFT data instead of
  the usual SFT loss"), a task of its own beside the GRPO task in the same phase, weighted by its ``loss_weight``: per
  row :func:`sft_kl_penalty`, the KL(reference || policy) over the reference's top-``topk`` tokens (``loss_args``,
  :func:`sft_kl_options`; k = 500 in the report) at every learned position (kernels.topk_kl). Two leaves on the same
  SFT rows, each ``after: []``: the policy (trained), then the frozen reference. Both predict through their own
  pretrained final norm and LM head, frozen and outside the parameters: the penalty moves the policy's layers, which
  the GRPO task trains too, and prices the model ``loom run`` exports (whose LM head is the pretrained one: no
  next-token task of the phase trains it).
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
from runtime.optim import lm_kernel_weights
from runtime.pretrained import load_lm_head
from runtime.tokenizer import IGNORE_INDEX, labels_key

if TYPE_CHECKING:
    from runtime.data import TaskBatch

RM_ALPHA = 0.5  # weight of the reward model's squared error to the absolute scores (the report gives no value)
DPO_BETA = 0.1  # DPO's temperature on the log-ratio margin (the DPO paper's usual value)
SFT_KL_TOPK = 500  # sft_kl's default k: the report's
SFT_KL_ARGS = ("topk",)  # sft_kl's loss_args
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
    the full KL(ref || policy); 0 for a row without learned positions. ``backend``: kernels.topk_kl's (None: what
    ``auto`` picks), or ``off`` for the plain log-softmax of the whole logits."""
    top, index = ref_logits.detach().float().topk(min(k, ref_logits.shape[-1]), dim=-1)
    if backend == "off":
        logq = F.log_softmax(top, dim=-1)
        logpi = F.log_softmax(F.linear(hidden, weight, bias).float(), dim=-1).gather(-1, index)
        per_position = (logq.exp() * (logq - logpi)).sum(-1)
    else:
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

    def kernel_weights(self) -> list[nn.Parameter]:
        """The policy's LM projection, when kernels.linear_logprobs reads it (runtime.optim.keep_kernel_grad_buffers:
        its gradient is added into a persistent buffer)."""
        return lm_kernel_weights(self.out, self.kernels)

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


def sft_kl_options(job: JobSpec, t: int) -> dict[str, int]:
    """``topk`` of sft_kl task ``t`` from its ``loss_args`` (default :data:`SFT_KL_TOPK`); a ValueError naming the
    argument, its value and the fix otherwise."""
    task = job.tasks[t]
    where = f"tasks[{t}] ('{task.name}').loss_args"
    unknown = sorted(set(task.loss_args) - set(SFT_KL_ARGS))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: not an option of loss 'sft_kl'; it takes {', '.join(SFT_KL_ARGS)} "
                         "(its weight is the task's loss_weight). Remove it.")
    topk = task.loss_args.get("topk", SFT_KL_TOPK)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"{where}.topk ({topk!r}): the number of the reference's tokens must be an integer >= 1.")
    return {"topk": topk}


def check_sft_kl(job: JobSpec, t: int) -> None:
    """What an ``sft_kl`` task needs (a ValueError naming the task and the fix otherwise): :func:`sft_kl_options`,
    and two leaves, each ``after: []``, on the same rows: a trained pretrained policy, then a frozen pretrained
    reference of the same width and vocabulary. Builds nothing (``loom run`` calls it before any worker starts)."""
    from planner.usegraph import leaf_uses

    task = job.tasks[t]
    sft_kl_options(job, t)
    leaves = leaf_uses(job, t)
    comps = [use_component(job, t, leaf) for leaf in leaves]
    uses = {u.use_name: u for u in task.components}
    ok = (len(leaves) == 2 == len(task.components) and comps[0][0] != comps[1][0]
          and all(c.pretrained for _, c in comps) and not comps[0][1].frozen and comps[1][1].frozen
          and uses[leaves[0]].mode == "train" and uses[leaves[0]].seq_len == uses[leaves[1]].seq_len
          and comps[0][1].hidden_size == comps[1][1].hidden_size and comps[0][1].vocab_size == comps[1][1].vocab_size)
    if not ok:
        raise ValueError(f"tasks[{t}] ('{task.name}'): loss sft_kl needs two uses, each `after: []` and of one seq_len, "
                         "on the same SFT rows: a trained pretrained policy, then a frozen pretrained reference "
                         f"(`frozen: true`, same width and vocabulary); got {leaves} of {[name for name, _ in comps]}.")


class SFTKLHead(TaskHead):
    """``sft_kl``: leaves (policy, reference) over the same SFT rows (``labels:<policy leaf>``: the learned tokens);
    per row :func:`sft_kl_penalty` at every learned position. No parameters of its own: :meth:`load_pretrained`
    (runtime.heads.build_head calls it) keeps the policy's and the reference's pretrained final norm and LM head,
    frozen, outside the parameters (the module docstring says why)."""

    def __init__(self, task: str, leaves: list[str], topk: int = SFT_KL_TOPK, kernels: str = "auto"):
        super().__init__(task, leaves)
        self.topk, self.kernels = topk, kernels
        self.lm_heads: tuple[nn.Module, ...] = ()  # (the policy's, the reference's), unregistered

    def load_pretrained(self, job: JobSpec, task_index: int) -> SFTKLHead:
        heads = []
        for leaf in self.leaves:
            holder = nn.Module()
            holder.kernels = self.kernels  # both final norms run as the policy's trunk runs them (same rounding)
            heads.append(load_lm_head(use_component(job, task_index, leaf)[1], holder).requires_grad_(False))
        self.lm_heads = tuple(heads)
        return self

    def forward(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        policy_leaf, reference_leaf = self.leaves
        hidden = outputs[policy_leaf]
        policy, reference = (m.to(hidden.device) for m in self.lm_heads)
        learned = batch.targets[labels_key(policy_leaf)][:, 1:] != IGNORE_INDEX  # position j predicts token j + 1
        with torch.no_grad():
            ref_logits = reference.out(reference.norm(outputs[reference_leaf][:, :-1].detach()))
        backend = backend_for(self.kernels, hidden.device) or "off"
        return sft_kl_penalty(policy.norm(hidden[:, :-1]), policy.out.weight, policy.out.bias, ref_logits, learned,
                              self.topk, backend)


def sft_kl_head(job: JobSpec, task_index: int, leaves: list[str]) -> SFTKLHead:
    """The ``sft_kl`` head of task ``task_index`` (:func:`check_sft_kl` first)."""
    check_sft_kl(job, task_index)
    return SFTKLHead(job.tasks[task_index].name, leaves, sft_kl_options(job, task_index)["topk"],
                     job.training.kernels)


LOSS_FACTORIES = {"reward_bt": reward_head, "dpo": dpo_head, "sft_kl": sft_kl_head}
LOSS_CHECKS = {"sft_kl": check_sft_kl}  # run by `loom run` before any worker starts (runtime.heads.register_loss)

