"""Automatic recovery of a run: which failures a restart can cure, how many restarts are left, and the watchdog's line.

The driver (orchestrator.run's Driver, through its :class:`Recovering` phase) calls :func:`lost_workers` when a
step, a checkpoint or a restore fails: a worker whose
process died (Ray reports the actor dead) or that does not answer a cheap call within ``timeout_s`` is lost; the
actors run their calls in threads, so a live worker answers even while its step waits in a collective. A failure
with every worker alive is an error the workers' own code raised (a bug, bad data) that a restart would repeat.
:func:`decide` (pure) turns that into a :class:`RestartDecision`; :func:`watchdog_failure` names the ranks of a step
that ran past ``training.step_timeout_s`` and the wave each stopped in. :func:`shrunk_cluster` (pure) says, before a
restart on a joined cluster, whether a node is gone and which cluster to re-plan the job for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from orchestrator.checkpoint import CheckpointError, find_resume_point
from orchestrator.placement import ClusterNode, RankPlacement, fitting_nodes
from orchestrator.remote import RunFailed, WorkerLost, first_line
from planner.spec import ClusterSpec

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0  # a live actor answers node_id() within this even on a loaded machine
PROGRESS_TIMEOUT_S = 5.0  # how long the watchdog waits for the hung ranks to say where they are


@dataclass(frozen=True)
class RestartDecision:
    """What the driver does after a failure: ``restart`` (with ``reason``, one line), else re-raise the failure."""

    restart: bool
    reason: str


def decide(failure: str, lost: dict[int, str], restarts_done: int, max_restarts: int) -> RestartDecision:
    """Restart when a worker is lost (``lost``: rank -> what happened to it, may be empty) and restarts are left.

    ``failure`` is the failure's one line; a failure with no lost worker is not restarted (it would recur)."""
    if not lost:
        return RestartDecision(False, f"{failure} (every worker is alive: not restarted)")
    if restarts_done >= max_restarts:
        return RestartDecision(False, f"{failure}; no restart left (training.max_restarts: {max_restarts})")
    ranks = ", ".join(f"worker {r} {what}" for r, what in sorted(lost.items()) if r >= 0)  # < 0: no rank known
    return RestartDecision(True, f"restart {restarts_done + 1} of {max_restarts}" + (f" ({ranks})" if ranks else ""))


def lost_workers(actors: list, timeout_s: float = PROBE_TIMEOUT_S) -> dict[int, str]:
    """Rank -> 'died' or 'does not answer' for every actor that is gone or hung (see the module docstring)."""
    import ray

    refs = {actor.node_id.remote(): rank for rank, actor in enumerate(actors)}
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    lost = {refs[ref]: "does not answer" for ref in pending}
    for ref in done:
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError:
            lost[refs[ref]] = "died"
    return lost


def watchdog_failure(actors: list, what: str, timeout_s: float, pending: list[int],
                     step: int | None = None) -> WorkerLost:
    """The failure of a call (``what``: its steps, or a checkpoint) that ran past ``timeout_s``: which ranks had not
    finished and where each stopped (``WaveActor.progress``), one line. For a call ending at ``step``, also where
    each rank that finished it stopped in the call sent behind it (a rank that froze after the step's last
    collective leaves the others waiting there)."""
    asked = range(len(actors)) if step is not None else pending
    where = ask_progress(actors, asked)
    parts = [f"rank {rank} {describe(where[rank]) if rank in where else 'does not answer'}" for rank in pending]
    parts += [f"rank {rank} finished it and {describe(where[rank])}" for rank in asked
              if rank not in pending and isinstance(where.get(rank), dict) and where[rank]["step"] > step]
    return WorkerLost(f"{what} ran past training.step_timeout_s ({timeout_s:g} s): {'; '.join(parts)}")


def ask_progress(actors: list, ranks) -> dict[int, dict | str | None]:
    """Rank -> its ``WaveActor.progress`` answer (or the error's first line) for the ``ranks`` that answer within
    PROGRESS_TIMEOUT_S."""
    import ray

    refs = {actors[rank].progress.remote(): rank for rank in ranks}
    done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=PROGRESS_TIMEOUT_S)
    where = {}
    for ref in done:
        try:
            where[refs[ref]] = ray.get(ref)
        except ray.exceptions.RayError as exc:
            where[refs[ref]] = first_line(exc)
    return where


class StepsAdvance:
    """The step watchdog of a call of several steps (orchestrator.run): each time the call runs past
    ``training.step_timeout_s``, it may go on only if every rank it waits for has finished a step since the last
    look (its ``progress`` names a later step): each step, not the whole call, gets the timeout."""

    def __init__(self, actors: list, first: int):
        self.actors, self.first = actors, first
        self.seen: dict[int, int] = {}  # rank -> the step it was in at the last look

    def __call__(self, pending: list[int]) -> bool:
        where = ask_progress(self.actors, pending)
        now = {rank: where[rank]["step"] for rank in pending if isinstance(where.get(rank), dict)}
        moved = len(now) == len(pending) and all(now[r] > self.seen.get(r, self.first) for r in pending)
        self.seen.update(now)
        return moved


