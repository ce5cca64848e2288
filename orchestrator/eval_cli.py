"""The ``loom eval`` command: per-task metrics of a trained model on held-out data.

Thin: parse, call :func:`runtime.evaluate.evaluate_job`, print a table (or JSON). ``register(app)``
adds the command to the ``loom`` app; torch loads only when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli_paths import check_distinct_files, check_output_path

JobArg = Annotated[Path, typer.Argument(metavar="JOB.yaml", exists=True, dir_okay=False, help="Job spec (YAML).")]
MAX_SAMPLES = 65_536  # --samples per task: 256 times the default; more runs for hours on CPU


def eval_command(
    job_path: JobArg,
    model: Annotated[Path | None, typer.Option(
        "--model", metavar="MODEL.pt", help="A run's trained parameters (`loom run` writes OUT/model.pt). "
        "Without it: the initial weights (an untrained baseline).",
    )] = None,
    split: Annotated[str | None, typer.Option(
        "--split", help="Data split: heldout or transfer (recipes), train. Default: heldout for a recipe, else train.",
    )] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, max=MAX_SAMPLES, help="Samples per task.")] = 256,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="EVAL.json", callback=check_output_path,
        help="Also write the report as JSON here (its folder must exist).",
    )] = None,
) -> None:
    """Evaluate a trained job on data it did not train on: per-task metrics next to trivial baselines."""
    check_distinct_files([("JOB.yaml", job_path), ("--model", model)], [("--output", output)])
    from orchestrator.recipes import load_job, load_recipe
    from runtime.evaluate import evaluate_job  # local: torch loads only here
    from runtime.reference import load_model

    job = load_job(job_path)
    load_recipe(job)
    params = load_model(model) if model is not None else None
    report = evaluate_job(job, params, split=split, num_samples=samples)
    for line in report_lines(report, "trained" if model is not None else "initial weights"):
        typer.echo(line)
    if output is not None:
        output.write_text(json.dumps(report.to_json(), indent=1) + "\n")
        typer.echo(f"wrote {output}", err=True)  # a note: stdout carries only the report


def report_lines(report, label: str) -> list[str]:
    """A plain table: one row per task and metric, the model's value and the baseline's where there is one."""
    lines = [f"{report.job}: split {report.split}, {report.num_samples} samples per task ({label})",
             f"{'task':<16} {'metric':<22} {'model':>10} {'baseline':>10}"]
    for task, values in report.metrics.items():
        for name, value in values.items():
            base = report.baselines.get(task, {}).get(name)
            lines.append(f"{task:<16} {name:<22} {value:>10.4f} {'' if base is None else f'{base:>10.4f}'}")
    lines += [f"note: {key}: {text}" for key, text in report.notes.items()]
    return lines


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
