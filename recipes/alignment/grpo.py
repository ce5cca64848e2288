"""GRPO in the alignment recipe: rollouts on the generator's prompts, scored by the rule or by the trained reward model.

Baichuan Alignment's RL stage (arXiv 2410.14940, §2.1) runs GRPO from the merged SFT model against a frozen reference
(the same merged model) with a trained reward model. Loom's built-in ``grpo`` loss (runtime.grpo) scores a rollout
with a frozen ``LayerNorm + Linear(H, 1)`` of its own, seeded, on the reward model's last counted token: the same
shape as this recipe's ``reward_bt`` head (:class:`recipes.alignment.losses.RewardHead`: its ``norm`` and ``out``).
This module joins the two:

- step ``reward_head`` (:func:`reward_head_step`): after the reward-model phase, writes that phase's exported reward
  model with the trained scalar head beside it (:data:`HEAD_FILE`, read from the phase's ``model.pt``: the head is a
  loss head's parameters, which a phase's export does not hold);
- loss ``grpo_rm`` (:class:`RewardModelGRPOHead`): the built-in ``grpo`` (same uses, advantages, k3 KL, on-policy
  update) whose reward head is loaded from :data:`HEAD_FILE` in the reward component's folder;
- loss ``grpo_rule`` (:class:`RuleGRPOHead`): the same, rewarded by the rule (tasks.rule_score of each rollout's
  decoded prompt and answer), optionally plus :data:`RM_WEIGHT` times a reward model's score: the verifiable reward
  that the pipeline uses, since the reward model alone is hacked (docs/recipes/alignment.md); its ``loss_args`` also
  take ``lm_head: frozen`` (:func:`rule_options`), which keeps the policy's final norm and LM head as they start:
  the pipeline's choice, since the trained head costs greedy answers here (docs/recipes/alignment.md);
- :func:`prompt_batch`: the rollout use's prompts from the recipe's generator (the ``constraints`` domain, where the
  reward model reads format and length reliably; docs/recipes/alignment.md), each group of ``samples`` rows on one
  prompt, left-padded to the use's ``seq_len`` with the tokenizer's pad id (the prompts are 17 to 20 tokens) and
  masked (runtime.tokenizer.prompt_mask_key): the rollouts and the log-prob passes never attend the pads.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from planner.components import resolve_shape
from planner.errors import SpecError
from planner.spec import JobSpec
from planner.usegraph import use_component
from recipes.alignment import tasks
from runtime.data import TaskBatch
from runtime.grpo import GRPOHead, grpo_head, grpo_options, grpo_roles
from runtime.tokenizer import load_tokenizer, pad_id, prompt_mask_key

log = logging.getLogger(__name__)

HEAD_FILE = "reward_head.safetensors"  # the reward model's trained scalar head, beside its from_pretrained weights
DOMAIN = "constraints"  # the prompts' domain
RULE_BETA = 0.04  # grpo_rule's KL weight
RM_WEIGHT = 0.25  # grpo_rule with a reward-model leaf: reward = rule + RM_WEIGHT * reward model
SPLITS = {"train": "grpo", "heldout": "grpo-heldout"}  # generator streams of the train and held-out prompts
LM_HEADS = ("trained", "frozen")  # grpo_rule's loss_args.lm_head: the policy's final norm and LM head


def problem(seed: int, split: str, group: int) -> tasks.Problem:
    """The prompt of group ``group`` (``samples`` consecutive rows) of ``split`` (train or heldout)."""
    return tasks.problem(seed, SPLITS.get(split, split), group, DOMAIN)


def prompt_batch(job: JobSpec, t: int, step: int, start: int, stop: int, split: str) -> TaskBatch:
    """Rows ``[start, stop)`` of grpo task ``t``'s batch at ``step``: the rollout use's prompt ids ``(rows, P)``,
    row ``r`` of the step's batch reading group ``(step * batch + r) // samples``'s prompt. A ValueError naming the
    use when a prompt is longer than its ``seq_len``."""
    task = job.tasks[t]
    name = grpo_roles(job, t)["rollout"]
    u = next(i for i, x in enumerate(task.components) if x.use_name == name)
    use, (component, comp) = task.components[u], use_component(job, t, name)
    length = resolve_shape(comp, component, use, f"tasks[{t}].components[{u}]").seq_len
    tokenizer = load_tokenizer(comp.pretrained, f"components.{component}.pretrained")
    pad = pad_id(tokenizer) or 0
    rows, real = [], []
    for r in range(start, stop):
        ids = list(tokenizer(problem(job.training.seed, split, (step * task.batch_size + r) // use.samples).prompt)
                   ["input_ids"])
        if len(ids) > length:
            raise ValueError(f"tasks[{t}].components[{u}].seq_len ({length}): a {DOMAIN} prompt has {len(ids)} "
                             f"tokens; set the rollout's seq_len to at least {len(ids)}.")
        rows.append([pad] * (length - len(ids)) + ids)
        real.append(ids)
    n = stop - start
    ids = torch.tensor(rows, dtype=torch.long).reshape(n, length)
    mask = torch.tensor([[i >= length - len(r) for i in range(length)] for r in real], dtype=torch.bool)
    return TaskBatch({name: ids}, torch.zeros(n), n, {prompt_mask_key(name): mask.reshape(n, length)},
                     first_row=start)


class RewardModelGRPOHead(GRPOHead):
    """Loss ``grpo_rm``: runtime.grpo.GRPOHead whose frozen reward head is the trained one (:data:`HEAD_FILE` in the
    reward component's pretrained folder, written by step ``reward_head``)."""

    def load_pretrained(self, job: JobSpec, t: int) -> RewardModelGRPOHead:
        from safetensors.torch import load_file

        name, comp = use_component(job, t, self.roles["reward"])
        path = Path(comp.pretrained or "") / HEAD_FILE
        if not path.is_file():
            raise ValueError(f"components.{name}.pretrained ({comp.pretrained}): no {HEAD_FILE}; loss grpo_rm scores "
                             "with a trained reward model: point it at the output of step reward_head "
                             "('@<phase>/model').")
        tensors = load_file(str(path))
        with torch.no_grad():
            for module, prefix in ((self.reward_norm, "norm"), (self.reward_out, "out")):
                for key, param in module.named_parameters():
                    param.copy_(tensors[f"{prefix}.{key}"])
                module.requires_grad_(False)  # frozen (runtime.modules.build_initialised made new parameters)
        return self


def grpo_rm_head(job: JobSpec, t: int, leaves: list[str]) -> RewardModelGRPOHead:
    """The ``grpo_rm`` head of task ``t``: the built-in grpo head's configuration (runtime.grpo.grpo_head checks the
    uses), its reward head loaded by :meth:`RewardModelGRPOHead.load_pretrained`."""
    base = grpo_head(job, t)
    widths = {"policy": base.policy.out.in_features, "reward": base.reward_out.in_features,
              "reference": base.reference.out.in_features if base.reference is not None else 0}
    return RewardModelGRPOHead(base.task, base.roles, base.prompt_len, base.new_tokens, base.samples, widths,
                               base.policy.out.out_features, base.kernels, base.beta, base.kl, base.topk)


def check_grpo_rm(job: JobSpec, t: int) -> None:
    """What a ``grpo_rm`` task needs, checked before any worker starts (runtime.heads.register_loss): the built-in
    grpo's uses and ``loss_args`` (a ValueError as runtime.grpo's)."""
    grpo_roles(job, t)
    grpo_options(job, t)


def without_lm_head_arg(job: JobSpec, t: int) -> JobSpec:
    """``job`` with task ``t``'s ``loss_args`` less ``lm_head`` (grpo_rule's own option; runtime.grpo reads the rest)."""
    task = job.tasks[t]
    if "lm_head" not in task.loss_args:
        return job
    args = {k: v for k, v in task.loss_args.items() if k != "lm_head"}
    tasks_ = list(job.tasks)
    tasks_[t] = task.model_copy(update={"loss_args": args})
    return job.model_copy(update={"tasks": tasks_})


def rule_options(job: JobSpec, t: int) -> dict[str, Any]:
    """``grpo_rule``'s ``loss_args``: runtime.grpo.grpo_options' (``beta`` defaulting to :data:`RULE_BETA`) and
    ``lm_head`` (:data:`LM_HEADS`; default ``trained``, as the built-in grpo: the policy's final norm and LM head train
    with its layers; ``frozen`` keeps them as the pretrained model's). A ValueError naming the argument otherwise."""
    lm_head = job.tasks[t].loss_args.get("lm_head", "trained")
    if lm_head not in LM_HEADS:
        raise ValueError(f"tasks[{t}] ('{job.tasks[t].name}').loss_args.lm_head ({lm_head!r}): expected trained (the "
                         "policy's final norm and LM head train with its layers) or frozen (they stay the pretrained "
                         "model's). Fix the value.")
    return grpo_options(without_lm_head_arg(job, t), t, RULE_BETA) | {"lm_head": lm_head}


def check_grpo_rule(job: JobSpec, t: int) -> None:
    """As :func:`check_grpo_rm`, for ``grpo_rule`` (whose one forward leaf may be the reference alone; its
    ``loss_args`` as :func:`rule_options` reads them)."""
    grpo_roles(job, t)
    rule_options(job, t)


class RuleGRPOHead(GRPOHead):
    """Loss ``grpo_rule``: runtime.grpo.GRPOHead whose reward is the rule (:func:`recipes.alignment.tasks.rule_score`)
    of each rollout's answer to its prompt, both decoded from the rollout's tokens with the policy's tokenizer (the
    prompt's pads and the answer's eos dropped; :func:`tasks.parse_prompt` reads the problem back from the prompt),
    plus :data:`RM_WEIGHT` times the trained reward model's score when the task has a reward-model leaf
    (``roles["reward"]``; its head loaded as ``grpo_rm``'s). ``beta``: :data:`RULE_BETA` unless ``loss_args`` set it;
    ``lm_head`` (:func:`rule_options`): whether the policy's final norm and LM head train (``frozen``: they stay the
    pretrained model's, so the exported policy and the rollouts decode through the starting model's head)."""

    def __init__(self, base: GRPOHead, roles: dict[str, str | None], widths: dict[str, int], tokenizer,
                 beta: float = RULE_BETA, lm_head: str = "trained"):
        super().__init__(base.task, roles, base.prompt_len, base.new_tokens, base.samples, widths,
                         base.policy.out.out_features, base.kernels, beta, base.kl, base.topk)
        self.tokenizer, self.lm_head = tokenizer, lm_head
        if roles["reward"] is None:  # the rule alone: no reward-model head
            self.reward_norm = self.reward_out = None

    def load_pretrained(self, job: JobSpec, t: int) -> RuleGRPOHead:
        if self.roles["reward"] is not None:
            RewardModelGRPOHead.load_pretrained(self, job, t)
        if self.lm_head == "frozen":  # runtime.heads.build_head loaded the pretrained head as trained
            self.policy.requires_grad_(False)
        return self

    def rule_scores(self, tokens: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """The rule score ``(B,)`` of each rollout. A prompt that is not the recipe's scores 0 with a warning (the
        task's prompts are the generator's, :func:`prompt_batch`; ``loom profile`` times the head on random tokens)."""
        pad, eos, p = pad_id(self.tokenizer), self.tokenizer.eos_token_id, self.prompt_len
        out = []
        for prompt, answer, counts in zip(tokens[:, :p].tolist(), tokens[:, p:].tolist(), generated.tolist()):
            text = self.tokenizer.decode([i for i in prompt if i != pad], skip_special_tokens=True)
            problem_ = tasks.parse_prompt(text)
            if problem_ is None:
                log.warning("loss grpo_rule: the rollout prompt %r is not one of the recipe's generated prompts; its "
                            "rollouts score 0", text)
                out.append(0.0)
                continue
            kept = [i for i, c in zip(answer, counts) if c and i != eos]
            out.append(tasks.rule_score(problem_, self.tokenizer.decode(kept, skip_special_tokens=True)))
        return torch.tensor(out, dtype=torch.float32, device=tokens.device)

    def scores(self, outputs: dict[str, torch.Tensor], tokens: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        rule = self.rule_scores(tokens, generated)
        if self.roles["reward"] is None:
            return rule
        return rule + RM_WEIGHT * super().scores(outputs, tokens, generated)


def grpo_rule_head(job: JobSpec, t: int, leaves: list[str]) -> RuleGRPOHead:
    """The ``grpo_rule`` head of task ``t``: the built-in grpo head's uses (runtime.grpo.grpo_head checks them), where
    one forward leaf is the reference and two are the reward model, then the reference."""
    options = rule_options(job, t)
    base = grpo_head(without_lm_head_arg(job, t), t)
    roles = dict(base.roles)
    if roles["reference"] is None:  # runtime.grpo reads a lone forward leaf as the reward model; here: the reference
        roles["reference"], roles["reward"] = roles["reward"], None
    widths = {role: use_component(job, t, name)[1].hidden_size for role, name in roles.items()
              if role != "rollout" and name is not None}
    widths.setdefault("reward", widths["policy"])  # unused: the head drops its reward-model layers
    name, comp = use_component(job, t, roles["rollout"])
    tokenizer = load_tokenizer(comp.pretrained, f"components.{name}.pretrained")
    return RuleGRPOHead(base, roles, widths, tokenizer, options["beta"], options["lm_head"])


# --------------------------------------------------------------------------- step reward_head

STEP_ARGS = ("component", "model", "task")


def check_reward_head_args(args: dict[str, Any], base: Path | None) -> None:
    """``component`` (the name written), ``model`` (a reference ``@<phase>/model`` to the reward-model phase),
    ``task`` (that phase's reward_bt task); torch-free, a ValueError naming the argument."""
    for key in args:
        if key not in STEP_ARGS:
            raise ValueError(f"{key}: unknown argument of step 'reward_head'; it takes {', '.join(STEP_ARGS)}.")
    for key, what in (("component", "the component name the reward model is written as"),
                      ("task", "the reward-model phase's reward_bt task, whose head is written")):
        if not isinstance(args.get(key), str):
            raise ValueError(f"{key} ({args.get(key)!r}): required, {what}. Add it.")
    model = args.get("model")
    if not isinstance(model, str) or not model.startswith("@"):
        raise ValueError(f"model ({model!r}): expected a reference '@<phase>/model' to the trained reward-model phase "
                         "(its model.pt holds the head). Fix the value.")


def reward_head_step(ctx) -> None:
    """Step ``reward_head``: ``OUT/<phase>/export/<component>/`` = the reward-model phase's exported folder plus
    :data:`HEAD_FILE` (``norm.*``, ``out.*`` of task ``task``'s head from that phase's ``model.pt``)."""
    from safetensors.torch import save_file

    from planner.pipeline import MODEL
    from runtime.reference import MODEL_FILE, load_model

    folder = ctx.path(ctx.args["model"])  # OUT/<rm phase>/export/<component>
    params = load_model(folder.parents[1] / MODEL_FILE)
    prefix = f"head:{ctx.args['task']}/0/"
    head = {name[len(prefix):]: t for name, t in params.items() if name.startswith(prefix)}
    if sorted(head) != ["norm.bias", "norm.weight", "out.bias", "out.weight"] or head["out.weight"].shape[0] != 1:
        raise SpecError(f"{ctx.phase}: step 'reward_head': {folder.parents[1] / MODEL_FILE} holds no reward_bt head "
                        f"of task '{ctx.args['task']}' (found {sorted(head) or 'nothing'}). Name the phase's reward "
                        "task in `task`.")
    target = ctx.artifact(MODEL) / ctx.args["component"]
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target)
    save_file({k: v.contiguous() for k, v in head.items()}, str(target / HEAD_FILE), metadata={"format": "pt"})
