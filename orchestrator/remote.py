"""The driver's calls to its worker actors: every rank at once, failing fast, each failure one line.

:func:`gather` calls a method on every actor and returns the results in rank order (:func:`collect` waits for
calls made earlier); the first worker error raises :class:`RunFailed` (exit code 1; :class:`WorkerLost` when the
worker's process is gone), or a
RunInputError when a worker rejects the job while it is being built (``what`` is :data:`STARTING`) or the
checkpoint while restoring it (:data:`RESTORING`), without waiting for the other actors, which may be stuck
in a collective. A timeout raises :class:`GatherTimeout`, naming the ranks that had not answered. Used by
:mod:`orchestrator.run` and :mod:`orchestrator.recovery`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from orchestrator.run_inputs import RunInputError

log = logging.getLogger(__name__)

STEP_NOTE = "in step "  # a note a call of several steps adds to the error of the one that failed (note_step)
STARTING = "while starting"  # what a worker was doing when setup failed: its job errors are user errors
RESTORING = "while restoring the checkpoint"  # a checkpoint the workers refuse (another job's) is a user error


class RunFailed(RuntimeError):
    """The run started but a worker (or the cluster) failed; the message is one line (exit code 1)."""


class WorkerLost(RunFailed):
    """A worker's process died or hung (not an error its code raised): what a restart can recover from."""


class GatherTimeout(Exception):
    """A :func:`gather` that ran past its timeout; ``pending``: the ranks that had not answered."""

    def __init__(self, what: str, pending: list[int]):
        super().__init__(f"{what}: timed out waiting for ranks {pending}")
        self.pending = pending


def gather(actors: list, call, what: str, timeout: float | None = None) -> list:
    """Call ``call(actor, rank)`` on every actor; their results in rank order (see the module docstring).
    ``timeout`` (seconds) ends the wait with :class:`GatherTimeout`."""
    return collect([call(a, r) for r, a in enumerate(actors)], what, timeout)


def collect(refs: list, what: str, timeout: float | None = None,
            go_on: Callable[[list[int]], bool] | None = None) -> list:
    """The results of calls already made, one per rank (``refs[rank]``), as :func:`gather` waits for them; the
    ``timeout`` counts from now. When it runs out, ``go_on(ranks not done)`` may grant another ``timeout`` (a call
    of several steps whose ranks still advance: orchestrator.recovery.StepsAdvance)."""
    import ray

    rank_of = {ref: r for r, ref in enumerate(refs)}
    pending, deadline = list(refs), None if timeout is None else time.monotonic() + timeout
    results: list = [None] * len(refs)
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            waiting = sorted(rank_of[ref] for ref in pending)
            if go_on is not None and go_on(waiting):
                deadline = time.monotonic() + timeout
                continue
            raise GatherTimeout(what, waiting)
        results[rank_of[done[0]]] = gather_one(done[0], rank_of[done[0]], what)  # each result fetched once
    return results


def gather_one(ref, rank: int, what: str) -> Any:
    """``ray.get(ref)``, turning a worker's failure into one readable line."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        log.debug("worker %d failed %s:\n%s", rank, what, exc)
        message = first_line(cause)
        what = failed_step(cause, what)
        if what == STARTING and isinstance(cause, (ValueError, NotImplementedError)):
            raise RunInputError(f"worker {rank} cannot run this job: {message}") from None
        if what == RESTORING and isinstance(cause, ValueError):
            raise RunInputError(f"worker {rank} cannot resume: {message}") from None
        raise RunFailed(f"worker {rank} failed {what}: {type(cause).__name__}: {message}") from None
    except ray.exceptions.RayActorError as exc:
        raise WorkerLost(f"worker {rank} died {what}: {first_line(exc)}") from None


def note_step(exc: BaseException, step: int) -> None:
    """Say on ``exc`` which step of a call of several steps raised it (the driver's line names that step)."""
    exc.add_note(f"{STEP_NOTE}{step}")


def failed_step(cause: BaseException, what: str) -> str:
    """``at step N`` when ``cause`` carries :func:`note_step`'s note, else ``what`` (``at steps 4-9``)."""
    notes = [n for n in getattr(cause, "__notes__", ()) if isinstance(n, str) and n.startswith(STEP_NOTE)]
    return f"at step {notes[-1][len(STEP_NOTE):]}" if notes else what


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
