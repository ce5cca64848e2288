"""``loom run`` of a phased job (planner.pipeline): its phases in order, each writing under ``OUT/<phase>/``.

Entry points :func:`read_pipeline` (load and check a job file with ``phases:``; None for a one-phase job) and
:func:`run_pipeline`. A trained phase is an ordinary run (:func:`orchestrator.run.run_job`) of the phase's JobSpec
``<job>.<phase>`` into ``OUT/<phase>/`` (plan.json, metrics.jsonl, ckpt/, export/, model.pt, traces); a step phase
runs its registered function in this driver process (orchestrator.steps). A finished phase gets the marker
``OUT/<phase>/PHASE_COMPLETE`` (JSON: its spec's hash, steps, the artifacts it wrote), written last.

Before anything runs (:meth:`PipelineRunner.check`, read-only): every trained phase is checked as ``loom run``
checks a job (a phase whose data is an earlier phase's artifact is checked when it starts), and the folder: a fresh
run into an ``OUT`` that holds an earlier run's phases is refused without ``overwrite`` (which moves all of it to
``OUT/previous-<time>/``, deleted once the new run has finished its first phase); ``resume`` skips the finished
phases (a marker whose spec hash differs is refused: the phase would not be what the job now says) and resumes the
first unfinished one from its last complete checkpoint (from its start without one). Nothing of a finished phase is
deleted without ``overwrite``.

One embedded Ray cluster (as many CPUs as the largest phase has workers) serves every phase; with ``--address``
each phase joins the cluster as a one-phase run does. One log line when each phase starts and ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.checkpoint import CKPT_DIRNAME, complete_checkpoints
from orchestrator.outdir import OutDirLock, check_out_dir, claim_folder, contained, earlier_run
from orchestrator.run_inputs import RunInputError, check_runnable_job
from orchestrator.signals import RunStopped, StopSignals
from orchestrator.remote import RunFailed
from orchestrator.steps import STEPS, StepContext, check_gate, check_step_args, registered_steps, step_metrics
from planner.errors import LoomError, SpecError
from planner.pipeline import (
    EXPORT_DIR, MODEL, Phase, Pipeline, Reference, artifact_path, is_phased, parse_pipeline, phase_job,
    references,
)
from planner.spec_file import read_job_document

if TYPE_CHECKING:
    from orchestrator.run import RunOptions, RunResult

log = logging.getLogger(__name__)

PHASE_MARKER = "PHASE_COMPLETE"
METRICS_FILE = "metrics.json"  # a step's reported metrics, OUT/<phase>/metrics.json
LOGS_DIR = "logs"  # the shared Ray cluster's worker logs (planner.pipeline reserves the name)


def read_pipeline(path: str | Path, cluster: str | Path | None = None) -> Pipeline | None:
    """The phased job in ``path`` checked whole (planner.pipeline, each step's args, the recipe's name), or None
    when the file has no ``phases:`` (a one-phase job: orchestrator.recipes.load_job reads it). A recipe's own
    steps are registered by importing the recipe, only when a phase names a step that is not built in."""
    from orchestrator.recipes import RECIPES, check_recipe, import_recipe

    data = read_job_document(path, cluster)
    if not is_phased(data):
        return None
    named = {p.get("step") for p in data.get("phases") or [] if isinstance(p, dict)} - {None}
    if named - set(STEPS) and data.get("recipe") in RECIPES:
        import_recipe(data["recipe"])
    pipeline = parse_pipeline(data, registered_steps(), base=Path(path).resolve().parent)
    for phase in pipeline.phases:
        if phase.is_step:
            check_step_args(phase.spec.step, phase.spec.args, f"phases[{phase.index}].args", pipeline.base,
                            pipeline.doc.get("components") or {})
            check_gate(phase.spec.step, phase.spec.gate, f"phases[{phase.index}].gate")
        else:
            check_recipe(phase.job)
    return pipeline


def phase_hash(phase: Phase) -> str:
    """What a finished phase's marker records of its spec: a SHA-256 of its planned job, or of its step and args."""
    text = phase.job.model_dump_json() if phase.job is not None else json.dumps(
        {"step": phase.spec.step, "args": phase.spec.args}
        | ({"gate": {k: v.model_dump() for k, v in phase.spec.gate.items()}} if phase.spec.gate else {}),
        sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reads_data_artifacts(phase: Phase) -> bool:
    """Whether a trained phase's tasks, its ``data_dir`` or a component's ``init_from`` read an earlier phase's
    artifact (its data and the model files its components start from are checked when it starts)."""
    starts = {name: comp.get("init_from") for name, comp in phase.spec.components.items()}
    return bool(references(phase.spec.tasks or [], "tasks") + references(phase.spec.data_dir, "data_dir")
                + references(starts, "components"))


def check_phase_data(phase: Phase) -> None:
    """A trained phase's data as ``loom validate`` checks it (runtime.source_files, torch-free), the error naming the
    phase: all of it, or for a phase reading an earlier phase's artifacts (which exist once that phase has run, and
    are checked when this one starts) its ``data_dir`` when that is a plain path, which must exist now."""
    from runtime.source_files import check_data_dir, check_data_files

    try:
        if not reads_data_artifacts(phase):
            check_data_files(phase.job)
        elif not references(phase.spec.data_dir, "data_dir"):
            check_data_dir(phase.job)
    except LoomError as exc:
        raise SpecError(f"phases[{phase.index}] ('{phase.name}'): {exc}") from None


@dataclass
class PhaseResult:
    """One phase of a pipeline run: trained (``run``), a step, or finished earlier and skipped."""

    name: str
    out_dir: Path
    step: str | None = None
    skipped: bool = False
    run: RunResult | None = None
    seconds: float = 0.0
    artifacts: dict[str, str] = field(default_factory=dict)  # artifact -> path
    metrics: dict[str, float] = field(default_factory=dict)  # what a step reported


class GateFailed(RunFailed):
    """A step's metric fell outside its phase's ``gate``: the run stops after that phase (exit code 1)."""


@dataclass
class PipelineResult:
    job: str
    out_dir: Path
    phases: list[PhaseResult] = field(default_factory=list)


def run_pipeline(pipeline: Pipeline, options: RunOptions | None = None, reporter=None) -> PipelineResult:
    """Run ``pipeline``'s phases in order (see the module docstring). Raises RunInputError for input that cannot
    run (before anything in ``OUT`` is written), RunFailed and RunStopped as :func:`orchestrator.run.run_job`."""
    from orchestrator.run import RunOptions  # local: torch loads only when a run starts

    return PipelineRunner(pipeline, options or RunOptions(), reporter).run()


class PipelineRunner:
    """One pipeline run's state; use :func:`run_pipeline`."""

    def __init__(self, pipeline: Pipeline, options: RunOptions, reporter=None):
        self.pipeline, self.options, self.reporter = pipeline, options, reporter
        self.out_dir = Path(options.out_dir) if options.out_dir is not None else Path("out") / pipeline.name
        self.lock = OutDirLock(self.out_dir)
        self.finished = 0  # phases finished earlier (a prefix), skipped by a resumed run
        self.previous: Path | None = None
        self.embedded = None
        self.stop = StopSignals()
        self.result = PipelineResult(pipeline.name, self.out_dir)

    def folder(self, phase: Phase) -> Path:
        return contained(self.out_dir, phase.name)

    def run(self) -> PipelineResult:
        try:
            self.check()
            self.claim()
            self.start_cluster()
            for phase in self.pipeline.phases:
                self.run_phase(phase)
            self.drop_previous()
        finally:
            if self.embedded is not None:
                self.embedded.stop(keep_logs_in=contained(self.out_dir, LOGS_DIR))
            self.lock.release()
            self.stop.restore()
        return self.result

    # ------------------------------------------------------------------ checks, before anything runs

    def check(self) -> None:
        """Read-only: options, every trained phase's job, and what an earlier run left in OUT."""
        if self.options.steps is not None:
            raise RunInputError("--steps: a phased job trains each phase for its own training.steps; leave --steps "
                                "out (set phases[i].training.steps).")
        if self.options.resume and self.options.overwrite:
            raise RunInputError("--resume continues the run in --out, --overwrite replaces it: pass one of them.")
        check_out_dir(self.out_dir)  # the pipeline's folder, before the phases' (OUT/<phase>: each run's own check)
        for phase in self.pipeline.phases:
            if phase.job is not None and not reads_data_artifacts(phase):
                self.check_job(phase, phase.job)
            elif phase.job is not None:  # the rest of its data is checked when it starts (run_trained)
                check_phase_data(phase)
        if self.out_dir.is_dir():
            self.lock.acquire(create=False)
        left = {p.name: self.left_behind(p) for p in self.pipeline.phases}
        left = {name: what for name, what in left.items() if what}
        self.finished = 0
        if not self.options.resume:
            if left and not self.options.overwrite:
                raise RunInputError(
                    f"--out ({self.out_dir}) holds phases of an earlier run ("
                    + "; ".join(f"{name}: {what}" for name, what in left.items()) + "); a fresh run would replace "
                    "them. Pass --resume to continue that run, --overwrite to start over (the earlier run is moved "
                    "aside), or another --out.")
            return
        if not left:  # as a single job's --resume without a checkpoint (orchestrator.run): a typo'd --out is said
            raise RunInputError(
                f"--resume: --out ({self.out_dir}) holds no phase of an earlier run of this job (no finished phase, no "
                "checkpoint). Run without --resume, or pass the --out directory of the run you want to continue.")
        for phase in self.pipeline.phases:
            marker = self.marker(phase)
            if marker is None:
                break
            if marker.get("spec") != phase_hash(phase):
                raise RunInputError(
                    f"phases[{phase.index}] ('{phase.name}') finished under another spec ({self.folder(phase)}/"
                    f"{PHASE_MARKER}); resuming would mix two jobs. Restore the spec, or pass --overwrite instead "
                    "of --resume to start over.")
            self.finished += 1
        for phase in self.pipeline.phases[self.finished + 1:]:
            if phase.name in left:
                raise RunInputError(
                    f"--out ({self.out_dir}): phase '{phase.name}' holds results ({left[phase.name]}) though the "
                    f"earlier phase '{self.pipeline.phases[self.finished].name}' is unfinished. Pass --overwrite "
                    "to start over, or another --out.")

    def check_job(self, phase: Phase, job) -> None:
        """``loom run``'s checks of a trained phase's job (orchestrator.run_inputs), the error naming the phase."""
        try:
            check_runnable_job(job, self.options.address)
        except LoomError as exc:
            raise RunInputError(f"phases[{phase.index}] ('{phase.name}'): {exc}") from None

    def left_behind(self, phase: Phase) -> str | None:
        """What an earlier run left of ``phase`` (its marker, checkpoints), as a short phrase; None if nothing."""
        folder = self.folder(phase)
        if (folder / PHASE_MARKER).is_file():
            return "finished"
        return earlier_run(folder)

    def marker(self, phase: Phase) -> dict | None:
        path = self.folder(phase) / PHASE_MARKER
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------ the run's first writes

    def claim(self) -> None:
        """Create OUT, take its lock, record this process, move an earlier run aside for ``overwrite``
        (orchestrator.outdir.claim_folder)."""
        self.previous = claim_folder(self.out_dir, self.lock, self.options.overwrite, self.check,
                                     "has finished a phase")

    def drop_previous(self) -> None:
        if self.previous is not None:
            shutil.rmtree(self.previous)
            self.previous = None

    def start_cluster(self) -> None:
        """One embedded Ray cluster for every trained phase to be run (none with --address or a session already
        started by the caller); this process's stop handler again, since ray.init installs its own."""
        import ray

        trained = [p.job for p in self.pipeline.phases[self.finished:] if p.job is not None]
        if trained and not self.options.address and not ray.is_initialized():
            from orchestrator.actors import EmbeddedRay

            self.embedded = EmbeddedRay(max(job.cluster.num_devices for job in trained)).start()
        self.stop.install()

    # ------------------------------------------------------------------ phases

    def run_phase(self, phase: Phase) -> None:
        folder, count = self.folder(phase), len(self.pipeline.phases)
        what = f"phase {phase.index + 1}/{count} '{phase.name}'"
        if phase.index < self.finished:
            log.info("%s: finished earlier, skipped (%s)", what, folder)
            marker = self.marker(phase)
            self.result.phases.append(PhaseResult(phase.name, folder, phase.spec.step, skipped=True,
                                                  artifacts=marker.get("artifacts", {}),
                                                  metrics=marker.get("metrics", {})))
            return
        start = time.perf_counter()
        if phase.is_step:
            log.info("%s: step '%s' in the driver process -> %s", what, phase.spec.step, folder)
            done = self.run_step(phase, folder)
        else:
            steps = phase.job.training.steps
            log.info("%s: training %d steps (tasks %s) -> %s", what, steps,
                     ", ".join(t.name for t in phase.job.tasks), folder)
            done = self.run_trained(phase, folder)
        done.seconds = time.perf_counter() - start
        self.write_marker(phase, done)
        self.result.phases.append(done)
        self.drop_previous()
        log.info("%s: finished in %.1f s; %s", what, done.seconds,
                 ", ".join(f"{name} {path}" for name, path in done.artifacts.items()) or "no artifacts")

    def run_step(self, phase: Phase, folder: Path) -> PhaseResult:
        """The step's function in this process, into a fresh ``OUT/<phase>/`` (an unfinished one is redone)."""
        if folder.exists():
            shutil.rmtree(folder)  # unfinished (no marker: check); a step starts over
        folder.mkdir(parents=True)
        args = self.resolve_args(phase.spec.args, phase.spec.args.get("component"), f"phases[{phase.index}].args")
        context = StepContext(phase.name, args, folder, self.pipeline.base)
        where = f"phases[{phase.index}] ('{phase.name}')"
        metrics = step_metrics(phase.spec.step, STEPS[phase.spec.step].run(context), where)
        artifacts = {}
        for name in phase.writes:
            path = context.artifact(name)
            if not path.exists():
                raise SpecError(f"phases[{phase.index}] ('{phase.name}'): step '{phase.spec.step}' did not write its "
                                f"artifact '{name}' ({path}); the step is wrong or its args name nothing to write.")
            artifacts[name] = str(path)
        if metrics:
            (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
            log.info("phase '%s' metrics: %s", phase.name, format_metrics(metrics))
        check_phase_gate(phase, metrics, where)
        return PhaseResult(phase.name, folder, phase.spec.step, artifacts=artifacts, metrics=metrics)

    def run_trained(self, phase: Phase, folder: Path) -> PhaseResult:
        """The phase's job, its earlier phases' artifacts read from OUT, as one ``loom run`` into ``OUT/<phase>/``:
        resumed from its last complete checkpoint when there is one and the run resumes, else fresh (moving an
        unfinished attempt without a checkpoint aside)."""
        from orchestrator.run import run_job

        job = phase_job(self.pipeline.doc, phase.spec, self.pipeline.base, locate=self.locate)
        if reads_data_artifacts(phase):
            self.check_job(phase, job)
        resume = self.options.resume and bool(complete_checkpoints(folder))
        options = replace(self.options, out_dir=folder, resume=resume, overwrite=folder.exists() and not resume,
                          export_when_done=True)
        try:
            run = run_job(job, None, options=options, reporter=self.reporter)
        except RunStopped as exc:
            raise RunStopped(exc.signum, f"phase '{phase.name}': {exc}") from None
        artifacts = {}
        if (folder / EXPORT_DIR).is_dir():
            artifacts[MODEL] = str(folder / EXPORT_DIR)
        latest = complete_checkpoints(folder)
        if latest:
            artifacts["checkpoint"] = str(latest[0].path)
        return PhaseResult(phase.name, folder, run=run, artifacts=artifacts)

    def write_marker(self, phase: Phase, done: PhaseResult) -> None:
        """``OUT/<phase>/PHASE_COMPLETE``, written to a temporary name and renamed: the phase is finished."""
        artifacts = {name: os.path.relpath(path, self.folder(phase)) for name, path in done.artifacts.items()}
        text = json.dumps({"phase": phase.name, "spec": phase_hash(phase), "step": phase.spec.step,
                           "steps": done.run.last_step if done.run else None, "artifacts": artifacts}
                          | ({"metrics": done.metrics} if done.metrics else {}), indent=1)
        tmp = self.folder(phase) / (PHASE_MARKER + ".tmp")
        tmp.write_text(text + "\n")
        tmp.rename(self.folder(phase) / PHASE_MARKER)

    def locate(self, ref: Reference, sub: str | None) -> Path:
        """An earlier phase's artifact, as its marker records it (references are checked by planner.pipeline)."""
        marker = self.marker(self.pipeline.phase(ref.phase)) or {}
        written = marker.get("artifacts", {})
        if ref.artifact not in written:
            raise RunInputError(f"@{ref.phase}/{ref.artifact}: phase '{ref.phase}' finished without writing it "
                                f"(it wrote {', '.join(written) or 'nothing'}; a trained phase writes `checkpoint` only "
                                "with training.checkpoint_every, `model` only for pretrained components).")
        path = artifact_path(self.out_dir, ref, sub, checkpoint=written.get("checkpoint", CKPT_DIRNAME))
        return path.resolve()

    def resolve_args(self, value, sub: str | None, where: str):
        """A step's args with every reference replaced by its artifact's absolute path."""
        if isinstance(value, dict):
            return {k: self.resolve_args(v, sub, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve_args(v, sub, f"{where}[{i}]") for i, v in enumerate(value)]
        refs = references(value, where)
        return str(self.locate(refs[0], sub)) if refs else value


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in sorted(metrics.items()))


def check_phase_gate(phase: Phase, metrics: dict[str, float], where: str) -> None:
    """GateFailed for the first gated metric outside its bounds or not reported (the phase stays unfinished: its
    metrics.json is kept, no marker, so a resumed run evaluates it again)."""
    for metric, gate in phase.spec.gate.items():
        if metric not in metrics:
            raise GateFailed(f"{where}: gate on '{metric}', which step '{phase.spec.step}' did not report (it "
                             f"reported {', '.join(sorted(metrics)) or 'no metrics'}). Gate a metric it reports.")
        why = gate.failure(metric, metrics[metric])
        if why is not None:
            raise GateFailed(f"{where}: {why}; the run stops here (metrics in "
                             f"{phase.name}/{METRICS_FILE}). Improve the model or relax phases[{phase.index}].gate.")


def summary_lines(result: PipelineResult) -> list[str]:
    """The end-of-run summary of a phased job: per phase, a trained phase's summary (orchestrator.summary), a step's
    artifacts, or that it was finished earlier."""
    from orchestrator.summary import summary_lines as run_summary

    lines = []
    for phase in result.phases:
        name = f"{result.job}.{phase.name}"
        if phase.skipped:
            lines.append(f"{name}: finished earlier, skipped ({phase.out_dir})")
        elif phase.run is not None:
            lines += run_summary(phase.run)
        else:
            wrote = ", ".join(f"{artifact} {path}" for artifact, path in phase.artifacts.items())
            scored = f"; metrics {format_metrics(phase.metrics)}" if phase.metrics else ""
            lines.append(f"{name}: step '{phase.step}' wrote {wrote or 'no artifacts'}{scored}")
    return lines

