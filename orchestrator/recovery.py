"""Automatic recovery of a run: which failures a restart can cure, how many restarts are left, and the watchdog's line.

The driver (orchestrator.run) calls :func:`lost_workers` when a step, a checkpoint or a restore fails: a worker whose
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


def watchdog_failure(actors: list, what: str, timeout_s: float, pending: list[int]) -> WorkerLost:
    """The failure of a step (or checkpoint: ``what``) that ran past ``timeout_s``: which ranks had not finished and
    where each stopped (``WaveActor.progress``), one line."""
    import ray

    refs = {actors[rank].progress.remote(): rank for rank in pending}
    done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=PROGRESS_TIMEOUT_S)
    where = {}
    for ref in done:
        try:
            where[refs[ref]] = ray.get(ref)
        except ray.exceptions.RayError as exc:
            where[refs[ref]] = first_line(exc)
    parts = [f"rank {rank} {describe(where[rank]) if rank in where else 'does not answer'}" for rank in pending]
    return WorkerLost(f"{what} ran past training.step_timeout_s ({timeout_s:g} s): {'; '.join(parts)}")


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
