"""Evaluation of a trained job (``loom eval``): per-task metrics on data the run did not train on.

The model is the single-process :class:`~runtime.reference.ReferenceTrainer` loaded with a run's
``model.pt`` (or left at its initial weights, the baseline every metric should beat). A job with a
recipe is evaluated by the recipe's registered evaluator (its own metrics, e.g. accuracy, Dice and
box IoU, next to trivial baselines); any other job reports each task's mean loss: a task with a ``data:`` source on
its own rows (one pass over the source in its first epoch's order, as many rows as asked: a source has one split,
the rows training reads), any other task on unseen steps of the built-in synthetic stream (every step draws new
samples, so a step past training is held out).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from planner.errors import LoomError
from planner.spec import JobSpec
from runtime.data import SPLITS, synthetic_batch, task_batch
from runtime.reference import ReferenceTrainer

HELD_OUT_STEP = 1 << 30  # first step of the built-in stream used for evaluation (no run trains that long)


@dataclass
class EvalReport:
    """Metrics by task (``metrics[task][name]``) and, where the evaluator has them, trivial baselines of the same
    metrics on the same samples (``baselines[task][name]``)."""

    job: str
    split: str
    num_samples: int
    metrics: dict[str, dict[str, float]]
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


Evaluator = Callable[[JobSpec, ReferenceTrainer, str, int], EvalReport]
_RECIPE_EVALUATORS: dict[str, Evaluator] = {}


class EvalError(LoomError):
    """An evaluation request that cannot be served (unknown split, too few samples)."""


def register_evaluator(recipe: str, evaluator: Evaluator) -> None:
    """``evaluator(job, model, split, num_samples)`` evaluates jobs with ``recipe: <recipe>``."""
    _RECIPE_EVALUATORS[recipe] = evaluator


def evaluate_job(job: JobSpec, params: dict[str, torch.Tensor] | None, split: str | None = None,
                 num_samples: int = 256) -> EvalReport:
    """Evaluate ``job``'s model with ``params`` (None: its initial weights) on ``num_samples`` samples of ``split``
    (None: "heldout" for a recipe's job, else "train")."""
    split = split or ("heldout" if job.recipe is not None else "train")
    if split not in SPLITS:
        raise EvalError(f"--split ('{split}') is not a data split; use one of {', '.join(SPLITS)}.")
    if num_samples < 1:
        raise EvalError(f"--samples ({num_samples}) must be at least 1.")
    model = ReferenceTrainer(job)
    if params is not None:
        model.load_parameters(params)
    with torch.no_grad():
        if job.recipe in _RECIPE_EVALUATORS:
            return _RECIPE_EVALUATORS[job.recipe](job, model, split, num_samples)
        if job.recipe is not None:
            raise EvalError(f"recipe ('{job.recipe}') has no evaluator in this process: the orchestrator loads recipes "
                            "(orchestrator.recipes.load_recipe), and a recipe without register_evaluator cannot be "
                            "evaluated yet.")
        if split != "train":
            raise EvalError(f"--split ('{split}'): jobs without a recipe have one data stream; use --split train "
                            "(it evaluates on steps no run reaches).")
        report = EvalReport(job.name, "train", num_samples, _task_losses(job, model, num_samples),
                            notes=_data_notes(job, num_samples))
        if params is not None:  # the same samples through the initial weights: what training changed
            report.baselines = _task_losses(job, ReferenceTrainer(job), num_samples)
            report.notes["baseline"] = "the model's initial weights"
        return report


def source_rows(job: JobSpec, t: int) -> int | None:
    """The rows of one epoch of task ``t``'s ``data:`` source (its lines, or packed rows); None without a source."""
    if job.tasks[t].data is None:
        return None
    from runtime.sources import epoch_rows  # local: only tasks with data read files

    return epoch_rows(job, t)


def _samples(job: JobSpec, t: int, num_samples: int) -> int:
    """How many rows task ``t`` is evaluated on: ``num_samples``, at most one epoch of its source."""
    rows = source_rows(job, t)
    return num_samples if rows is None else min(num_samples, rows)


def _data_notes(job: JobSpec, num_samples: int) -> dict[str, str]:
    notes = {}
    for t, task in enumerate(job.tasks):
        rows = source_rows(job, t)
        if rows is not None:
            notes[f"data of {task.name}"] = (f"tasks[{t}].data ({task.data.path}): the first {_samples(job, t, num_samples)} "
                                             f"of its {rows} rows in the first epoch's order (the rows training reads)")
    if len(notes) < len(job.tasks):
        notes["data"] = "unseen steps of the synthetic stream" + (" (tasks without data:)" if notes else "")
    return notes


def _task_losses(job: JobSpec, model: ReferenceTrainer, num_samples: int) -> dict[str, dict[str, float]]:
    """Per task, its mean loss over ``num_samples`` samples: from its ``data:`` source from step 0 (at most one
    epoch), else from unseen steps of the synthetic stream."""
    metrics = {}
    for t, task in enumerate(job.tasks):
        has_data = task.data is not None
        wanted, step = _samples(job, t, num_samples), 0 if has_data else HELD_OUT_STEP
        total, seen = 0.0, 0
        while seen < wanted:
            rows = min(task.batch_size, wanted - seen)
            batch = (task_batch if has_data else synthetic_batch)(job, t, step, 0, rows)
            total += float(model.head(t)(model.forward(t, batch), batch).sum())
            seen, step = seen + rows, step + 1
        metrics[task.name] = {"loss": total / seen}
    return metrics
