"""The ``loom`` command line (typer): parse, call one library function, print.

Commands: ``loom validate`` (load and check a job spec), ``loom schema`` (the job spec's JSON
schema), ``loom plan`` (plan a job; table or JSON on stdout, optional plan file and Gantt charts; with
``--shapes`` a plan cache for varying batch shapes, planner.plan_cache),
``loom run`` (train a job on Ray workers; a summary on stdout, exit code 1 when a worker fails),
``loom gantt`` (a finished run's predicted against measured timeline as a Gantt chart).

Contract with the user: any :class:`~planner.errors.LoomError` and every usage error (missing or
unreadable file, directory, bad option value, unknown command) ends the command with exactly one
line ``error: <message>`` on stderr and exit code 2, never a traceback; anything else is a bug and
raises. stdout carries only the command's result (``loom plan --output json > plan.json`` works);
progress and logs go to stderr: rich when stderr is a terminal, plain logging otherwise. Only this
module configures logging.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

# typer 0.29 vendors click as typer._click; these two are not re-exported (pinned in pyproject.toml).
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperGroup

from orchestrator import pipeline_cli  # phased jobs (torch-free)
from orchestrator.cli_paths import check_distinct_files, check_output_path
from planner.errors import LoomError

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
_HANDLER_FLAG = "_loom_cli_handler"


class OutputFormat(str, enum.Enum):
    """What ``loom plan`` prints on stdout."""

    table = "table"
    json = "json"


def one_line(message: str) -> str:
    """``message`` with its lines joined by spaces (the error contract is a single line)."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text.replace("Value error, ", "")  # typer's enum coercion leaks pydantic's prefix


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with code 2."""
    typer.echo(f"error: {one_line(message)}", err=True)
    sys.exit(EXIT_USER_ERROR)


class LoomGroup(TyperGroup):
    """The command group: turns user and usage errors into one ``error:`` line and exit code 2."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:
            exc.show()
            code = exc.exit_code
        except ClickException as exc:
            fail(exc.format_message())
        except LoomError as exc:
            fail(str(exc))
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            code = 1
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=LoomGroup,
    name="loom",
    help="Plan and run multi-task multi-modal training jobs across a cluster.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# --------------------------------------------------------------------------- options and checks

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log at DEBUG level on stderr.")]
ClusterOpt = Annotated[
    Path | None,
    typer.Option("--cluster", metavar="CLUSTER.yaml", exists=True, dir_okay=False,
                 help="YAML file whose `cluster:` section (or whole content) replaces the job's cluster."),
]
JobArg = Annotated[Path, typer.Argument(metavar="JOB.yaml", exists=True, dir_okay=False, help="Job spec (YAML).")]


def _check_gantt_paths(paths: list[Path] | None) -> list[Path]:
    from orchestrator.gantt import GANTT_SUFFIXES

    for path in paths or []:
        if path.suffix.lower() not in GANTT_SUFFIXES:
            raise typer.BadParameter(f"'{path}' has an unsupported suffix; use {' or '.join(GANTT_SUFFIXES)}.")
        check_output_path(path)
    return paths or []


def _out_dir(value: str) -> Path:
    """``--out`` as given: an empty value would mean the current directory, never what was meant."""
    if not value.strip():
        raise ValueError("'' names no folder; give the run's output folder, or leave --out out for out/<job name>.")
    return Path(value)


