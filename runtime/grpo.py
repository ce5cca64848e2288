"""The built-in ``grpo`` loss: GRPO's policy-gradient loss over a task's rollouts (DeepSeekMath, Shao et al. 2024).

A GRPO task has one ``mode: generate`` use of the policy (the rollouts: ``samples`` per prompt, a group), read by a
reward model and a reference model (``mode: forward`` leaves) and by the policy itself (the ``mode: train`` leaf),
each of which embeds the rollout's tokens (prompt + generated; runtime.rollout). The loss head reads all four: the
rollout's tokens and which generated tokens count, the reward model's last hidden state, the reference's and the
policy's hidden states. Which forward leaf is which: the task's forward leaves in task order, the reward model first,
then the reference (optional: no KL term without one).

Per sample ``i`` of a group of ``G`` (the generate use's ``samples``), over its ``n_i`` generated tokens ``t``:

- reward ``r_i``: ``Linear(H, 1)`` of the reward model's last token (the last generated one that counts) after a
  LayerNorm: the scalar head lives here, in the task's loss head, frozen (a forward use has no gradient); it starts
  from the job seed like every head;
- advantage ``A_i = (r_i - mean_G r) / (std_G r + eps)`` over the sample's group (unbiased std, eps 1e-4, as TRL's
  GRPOTrainer), gathered over the loss's data-parallel shards (runtime.data.TaskBatch.every_row), so a group may
  span shards;
- ``loss_i = 1/n_i sum_t [ -A_i * ratio_t + beta * k3_t ]``, ``ratio_t = exp(logp_t - sg(logp_t))`` (1 in value: one
  policy update per rollout, on-policy; its gradient is that of ``logp_t``); with ``training.rollout_lag: 1`` the
  rollouts come from the policy one step older (runtime.rollout), and the term is PPO's clipped one,
  ``-min(ratio_t A_i, clip(ratio_t, 1 - eps, 1 + eps) A_i)`` with ``ratio_t = exp(logp_t - b_t)`` against the behaviour
  log-probabilities ``b_t`` the generating device recorded and ``eps`` = :data:`CLIP` (DeepSeekMath's GRPO
  objective, eq. 3; the importance ratio verl's and OpenRLHF's off-policy modes apply); and ``k3_t = exp(ref_t - logp_t) -
  (ref_t - logp_t) - 1`` (Schulman's unbiased, non-negative estimator of KL(policy || reference) at the sampled
  token, GRPO's choice; the top-k kernel kernels.topk_kl computes KL(reference top-k || policy), the other direction,
  and needs the reference's top-k logits moved to the loss instead of one log-probability per token);
  ``beta`` = :data:`BETA`.

``loss_args`` (:func:`grpo_options`) change two things: ``beta``, and ``kl: topk`` (Baichuan Alignment's choice,
arXiv 2410.14940 §2.1), which replaces ``k3_t`` with the KL from the reference's distribution renormalised over its
``topk`` most likely tokens (k = 500 in the report) to the policy's whole distribution at the position that generated
token ``t`` (kernels.topk_kl; with k = vocabulary, the full KL(reference || policy)): every token of the top-k is
priced, not only the sampled one, at the cost of the reference's logits in the loss.

Log-probabilities come from each LM's head (its final norm and ``Linear(H, V)``: for a pretrained model, the model's
norm and ``lm_head``) through kernels.linear_cross_entropy (runtime.heads.next_token_losses: never the whole
logits). The policy's LM head is trained here and is the one its generate use decodes with (runtime.rollout hands it
to the generating devices after every step); the reference's is frozen.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels import backend_for, topk_kl
from planner.spec import JobSpec
from runtime.optim import lm_kernel_weights

BETA = 0.04  # KL weight (DeepSeekMath's)
CLIP = 0.2  # the importance ratio's clip range with rollout_lag 1 (PPO's and DeepSeekMath's epsilon)
ADVANTAGE_EPS = 1e-4
KL_ESTIMATORS = ("k3", "topk")  # loss_args.kl
TOPK = 500  # loss_args.topk's default: the report's k
LOSS_ARGS = ("beta", "kl", "topk")


def grpo_options(job: JobSpec, t: int, beta: float = BETA) -> dict[str, Any]:
    """``beta``, ``kl`` and ``topk`` of grpo task ``t`` from its ``loss_args`` (defaults: ``beta``, k3, :data:`TOPK`);
    a ValueError naming the argument, its value and the fix otherwise. Torch-free."""
    task = job.tasks[t]
    args, where = task.loss_args, f"tasks[{t}] ('{task.name}').loss_args"
    unknown = sorted(set(args) - set(LOSS_ARGS))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: not an option of loss '{task.loss}'; it takes {', '.join(LOSS_ARGS)}. "
                         "Remove it.")
    beta = args.get("beta", beta)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
        raise ValueError(f"{where}.beta ({beta!r}): the KL weight must be a number >= 0 (0: no KL term). Fix it.")
    kl = args.get("kl", "k3")
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"{where}.kl ({kl!r}) is not a KL estimator; use k3 (at the sampled token) or topk (over "
                         "the reference's top-k tokens).")
    topk = args.get("topk", TOPK)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"{where}.topk ({topk!r}): the number of the reference's tokens must be an integer >= 1.")
    if "topk" in args and kl != "topk":
        raise ValueError(f"{where}.topk ({topk}) is read only with kl: topk (kl is {kl}). Set kl: topk or drop topk.")
    return {"beta": float(beta), "kl": kl, "topk": topk}


def group_advantages(rewards: torch.Tensor, samples: int, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """``(r - group mean) / (group std + eps)`` per row of ``rewards`` ``(B,)``, groups being consecutive runs of
    ``samples`` rows; 0 for groups of one."""
    groups = rewards.float().reshape(-1, samples)
    if samples == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return (centred / (groups.std(dim=1, keepdim=True) + eps)).reshape(-1)


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(policy || reference) per sampled token: ``exp(d) - d - 1``, ``d = ref - logp``."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_losses(logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
                generated: torch.Tensor, beta: float = BETA, kl: torch.Tensor | None = None,
                behaviour: torch.Tensor | None = None, clip: float = CLIP) -> torch.Tensor:
    """Per-sample GRPO losses ``(B,)`` (module docstring) from the policy's and the reference's log-probabilities of the
    generated tokens ``(B, N)``, the advantages ``(B,)`` and which tokens count ``(B, N)`` bool; ``kl`` ``(B, N)``
    (the top-k KL per token, with gradient) replaces k3 of ``ref_logp`` when given; with ``behaviour`` (the rollouts'
    own log-probabilities ``(B, N)``, rollout_lag 1) the clipped importance-ratio term."""
    a = advantages[:, None]
    if behaviour is None:
        per_token = -a * torch.exp(logp - logp.detach())
    else:  # tokens that do not count are masked below; their ratio is kept at 1 so that nothing overflows
        ratio = torch.exp(torch.where(generated, logp - behaviour.detach(), torch.zeros_like(logp)))
        per_token = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    if kl is not None and beta:
        per_token = per_token + beta * kl
    elif ref_logp is not None and beta:
        per_token = per_token + beta * k3(logp, ref_logp.detach())
    mask = generated.float()
    return (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class LMHead(nn.Module):
    """An LM's final norm and output projection (``normed``, ``out``: what runtime.generate.lm_logits and
    runtime.heads.next_token_losses read); a pretrained model's are loaded over them
    (runtime.pretrained.load_lm_head)."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=1e-5)
        self.out = nn.Linear(hidden_size, vocab_size, bias=True)

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class GRPOHead(nn.Module):
    """The ``grpo`` loss head (module docstring): ``policy`` (trained LM head), ``reference`` (frozen LM head, or
    None), ``reward_norm``/``reward_out`` (the reward model's frozen scalar head)."""

    def __init__(self, task: str, roles: dict[str, str | None], prompt_len: int, new_tokens: int, samples: int,
                 widths: dict[str, int], vocab_size: int, kernels: str = "auto", beta: float = BETA,
                 kl: str = "k3", topk: int = TOPK):
        super().__init__()
        self.task, self.roles, self.kernels, self.beta = task, dict(roles), kernels, beta
        self.kl, self.topk = kl, topk
        self.prompt_len, self.new_tokens, self.samples = prompt_len, new_tokens, samples
        self.leaves = [roles[k] for k in ("reward", "reference", "policy") if roles[k] is not None]
        self.policy = LMHead(widths["policy"], vocab_size)
        self.reference = LMHead(widths["reference"], vocab_size) if roles["reference"] else None
        self.reward_norm = nn.LayerNorm(widths["reward"], eps=1e-5)
        self.reward_out = nn.Linear(widths["reward"], 1, bias=True)
        for frozen in (self.reference, self.reward_norm, self.reward_out):
            if frozen is not None:
                frozen.requires_grad_(False)

    def kernel_weights(self) -> list[nn.Parameter]:
        """The policy's LM projection, when the loss kernels read it (runtime.optim.keep_kernel_grad_buffers)."""
        return lm_kernel_weights(self.policy.out, self.kernels)

    def logprobs(self, lm: LMHead, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``(B, N)`` of the generated tokens under ``lm`` from an LM's hidden states
        ``(B, P + N, H)`` over the rollout (position ``P - 1 + j`` predicts generated token ``j``)."""
        from runtime.heads import next_token_losses  # heads imports this module

        p = self.prompt_len
        return -next_token_losses(lm.normed(hidden[:, p - 1:-1]), lm.out, tokens[:, p:], self.kernels)

    def topk_kl(self, hidden: torch.Tensor, ref_hidden: torch.Tensor) -> torch.Tensor:
        """The top-k KL ``(B, N)`` (module docstring) at each generated token's position from the policy's and the
        reference's hidden states ``(B, P + N, H)``: kernels.topk_kl unless training.kernels is off."""
        p = self.prompt_len
        with torch.no_grad():
            ref = self.reference.out(self.reference.normed(ref_hidden[:, p - 1:-1].detach())).float()
            top, index = ref.topk(min(self.topk, ref.shape[-1]), dim=-1)
        h = self.policy.normed(hidden[:, p - 1:-1])
        backend = backend_for(self.kernels, h.device)
        if backend is not None:
            return topk_kl(h, self.policy.out.weight, self.policy.out.bias, top, index, backend=backend)
        logq = F.log_softmax(top, dim=-1)
        logpi = F.log_softmax(self.policy.out(h).float(), dim=-1).gather(-1, index)
        return (logq.exp() * (logq - logpi)).sum(-1)

    def rewards(self, hidden: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """The reward model's score ``(B,)`` of each rollout: its scalar head on the last token that counts."""
        last = self.prompt_len + generated.sum(dim=1).clamp(min=1) - 1
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.reward_out(self.reward_norm(h)).squeeze(-1).float()

    def scores(self, outputs: dict[str, torch.Tensor], tokens: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """Each rollout's reward ``(B,)`` (no gradient): the reward model's (:meth:`rewards`); a recipe's head may score
        the rollout's ``tokens`` ``(B, P + N)`` otherwise (recipes.alignment.grpo: by a rule)."""
        return self.rewards(outputs[self.roles["reward"]].detach(), generated)

    def forward(self, outputs: dict[str, torch.Tensor], batch) -> torch.Tensor:
        from runtime.rollout import behaviour_logprobs, unpack  # rollout imports runtime.heads, which imports this

        rows = outputs[self.roles["rollout"]]
        tokens, generated = unpack(rows, self.prompt_len, self.new_tokens)
        logp = self.logprobs(self.policy, outputs[self.roles["policy"]], tokens)
        ref = kl = None
        if self.reference is not None and self.kl == "topk":
            kl = self.topk_kl(outputs[self.roles["policy"]], outputs[self.roles["reference"]])
        elif self.reference is not None:
            with torch.no_grad():
                ref = self.logprobs(self.reference, outputs[self.roles["reference"]].detach(), tokens)
        with torch.no_grad():
            scores = batch.every_row(self.scores(outputs, tokens, generated))
        mine = batch.rows_in_gathered  # these rows among the micro-batch's (a micro-batch holds whole groups)
        advantages = group_advantages(scores, self.samples)[mine.start:mine.stop]
        return grpo_losses(logp, ref, advantages, generated, self.beta, kl,
                           behaviour_logprobs(rows, self.prompt_len, self.new_tokens))


def grpo_roles(job: JobSpec, t: int) -> dict[str, str | None]:
    """The uses a grpo task's loss reads: ``rollout`` (its one generate use), ``policy`` (its one train leaf, a use of
    the rollout's component), ``reward`` and ``reference`` (its forward leaves in task order; the reference optional).
    A ValueError naming the task and what is missing otherwise."""
    from planner.usegraph import leaf_uses

    task = job.tasks[t]
    uses = {u.use_name: u for u in task.components}
    leaves = leaf_uses(job, t)
    generate = [u.use_name for u in task.components if u.mode == "generate"]
    train = [name for name in leaves if uses[name].mode == "train"]
    forward = [name for name in leaves if uses[name].mode == "forward"]
    where = f"tasks[{t}] ('{task.name}').loss ('grpo')"
    if len(generate) != 1 or len(train) != 1 or not 1 <= len(forward) <= 2 or len(leaves) != len(train) + len(forward):
        raise ValueError(
            f"{where} needs one generate use (the rollouts), one train leaf (the policy) and one or two forward "
            f"leaves (the reward model, then the reference); got generate uses {generate}, leaves "
            f"{ {name: uses[name].mode for name in leaves} }."
        )
    if uses[train[0]].component != uses[generate[0]].component:
        raise ValueError(f"{where}: the train leaf '{train[0]}' uses component '{uses[train[0]].component}', the "
                         f"rollouts '{uses[generate[0]].component}'; GRPO trains the policy that generates.")
    readers = [u.use_name for u in task.components if generate[0] in task.upstream_names(
        next(i for i, v in enumerate(task.components) if v.use_name == u.use_name))]
    for name in [train[0], *forward]:
        if task.upstream_names(next(i for i, v in enumerate(task.components) if v.use_name == name)) != generate:
            raise ValueError(f"{where}: leaf '{name}' must read the rollouts '{generate[0]}' alone (`after: "
                             f"[{generate[0]}]`); uses reading it: {readers}.")
    return {"rollout": generate[0], "policy": train[0], "reward": forward[0],
            "reference": forward[1] if len(forward) > 1 else None}


def grpo_head(job: JobSpec, t: int) -> GRPOHead:
    """The grpo head of task ``t`` (unseeded: runtime.heads.build_head initialises and loads it)."""
    from planner.components import use_shape
    from runtime.modules import DEFAULT_VOCAB

    roles = grpo_roles(job, t)
    task = job.tasks[t]
    use = next(u for u in task.components if u.use_name == roles["rollout"])
    comps = {role: job.components[next(u.component for u in task.components if u.use_name == name)]
             for role, name in roles.items() if name is not None}
    widths = {role: comp.hidden_size for role, comp in comps.items()}
    prompt = use_shape(job, t, next(i for i, u in enumerate(task.components) if u.use_name == roles["rollout"])).seq_len
    return GRPOHead(task.name, roles, prompt, use.new_tokens, use.samples, widths,
                    comps["policy"].vocab_size or DEFAULT_VOCAB, job.training.kernels, **grpo_options(job, t))
