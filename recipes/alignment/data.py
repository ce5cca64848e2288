"""The recipe's dataset: reward-model pairs with both sequences through the model, and the data files it ships.

A ``reward_bt`` or ``dpo`` task without ``data:`` reads preference pairs here (runtime.data.register_dataset), because a
``preference`` data source puts only the chosen sequence through the model (the rejected one rides in the batch's
targets, docs/data.md). Each pair becomes one row of the task's uses: the first (``chosen``) reads prompt + chosen
answer, the second (``rejected``) prompt + rejected answer (a dpo task's third and fourth, the reference's, again),
each tokenised with its model's tokenizer (the pretrained folder) as a ``preference`` source would
(runtime.tokenizer.encode_completion) and padded to the use's seq_len. ``targets`` carry each sequence's labels (the
answer tokens), the index of its last token (losses.last_key) and the scores (``score_chosen``, ``score_rejected``:
NaN where a pair has none, so alpha = 0 there). An ``sft_kl`` task (GRPO's KL penalty on SFT data) puts each pair's
prompt + chosen answer through both its uses (the policy's and the reference's), the answer's tokens learned: the
pipeline's SFT rows.

Pairs come from the job's ``data_dir`` when it has one (``<data_dir>/<split>/preference.jsonl``, the documented
preference JSONL, checked line by line as a source is), else from the generator (recipes.alignment.tasks): row ``g``
of the train stream is pair ``g mod TRAIN_PAIRS`` of split train, held-out rows are pairs of split heldout (drawn
from another stream). One pair in :data:`UNSCORED_EVERY` has no scores, as open preference sets without absolute
scores (hh-rlhf, SHP) mixed in.
"""

from __future__ import annotations

import math

import torch

from planner.components import resolve_shape
from planner.data_spec import DataSpec
from planner.spec import JobSpec
from planner.usegraph import leaf_uses, use_component
from recipes.alignment import tasks
from recipes.alignment.losses import SCORE_KEYS, last_key
from runtime.data import TaskBatch
from runtime.source_files import load_records
from runtime.tokenizer import encode_completion, labels_key, load_tokenizer, pad_id, padded_row

TRAIN_PAIRS = 2048  # distinct training pairs of the generated stream
UNSCORED_EVERY = 5  # every fifth generated pair carries no absolute scores
SFT_KL = "sft_kl"  # GRPO's KL penalty on SFT data: the pairs' prompt + chosen answer through both its uses
PAIR_LOSSES = ("reward_bt", "dpo", SFT_KL)
GRPO_LOSSES = ("grpo_rm", "grpo_rule")  # rollouts on the generator's prompts (recipes.alignment.grpo)


def generated_pair(seed: int, split: str, index: int) -> dict:
    """Pair ``index`` of the generated ``split`` (train: a pool of TRAIN_PAIRS, cycled)."""
    if split == "train":
        index %= TRAIN_PAIRS
    return tasks.pair(seed, split, index, with_score=index % UNSCORED_EVERY != 0)


def pairs(job: JobSpec, t: int, split: str, indices: range) -> list[dict]:
    """The preference rows ``indices`` of ``split`` for task ``t``: from ``data_dir`` when the job has one (cycled
    over the file's lines), else generated."""
    if job.data_dir is None:
        return [generated_pair(job.training.seed, split, i) for i in indices]
    spec = DataSpec(format="preference", path=f"{job.data_dir}/{split}/preference.jsonl")
    rows = load_records(spec, t, None, False).rows
    return [rows[i % len(rows)] for i in indices]


def job_batch(job: JobSpec, t: int, step: int, start: int, stop: int, split: str) -> TaskBatch:
    """Rows ``[start, stop)`` of task ``t``'s batch at ``step``: preference pairs for a ``reward_bt`` or ``dpo`` task
    (see the module docstring), their prompts and chosen answers (the SFT rows) for an ``sft_kl`` task; the rollout
    prompts of a ``grpo_rm`` or ``grpo_rule`` task
    (recipes.alignment.grpo.prompt_batch); a ValueError for a task of another loss without ``data:``."""
    task = job.tasks[t]
    if task.loss in GRPO_LOSSES:  # rollouts: the generator's prompts (recipes.alignment.grpo)
        from recipes.alignment.grpo import prompt_batch

        return prompt_batch(job, t, step, start, stop, split)
    if task.loss not in PAIR_LOSSES:
        raise ValueError(f"tasks[{t}] ('{task.name}'): recipe alignment generates data for losses "
                         f"{', '.join(PAIR_LOSSES + GRPO_LOSSES)} only, not '{task.loss}'; give the task a `data:` "
                         "source (docs/data.md; recipes/alignment/data holds the generated files).")
    size = task.batch_size
    rows = pairs(job, t, split, range(step * size + start, step * size + stop))
    inputs, targets = {}, {}
    sides = ("chosen", "chosen") if task.loss == SFT_KL else ("chosen", "rejected") * 2
    for side, use in zip(sides, leaf_uses(job, t)):  # reward_bt: 2 leaves; dpo: 4; sft_kl: 2 on the same answer
        name, comp = use_component(job, t, use)
        u = next(i for i, x in enumerate(task.components) if x.use_name == use)
        seq_len = resolve_shape(comp, name, task.components[u], f"tasks[{t}].components[{u}]").seq_len
        tokenizer = load_tokenizer(comp.pretrained, f"components.{name}.pretrained")
        docs = [encode_completion(tokenizer, row["prompt"], row[side]) for row in rows]
        padded = [padded_row(doc, seq_len, pad_id(tokenizer)) for doc in docs]
        inputs[use] = torch.tensor([r.ids for r in padded], dtype=torch.long).reshape(len(rows), seq_len)
        targets[labels_key(use)] = torch.tensor([r.labels for r in padded], dtype=torch.long).reshape(inputs[use].shape)
        targets[last_key(use)] = torch.tensor([min(len(d.ids), seq_len) - 1 for d in docs], dtype=torch.long)
    for key in SCORE_KEYS:
        targets[key] = torch.tensor([float(row.get(key, math.nan)) for row in rows], dtype=torch.float32)
    return TaskBatch(inputs, torch.zeros(len(rows)), len(rows), targets, first_row=start)