def _check_run_address(value: str | None) -> str | None:
    """``loom run --address``: an empty value would silently start an embedded cluster instead of joining one, and a
    port that is no port number would be reported as a connection failure (or not at all) after planning."""
    if value is not None and not value.strip():
        raise typer.BadParameter("'' names no cluster; give the Ray head's GCS address (HOST:PORT, or 'auto'), or "
                                 "leave --address out to start an embedded cluster on this machine.")
    _, colon, port = (value or "").rpartition(":")
    if colon and not (re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
        raise typer.BadParameter(f"'{value}': port '{port}' is not a port number (1-65535); give the Ray head's GCS "
                                 "address as HOST:PORT, e.g. '10.0.0.1:6379' (what `ray start --head` prints), or "
                                 "'auto'.")
    return value


def _check_finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number; give a size in MiB, e.g. 32, or 0 for never.")
    return value


def configure_logging(verbose: bool) -> None:
    """One handler on the root logger, to stderr: rich on a terminal, plain lines otherwise.

    Default level: INFO for the orchestrator's own progress messages, WARNING for libraries;
    ``verbose`` turns everything to DEBUG. Calling it again replaces the handler it installed.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_FLAG, False)]:
        root.removeHandler(handler)
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    setattr(handler, _HANDLER_FLAG, True)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("orchestrator").setLevel(logging.DEBUG if verbose else logging.INFO)


def _progress_reporter(stack: ExitStack) -> Callable[[str], None]:
    """Where planning steps go: a rich spinner plus log lines on a terminal, plain logging otherwise."""
    if not sys.stderr.isatty():
        return lambda message: log.info("%s", message)
    console = Console(stderr=True, log_path=False)
    status = stack.enter_context(console.status("planning ..."))

    def report(message: str) -> None:
        console.log(message)
        status.update(message)

    return report


def _write_output(path: Path, write: Callable[[Path], None], what: str) -> None:
    try:
        write(path)
    except OSError as exc:
        fail(f"{path}: cannot write the {what} ({exc.strerror or exc}). Check the path and permissions.")
    log.info("wrote %s to %s", what, path)


# --------------------------------------------------------------------------- commands


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"loom {_version()}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version, help="Print Loom's version and exit.",
    )] = False,
) -> None:
    """Plan and run multi-task multi-modal training jobs across a cluster."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loom")
    except PackageNotFoundError:
        return "unknown (not installed)"


@app.command()
def validate(job_path: JobArg, cluster: ClusterOpt = None, verbose: Verbose = False) -> None:
    """Load and check a job spec; print a one-line summary (tasks, components, MetaOps, devices).

    A spec that plans but that `loom run` would refuse (a loss the runtime does not run, a use whose inputs cannot
    become what it reads) gets a second line saying why; it stays valid for `loom plan` (exit code 0).
    """
    from orchestrator.recipes import load_job
    from orchestrator.render import describe_job
    from runtime.checks import check_trainable  # torch-free: a recipe's own losses are left to the recipe
    from runtime.source_files import check_data_files

    configure_logging(verbose)
    if (pipeline := pipeline_cli.read_phased(job_path, cluster)) is not None:
        return pipeline_cli.validate_phases(pipeline, job_path)
    job = load_job(job_path, cluster)
    check_data_files(job)  # the tasks' data files (torch-free; loom run also loads their tokenizers)
    typer.echo(f"{job_path}: valid. {describe_job(job)}")
    try:
        check_trainable(job)
    except ValueError as exc:
        typer.echo(f"note: `loom run` would refuse it: {one_line(str(exc))} (`loom plan` plans it as it is.)")


@app.command()
def schema() -> None:
    """Print the JSON schema of a job file, one phase or phased (point your editor's YAML support at it)."""
    from planner.pipeline import document_schema

    typer.echo(json.dumps(document_schema(), indent=2))


