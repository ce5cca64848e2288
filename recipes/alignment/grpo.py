"""GRPO in the alignment recipe: rollouts on the generator's prompts, scored by the reward model the pipeline trained.

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
- :func:`prompt_batch`: the rollout use's prompts from the recipe's generator (the ``constraints`` domain, where the
  reward model reads format and length reliably; docs/recipes/alignment.md), each group of ``samples`` rows on one
  prompt, left-padded to the use's ``seq_len`` with the tokenizer's pad id (the prompts are 17 to 20 tokens).
"""

from __future__ import annotations

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
from runtime.grpo import GRPOHead, grpo_head, grpo_roles
from runtime.tokenizer import load_tokenizer, pad_id

HEAD_FILE = "reward_head.safetensors"  # the reward model's trained scalar head, beside its from_pretrained weights
DOMAIN = "constraints"  # the prompts' domain
SPLITS = {"train": "grpo", "heldout": "grpo-heldout"}  # generator streams of the train and held-out prompts


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
    rows = []
    for r in range(start, stop):
        ids = list(tokenizer(problem(job.training.seed, split, (step * task.batch_size + r) // use.samples).prompt)
                   ["input_ids"])
        if len(ids) > length:
            raise ValueError(f"tasks[{t}].components[{u}].seq_len ({length}): a {DOMAIN} prompt has {len(ids)} "
                             f"tokens; set the rollout's seq_len to at least {len(ids)}.")
        rows.append([pad] * (length - len(ids)) + ids)
    n = stop - start
    return TaskBatch({name: torch.tensor(rows, dtype=torch.long).reshape(n, length)}, torch.zeros(n), n,
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
                               base.policy.out.out_features, base.kernels, base.beta)


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
