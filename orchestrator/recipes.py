"""The recipes Loom runs, by name: the registry the orchestrator owns.

A job opts into a recipe with ``recipe: <name>``. Loading it (:func:`load_recipe`) imports the recipe's package,
which registers its losses, dataset and evaluator with the runtime's registries (``runtime.heads.register_loss``,
``runtime.data.register_dataset``, ``runtime.evaluate.register_evaluator``). Only the orchestrator loads recipes:
in the driver before it checks a job, and in every worker process before the worker builds its modules. The
runtime never imports a recipe, and the planner only carries the name (DESIGN.md §3; tests/unit/test_import_rules.py).

Adding a recipe: its package under ``recipes/`` and one entry in :data:`RECIPES`. Torch-free until
:func:`load_recipe` runs (recipes import torch).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from planner.errors import SpecError, did_you_mean
from planner.spec import JobSpec
from planner.spec import load_job as load_spec

RECIPES: dict[str, str] = {
    "alignment": "recipes.alignment",  # Baichuan Alignment: packed SFT, reward model, DPO, merging (docs/recipes/alignment.md)
    "medical": "recipes.medical",  # UniMed-style multi-task medical imaging (docs/recipes/medical.md)
    "diffusion": "recipes.diffusion",  # IterComp: shapes gallery, rankings, reward models (docs/recipes/diffusion.md)
}


def check_recipe(job: JobSpec) -> None:
    """A SpecError unless ``job.recipe`` is None or a name in :data:`RECIPES` (nothing is imported)."""
    if job.recipe is not None and job.recipe not in RECIPES:
        raise SpecError(f"recipe ('{job.recipe}') is not a recipe Loom knows; {did_you_mean(job.recipe, RECIPES)}")


def load_recipe(job: JobSpec) -> None:
    """Import ``job``'s recipe (it registers its losses, dataset and evaluator in this process); nothing without
    one. Importing again is free. A SpecError for a name not in :data:`RECIPES`."""
    check_recipe(job)
    if job.recipe is not None:
        import_recipe(job.recipe)


def job_losses(job: JobSpec) -> tuple[str, ...]:
    """The recipe losses ``job``'s workers will know: its recipe's, loaded here (:func:`load_recipe`); none without a
    recipe, whatever other recipes this process has imported (a worker loads only the job's own)."""
    from runtime.heads import registered_losses

    load_recipe(job)
    return registered_losses() if job.recipe is not None else ()


def import_recipe(name: str) -> None:
    """Import recipe ``name`` (a key of :data:`RECIPES`): it registers its losses, dataset and evaluator with the
    runtime; the phase steps it declares (``PHASE_STEPS``: name -> orchestrator.steps.register_step's keyword
    arguments) are registered here, since a recipe never imports the orchestrator."""
    from orchestrator.steps import register_step

    module = importlib.import_module(RECIPES[name])
    for step, spec in getattr(module, "PHASE_STEPS", {}).items():
        register_step(step, **spec)


def load_job(path: str | Path, cluster: str | Path | None = None) -> JobSpec:
    """The CLI's way to read a job: :func:`planner.spec.load_job` (spec, components, shapes), then its recipe's
    name (:func:`check_recipe`). Nothing is imported: ``loom plan`` and ``loom validate`` stay torch-free."""
    job = load_spec(path, cluster)
    check_recipe(job)
    return job