@app.command()
def plan(
    job_path: JobArg,
    cluster: ClusterOpt = None,
    costs: Annotated[Path | None, typer.Option(
        "--costs", metavar="COSTS.json", exists=True, dir_okay=False,
        help="Profiled cost file (from `loom profile`); MetaOps it lacks fall back to the analytic model.",
    )] = None,
    output: Annotated[OutputFormat, typer.Option(
        "--output", "-o", case_sensitive=False, help="table: waves and summary for people; json: exactly the Plan.",
    )] = OutputFormat.table,
    save: Annotated[Path | None, typer.Option(
        "--save", metavar="PLAN.json", callback=check_output_path, help="Also write the Plan JSON to this file.",
    )] = None,
    gantt: Annotated[list[Path] | None, typer.Option(
        "--gantt", metavar="FILE.png|FILE.html", callback=_check_gantt_paths,
        help="Write a Gantt chart (PNG, or standalone HTML with hover details); repeat for both.",
    )] = None,
    no_baselines: Annotated[bool, typer.Option(
        "--no-baselines", help="Leave the baselines out of the plan and summary (no speed-ups; they still run, as "
        "candidates Loom may adopt).",
    )] = False,
    shapes: Annotated[Path | None, typer.Option(
        "--shapes", metavar="SHAPES.yaml", exists=True, dir_okay=False,
        help="How batches vary (docs/shapes.md): plan a cache of plans, one per bucket of shapes, and compare it "
             "with static plans; --save then writes the plan set.",
    )] = None,
    verbose: Verbose = False,
) -> None:
    """Plan a job: waves of MetaOp slices on devices, predicted time, bounds and baselines.

    No side effects except the files named by --save and --gantt.
    """
    check_distinct_files([("JOB.yaml", job_path), ("--cluster", cluster), ("--costs", costs), ("--shapes", shapes)],
                         [("--save", save), *(("--gantt", chart) for chart in gantt or [])])
    if (pipeline := pipeline_cli.read_phased(job_path, cluster, shapes)) is not None:
        configure_logging(verbose)
        with ExitStack() as stack:
            pipeline_cli.plan_phases(pipeline, costs, output is OutputFormat.json, save, gantt or [], no_baselines,
                        _progress_reporter(stack), _write_output)
        return
    if shapes is not None:
        if gantt:
            raise typer.BadParameter("--gantt draws one plan; with --shapes there are several. Save the plan set "
                                     "(--save) or drop --gantt.")
        _plan_shapes(job_path, shapes, cluster, costs, output, save, no_baselines, verbose)
        return
    from planner.accumhint import micro_batch_hint
    from planner.api import make_cost_model, plan_job  # local: the solver stack loads only when planning
    from orchestrator.recipes import load_job
    from orchestrator.gantt import write_gantt
    from orchestrator.render import plan_console, print_plan

    configure_logging(verbose)
    job = load_job(job_path, cluster)
    cost_model = make_cost_model(job, costs)
    with ExitStack() as stack:
        outcome = plan_job(job, cost_model, with_baselines=not no_baselines, progress=_progress_reporter(stack))
    result = outcome.plan
    if save is not None:
        _write_output(save, result.save, "plan")
    for chart in gantt or []:
        _write_output(chart, lambda path: write_gantt(result, path), "Gantt chart")
    hint = micro_batch_hint(job, result, outcome.placed, cost_model)  # more micro-batches, where they pay
    if output is OutputFormat.json:
        typer.echo(result.to_json(), nl=False)
        if hint is not None:
            log.info(hint.line())
    else:
        print_plan(result, plan_console(), outcome.planning_time_s)
        if hint is not None:
            plan_console().print(hint.line())


def _plan_shapes(job_path: Path, shapes_path: Path, cluster: Path | None, costs: Path | None,
                 output: OutputFormat, save: Path | None, no_baselines: bool, verbose: bool) -> None:
    """``loom plan --shapes``: the plan cache (planner.plan_cache), printed as a table of buckets or as JSON."""
    import time

    from planner.api import make_cost_model
    from planner.plan_cache import plan_cache
    from planner.shapes import load_shapes
    from orchestrator.recipes import load_job
    from orchestrator.render import plan_console
    from orchestrator.render_shapes import print_plan_set

    configure_logging(verbose)
    job = load_job(job_path, cluster)
    resolved = load_shapes(shapes_path, job)
    cost_model = make_cost_model(job, costs)
    start = time.perf_counter()
    with ExitStack() as stack:
        result = plan_cache(job, resolved, cost_model, with_baselines=not no_baselines,
                            progress=_progress_reporter(stack), source=str(shapes_path))
    if save is not None:
        _write_output(save, result.save, "plan set")
    if output is OutputFormat.json:
        typer.echo(result.to_json(), nl=False)
    else:
        print_plan_set(result, plan_console(), time.perf_counter() - start)


