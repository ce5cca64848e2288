"""The driver of ``loom run``: train a job's plan on Ray actors, with metrics, checkpoints and resume.

Entry point :func:`run_job`. A run is a sequence of named phases (:class:`Driver`):

1. ``prepare``: check the job can run here (CPU cluster, supported losses), check the output
   directory (its lock, :mod:`orchestrator.outdir`; a fresh run over an earlier run's checkpoints
   needs ``overwrite``), plan the job or check the given plan belongs to it and, for ``resume``, find
   the checkpoint to continue from (of this job, under any of its plans: the workers reshard it); bind
   the metrics port. Every problem found here is a user error (:class:`RunInputError`, exit 2), and
   nothing in the output directory has been written yet.
2. ``start_cluster`` (an embedded local Ray cluster with one logical CPU per worker; or
   ``ray.init(address=...)``; or the Ray session this process already has), ``create_workers`` (one
   actor per device of the plan, each plan node's ranks on a Ray node of their own through one
   placement group, joined in one gloo group), ``claim_out_dir`` (the first write into the output
   directory: its lock, the earlier run moved aside for ``overwrite``, ``plan.json``), ``restore``
   (every rank reads what it holds from the checkpoint, runtime.portable). A cluster whose nodes
   cannot hold the plan's nodes is refused before any actor starts (:mod:`orchestrator.placement`).
3. ``train``: collective ``train_steps`` calls on every actor, each of one step or, where steps are short, of as
   many as the plan predicts in ``CALL_SECONDS`` (Ray's cost per call is paid once for them), the next call sent
   before this one's results are back (so the actors never wait for Ray's round trip to the driver; they run their
   steps in order) unless a checkpoint is due after it or a stop signal came; each step is logged to
   ``metrics.jsonl``, the metrics and the progress reporter; every ``checkpoint_every`` steps the
   actors write their files and the driver writes the manifest and the completion marker, then applies
   ``keep_last``. SIGINT or SIGTERM stops the run after the steps in flight (the call sent ahead too), with a final
   checkpoint when checkpointing is on (:mod:`orchestrator.signals`; :class:`RunStopped`, exit 128 + the signal).
4. ``shutdown`` (always): kill the actors, stop the embedded cluster (keeping the workers' logs
   that hold output under ``<out>/logs`` once the run has claimed it) or disconnect from ``--address``,
   stop the metrics server, release the output directory's lock.

A worker that dies, or a step that runs past ``training.step_timeout_s``, is recovered (``recover``,
:mod:`orchestrator.recovery`): the actors are killed, new ones started (for a plan re-made for the nodes left when
a joined cluster lost one), and training resumes from the last complete checkpoint (step 0 without one), at most
``training.max_restarts`` times, one log line each. Any other worker failure, or one more loss, ends the run with
:class:`RunFailed` (one line: which worker, which step, what it raised; exit 1); the other actors are killed
rather than left waiting in a collective.
Files written under ``<out>`` (each path checked to resolve inside it, :func:`orchestrator.outdir.contained`):
``.loom-run.lock``, ``plan.json``, ``metrics.jsonl``, ``ckpt/step_<k>/``, ``logs/``, ``previous-<time>/`` (an
earlier run moved aside by ``overwrite``, deleted once this run has a checkpoint), and at the end ``model.pt``,
``trace.json`` (the last steps' measured spans per rank) and ``trace-predicted.json`` (the plan's), Chrome traces
(orchestrator.trace).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orchestrator.checkpoint import (
    CKPT_DIRNAME, PORTABLE, CheckpointInfo, begin_checkpoint, check_job, mark_complete, rank_file,
    remove_older_checkpoints, step_dir, tensor_index,
)
from orchestrator.metrics import (
    RunMetrics, StepLog, StepRecord, predicted_wave_seconds, step_breakdown, tokens_per_sample,
)
from orchestrator.outdir import LOCK_FILE, RunFolder
from orchestrator.placement import RankPlacement, fitting_nodes, misplaced_ranks, nodes_from_ray, placement_mismatch
from orchestrator.recovery import Recovering, StepsAdvance, watchdog_failure
from orchestrator.remote import RESTORING, STARTING, GatherTimeout, RunFailed, collect, gather, gather_one
from orchestrator.run_inputs import (
    RunInputError, check_cpu_device, check_plan_for_job, check_runnable_job, plan_option,
)
from orchestrator.signals import RunStopped, StopSignals, signal_name
from orchestrator.trace import PREDICTED_TRACE_FILE, TRACE_FILE, TraceRecorder, write_run_traces
from planner.plan import Plan, PlanCluster, job_for_plan, load_plan
from planner.spec import ClusterSpec, JobSpec
from runtime.export import EXPORT_DIR, export_pretrained
from runtime.reference import MODEL_FILE, merge_parameters, save_model

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
STEP_LOG_FILE = "metrics.jsonl"
LOGS_DIR = "logs"
SETUP_TIMEOUT_S = 300.0
PLACEMENT_TIMEOUT_S = 60.0  # a placement group Ray has not placed by then is refused, never waited on forever
# pieces from this size on move between CPU workers through Ray's object store: cheaper than gloo from 32 MiB on one
# host (bench/results/transfer.md: 0.40x at 32 MiB, 2.4x dearer at 16 MiB)
OBJECT_STORE_FROM_BYTES = 32 * 1024**2
# Steps per call to the actors: as many as the plan predicts in this many seconds (at most MAX_STEPS_PER_CALL). Each
# call costs the driver ~1.5 ms of CPU and each actor ~0.6 ms (Ray's submission, dispatch, results) on the cores the
# workers compute on; a step of a few milliseconds paid it every step (chat-sft-cpu: 8.9-9.4 -> 7.5 ms a step at 29
# steps a call, session 26). A stop signal waits for at most two calls, so this bounds its delay too.
CALL_SECONDS = 0.2
MAX_STEPS_PER_CALL = 32
# every name the run writes at the top of its output directory (checked to resolve inside it before the first write)
OUTPUTS = (LOCK_FILE, PLAN_FILE, STEP_LOG_FILE, CKPT_DIRNAME, LOGS_DIR, MODEL_FILE, EXPORT_DIR, TRACE_FILE,
           PREDICTED_TRACE_FILE)


@dataclass(frozen=True)
class RunOptions:
    """How to run a job; ``None`` means the job spec's ``training`` value."""

    steps: int | None = None  # train until this many steps are done (a resumed run counts the earlier ones)
    out_dir: Path | None = None  # default out/<job name>
    metrics_port: int = 0  # 0: no Prometheus endpoint
    checkpoint_every: int | None = None  # 0: never
    resume: bool = False  # continue from the latest complete checkpoint in out_dir
    overwrite: bool = False  # a fresh run into an out_dir with checkpoints moves the earlier run aside
    keep_last: int | None = None  # keep this many newest complete checkpoints (None: every one)
    address: str | None = None  # join this Ray cluster instead of starting an embedded one
    costs: Path | None = None  # plan with this profiled cost file (`loom profile`) instead of the analytic model
    plan_file: Path | None = None  # the file the given plan was read from (`--plan`), named in errors about it
    collect_parameters: bool = False  # return every rank's final parameters in RunResult (tests)
    send_ahead: bool = True  # send each call before the previous one's results are back (Driver.may_send_ahead)
    call_seconds: float = CALL_SECONDS  # steps per actor call: as many as predicted in this time (Driver.call_size)
    object_store_from_bytes: int = OBJECT_STORE_FROM_BYTES  # CPU pieces this large and larger: object store (0: never)
    setup_timeout_s: float = SETUP_TIMEOUT_S
    placement_timeout_s: float = PLACEMENT_TIMEOUT_S  # wait this long for Ray to reserve the plan's nodes
    # a resumed run already at its last step still restores and exports (a phase stopped before its export)
    export_when_done: bool = False


