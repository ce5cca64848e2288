"""The driver's calls to its worker actors: every rank at once, failing fast, each failure one line.

:func:`gather` calls a method on every actor and returns the results in rank order; the first worker error
raises :class:`RunFailed` (exit code 1), or a RunInputError when a worker rejects the job while it is being
built (``what`` is :data:`STARTING`), without waiting for the other actors, which may be stuck in a
collective. Used by :mod:`orchestrator.run`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from orchestrator.run_inputs import RunInputError

log = logging.getLogger(__name__)

STARTING = "while starting"  # what a worker was doing when setup failed: its job errors are user errors


class RunFailed(RuntimeError):
    """The run started but a worker (or the cluster) failed; the message is one line (exit code 1)."""


def gather(actors: list, call, what: str, timeout: float | None = None) -> list:
    """Call ``call(actor, rank)`` on every actor; their results in rank order (see the module docstring).
    ``timeout`` (seconds) ends the wait with Ray's GetTimeoutError."""
    import ray

    refs = [call(a, r) for r, a in enumerate(actors)]
    rank_of = {ref: r for r, ref in enumerate(refs)}
    pending, deadline = list(refs), None if timeout is None else time.monotonic() + timeout
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            raise ray.exceptions.GetTimeoutError(f"{what}: timed out")
        gather_one(done[0], rank_of[done[0]], what)
    return ray.get(refs)


def gather_one(ref, rank: int, what: str) -> Any:
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


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