@app.command()
def profile(
    job_path: JobArg,
    cluster: ClusterOpt = None,
    output: Annotated[Path, typer.Option(
        "--output", "-o", metavar="COSTS.json", callback=check_output_path,
        help="Where to write the profiled cost file (for `loom plan --costs`).",
    )] = Path("costs.json"),
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed runs per point (median).")] = 5,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate/--no-calibrate",
        help="CPU jobs on one node: end with a few training steps of the sequential plan and scale the profile's "
             "compute, loss and optimizer times to what the runtime measured.",
    )] = True,
    verbose: Verbose = False,
) -> None:
    """Measure the job's costs on this machine at the per-device batches the planner uses.

    Writes the profiled cost file `loom plan --costs` reads: each distinct layer workload (one thread,
    as a worker runs, forward+backward, tensor parallel degree 1), each root's data and embedding, each
    task's loss head, AdamW per parameter and, with 2+ CPU workers per node, gloo point-to-point and
    all-reduce times between two worker processes. A CPU job on one node is then calibrated against the
    runtime (--no-calibrate skips it).
    """
    check_distinct_files([("JOB.yaml", job_path), ("--cluster", cluster)], [("--output", output)])
    from orchestrator.recipes import load_job, load_recipe
    from runtime.profiler import profile_job  # local: torch loads only when profiling

    configure_logging(verbose)
    job = load_job(job_path, cluster)
    load_recipe(job)  # the loss heads it times may be the recipe's
    with ExitStack() as stack:
        progress = _progress_reporter(stack)
        costs = profile_job(job, repeats=repeats, progress=progress, launcher=_actors_launcher())
        if calibrate and job.cluster.device.lower() == "cpu" and job.cluster.num_nodes == 1:
            from orchestrator.calibrate import calibrate_costs  # local: Ray loads only when profiling

            costs["calibration"] = calibrate_costs(job, costs, progress)
    _write_output(output, lambda path: path.write_text(json.dumps(costs, indent=1) + "\n"), "cost file")
    typer.echo(f"{output}: {len(costs['points'])} layer workloads profiled on {job.cluster.device}. "
               f"Plan with: loom plan {job_path} --costs {output}")


def _actors_launcher():
    """The layers of a CPU job are timed in Ray actors, as its run computes them (orchestrator.actors
    .profile_in_actors)."""
    from orchestrator.actors import profile_in_actors  # local: Ray loads only when profiling

    return profile_in_actors


