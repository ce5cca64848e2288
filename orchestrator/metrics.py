"""What a run reports: Prometheus metrics on 127.0.0.1, the ``metrics.jsonl`` step log, step progress.

:class:`RunMetrics` owns a private ``CollectorRegistry`` (never the process-global one, so two runs
in one process do not collide) and, when asked, an HTTP server on 127.0.0.1 that serves it. Names
follow ``loom_<what>_<unit>[_total]``; labels are bounded (task, worker), never a step:

- ``loom_steps_total``, ``loom_samples_total{task}``, ``loom_tokens_total{task}``
- ``loom_step_seconds`` (histogram of the driver's wall time per step), ``loom_task_loss{task}``
- ``loom_iteration_predicted_seconds`` (the plan's) and ``loom_iteration_measured_seconds`` (mean so far)
- ``loom_worker_step_seconds{worker}`` (each worker's own time in its last step)
- ``loom_wave_measured_seconds{wave}`` and ``loom_wave_predicted_seconds{wave}`` (each wave's compute in the
  last step, on its slowest worker, vs the plan's wave duration); ``loom_step_part_seconds{part}`` (the
  slowest worker's transfer, loss, sync and optimizer time in the last step)
- ``loom_restarts_total`` (runs resumed from a checkpoint), ``loom_checkpoints_total``

:class:`StepLog` writes one JSON object per step to ``metrics.jsonl`` (see :class:`StepRecord`).
Progress reporters: :class:`RichReporter` (a progress bar with per-task losses on stderr, for a
terminal) and :class:`LogReporter` (one log line per step); :func:`default_reporter` picks one.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from planner.plan import Plan
    from planner.spec import JobSpec

log = logging.getLogger(__name__)

METRICS_HOST = "127.0.0.1"
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))


@dataclass(frozen=True)
class StepRecord:
    """One training step as logged: losses per task (task mean), seconds, throughput per task (per second)."""

    step: int
    loss: dict[str, float]
    step_seconds: float
    samples_per_s: dict[str, float]
    tokens_per_s: dict[str, float]
    predicted_iteration_s: float
    worker_seconds: list[float]  # each rank's own time inside train_step
    # per wave: the slowest rank's forward + backward of its slice (empty when the workers report no timing)
    wave_seconds: list[float] = field(default_factory=list)
    predicted_wave_seconds: list[float] = field(default_factory=list)  # the plan's wave durations
    # the slowest rank's time in each other part of the step: transfer, loss, sync, optimizer
    part_seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class RunMetrics:
    """The run's Prometheus metrics; :meth:`serve` exposes them, :meth:`close` stops the server."""

    def __init__(self, tasks: list[str], predicted_iteration_s: float, predicted_wave_s: list[float] | None = None):
        self.registry = CollectorRegistry()
        reg = self.registry
        self.steps = Counter("loom_steps", "Training steps completed.", registry=reg)
        self.samples = Counter("loom_samples", "Samples trained on, per task.", ["task"], registry=reg)
        self.tokens = Counter("loom_tokens", "Tokens (input positions) trained on, per task.", ["task"], registry=reg)
        self.step_seconds = Histogram("loom_step_seconds", "Wall time of one training step seen by the driver.",
                                      buckets=STEP_BUCKETS, registry=reg)
        self.loss = Gauge("loom_task_loss", "Mean loss of the task at the last step.", ["task"], registry=reg)
        self.predicted = Gauge("loom_iteration_predicted_seconds", "Iteration time the plan predicts.", registry=reg)
        self.measured = Gauge("loom_iteration_measured_seconds", "Mean measured step time of this run.", registry=reg)
        self.worker_seconds = Gauge("loom_worker_step_seconds", "Each worker's own time in its last step.",
                                    ["worker"], registry=reg)
        self.wave_measured = Gauge("loom_wave_measured_seconds", "Compute (forward + backward) of the wave in the "
                                   "last step, on its slowest worker.", ["wave"], registry=reg)
        self.wave_predicted = Gauge("loom_wave_predicted_seconds", "Compute time of the wave the plan predicts.",
                                    ["wave"], registry=reg)
        self.part_seconds = Gauge("loom_step_part_seconds", "The slowest worker's time in one part of the last "
                                  "step (transfer, loss, sync, optimizer).", ["part"], registry=reg)
        self.restarts = Counter("loom_restarts", "Runs resumed from a checkpoint.", registry=reg)
        self.checkpoints = Counter("loom_checkpoints", "Complete checkpoints written.", registry=reg)
        self.predicted.set(predicted_iteration_s)
        for wave, seconds in enumerate(predicted_wave_s or []):
            self.wave_predicted.labels(wave=str(wave)).set(seconds)
        for task in tasks:  # export every task's series from the start, at zero
            self.samples.labels(task=task)
            self.tokens.labels(task=task)
        self._server = None
        self._thread = None
        self._total_seconds = 0.0
        self._num_steps = 0

    def serve(self, port: int) -> int:
        """Serve ``/metrics`` on 127.0.0.1:``port`` in a daemon thread; returns the bound port.

        Raises OSError when the port is taken."""
        self._server, self._thread = start_http_server(port, addr=METRICS_HOST, registry=self.registry)
        bound = self._server.server_address[1]
        log.info("Prometheus metrics on http://%s:%d/metrics", METRICS_HOST, bound)
        return bound

    def record_step(self, record: StepRecord, batch_sizes: Mapping[str, int],
                    tokens_per_sample: Mapping[str, int]) -> None:
        """Count one step: its time, each task's loss, samples (batch size) and tokens (batch x positions)."""
        self.steps.inc()
        self.step_seconds.observe(record.step_seconds)
        self._total_seconds += record.step_seconds
        self._num_steps += 1
        self.measured.set(self._total_seconds / self._num_steps)
        for task, value in record.loss.items():
            self.loss.labels(task=task).set(value)
            self.samples.labels(task=task).inc(batch_sizes[task])
            self.tokens.labels(task=task).inc(batch_sizes[task] * tokens_per_sample[task])
        for rank, seconds in enumerate(record.worker_seconds):
            self.worker_seconds.labels(worker=str(rank)).set(seconds)
        for wave, seconds in enumerate(record.wave_seconds):
            self.wave_measured.labels(wave=str(wave)).set(seconds)
        for part, seconds in record.part_seconds.items():
            self.part_seconds.labels(part=part).set(seconds)

    def close(self) -> None:
        """Stop the HTTP server (if serving); idempotent."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class StepLog:
    """``metrics.jsonl``: one :class:`StepRecord` per line, flushed after every step.

    A fresh run truncates the file; a resumed run keeps the lines of steps before ``first_step`` and
    drops the rest (steps the interrupted run did after its last checkpoint are redone)."""

    def __init__(self, path: str | Path, first_step: int = 0):
        self.path = Path(path)
        kept = _lines_before(self.path, first_step) if first_step > 0 else []
        self._file: IO[str] | None = self.path.open("w")
        self._file.writelines(kept)
        self._file.flush()

    def write(self, record: StepRecord) -> None:
        assert self._file is not None, "the step log is closed"
        self._file.write(record.to_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _lines_before(path: Path, first_step: int) -> list[str]:
    """The lines of an existing step log whose step is below ``first_step`` (unreadable lines are dropped)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(step, int) and step < first_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    return kept