@dataclass
class RunResult:
    """What a finished run did. ``records`` are this invocation's steps (a resumed run's start at ``first_step``)."""

    job: str
    plan: Plan
    out_dir: Path
    first_step: int
    last_step: int  # steps done in total when the run ended
    num_steps: int  # the steps the run was asked to reach
    records: list[StepRecord] = field(default_factory=list)
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    resumed_from: CheckpointInfo | None = None
    metrics_port: int | None = None
    parameters: dict[int, dict[str, Any]] | None = None  # rank -> name -> tensor (collect_parameters only)
    worker_nodes: list[str] = field(default_factory=list)  # rank -> the Ray node id its actor ran on

    def mean_step_seconds(self) -> float:
        """Mean measured step time, leaving out the first step (warm-up) when there are several."""
        times = [r.step_seconds for r in self.records]
        times = times[1:] if len(times) > 1 else times
        return sum(times) / len(times) if times else float("nan")


class Reporter(Protocol):
    """Where per-step progress goes (a rich bar on a terminal, log lines otherwise)."""

    def start(self, first_step: int, last_step: int) -> None: ...

    def step(self, record: StepRecord) -> None: ...

    def close(self) -> None: ...


def run_job(job: JobSpec, plan: Plan | None = None, *, options: RunOptions = RunOptions(),
            reporter: Reporter | None = None) -> RunResult:
    """Train ``job`` with ``plan`` (planned here when None) on Ray; see the module docstring.

    Raises RunInputError for input that cannot run (before any Ray process starts, except a job
    the workers reject when they build it; always before anything in the output directory is written),
    RunFailed when a worker or the cluster fails, RunStopped on SIGINT or SIGTERM."""
    from orchestrator.metrics import default_reporter

    return Driver(job, plan, options, reporter or default_reporter()).run()


