"""Checkpoint directories of a run: layout, completion markers and finding the one to resume from.

Layout under a run's output directory::

    ckpt/step_<k>/rank_<r>.pt   one file per rank (written by that rank's actor: modules + AdamW state)
    ckpt/step_<k>/COMPLETE      JSON {step, plan_hash, num_ranks, job}, written last by the driver

``step_<k>`` holds the state after ``k`` completed steps, so a resumed run starts at step ``k``
(the data of a step is a pure function of its index: the step counter is the whole data state).
A directory without ``COMPLETE`` (a run killed while saving) is never resumed from. Files are
written to a temporary name and renamed, so a marker never points at a half-written file.

Owns no torch code: rank files are written by the actors (orchestrator.actors), which get their
path from :func:`rank_file`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from planner.errors import LoomError

log = logging.getLogger(__name__)

CKPT_DIRNAME = "ckpt"
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(LoomError):
    """A checkpoint cannot be resumed from (missing, or made for another plan)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint: the state after ``step`` steps of the plan with hash ``plan_hash``."""

    path: Path
    step: int
    plan_hash: str
    num_ranks: int
    job: str


def checkpoint_root(out_dir: str | Path) -> Path:
    """Where a run keeps its checkpoints: ``<out_dir>/ckpt``."""
    return Path(out_dir) / CKPT_DIRNAME


def step_dir(out_dir: str | Path, step: int) -> Path:
    """The directory of the checkpoint taken after ``step`` completed steps."""
    return checkpoint_root(out_dir) / f"step_{step}"


def rank_file(directory: str | Path, rank: int) -> Path:
    """The file rank ``rank`` writes in a checkpoint directory."""
    return Path(directory) / f"rank_{rank}.pt"


def begin_checkpoint(out_dir: str | Path, step: int) -> Path:
    """Create (or reuse) ``step_<step>`` for writing: its old marker, if any, is removed first."""
    directory = step_dir(out_dir, step)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).unlink(missing_ok=True)
    return directory


def mark_complete(directory: str | Path, step: int, plan_hash: str, num_ranks: int, job: str) -> CheckpointInfo:
    """Write the ``COMPLETE`` marker once every rank file is on disk; an AssertionError if one is missing."""
    directory = Path(directory)
    missing = [r for r in range(num_ranks) if not rank_file(directory, r).is_file()]
    assert not missing, f"ranks {missing} did not write their checkpoint files in {directory}"
    body = {"step": step, "plan_hash": plan_hash, "num_ranks": num_ranks, "job": job}
    write_atomically(directory / MARKER, json.dumps(body, sort_keys=True) + "\n")
    return CheckpointInfo(directory, step, plan_hash, num_ranks, job)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_marker(directory: Path) -> CheckpointInfo | None:
    """The checkpoint in ``directory`` if it is complete (marker readable, every rank file present), else None."""
    try:
        body = json.loads((directory / MARKER).read_text())
        info = CheckpointInfo(directory, int(body["step"]), str(body["plan_hash"]), int(body["num_ranks"]),
                              str(body.get("job", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(not rank_file(directory, r).is_file() for r in range(info.num_ranks)):
        return None
    return info


def latest_complete(out_dir: str | Path) -> CheckpointInfo | None:
    """The complete checkpoint with the highest step under ``<out_dir>/ckpt``, or None when there is none."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            info = read_marker(entry)
            if info is not None and info.step == int(match.group(1)):
                found.append(info)
    return max(found, key=lambda info: info.step, default=None)


def find_resume_point(out_dir: str | Path, plan_hash: str) -> CheckpointInfo:
    """The checkpoint ``--resume`` continues from; a CheckpointError when none exists or its plan differs."""
    info = latest_complete(out_dir)
    if info is None:
        raise CheckpointError(
            f"{checkpoint_root(out_dir)}: no complete checkpoint to resume from. Run without --resume, or pass the "
            "--out directory of the run you want to continue."
        )
    if info.plan_hash != plan_hash:
        raise CheckpointError(
            f"{info.path}: checkpoint was written for plan {info.plan_hash}, but this run's plan is {plan_hash}; "
            "a resumed run must use the same plan. Pass the original plan with --plan, or start a new run in "
            "another --out directory."
        )
    return info


def remove_checkpoints(out_dir: str | Path) -> int:
    """Delete every ``step_*`` directory under ``<out_dir>/ckpt`` (a fresh run's stale state); returns how many."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return 0
    removed = 0
    for entry in root.iterdir():
        if _STEP_DIR.match(entry.name) and entry.is_dir():
            shutil.rmtree(entry)
            removed += 1
    return removed
