"""The driver of ``loom run``: train a job's plan on Ray actors, with metrics, checkpoints and resume.

Entry point :func:`run_job`. A run is a sequence of named phases (:class:`Driver`):

1. ``prepare``: check the job can run here (CPU cluster, supported losses), plan it or check the
   given plan belongs to it, settle the output directory and, for ``resume``, the checkpoint to
   continue from. Every problem found here is a user error (:class:`RunInputError`, exit 2).
2. ``start_metrics``, ``start_cluster`` (an embedded local Ray cluster with one logical CPU per
   worker; or ``ray.init(address=...)``; or the Ray session this process already has),
   ``create_workers`` (one actor per device of the plan, each plan node's ranks on a Ray node of
   their own through one placement group, joined in one gloo group), ``restore`` (every rank loads
   its checkpoint file). A cluster whose nodes cannot hold the plan's nodes is refused before any
   actor starts (:mod:`orchestrator.placement`).
3. ``train``: one collective ``train_step`` per step on every actor; each step is logged to
   ``metrics.jsonl``, the metrics and the progress reporter; every ``checkpoint_every`` steps the
   actors write their files and the driver writes the completion marker.
4. ``shutdown`` (always): kill the actors, stop the embedded cluster (keeping the workers' logs
   that hold output under ``<out>/logs``) or disconnect from ``--address``, stop the metrics server.

A worker that fails ends the run with :class:`RunFailed` (one line: which worker, which step,
what it raised; exit 1); the other actors are killed rather than left waiting in a collective.
Files written under ``<out>``: ``plan.json``, ``metrics.jsonl``, ``ckpt/step_<k>/``, ``logs/``, and at the end
``trace.json`` (the last steps' measured spans per rank) and ``trace-predicted.json`` (the plan's), Chrome traces
(orchestrator.trace).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orchestrator.checkpoint import (
    CheckpointInfo, begin_checkpoint, find_resume_point, mark_complete, rank_file, remove_checkpoints,
)
from orchestrator.metrics import (
    RunMetrics, StepLog, StepRecord, predicted_wave_seconds, step_breakdown, tokens_per_sample,
)
from orchestrator.placement import RankPlacement, fitting_nodes, misplaced_ranks, nodes_from_ray, placement_mismatch
from orchestrator.run_inputs import RunInputError, check_cpu_device, check_plan_for_job, check_runnable_job
from orchestrator.trace import TraceRecorder, write_run_traces
from planner.plan import Plan, load_plan
from planner.spec import JobSpec
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
STARTING = "while starting"  # what a worker was doing when setup failed: its job errors are user errors


class RunFailed(RuntimeError):
    """The run started but a worker (or the cluster) failed; the message is one line (exit code 1)."""


@dataclass(frozen=True)
class RunOptions:
    """How to run a job; ``None`` means the job spec's ``training`` value."""

    steps: int | None = None  # train until this many steps are done (a resumed run counts the earlier ones)
    out_dir: Path | None = None  # default out/<job name>
    metrics_port: int = 0  # 0: no Prometheus endpoint
    checkpoint_every: int | None = None  # 0: never
    resume: bool = False  # continue from the latest complete checkpoint in out_dir
    address: str | None = None  # join this Ray cluster instead of starting an embedded one
    costs: Path | None = None  # plan with this profiled cost file (`loom profile`) instead of the analytic model
    collect_parameters: bool = False  # return every rank's final parameters in RunResult (tests)
    object_store_from_bytes: int = OBJECT_STORE_FROM_BYTES  # CPU pieces this large and larger: object store (0: never)
    setup_timeout_s: float = SETUP_TIMEOUT_S
    placement_timeout_s: float = PLACEMENT_TIMEOUT_S  # wait this long for Ray to reserve the plan's nodes


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
    the workers reject when they build it), RunFailed when a worker or the cluster fails."""
    from orchestrator.metrics import default_reporter

    return Driver(job, plan, options, reporter or default_reporter()).run()


class Driver:
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
        self.joined = False  # True when this run connected to --address
        self.records: list[StepRecord] = []
        self.checkpoints: list[CheckpointInfo] = []
        self.trace = TraceRecorder()  # the last steps' spans, for trace.json

    @property
    def world_size(self) -> int:
        return self.plan.cluster.num_nodes * self.plan.cluster.devices_per_node

    def run(self) -> RunResult:
        self.prepare()
        if self.first_step >= self.num_steps:  # a resumed run that is already there: start nothing
            log.info("nothing to train: at step %d of %d", self.first_step, self.num_steps)
            return self.result(None)
        parameters = None
        try:
            self.start_metrics()
            self.start_cluster()
            self.create_workers()
            self.restore()
            self.train()
            write_run_traces(self.out_dir, self.plan, self.trace.steps)
            parameters = self.gather(lambda a, r: a.named_parameters.remote(), "while collecting parameters")
            save_model(self.out_dir / MODEL_FILE, parameters)  # the trained model, for `loom eval`
            for folder in export_pretrained(self.job, merge_parameters(parameters), self.out_dir / EXPORT_DIR):
                log.info("exported %s (loads with from_pretrained)", folder)
        finally:
            self.shutdown()
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
        """Check the job and options, settle the plan, the output directory and the first step."""
        check_runnable_job(self.job, self.options.address)
        if self.num_steps < 0 or self.checkpoint_every < 0:
            raise RunInputError("--steps and --checkpoint-every must be >= 0.")
        self.plan = self.resolve_plan()
        if self.options.resume:  # before plan.json is written: a refused resume leaves the directory as it was
            self.resume_point = find_resume_point(self.out_dir, self.plan.hash)
            self.first_step = self.resume_point.step
            log.info("resuming from %s (step %d)", self.resume_point.path, self.first_step)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            plan_path = self.out_dir / PLAN_FILE
            if not plan_path.is_file() or plan_path.read_text() != self.plan.to_json():
                self.plan.save(plan_path)
        except OSError as exc:
            raise RunInputError(f"--out ({self.out_dir}): cannot write there ({exc.strerror or exc}). "
                                "Check the path and permissions.") from None
        if not self.options.resume:
            removed = remove_checkpoints(self.out_dir)
            if removed:
                log.info("removed %d checkpoint(s) of an earlier run in %s", removed, self.out_dir)

    def resolve_plan(self) -> Plan:
        """The given plan, else the plan a resumed run used (``<out>/plan.json``), else a new one."""
        plan, source = self.plan, "--plan"
        saved = self.out_dir / PLAN_FILE
        if plan is None and self.options.resume and saved.is_file():
            plan, source = load_plan(saved), str(saved)  # replanning could differ (solver time limits)
        if plan is None:
            from planner.api import make_cost_model, plan_job

            log.info("planning %s%s ...", self.job.name, f" with {self.options.costs}" if self.options.costs else "")
            cost_model = make_cost_model(self.job, self.options.costs)
            plan = plan_job(self.job, cost_model, with_baselines=False, progress=log.debug).plan
        check_plan_for_job(plan, self.job, source)
        if not self.options.address:
            check_cpu_device(plan.cluster.device, f"{source}: cluster.device")
        return plan

    # ------------------------------------------------------------------ phase 2: processes

    def start_metrics(self) -> None:
        tasks = [t.name for t in self.job.tasks]
        self.metrics = RunMetrics(tasks, self.plan.predicted.iteration_time_s, predicted_wave_seconds(self.plan))
        if self.options.metrics_port:
            try:
                self.metrics_port = self.metrics.serve(self.options.metrics_port)
            except OSError as exc:
                raise RunInputError(
                    f"--metrics-port ({self.options.metrics_port}): cannot serve metrics on 127.0.0.1 "
                    f"({exc.strerror or exc}). Pick a free port, or 0 to turn metrics off."
                ) from None
        if self.resume_point is not None:
            self.metrics.restarts.inc()

    def start_cluster(self) -> None:
        """Join ``--address``, or use the Ray session this process already has, or start an embedded cluster."""
        import ray

        from orchestrator.actors import EmbeddedRay, join_cluster

        if self.options.address:
            self.joined = True
            join_cluster(self.options.address)
            self._check_cluster(f"--address ({self.options.address})")
        elif ray.is_initialized():  # the caller owns the session (a notebook, a test fixture)
            log.info("using this process's Ray session")
            self._check_cluster("this process's Ray session")
        else:
            self._check_embedded_nodes()
            cores = os.cpu_count() or 1
            if self.world_size > cores:
                log.warning("%d workers share this machine's %d CPU cores: each computes at about %.0f%% of the core "
                            "the plan assumes, so steps will take longer than predicted. Plan for %d devices, or "
                            "`loom profile` the job here.", self.world_size, cores, 100 * cores / self.world_size, cores)
            self.embedded = EmbeddedRay(self.world_size).start()

    def _check_embedded_nodes(self) -> None:
        """The embedded cluster is one Ray node (this machine): a plan for several nodes is refused rather than run
        with its nodes folded onto one, which would train but never test the placement the plan was made for."""
        cluster = self.plan.cluster
        if cluster.num_nodes > 1:
            raise RunInputError(
                f"cluster.num_nodes ({cluster.num_nodes}): the plan places its workers on {cluster.num_nodes} nodes, "
                f"but `loom run` without --address starts a one-node Ray cluster on this machine. Plan for "
                f"num_nodes: 1 and devices_per_node: {self.world_size} to train here, or join a cluster of "
                f"{cluster.num_nodes} nodes with --address."
            )

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
        cluster has them for a GPU job), joined in one gloo or NCCL group; the workers build their modules from the
        job."""
        import ray

        from orchestrator.actors import create_actors, free_port, reserve_nodes
        from planner.program import assignment

        placement = self.placement()
        self.placement_group = reserve_nodes(placement, self.options.placement_timeout_s)
        if self.placement_group is None:
            raise RunInputError(
                f"the cluster did not reserve {placement.describe()} (each plan node on a Ray node of its own) within "
                f"{self.options.placement_timeout_s:g} s: its nodes are big enough but busy. Free CPUs"
                f"{' and GPUs' if placement.gpus_per_rank else ''} on them (`ray status`), or plan for fewer devices."
            )
        assignments = [assignment(self.plan, rank).to_json() for rank in range(placement.world_size)]
        self.actors = create_actors(self.job.model_dump_json(), assignments, placement, self.placement_group)
        start = time.perf_counter()
        try:
            self.worker_nodes = self.gather(lambda a, r: a.node_id.remote(), STARTING,
                                            timeout=self.options.setup_timeout_s)
            self._check_worker_nodes(placement)
            if self.embedded is not None:  # every actor is on this machine
                host, port = "127.0.0.1", free_port()
            else:  # the actors may be on other nodes: rendezvous at rank 0's node
                host, port = self.gather_one(self.actors[0].endpoint.remote(), 0, STARTING)
            self.gather(lambda a, r: a.setup.remote(host, port, self.actors, self.options.object_store_from_bytes),
                        STARTING, timeout=self.options.setup_timeout_s)
        except ray.exceptions.GetTimeoutError:
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
        if self.resume_point is None:
            return
        directory = self.resume_point.path
        self.gather(lambda a, r: a.load.remote(str(rank_file(directory, r))), "while restoring the checkpoint")

    # ------------------------------------------------------------------ phase 3: steps

    def train(self) -> None:
        """Steps ``first_step .. num_steps - 1``, each logged; checkpoints on schedule and at the end."""
        batch = {t.name: t.batch_size for t in self.job.tasks}
        tokens = tokens_per_sample(self.job)
        self.step_log = StepLog(self.out_dir / STEP_LOG_FILE, self.first_step)
        self.reporter.start(self.first_step, self.num_steps)
        try:
            for step in range(self.first_step, self.num_steps):
                record = self.run_step(step, batch, tokens)
                self.records.append(record)
                self.step_log.write(record)
                self.metrics.record_step(record, batch, tokens)
                self.reporter.step(record)
                done = step + 1
                if self.checkpoint_every and (done % self.checkpoint_every == 0 or done == self.num_steps):
                    self.save_checkpoint(done)
        finally:
            self.reporter.close()

    def run_step(self, step: int, batch: dict[str, int], tokens: dict[str, int]) -> StepRecord:
        start = time.perf_counter()
        results = self.gather(lambda a, r: a.train_step.remote(step), f"at step {step}")
        seconds = time.perf_counter() - start
        losses = results[0]["losses"]  # identical on every rank (all-reduced)
        waves, parts = step_breakdown([r.get("timing") for r in results])
        self.trace.record(step, [r.get("timing") for r in results])
        return StepRecord(
            step=step, loss=losses, step_seconds=seconds,
            samples_per_s={t: batch[t] / seconds for t in losses},
            tokens_per_s={t: batch[t] * tokens[t] / seconds for t in losses},
            predicted_iteration_s=self.plan.predicted.iteration_time_s,
            worker_seconds=[r["seconds"] for r in results],
            wave_seconds=waves, predicted_wave_seconds=predicted_wave_seconds(self.plan), part_seconds=parts,
        )

    def save_checkpoint(self, done: int) -> None:
        """Every rank writes its file, then the driver marks ``step_<done>`` complete."""
        directory = begin_checkpoint(self.out_dir, done)
        self.gather(lambda a, r: a.save.remote(str(rank_file(directory, r))), f"while writing checkpoint {done}")
        info = mark_complete(directory, done, self.plan.hash, self.world_size, self.job.name)
        self.checkpoints.append(info)
        self.metrics.checkpoints.inc()
        log.info("checkpoint %s", directory)

    # ------------------------------------------------------------------ remote calls

    def gather(self, call, what: str, timeout: float | None = None) -> list:
        """Call ``call(actor, rank)`` on every actor; their results in rank order.

        Fails fast: the first worker error raises (RunFailed, or RunInputError when a worker rejects the
        job while building it) without waiting for the others, which may be stuck in a collective."""
        import ray

        refs = [call(a, r) for r, a in enumerate(self.actors)]
        rank_of = {ref: r for r, ref in enumerate(refs)}
        pending, deadline = list(refs), None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not done:
                raise ray.exceptions.GetTimeoutError(f"{what}: timed out")
            self.gather_one(done[0], rank_of[done[0]], what)
        return ray.get(refs)

    def gather_one(self, ref, rank: int, what: str) -> Any:
        """``ray.get(ref)``, turning a worker's failure into one readable line."""
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            log.debug("worker %d failed %s:\n%s", rank, what, exc)
            message = first_line(cause)
            if what == STARTING and isinstance(cause, (ValueError, NotImplementedError)):
                raise RunInputError(f"worker {rank} cannot run this job: {message}") from None
            raise RunFailed(f"worker {rank} failed {what}: {type(cause).__name__}: {message}") from None
        except ray.exceptions.RayActorError as exc:
            raise RunFailed(f"worker {rank} died {what}: {first_line(exc)}") from None

    # ------------------------------------------------------------------ phase 4: cleanup

    def shutdown(self) -> None:
        """Kill the actors, stop Ray if this run started or joined it, stop the metrics server; keep logs."""
        if self.step_log is not None:
            self.step_log.close()
        if self.actors:
            from orchestrator.actors import kill_actors

            kill_actors(self.actors)
            self.actors = []
        if self.placement_group is not None:
            from orchestrator.actors import release_nodes

            release_nodes(self.placement_group)
            self.placement_group = None
        if self.embedded is not None:
            self.embedded.stop(keep_logs_in=self.out_dir / LOGS_DIR)
            self.embedded = None
        elif self.joined:
            import ray

            ray.shutdown()  # disconnects this driver; the cluster keeps running
        if self.metrics is not None:
            self.metrics.close()


# --------------------------------------------------------------------------- helpers


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
