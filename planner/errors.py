"""User-facing error types of the planner.

Messages follow STYLE.md: ``<field path> (<value>) <what is wrong>; <expected>. <how to fix>.``
The CLI prints ``str(error)`` as one line and exits with code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LoomError(ValueError):
    """Base class of every error a user can fix by changing their input."""


class SpecError(LoomError):
    """A job spec (or cluster/cost file) is malformed."""


class PlanningError(LoomError):
    """The spec is well formed but no plan exists (e.g. a MetaOp cannot fit in device memory)."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most similar to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` when a close candidate exists, else a list of valid names."""
    candidates = sorted(candidates)
    match = closest(name, candidates)
    if match is not None:
        return f"did you mean '{match}'?"
    return "valid names: " + ", ".join(f"'{c}'" for c in candidates)