def describe(progress: dict | str | None) -> str:
    """'stopped in wave 2 (forward) of step 5' from ``WaveActor.progress``'s answer."""
    if not isinstance(progress, dict):
        return f"stopped before its first wave ({progress})" if progress else "stopped before its first wave"
    micro = f", micro-batch {progress['micro']}" if progress.get("micro") else ""
    if progress["wave"] < 0:
        return f"stopped in the {progress['phase']} of step {progress['step']}{micro}"
    return f"stopped in wave {progress['wave']} ({progress['phase']}) of step {progress['step']}{micro}"


def shrunk_cluster(job_cluster: ClusterSpec, placement: RankPlacement, nodes: list[ClusterNode]) -> ClusterSpec | None:
    """The job's cluster with as many nodes as ``nodes`` (the alive ones) can still hold, each with the plan's
    ``devices_per_node``, when that is fewer than ``placement`` needs; None when the plan still fits. RunFailed when no
    node is left that can hold one plan node."""
    fit = fitting_nodes(nodes, placement)
    if len(fit) >= placement.num_nodes:
        return None
    if not fit:
        raise RunFailed(f"no node of the cluster can hold {placement.devices_per_node} workers any more "
                        f"({len(nodes)} alive); the run cannot restart.")
    return job_cluster.model_copy(update={"num_nodes": len(fit)})


class Recovering:
    """The driver's recovery phase (a part of ``orchestrator.run.Driver``, kept here with its policy): ``recover``
    after a failure, ``fit_plan_to_cluster`` before the new workers start."""

    def recover(self, failure: RunFailed) -> int:
        """After ``failure`` in a step or checkpoint: restart the workers and restore the last complete checkpoint when
        a worker is lost and restarts are left (decide), else re-raise. Returns the step to
        continue from."""
        from orchestrator.metrics import StepLog
        from orchestrator.run import STEP_LOG_FILE

        # a dead or hung worker names itself; any other failure: lost only if a probe finds a worker dead or mute
        lost = {-1: "lost"} if isinstance(failure, WorkerLost) else lost_workers(self.actors)
        decision = decide(str(failure), lost, self.restarts, self.job.training.max_restarts)
        if not decision.restart:
            raise failure if not lost or not self.job.training.max_restarts else RunFailed(decision.reason)
        self.restarts += 1
        self.metrics.restarts.inc()
        try:
            self.resume_point = find_resume_point(self.out_dir, self.plan.hash)
        except CheckpointError:
            self.resume_point = None  # no checkpoint yet: the workers start from the job's seed again
        step = self.resume_point.step if self.resume_point else 0
        log.warning("%s; %s; resuming from %s", failure, decision.reason,
                    self.resume_point.path if self.resume_point else "step 0 (no checkpoint yet)")
        self.stop_workers()
        if self.embedded is None:  # a joined cluster may have lost a node (the embedded one is this machine)
            self.fit_plan_to_cluster()
        try:
            self.create_workers()
            self.restore()
        except WorkerLost as again:  # lost once more while starting: another restart, if one is left
            return self.recover(again)
        self.records = [r for r in self.records if r.step < step]
        self.step_log.close()
        self.step_log = StepLog(self.path(STEP_LOG_FILE), step)
        return step

    def fit_plan_to_cluster(self) -> None:
        """Before a restart: when the cluster's alive nodes can no longer hold the plan's (a node is gone), re-plan the
        job for the nodes left (:func:`shrunk_cluster`); the checkpoint reshards onto the new plan."""
        import ray

        from orchestrator.placement import nodes_from_ray
        from orchestrator.run import PLAN_FILE
        from planner.api import make_cost_model, plan_job
        from planner.generation import as_run

        cluster = shrunk_cluster(self.job.cluster, self.placement(), nodes_from_ray(ray.nodes()))
        if cluster is None:
            return
        before = self.world_size
        self.job = self.job.model_copy(update={"cluster": cluster})
        cost_model = make_cost_model(self.job, self.options.costs)
        with as_run(cost_model):  # as Driver.resolve_plan plans: what the runtime runs
            self.plan = plan_job(self.job, cost_model, with_baselines=False, progress=log.debug).plan
        self.plan.save(self.path(PLAN_FILE))
        log.warning("the cluster holds %d node(s) of %d workers each now: re-planned for %d devices instead of %d "
                    "(plan %s)", cluster.num_nodes, cluster.devices_per_node, self.world_size, before, self.plan.hash)