@app.command()
def run(
    job_path: JobArg,
    cluster: ClusterOpt = None,
    plan_path: Annotated[Path | None, typer.Option(
        "--plan", metavar="PLAN.json", exists=True, dir_okay=False,
        help="Run this plan (from `loom plan --save`) instead of planning; it must be for this job's MetaOps.",
    )] = None,
    costs: Annotated[Path | None, typer.Option(
        "--costs", metavar="COSTS.json", exists=True, dir_okay=False,
        help="Plan with this profiled cost file (from `loom profile`) instead of the analytic model.",
    )] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", min=1, help="Train until this many steps are done (default: the job's training.steps).",
    )] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", metavar="DIR", parser=_out_dir,
        help="Output directory: plan.json, metrics.jsonl, ckpt/, logs/ (default: out/<job name>).",
    )] = None,
    metrics_port: Annotated[int, typer.Option(
        "--metrics-port", min=0, max=65535, help="Serve Prometheus metrics on 127.0.0.1:PORT (0: off).",
    )] = 0,
    checkpoint_every: Annotated[int | None, typer.Option(
        "--checkpoint-every", min=0,
        help="Checkpoint every N steps and at the end (0: never; default: the job's training.checkpoint_every).",
    )] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the latest intact complete checkpoint in --out (any plan of the job).",
    )] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start over in an --out that holds an earlier run's checkpoints: the earlier run is moved "
                            "to OUT/previous-<time>/ and deleted once this run has a checkpoint.",
    )] = False,
    keep_last: Annotated[int | None, typer.Option(
        "--keep-last", metavar="K", min=1,
        help="Keep only the K newest complete checkpoints; older ones are deleted after a newer one is complete "
             "(default: keep every one).",
    )] = None,
    address: Annotated[str | None, typer.Option(
        "--address", metavar="ADDR", callback=_check_run_address,
        help="Join this Ray cluster (host:port) instead of starting an embedded one.",
    )] = None,
    object_store_from: Annotated[float | None, typer.Option(
        "--object-store-from", metavar="MIB", min=0, callback=_check_finite,
        help="Move activation pieces of at least MIB MiB between CPU workers through Ray's object store instead of "
             "gloo point-to-point (0: never). Default 32: where it became cheaper on a 2-core host "
             "(bench/results/transfer.md).",
    )] = None,
    verbose: Verbose = False,
) -> None:
    """Train a job on CPU workers: one Ray actor per device of its plan, with metrics and checkpoints.

    Per-step losses go to stderr, the summary (losses at the start vs the end, step time) to stdout.
    A worker failure is one `error:` line and exit code 1; SIGINT (Ctrl-C) and SIGTERM stop after the step in
    flight with a final checkpoint (exit 130, 143). See docs/run.md and docs/reliability.md.
    """
    from orchestrator.recipes import load_job
    from orchestrator.remote import RunFailed
    from orchestrator.run import OBJECT_STORE_FROM_BYTES, RunOptions, run_job
    from orchestrator.run_inputs import load_plan_option
    from orchestrator.signals import RunStopped
    from orchestrator.summary import summary_lines

    configure_logging(verbose)
    if resume and overwrite:
        raise typer.BadParameter("--resume continues the run in --out, --overwrite replaces it: pass one of them.")
    if resume and cluster is not None:
        raise typer.BadParameter("--cluster with --resume: a resumed run continues on its saved plan's cluster "
                                 "(OUT/plan.json). Leave --cluster out, or start a new run without --resume.")
    pipeline = pipeline_cli.read_phased(job_path, cluster)
    if pipeline is not None and plan_path is not None:
        raise typer.BadParameter("--plan runs one plan; a phased job plans each phase when it starts (a resumed "
                                 "phase reuses OUT/<phase>/plan.json). Leave --plan out.")
    job = load_job(job_path, cluster) if pipeline is None else None
    if costs is not None and plan_path is not None:
        raise typer.BadParameter("--costs plans the job; with --plan the plan is given. Use one of them.")
    given_plan = load_plan_option(plan_path) if plan_path is not None else None
    options = RunOptions(steps=steps, out_dir=out, metrics_port=metrics_port, checkpoint_every=checkpoint_every,
                         resume=resume, overwrite=overwrite, keep_last=keep_last, address=address, costs=costs,
                         plan_file=plan_path,
                         object_store_from_bytes=OBJECT_STORE_FROM_BYTES if object_store_from is None
                         else int(object_store_from * 1024**2))
    try:
        if pipeline is not None:
            return pipeline_cli.run_phases(pipeline, options)
        result = run_job(job, given_plan, options=options)
    except RunFailed as exc:
        typer.echo(f"error: {one_line(str(exc))}", err=True)
        raise typer.Exit(1) from None
    except RunStopped as exc:
        typer.echo(f"error: {one_line(str(exc))}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:  # outside the run's own handler (orchestrator.signals): loading, or not the main thread
        typer.echo("error: interrupted; continue from the latest complete checkpoint with --resume", err=True)
        raise typer.Exit(130) from None
    for line in summary_lines(result):
        typer.echo(line)


@app.command()
def gantt(
    out_dir: Annotated[Path, typer.Argument(
        metavar="OUT", help="Output folder of a finished `loom run` (its --out): plan.json and trace.json.",
    )],
    output: Annotated[list[Path] | None, typer.Option(
        "--output", "-o", metavar="FILE.png|FILE.html", callback=_check_gantt_paths,
        help="Write the chart here (PNG, or standalone HTML with hover details); repeat for both. "
             "Default: OUT/gantt.png and OUT/gantt.html.",
    )] = None,
    step: Annotated[int | None, typer.Option(
        "--step", min=0, help="The measured step to draw (default: the last one trace.json holds).",
    )] = None,
    verbose: Verbose = False,
) -> None:
    """Draw a finished run's predicted iteration above a measured step: one row per rank, a block per
    forward/backward slice (named after its task), transfer, loss, gradient sync and optimizer. See docs/run.md.
    """
    from orchestrator.render import format_seconds
    from orchestrator.timeline import write_run_gantt

    configure_logging(verbose)
    summary = write_run_gantt(out_dir, output or [], step)
    ratio = f" ({summary.measured_s / summary.predicted_s:.2f}x)" if summary.predicted_s > 0 else ""
    typer.echo(f"step {summary.step}: measured {format_seconds(summary.measured_s)}, predicted "
               f"{format_seconds(summary.predicted_s)}{ratio}; wrote {', '.join(map(str, summary.paths))}")


# `loom submit`, `loom status`, `loom logs`, `loom stop` (Ray Jobs API) live in their own module.
from orchestrator.jobs_cli import register as _register_job_commands  # noqa: E402  (needs `app` above)

_register_job_commands(app)

from orchestrator.eval_cli import register as _register_eval_command  # noqa: E402  (`loom eval`)

_register_eval_command(app)


def main() -> None:
    """Console-script entry point (``loom``)."""
    app(prog_name="loom")


if __name__ == "__main__":
    main()