def call_shares(seconds: float, results: list[list[dict]]) -> list[float]:
    """Each step's share of a call's measured ``seconds`` (``results[rank][i]``: rank's result of the call's i-th
    step): in proportion to the time its slowest rank spent in it, so that the steps add up to the call."""
    slowest = [max(rank[i]["seconds"] for rank in results) for i in range(len(results[0]))]
    total = sum(slowest)
    return [seconds * s / total if total > 0 else seconds / len(slowest) for s in slowest]


def caller_owns_ray() -> bool:
    """Whether this process already has a Ray session (a notebook's, a test fixture's), which ``loom run`` then uses
    instead of starting its embedded cluster. Without importing Ray: a session needs it imported."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def check_embedded_nodes(cluster: ClusterSpec | PlanCluster, source: str) -> None:
    """The embedded cluster is one Ray node (this machine): a plan for several nodes is refused rather than run with
    its nodes folded onto one, which would train but never test the placement the plan was made for."""
    if cluster.num_nodes > 1:
        world = cluster.num_nodes * cluster.devices_per_node
        raise RunInputError(
            f"{source}: cluster.num_nodes ({cluster.num_nodes}): the plan places its workers on {cluster.num_nodes} "
            f"nodes, but `loom run` without --address starts a one-node Ray cluster on this machine. Plan for "
            f"num_nodes: 1 and devices_per_node: {world} to train here, or join a cluster of {cluster.num_nodes} "
            "nodes with --address."
        )


class Driver(Recovering):
    """One run's state and its phases (see the module docstring); use :func:`run_job`."""

    def __init__(self, job: JobSpec, plan: Plan | None, options: RunOptions, reporter: Reporter):
        self.job, self.plan, self.options, self.reporter = job, plan, options, reporter
        self.out_dir = Path(options.out_dir) if options.out_dir is not None else Path("out") / job.name
        self.num_steps = options.steps if options.steps is not None else job.training.steps
        every = options.checkpoint_every
        self.checkpoint_every = job.training.checkpoint_every if every is None else every
        self.first_step = 0
        self.resume_point: CheckpointInfo | None = None
        self.metrics: RunMetrics | None = None
        self.metrics_port: int | None = None
        self.step_log: StepLog | None = None
        self.actors: list = []
        self.embedded = None  # EmbeddedRay when this run started its own cluster
        self.gpus_per_worker = 0  # 1 for a GPU job on a cluster with a GPU per worker
        self.placement_group = None  # the run's reserved nodes (orchestrator.actors.reserve_nodes)
        self.worker_nodes: list[str] = []  # rank -> Ray node id, as the actors report it
        self.worker_pids: list[int] = []  # rank -> the actor's process id (on its node)
        self.joined = False  # True when this run connected to --address
        self.records: list[StepRecord] = []
        self.checkpoints: list[CheckpointInfo] = []
        self.restarts = 0  # automatic restarts so far (recover)
        self.trace = TraceRecorder()  # the last steps' spans, for trace.json
        # (first step, steps, its calls): the call sent before the previous call's results came
        self.ahead: tuple[int, int, list] | None = None
        self.step_end = 0.0  # perf_counter() when the last step's results were all in
        self.folder = RunFolder(self.out_dir, resume=options.resume, overwrite=options.overwrite, outputs=OUTPUTS)
        self.stop = StopSignals()

    @property
    def world_size(self) -> int:
        return self.plan.cluster.num_nodes * self.plan.cluster.devices_per_node

    def run(self) -> RunResult:
        parameters = None
        self.stop.install()
        try:
            self.prepare()
            if self.first_step >= self.num_steps and not self.options.export_when_done:  # already there: start nothing
                log.info("nothing to train: at step %d of %d", self.first_step, self.num_steps)
                return self.result(None)
            self.start_cluster()
            self.stop.install()  # again: ray.init installs its own SIGTERM handler (orchestrator.signals)
            self.create_workers()
            self.claim_out_dir()
            self.restore()
            self.train()
            write_run_traces(self.out_dir, self.plan, self.trace.steps)
            parameters = self.gather(lambda a, r: a.named_parameters.remote(), "while collecting parameters")
            save_model(self.path(MODEL_FILE), parameters)  # the trained model, for `loom eval`
            for folder in export_pretrained(self.job, merge_parameters(parameters), self.path(EXPORT_DIR)):
                log.info("exported %s (loads with from_pretrained)", folder)
            self.folder.drop_previous()  # a run without checkpoints: once it has finished
        except RunStopped as exc:
            raise RunStopped(exc.signum, self.stopped_message(exc.signum)) from None
        finally:
            self.shutdown()
            self.stop.restore()
        return self.result(parameters if self.options.collect_parameters else None)

    def result(self, parameters: list | None) -> RunResult:
        return RunResult(
            job=self.job.name, plan=self.plan, out_dir=self.out_dir, first_step=self.first_step,
            last_step=self.first_step + len(self.records), num_steps=self.num_steps, records=self.records,
            checkpoints=self.checkpoints, resumed_from=self.resume_point, metrics_port=self.metrics_port,
            parameters=dict(enumerate(parameters)) if parameters is not None else None,
            worker_nodes=self.worker_nodes,
        )

    # ------------------------------------------------------------------ phase 1: inputs

    def prepare(self) -> None:
        """Check the job, options, plan and output directory, bind the metrics port; writes nothing in out_dir."""
        check_runnable_job(self.job, self.options.address)
        if self.num_steps < 0 or self.checkpoint_every < 0 or (self.options.keep_last or 1) < 1:
            raise RunInputError("--steps and --checkpoint-every must be >= 0, --keep-last >= 1.")
        self.folder.check()  # before planning: a folder in use or holding checkpoints is refused at once
        self.plan = self.resolve_plan()
        self.job = job_for_plan(self.job, self.plan)  # grad_accum_steps: auto runs the plan's count
        self.resume_point = self.folder.find_resume_point(self.plan.hash)  # only reads, as check does
        if self.resume_point is not None:
            check_job(self.resume_point, self.job.name)
        self.first_step = self.resume_point.step if self.resume_point else 0
        self.start_metrics()

    def claim_out_dir(self) -> None:
        """The run's first writes into out_dir, after every check (orchestrator.outdir.RunFolder.claim), then
        plan.json."""
        self.resume_point = self.folder.claim(self.plan.hash)
        self.first_step = self.resume_point.step if self.resume_point else 0
        try:
            plan_path = self.path(PLAN_FILE)
            if not plan_path.is_file() or plan_path.read_text() != self.plan.to_json():
                self.plan.save(plan_path)
        except OSError as exc:
            raise RunInputError(f"--out ({self.out_dir}): cannot write there ({exc.strerror or exc}). "
                                "Check the path and permissions.") from None
        point = self.resume_point
        if point is not None and point.plan_hash != self.plan.hash:
            log.info("resuming from %s (step %d), written under plan %s on %d workers: resharding onto plan %s on %d "
                     "workers", point.path, self.first_step, point.plan_hash, point.num_ranks, self.plan.hash,
                     self.world_size)
        elif point is not None:
            log.info("resuming from %s (step %d)", point.path, self.first_step)

    def path(self, *parts: str | Path) -> Path:
        """``out_dir / parts``, checked to resolve inside out_dir (orchestrator.outdir.contained)."""
        return self.folder.path(*parts)

    def resolve_plan(self) -> Plan:
        """The given plan, else the plan a resumed run used (``<out>/plan.json``), else a new one. Errors name where
        it came from: ``--plan PATH``, the saved file, or the job (a new plan is its cluster's)."""
        plan, source = self.plan, plan_option(self.options.plan_file)
        saved = self.out_dir / PLAN_FILE
        if plan is None and self.options.resume and saved.is_file():
            plan, source = load_plan(saved), str(saved)  # replanning could differ (solver time limits)
            try:
                check_plan_for_job(plan, self.job, source)
            except RunInputError as exc:  # e.g. the job's cluster changed: a new plan, the checkpoint reshards
                log.info("%s does not fit this job (%s); planning anew", saved, str(exc).split(": ", 1)[-1])
                plan = None
        given = plan is not None  # with --plan, or the resumed run's
        if not given:
            source = f"job '{self.job.name}'"
            self.check_local_cluster(self.job.cluster, source)  # before planning (seconds): it plans for this cluster
            from planner.accumhint import micro_batch_hint
            from planner.api import make_cost_model, plan_job
            from planner.generation import as_run

            log.info("planning %s%s ...", self.job.name, f" with {self.options.costs}" if self.options.costs else "")
            cost_model = make_cost_model(self.job, self.options.costs)
            with as_run(cost_model):  # generate and sample uses at the layouts the runtime runs them at
                outcome = plan_job(self.job, cost_model, with_baselines=False, progress=log.debug)
                hint = micro_batch_hint(self.job, outcome.plan, outcome.placed, cost_model)
            plan = outcome.plan
            if hint is not None:
                log.info(hint.line())
        check_plan_for_job(plan, self.job, source)
        if given:
            self.check_local_cluster(plan.cluster, source)  # its cluster may not be the job's
        return plan

    def check_local_cluster(self, cluster: ClusterSpec | PlanCluster, source: str) -> None:
        """Without --address the workers run on this machine: CPU devices, no more workers than it can start
        (runtime.checks.check_local_workers) and, on the embedded cluster (one Ray node), one node; ``cluster`` is
        the plan's, or the job's that a new plan is made for (so the job is refused before planning)."""
        if not self.options.address:
            from runtime.checks import check_local_workers

            check_cpu_device(cluster.device, f"{source}: cluster.device")
            check_local_workers(cluster, source)
            if not caller_owns_ray():
                check_embedded_nodes(cluster, source)

    # ------------------------------------------------------------------ phase 2: processes

    def start_metrics(self) -> None:
        tasks = [t.name for t in self.job.tasks]
        self.predicted_waves = predicted_wave_seconds(self.plan, self.job.training.grad_accum_steps)
        self.metrics = RunMetrics(tasks, self.plan.predicted.iteration_time_s, self.predicted_waves)
        if self.options.metrics_port:
            try:
                self.metrics_port = self.metrics.serve(self.options.metrics_port)
            except OSError as exc:
                raise RunInputError(
                    f"--metrics-port ({self.options.metrics_port}): cannot serve metrics on 127.0.0.1 "
                    f"({exc.strerror or exc}). Pick a free port, or 0 to turn metrics off."
                ) from None
        if self.options.resume:
            self.metrics.restarts.inc()

    def start_cluster(self) -> None:
        """Join ``--address``, or use the Ray session this process already has, or start an embedded cluster."""
        from orchestrator.actors import EmbeddedRay, join_cluster

        if self.options.address:
            self.joined = True
            join_cluster(self.options.address)
            self._check_cluster(f"--address ({self.options.address})")
        elif caller_owns_ray():  # a notebook's or a test fixture's session
            log.info("using this process's Ray session")
            self._check_cluster("this process's Ray session")
        else:  # check_local_cluster refused a plan of several nodes
            cores = os.cpu_count() or 1
            if self.world_size > cores:
                log.warning("%d workers share this machine's %d CPU cores: each computes at about %.0f%% of the core "
                            "the plan assumes, so steps will take longer than predicted. Plan for %d devices, or "
                            "`loom profile` the job here.", self.world_size, cores, 100 * cores / self.world_size, cores)
            self.embedded = EmbeddedRay(self.world_size).start()

    def _check_cluster(self, where: str) -> None:
        """The cluster's alive nodes can hold the plan's nodes (:func:`orchestrator.placement.placement_mismatch`),
        and whether the workers take a GPU each: a GPU job does when enough nodes have a GPU per worker (NCCL between
        them); otherwise it trains on CPUs (with a warning), as it would on this machine."""
        import ray

        nodes = nodes_from_ray(ray.nodes())
        cluster = self.plan.cluster
        if self.job.cluster.device.lower() != "cpu":
            on_gpus = RankPlacement(cluster.num_nodes, cluster.devices_per_node, gpus_per_rank=1)
            self.gpus_per_worker = 1 if len(fitting_nodes(nodes, on_gpus)) >= cluster.num_nodes else 0
            if not self.gpus_per_worker:
                log.warning("cluster.device is %s but %s lacks %d nodes with %d GPUs each: the workers compute on "
                            "CPU with gloo", self.job.cluster.device, where, cluster.num_nodes,
                            cluster.devices_per_node)
        problem = placement_mismatch(self.placement(), nodes, where)
        if problem:
            raise RunInputError(problem)

    def placement(self) -> RankPlacement:
        """Which Ray node bundle each rank takes, from the plan's cluster."""
        cluster = self.plan.cluster
        return RankPlacement(cluster.num_nodes, cluster.devices_per_node, gpus_per_rank=self.gpus_per_worker)

    def create_workers(self) -> None:
        """Reserve the plan's nodes, then one actor per device on its plan node's Ray node (with a GPU each when the
        cluster has them for a GPU job), joined in one gloo or NCCL group; each worker builds its modules from its payload
        (runtime.payload: its Assignment and the specs it builds, not the whole job)."""
        from orchestrator.actors import create_actors, free_port, reserve_nodes
        from runtime.prepare import build_payloads

        placement = self.placement()
        self.placement_group = reserve_nodes(placement, self.options.placement_timeout_s)
        if self.placement_group is None:
            raise RunInputError(
                f"the cluster did not reserve {placement.describe()} (each plan node on a Ray node of its own) within "
                f"{self.options.placement_timeout_s:g} s: its nodes are big enough but busy. Free CPUs"
                f"{' and GPUs' if placement.gpus_per_rank else ''} on them (`ray status`), or plan for fewer devices."
            )
        payloads = [p.to_json() for p in build_payloads(self.job, self.plan)]  # what each rank receives
        self.actors = create_actors(payloads, placement, self.placement_group)
        start = time.perf_counter()
        try:
            self.worker_nodes = self.gather(lambda a, r: a.node_id.remote(), STARTING,
                                            timeout=self.options.setup_timeout_s)
            self._check_worker_nodes(placement)
            if self.embedded is not None:  # every actor is on this machine
                host, port = "127.0.0.1", free_port()
            else:  # the actors may be on other nodes: rendezvous at rank 0's node
                host, port = gather_one(self.actors[0].endpoint.remote(), 0, STARTING)
            self.worker_pids = self.gather(
                lambda a, r: a.setup.remote(host, port, self.actors, self.options.object_store_from_bytes), STARTING,
                timeout=self.options.setup_timeout_s)
        except GatherTimeout:
            raise RunFailed(
                f"the {self.world_size} workers did not start within {self.options.setup_timeout_s:g} s, though their "
                "CPUs were reserved; the nodes may be overloaded."
            ) from None
        log.info("%d workers ready in %.1f s (rendezvous %s:%d)", self.world_size,
                 time.perf_counter() - start, host, port)

    def _check_worker_nodes(self, placement: RankPlacement) -> None:
        """The placement group's promise, checked where the actors say they run (our invariant, not user input)."""
        problem = misplaced_ranks(placement, self.worker_nodes)
        if problem:
            raise RunFailed(f"the workers are not where the plan puts them: {problem}")
        level = logging.INFO if placement.num_nodes > 1 else logging.DEBUG  # one node: nothing to tell
        for node in range(placement.num_nodes):
            ranks = range(node * placement.devices_per_node, (node + 1) * placement.devices_per_node)
            log.log(level, "plan node %d: ranks %d-%d on Ray node %s", node, ranks[0], ranks[-1],
                    self.worker_nodes[ranks[0]])

    def restore(self) -> None:
        """Every rank reads what it holds from the resume point (any plan of this job: runtime.portable)."""
        import ray

        point = self.resume_point
        if point is None:
            return
        directory = str(self.path(step_dir(Path(), point.step)))
        index = ray.put(tensor_index(point) if point.format == PORTABLE else {})
        self.gather(lambda a, r: a.load.remote(directory, index, point.format), RESTORING)

    # ------------------------------------------------------------------ phase 3: steps

    def train(self) -> None:
        """Steps ``first_step .. num_steps - 1``, each logged; checkpoints on schedule and at the end. A stop signal
        (orchestrator.signals) ends the loop after the steps in flight, with a final checkpoint when checkpointing
        is on, by raising RunStopped."""
        batch = {t.name: t.batch_size for t in self.job.tasks}
        tokens = tokens_per_sample(self.job)
        self.step_log = StepLog(self.path(STEP_LOG_FILE), self.first_step)
        self.reporter.start(self.first_step, self.num_steps)
        self.stop.graceful = True
        try:
            step, fresh = self.first_step, True
            while step < self.num_steps:
                try:
                    step += self.train_one(step, fresh, batch, tokens)
                    fresh = False
                except RunFailed as failure:
                    if self.stop.requested is not None:  # the signal reached the workers too
                        raise RunStopped(self.stop.requested, "") from None
                    step, fresh = self.recover(failure), True
        finally:
            self.stop.graceful = False
            self.reporter.close()

    def train_one(self, step: int, fresh: bool, batch: dict[str, int], tokens: dict[str, int]) -> int:
        """The call of steps from ``step`` (``fresh``: the first since the workers started), each logged, then a
        checkpoint when one is due; RunStopped after it when a signal came. Returns the number of steps run."""
        records = self.run_step(step, fresh, batch, tokens)
        for record in records:
            self.records.append(record)
            self.step_log.write(record)
            self.metrics.record_step(record, batch, tokens)
            self.reporter.step(record)
        done = step + len(records)
        stopping = self.stop.requested is not None
        if stopping and self.ahead is not None:  # the next call runs already: the run stops (and saves) after it
            return len(records)
        if self.checkpoint_every and (done % self.checkpoint_every == 0 or done == self.num_steps or stopping):
            self.save_checkpoint(done)
        if stopping:
            raise RunStopped(self.stop.requested, "")
        return len(records)

    def call_size(self, step: int, fresh: bool) -> int:
        """How many steps the call from ``step`` runs: one for the first step after the workers start (its warm-up
        is its own), else as many as the plan predicts in ``options.call_seconds`` (CALL_SECONDS), at most
        MAX_STEPS_PER_CALL; never past a checkpoint (the actors' ``save`` must see that step's weights) or the end."""
        predicted = self.plan.predicted.iteration_time_s
        count = 1 if fresh or predicted <= 0 else int(self.options.call_seconds / predicted)
        end = self.num_steps
        if self.checkpoint_every:
            end = min(end, (step // self.checkpoint_every + 1) * self.checkpoint_every)
        return max(1, min(count, MAX_STEPS_PER_CALL, end - step))

    def run_step(self, step: int, fresh: bool, batch: dict[str, int], tokens: dict[str, int]) -> list[StepRecord]:
        """The call of steps from ``step`` on every actor (sent now, or earlier as the call ahead), with the next call
        sent behind it when :meth:`may_send_ahead`; a record per step. The measured time of the call runs from when
        the actors could start it (its sending, or the previous call's results for a call sent ahead) to its
        results: the period of the steps, as the plan predicts it, without Ray's round trip when the call was sent
        ahead; each step gets the share of it its slowest rank spent in the step."""
        timeout = self.job.training.step_timeout_s
        if self.ahead is not None and self.ahead[0] == step:
            (_, count, refs), start = self.ahead, self.step_end
        else:
            count = self.call_size(step, fresh)
            refs, start = [a.train_steps.remote(step, count) for a in self.actors], time.perf_counter()
        last = step + count - 1
        self.ahead = None
        if self.may_send_ahead(last):
            following = self.call_size(last + 1, False)
            self.ahead = (last + 1, following, [a.train_steps.remote(last + 1, following, last) for a in self.actors])
        what = f"step {step}" if count == 1 else f"steps {step}-{last}"
        try:
            results = collect(refs, f"at {what}", timeout=timeout,
                              go_on=StepsAdvance(self.actors, step) if count > 1 else None)
        except GatherTimeout as exc:
            raise watchdog_failure(self.actors, what, timeout, exc.pending, last) from None
        self.step_end = time.perf_counter()
        shares = call_shares(self.step_end - start, results)
        return [self.step_record(step + i, [r[i] for r in results], shares[i], batch, tokens) for i in range(count)]

    def step_record(self, step: int, results: list[dict], seconds: float, batch: dict[str, int],
                    tokens: dict[str, int]) -> StepRecord:
        """Step ``step``'s record from every rank's result of it, ``seconds`` its measured time."""
        losses = results[0]["losses"]  # identical on every rank (all-reduced)
        timings = [r.get("timing") for r in results]
        waves, parts = step_breakdown(timings)
        self.trace.record(step, timings)
        return StepRecord(
            step=step, loss=losses, step_seconds=seconds,
            samples_per_s={t: batch[t] / seconds for t in losses},
            tokens_per_s={t: batch[t] * tokens[t] / seconds for t in losses},
            predicted_iteration_s=self.plan.predicted.iteration_time_s,
            worker_seconds=[r["seconds"] for r in results],
            wave_seconds=waves, predicted_wave_seconds=self.predicted_waves, part_seconds=parts,
        )

    def may_send_ahead(self, step: int) -> bool:
        """Whether the call after the one ending at step ``step`` goes to the actors before its results are back:
        when it holds steps of this run, no checkpoint is due after ``step`` (the actors' ``save`` must see
        ``step``'s weights) and no stop signal came (the run stops after the steps in flight)."""
        done = step + 1
        due = self.checkpoint_every and done % self.checkpoint_every == 0
        return self.options.send_ahead and done < self.num_steps and not due and self.stop.requested is None

    def save_checkpoint(self, done: int) -> None:
        """Every rank writes its file, then the driver writes the manifest and marks ``step_<done>`` complete; only
        then are older checkpoints (``keep_last``) and an earlier run moved aside (``overwrite``) deleted."""
        relative = step_dir(Path(), done)
        files = [str(self.path(rank_file(relative, r))) for r in range(self.world_size)]
        directory = begin_checkpoint(self.out_dir, done)
        timeout = self.job.training.step_timeout_s  # a worker that hangs while saving is as lost
        try:
            index = self.gather(lambda a, r: a.save.remote(files[r]), f"while writing checkpoint {done}", timeout)
        except GatherTimeout as exc:
            raise watchdog_failure(self.actors, f"checkpoint {done}", timeout, exc.pending) from None
        info = mark_complete(directory, done, self.plan.hash, self.world_size, self.job.name, index)
        self.checkpoints.append(info)
        self.metrics.checkpoints.inc()
        log.info("checkpoint %s", directory)
        if self.options.keep_last:
            for old in remove_older_checkpoints(self.out_dir, done, self.options.keep_last):
                log.debug("removed %s (--keep-last %d)", old, self.options.keep_last)
        self.folder.drop_previous()

    def stopped_message(self, signum: int) -> str:
        """One line for a run stopped by a signal: how far it got and what to resume from."""
        done = self.first_step + len(self.records)
        where = f"after step {done} of {self.num_steps}" if self.records else "before training"
        latest = self.checkpoints[-1] if self.checkpoints else self.resume_point
        if latest is None:
            return f"stopped by {signal_name(signum)} {where}; no checkpoint to resume from (--checkpoint-every)"
        return (f"stopped by {signal_name(signum)} {where}; continue from checkpoint {latest.path} (step "
                f"{latest.step}) with --resume")

    # ------------------------------------------------------------------ remote calls

    def gather(self, call, what: str, timeout: float | None = None) -> list:
        """``call(actor, rank)`` on every actor, results in rank order (orchestrator.remote.gather: fails fast)."""
        return gather(self.actors, call, what, timeout)

    # ------------------------------------------------------------------ phase 4: cleanup

    def stop_workers(self) -> None:
        """Kill the actors and free their reserved nodes (shutdown, and before a restart)."""
        from orchestrator.actors import end_processes, kill_actors, release_nodes

        self.ahead = None  # a call sent ahead dies with the actors
        if self.actors:
            kill_actors(self.actors)
            self.actors = []
        if self.worker_pids:  # the run's own actor processes on this node: one Ray cannot reach (SIGSTOP) ends too
            import ray

            here = ray.get_runtime_context().get_node_id()
            end_processes([pid for pid, node in zip(self.worker_pids, self.worker_nodes) if node == here])
        self.worker_pids = []
        if self.placement_group is not None:
            release_nodes(self.placement_group)
            self.placement_group = None

    def shutdown(self) -> None:
        """Kill the actors, stop Ray if this run started or joined it, stop the metrics server, keep the logs (once
        out_dir is claimed), release out_dir's lock. A stop signal meanwhile is only recorded: cleanup finishes."""
        self.stop.shielded = True
        if self.step_log is not None:
            self.step_log.close()
        self.stop_workers()
        if self.embedded is not None:
            self.embedded.stop(keep_logs_in=self.path(LOGS_DIR) if self.folder.claimed else None)
            self.embedded = None
        elif self.joined:
            import ray

            ray.shutdown()  # disconnects this driver; the cluster keeps running
        if self.metrics is not None:
            self.metrics.close()
        self.folder.release()
        self.stop.shielded = False

