"""The ``loom submit``, ``loom status``, ``loom logs`` and ``loom stop`` commands (Ray Jobs API).

Thin commands: parse, call one function of :mod:`orchestrator.submit`, print. User errors are
raised as LoomError (SpecError, SubmitError); the ``loom`` command group turns them into one
``error: ...`` line and exit code 2. ``register(app)`` adds the commands to the ``loom`` app.
This module imports neither ray nor orchestrator.cli at import time (cli imports it at its end).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger(__name__)

JobArg = Annotated[Path, typer.Argument(metavar="JOB.yaml", exists=True, dir_okay=False, help="Job spec (YAML).")]
JobIdArg = Annotated[str, typer.Argument(
    metavar="JOB_ID", help="The id `loom submit` printed (raysubmit_...; only A-Z a-z 0-9 _ . - are accepted).",
)]
AddressOpt = Annotated[str, typer.Option(
    "--address", metavar="URL", help="The Ray dashboard's HTTP address (Jobs API), e.g. http://HOST:8265.",
)]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log at DEBUG level on stderr.")]


def _configure_logging(verbose: bool) -> None:
    from orchestrator.cli import configure_logging  # local: cli imports this module

    configure_logging(verbose)


def submit(
    job_path: JobArg,
    address: AddressOpt,
    plan: Annotated[Path | None, typer.Option(
        "--plan", metavar="PLAN.json", exists=True, dir_okay=False,
        help="Run this saved plan (from `loom plan --save`) instead of planning on the cluster.",
    )] = None,
    working_dir: Annotated[Path | None, typer.Option(
        "--working-dir", metavar="DIR", exists=True, file_okay=False,
        help="Ship this directory (it must hold JOB.yaml and PLAN.json); default: only those two files.",
    )] = None,
    entrypoint_command: Annotated[str | None, typer.Option(
        "--entrypoint-command", hidden=True, help="Replace `loom run ...`; {job} and {plan} name the shipped files.",
    )] = None,
    verbose: Verbose = False,
) -> None:
    """Validate a job here, then run it on a Ray cluster with `loom run` through the Jobs API; print its id."""
    from orchestrator.submit import submit_job

    _configure_logging(verbose)
    runtime_env = {"working_dir": str(working_dir)} if working_dir is not None else None
    job_id = submit_job(job_path, address, plan=plan, runtime_env=runtime_env, entrypoint=entrypoint_command)
    typer.echo(job_id)
    log.info("follow it with: loom logs %s --address %s --follow", job_id, address)


def status(job_id: JobIdArg, address: AddressOpt, verbose: Verbose = False) -> None:
    """Print a submitted job's status: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    from orchestrator.submit import job_status

    _configure_logging(verbose)
    state = job_status(address, job_id)
    typer.echo(f"{state.job_id}: {state.status}" + (f" ({state.message})" if state.message else ""))


def logs(
    job_id: JobIdArg,
    address: AddressOpt,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    verbose: Verbose = False,
) -> None:
    """Print a submitted job's output (its `loom run` driver's stdout and stderr)."""
    from orchestrator.submit import job_logs

    _configure_logging(verbose)
    for chunk in job_logs(address, job_id, follow=follow):
        typer.echo(chunk, nl=False)


def stop(job_id: JobIdArg, address: AddressOpt, verbose: Verbose = False) -> None:
    """Ask the cluster to stop a submitted job (asynchronous; `loom status` shows STOPPED once done)."""
    from orchestrator.submit import stop_job

    _configure_logging(verbose)
    if stop_job(address, job_id):
        typer.echo(f"{job_id}: stop requested")
    else:
        typer.echo(f"{job_id}: not running; nothing to stop")


def register(app: typer.Typer) -> None:
    """Add the four job commands to the ``loom`` app."""
    for command in (submit, status, logs, stop):
        app.command(command.__name__)(command)
