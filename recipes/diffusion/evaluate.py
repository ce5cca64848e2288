"""``loom eval`` of the diffusion recipe: each reward model's pairwise accuracy on held-out pairs.

Per reward-model task (one category each), the first ``num_samples`` pairs of the held-out gallery (prompts the
training stream never draws; recipes.diffusion.data.heldout_rows) or of a real gallery's ``heldout`` folder: accuracy
(the share of pairs with ``r(c, x_better) > r(c, x_worse)``, IterComp's validation metric), the mean pairwise loss
and the mean reward margin. Baselines: the same metrics of the model at its initial weights (untrained heads and
scoring layers over the same frozen towers) on the same pairs; chance accuracy is 0.5.
"""

from __future__ import annotations

import torch

from planner.spec import JobSpec
from recipes.diffusion.data import heldout_rows, pair_batch, pair_layout
from recipes.diffusion.heads import pairwise_loss
from runtime.evaluate import EvalError, EvalReport
from runtime.reference import ReferenceTrainer


def pair_metrics(job: JobSpec, model: ReferenceTrainer, t: int, rows: list) -> dict[str, float]:
    """accuracy, loss and margin of task ``t``'s reward model over ``rows`` (ranking, better, worse)."""
    layout, size = pair_layout(job, t), job.tasks[t].batch_size
    better, worse = [], []
    for start in range(0, len(rows), size):
        batch = pair_batch(layout, rows[start:start + size])
        b, w = model.head(t).rewards(model.forward(t, batch))
        better.append(b)
        worse.append(w)
    b, w = torch.cat(better), torch.cat(worse)
    return {"accuracy": float((b > w).float().mean()), "loss": float(pairwise_loss(b, w).mean()),
            "margin": float((b - w).mean()), "pairs": float(len(rows))}


def task_rows(job: JobSpec, t: int, split: str, num_samples: int) -> list:
    """The evaluation pairs of task ``t``: the synthetic held-out gallery's, or the real gallery's ``split``."""
    category = pair_layout(job, t).category
    if job.data_dir is not None:
        from recipes.diffusion.folder import load_split  # local: only real galleries read files

        return heldout_rows(job.training.seed, category, num_samples, load_split(job.data_dir, split, category))
    if split != "heldout":
        raise EvalError(f"--split ('{split}'): recipe diffusion evaluates its reward models on held-out pairs; use "
                        "--split heldout.")
    return heldout_rows(job.training.seed, category, num_samples)


def evaluate(job: JobSpec, model: ReferenceTrainer, split: str, num_samples: int) -> EvalReport:
    """The recipe's evaluator (runtime.evaluate.register_evaluator)."""
    rows = {t: task_rows(job, t, split, num_samples) for t in range(len(job.tasks))}
    initial = ReferenceTrainer(job)
    metrics, baselines = {}, {}
    for t, task in enumerate(job.tasks):
        if not rows[t]:
            raise EvalError(f"tasks[{t}] ('{task.name}'): split '{split}' holds no pairs of its category.")
        metrics[task.name] = pair_metrics(job, model, t, rows[t])
        baselines[task.name] = pair_metrics(job, initial, t, rows[t])
    notes = {"baseline": "the same pairs through the model's initial weights; chance accuracy is 0.5",
             "data": f"real gallery {job.data_dir}/{split}" if job.data_dir else
             "held-out prompts of the synthetic gallery (never drawn in training); every pair of each prompt"}
    return EvalReport(job.name, split, num_samples, metrics, baselines, notes)
