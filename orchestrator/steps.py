"""Python steps of a phased job (``phases[i].step``): the registry, and the built-in ``average``.

A step is a plain Python function run by ``loom run`` in its driver process, between trained phases: ranking,
merging, filtering. Why the driver and not a Ray worker: a step reads and writes files under ``--out`` (earlier
phases' exported models, generated datasets) and needs no accelerator; the driver is the one process sure to see
that folder (a worker of a joined cluster may be on a node without it), and it holds no devices between phases.

A recipe declares its steps in its package's ``PHASE_STEPS`` (name -> :func:`register_step`'s keyword arguments)
and orchestrator.recipes registers them when it imports the recipe (recipes never import the orchestrator:
DESIGN.md §3); the step API they use (StepContext, check_average) is torch-free planner.pipeline's; :func:`registered_steps` is what planner.pipeline checks step names and references against.
A step may return its metrics (a mapping of name -> number; an evaluation step's scores): the orchestrator writes
them to ``OUT/<phase>/metrics.json``, prints them in the summary and checks the phase's ``gate:`` against them (a
value outside its bounds fails the run after the phase). A step that declares ``metrics`` (their names; ``()``
for a step that reports none) has its phases' gates checked against them before anything runs.
A step declares the artifacts it writes: ``model`` is the folder ``OUT/<phase>/export/`` (one from_pretrained folder
per component, as a trained phase exports), any other name ``OUT/<phase>/<name>``. Torch loads only when a step
runs.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.errors import SpecError, did_you_mean
from planner.pipeline import MODEL, StepContext, check_average  # noqa: F401  (re-exported: the step API)


@dataclass(frozen=True)
class Step:
    """A registered step: the function (returning its metrics or None), the artifacts it writes, a torch-free
    check of its ``args`` (a ValueError naming the argument; run by ``loom validate``/``plan``/``run`` before
    anything runs), the names of the metrics it reports (``()``: none; None: not declared, gates are checked when
    it runs) and the arguments that name a component of the job (the one it writes its model as, read by later
    phases as ``@<phase>/model``): checked against the job's components with its args."""

    name: str
    run: Callable[[StepContext], Mapping[str, float] | None]
    writes: tuple[str, ...]
    check: Callable[[dict[str, Any], Path | None], None] | None = None
    doc: str = field(default="", compare=False)
    metrics: tuple[str, ...] | None = None
    component_args: tuple[str, ...] = ()


STEPS: dict[str, Step] = {}


def register_step(name: str, run: Callable[[StepContext], Mapping[str, float] | None],
                  writes: tuple[str, ...] = (MODEL,), check: Callable[[dict[str, Any], Path | None], None] | None = None,
                  doc: str = "", metrics: tuple[str, ...] | None = None,
                  component_args: tuple[str, ...] = ()) -> None:
    """Register step ``name`` (a recipe does it on import); registering the same name again replaces it. ``writes``
    may be empty for a step that only reports ``metrics``; ``component_args``: the arguments naming a component."""
    STEPS[name] = Step(name, run, tuple(writes), check, doc, None if metrics is None else tuple(metrics),
                       tuple(component_args))


def registered_steps() -> dict[str, tuple[str, ...]]:
    """Step name -> the artifacts it writes (what planner.pipeline checks phases against)."""
    return {name: step.writes for name, step in STEPS.items()}


def check_step_args(step: str, args: dict[str, Any], where: str, base: Path | None,
                    components: Mapping[str, Any] | None = None) -> None:
    """The step's own check of ``args``, then each of its ``component_args`` is one of the job's ``components``
    (None: the args alone, as a step's tests check them): one SpecError naming ``where`` (``phases[i].args``)."""
    check = STEPS[step].check
    if check is not None:
        try:
            check(args, base)
        except ValueError as exc:
            raise SpecError(f"{where}.{exc}") from None
    for key in STEPS[step].component_args if components is not None else ():
        if isinstance(args.get(key), str) and args[key] not in components:
            raise SpecError(f"{where}.{key} ('{args[key]}'): not a component of the job (step '{step}' writes its "
                            f"model under that name, for later phases to read); {did_you_mean(args[key], components)}")


def check_gate(step: str, gate: Mapping[str, Any], where: str) -> None:
    """Every gated metric is one the step declares it reports (nothing to check for a step that does not declare
    its metrics: its gate is checked when it runs)."""
    declared = STEPS[step].metrics
    for metric in gate:
        if declared is not None and metric not in declared:
            known = did_you_mean(metric, declared) if declared else "it reports no metrics, so it cannot be gated"
            raise SpecError(f"{where}.{metric}: step '{step}' reports no metric '{metric}'; {known}")


def step_metrics(step: str, returned: Any, where: str) -> dict[str, float]:
    """A step's return value as its metrics: None -> {}, else a mapping of names to finite numbers (a bug in the
    step otherwise, reported as one line)."""
    if returned is None:
        return {}
    if not isinstance(returned, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in returned.items()):
        raise SpecError(f"{where}: step '{step}' returned {type(returned).__name__}, not a mapping of metric names "
                        "to numbers (or None); the step is wrong.")
    return {k: float(v) for k, v in returned.items()}


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


register_step("average", average, writes=(MODEL,), check=check_average, metrics=(), component_args=("component",),
              doc="weighted average of model folders (args: component, models, weights)")