def read_step_log(path: str | Path) -> list[dict]:
    """Every record of a ``metrics.jsonl`` file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- progress


def format_losses(losses: Mapping[str, float]) -> str:
    """``caption 2.301  align 0.693`` (4 significant digits)."""
    return "  ".join(f"{task} {value:.4g}" for task, value in losses.items())


class LogReporter:
    """One INFO line per step: ``step 3/40  caption 2.301  align 0.693  (0.412 s)``."""

    def __init__(self) -> None:
        self.last_step = 0

    def start(self, first_step: int, last_step: int) -> None:
        self.last_step = last_step
        if first_step < last_step:
            log.info("training steps %d..%d", first_step, last_step - 1)

    def step(self, record: StepRecord) -> None:
        log.info("step %d/%d  %s  (%.3f s)", record.step + 1, self.last_step, format_losses(record.loss),
                 record.step_seconds)

    def close(self) -> None:
        pass


class RichReporter:
    """A rich progress bar on stderr: steps done, per-task losses of the last step, elapsed and remaining time."""

    def __init__(self) -> None:
        self.progress = None
        self.task_id = None

    def start(self, first_step: int, last_step: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(
            TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.description}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
        )
        self.progress.start()
        self.task_id = self.progress.add_task("", total=last_step, completed=first_step)

    def step(self, record: StepRecord) -> None:
        self.progress.update(self.task_id, advance=1,
                             description=f"{format_losses(record.loss)}  ({record.step_seconds:.2f} s/step)")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def default_reporter() -> LogReporter | RichReporter:
    """A progress bar when stderr is a terminal, log lines otherwise."""
    return RichReporter() if sys.stderr.isatty() else LogReporter()


# --------------------------------------------------------------------------- step breakdown

STEP_PARTS = ("transfer", "loss", "sync", "optimizer")


def step_breakdown(timings: Sequence[Mapping | None]) -> tuple[list[float], dict[str, float]]:
    """Per wave, the slowest rank's compute; per part of :data:`STEP_PARTS`, the slowest rank's seconds.

    ``timings`` holds each rank's ``runtime.steps.StepTiming.to_dict()`` for one step; when a rank sent
    none, both results are empty."""
    if not timings or any(t is None for t in timings):
        return [], {}
    num_waves = len(timings[0]["compute_s"])
    waves = [max(t["compute_s"][k] for t in timings) for k in range(num_waves)]
    parts = {
        "transfer": max(sum(t["transfer_s"]) for t in timings),
        "loss": max(t["loss_s"] for t in timings),
        "sync": max(t["sync_s"] for t in timings),
        "optimizer": max(t["optimizer_s"] for t in timings),
    }
    return waves, parts


def predicted_wave_seconds(plan: Plan, micro_batches: int = 1) -> list[float]:
    """The plan's compute time of each wave in one step (its slowest slice, forward + backward, once per micro-batch:
    ``training.grad_accum_steps``; a wave's duration is one micro-batch's), in wave order, as the workers time it
    (runtime.executor adds each micro-batch's forward and backward of a wave into that wave's compute)."""
    return [wave.duration_s * micro_batches for wave in plan.waves]


def tokens_per_sample(job: JobSpec) -> dict[str, int]:
    """Input positions one sample of each task feeds its root uses (tokens, patches + class token, or rows)."""
    from planner.components import resolve_shape
    from planner.usegraph import root_uses

    out = {}
    for t, task in enumerate(job.tasks):
        total = 0
        for name in root_uses(job, t):
            u = next(i for i, use in enumerate(task.components) if use.use_name == name)
            use = task.components[u]
            total += resolve_shape(job.components[use.component], use.component, use,
                                   f"tasks[{t}].components[{u}]").seq_len
        out[task.name] = total
    return out
