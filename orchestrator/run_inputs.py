"""What ``loom run`` checks of its inputs before anything starts: the job can be trained here, the plan belongs to
it, the devices are this machine's CPUs. Each problem is a :class:`RunInputError` (one line, exit code 2)."""

from __future__ import annotations

from pathlib import Path

from planner.errors import LoomError
from planner.plan import Plan, load_plan
from planner.spec import JobSpec


class RunInputError(LoomError):
    """The job, plan or options cannot be run as given (the CLI's exit code 2)."""


def check_runnable_job(job: JobSpec, address: str | None) -> None:
    """A RunInputError unless ``loom run`` can train ``job``: losses and chains the runtime runs and, unless it
    joins a cluster (``address``, from ``--address``), CPU devices (the embedded cluster is this machine's CPUs). Loads the job's
    recipe in the driver (its losses); each worker loads it again in its own process."""
    from orchestrator.recipes import job_losses
    from runtime.checks import check_trainable
    from runtime.sources import check_data

    losses = job_losses(job)
    if not address:
        check_cpu_device(job.cluster.device, "cluster.device")
    try:
        check_trainable(job, losses)
    except ValueError as exc:
        raise RunInputError(str(exc)) from None
    check_data(job)  # tasks' data: files, rows, tokenizers (a DataError, one line), before any Ray process starts


def check_cpu_device(device: str, where: str) -> None:
    """The embedded path trains on this machine's CPUs: a RunInputError for any other device kind."""
    if device.lower() != "cpu":
        raise RunInputError(
            f"{where} ('{device}') is not cpu; `loom run` without --address trains on an embedded Ray cluster "
            "of this machine's CPUs. Send jobs for GPU clusters with `loom submit JOB.yaml --address URL`, or "
            "set cluster.device: cpu."
        )


def plan_option(path: str | Path | None) -> str:
    """How every message about a plan given with ``--plan`` (``loom run``, ``loom submit``) names it: ``--plan PATH``
    (``--plan`` alone for a plan handed to the library without a file)."""
    return "--plan" if path is None else f"--plan {path}"


def load_plan_option(path: str | Path) -> Plan:
    """The plan file given with ``--plan``, verified (planner.plan.load_plan); its SpecError starts ``--plan PATH:``."""
    return load_plan(path, plan_option(path))


def check_plan_for_job(plan: Plan, job: JobSpec, source: str = plan_option(None)) -> None:
    """A RunInputError unless ``plan`` belongs to ``job`` (runtime.checks.check_plan_matches_job: the workers' own
    check, and loom submit's, run here first so that it fails before any Ray process starts)."""
    from planner.metagraph import build_metagraph
    from planner.plan import job_for_plan
    from runtime.checks import check_plan_matches_job

    try:
        check_plan_matches_job(plan, build_metagraph(job_for_plan(job, plan)), source, job.name)
    except ValueError as exc:
        raise RunInputError(str(exc)) from None
