"""Python steps of a phased job (``phases[i].step``): the registry, and the built-in ``average``.

A step is a plain Python function run by ``loom run`` in its driver process, between trained phases: ranking,
merging, filtering. Why the driver and not a Ray worker: a step reads and writes files under ``--out`` (earlier
phases' exported models, generated datasets) and needs no accelerator; the driver is the one process sure to see
that folder (a worker of a joined cluster may be on a node without it), and it holds no devices between phases.

A recipe declares its steps in its package's ``PHASE_STEPS`` (name -> :func:`register_step`'s keyword arguments)
and orchestrator.recipes registers them when it imports the recipe (recipes never import the orchestrator:
DESIGN.md §3); the step API they use (StepContext, check_average) is torch-free planner.pipeline's; :func:`registered_steps` is what planner.pipeline checks step names and references against.
A step declares the artifacts it writes: ``model`` is the folder ``OUT/<phase>/export/`` (one from_pretrained folder
per component, as a trained phase exports), any other name ``OUT/<phase>/<name>``. Torch loads only when a step
runs.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.errors import SpecError
from planner.pipeline import MODEL, StepContext, check_average  # noqa: F401  (re-exported: the step API)


@dataclass(frozen=True)
class Step:
    """A registered step: the function, the artifacts it writes, and a torch-free check of its ``args`` (a
    ValueError naming the argument; run by ``loom validate``/``plan``/``run`` before anything runs)."""

    name: str
    run: Callable[[StepContext], None]
    writes: tuple[str, ...]
    check: Callable[[dict[str, Any], Path | None], None] | None = None
    doc: str = field(default="", compare=False)


STEPS: dict[str, Step] = {}


def register_step(name: str, run: Callable[[StepContext], None], writes: tuple[str, ...] = (MODEL,),
                  check: Callable[[dict[str, Any], Path | None], None] | None = None, doc: str = "") -> None:
    """Register step ``name`` (a recipe does it on import); registering the same name again replaces it."""
    STEPS[name] = Step(name, run, tuple(writes), check, doc)


def registered_steps() -> dict[str, tuple[str, ...]]:
    """Step name -> the artifacts it writes (what planner.pipeline checks phases against)."""
    return {name: step.writes for name, step in STEPS.items()}


def check_step_args(step: str, args: dict[str, Any], where: str, base: Path | None) -> None:
    """The step's own check of ``args``, as one SpecError naming ``where`` (``phases[i].args``)."""
    check = STEPS[step].check
    if check is not None:
        try:
            check(args, base)
        except ValueError as exc:
            raise SpecError(f"{where}.{exc}") from None


# --------------------------------------------------------------------------- built-in: average


def average(ctx: StepContext) -> None:
    """A weighted average of ``models``' tensors (model soup / merging), written as ``model`` under ``component``:
    every tensor is sum_i w_i t_i / sum_i w_i in float32, saved in the first model's format next to a copy of its
    other files (config, tokenizer). The models must hold the same tensor names and shapes."""
    import torch
    from safetensors.torch import save_file

    from planner.pretrained import tensor_files, weights_file
    from runtime.pretrained import read_tensors

    folders = [ctx.path(m) for m in ctx.args["models"]]
    weights = [float(w) for w in ctx.args.get("weights") or [1.0] * len(folders)]
    names = sorted(tensor_files(folders[0]))
    total: dict[str, torch.Tensor] = {}
    for folder, weight in zip(folders, weights):
        if sorted(tensor_files(folder)) != names:
            raise SpecError(f"{ctx.phase}: step 'average': {folder} holds other tensors than {folders[0]}; averaged "
                            "models must share one architecture. Average models of one component.")
        for name, tensor in read_tensors(folder, names).items():
            if name in total and total[name].shape != tensor.shape:
                raise SpecError(f"{ctx.phase}: step 'average': {folder}: {name} has shape {tuple(tensor.shape)}, "
                                f"{tuple(total[name].shape)} in {folders[0]}. Average models of one shape.")
            total[name] = total[name] + weight * tensor if name in total else weight * tensor
    target = ctx.artifact(MODEL) / ctx.args["component"]
    target.mkdir(parents=True, exist_ok=True)
    for path in folders[0].iterdir():  # config, tokenizer, generation config: everything but the weights
        if path.is_file() and not path.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(path, target / path.name)
    save_file({k: (v / sum(weights)).contiguous() for k, v in total.items()},
              str(target / weights_file(folders[0])), metadata={"format": "pt"})


register_step("average", average, writes=(MODEL,), check=check_average,
              doc="weighted average of model folders (args: component, models, weights)")
