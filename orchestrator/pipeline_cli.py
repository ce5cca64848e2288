"""What ``loom validate``, ``loom plan`` and ``loom run`` print for a phased job (planner.pipeline); the commands
themselves (orchestrator.cli) hand a job file with ``phases:`` here. Thin: each function calls the library and
prints."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import typer

from planner.pipeline import Pipeline


def phase_file(path: Path, phase: str) -> Path:
    """The per-phase name of an output file: ``plan.json`` -> ``plan.<phase>.json``."""
    return path.with_name(f"{path.stem}.{phase}{path.suffix}")


def read_phased(job_path: Path, cluster: Path | None, shapes: Path | None = None) -> Pipeline | None:
    """The job file's phases (orchestrator.pipeline.read_pipeline, checked whole), None for a one-phase job;
    ``shapes`` (``loom plan --shapes``) is refused for a phased job."""
    from orchestrator.pipeline import read_pipeline

    pipeline = read_pipeline(job_path, cluster)
    if pipeline is not None and shapes is not None:
        raise typer.BadParameter("--shapes plans one phase's batches; this job has phases. Plan a one-phase job "
                                 "with --shapes.")
    return pipeline


def validate_phases(pipeline: Pipeline, job_path: Path) -> None:
    """``loom validate``: the job's line, then one line per phase (its job's summary, or its step)."""
    from orchestrator.pipeline import check_phase_data
    from orchestrator.render import describe_job

    typer.echo(f"{job_path}: valid. {pipeline.name}: {len(pipeline.phases)} phases")
    for phase in pipeline.phases:
        if phase.is_step:
            typer.echo(f"  {phase.name}: step '{phase.spec.step}' ({_writes(phase)})")
            continue
        check_phase_data(phase)  # an earlier phase's dataset is checked when the phase starts
        typer.echo(f"  {phase.name}: {describe_job(phase.job)}, {phase.job.training.steps} steps")


def plan_phases(pipeline: Pipeline, costs: Path | None, json_output: bool, save: Path | None, gantt: list[Path],
                no_baselines: bool, progress: Callable[[str], None], write: Callable) -> None:
    """``loom plan``: every trained phase planned; a table per phase under a header line (or one JSON object
    mapping each trained phase to its Plan); ``--save``/``--gantt`` write one file per phase (:func:`phase_file`)."""
    from orchestrator.gantt import write_gantt
    from orchestrator.render import plan_console, print_plan
    from planner.api import make_cost_model, plan_job

    plans = {}
    for phase in pipeline.phases:
        if phase.is_step:
            plans[phase.name] = None
            continue
        progress(f"planning phase '{phase.name}' ...")
        outcome = plan_job(phase.job, make_cost_model(phase.job, costs), with_baselines=not no_baselines,
                           progress=progress)
        plans[phase.name] = outcome
        if save is not None:
            write(phase_file(save, phase.name), outcome.plan.save, "plan")
        for chart in gantt:
            write(phase_file(chart, phase.name), lambda path, plan=outcome.plan: write_gantt(plan, path),
                  "Gantt chart")
    if json_output:
        typer.echo(json.dumps({name: json.loads(o.plan.to_json()) for name, o in plans.items() if o}, indent=1))
        return
    console = plan_console()
    for phase in pipeline.phases:
        outcome = plans[phase.name]
        if outcome is None:
            console.print(f"[bold]phase {phase.index + 1}/{len(pipeline.phases)} {phase.name}[/bold]: step "
                          f"'{phase.spec.step}' in the driver process ({_writes(phase)})")
            console.print()
            continue
        console.print(f"[bold]phase {phase.index + 1}/{len(pipeline.phases)} {phase.name}[/bold]: "
                      f"{phase.job.training.steps} steps")
        print_plan(outcome.plan, console, outcome.planning_time_s)


def run_phases(pipeline: Pipeline, options) -> None:
    """``loom run``: every phase in order (orchestrator.pipeline); the summary of each on stdout."""
    from orchestrator.pipeline import run_pipeline, summary_lines

    for line in summary_lines(run_pipeline(pipeline, options)):
        typer.echo(line)


def _writes(phase) -> str:
    """What a step phase writes, as the listings say it ("writes model", "reports only")."""
    return f"writes {', '.join(phase.writes)}" if phase.writes else "reports only"
