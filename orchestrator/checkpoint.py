"""Checkpoint directories of a run: layout, manifests, completion markers, retention, and finding the one to resume from.

Layout under a run's output directory::

    ckpt/step_<k>/rank_<r>.safetensors  one file per rank (written by that rank's actor: runtime.portable's layout,
                                        parameters and AdamW state under global names, independent of the plan)
    ckpt/step_<k>/MANIFEST.json   {"files": {"rank_<r>.safetensors": {"bytes", "sha256"}},
                                   "tensors": {key: {"file", "shape"}}}, written by the driver
    ckpt/step_<k>/COMPLETE        JSON {step, plan_hash, num_ranks, job, manifest_sha256, format}, written last

``step_<k>`` holds the state after ``k`` completed steps, so a resumed run starts at step ``k``
(the data of a step is a pure function of its index: the step counter is the whole data state).
The manifest's ``tensors`` index says which file holds each tensor (or slice of optimizer state), so a
worker of any plan of the same job reads only what it holds: resuming under another plan (another
device count) reshards on load. A checkpoint of the old per-rank pickle format (``rank_<r>.pt``, a
marker without ``format``) resumes on its own plan only.
A directory without ``COMPLETE`` (a run killed while saving) is never resumed from. Files are
written to a temporary name and renamed, so a marker never points at a half-written file.

The manifest is written before the marker and the marker records the manifest's own SHA-256, so a
complete checkpoint names the exact bytes of every rank file. :func:`find_resume_point` verifies
them and falls back to the newest complete checkpoint that is intact, with one warning line per
damaged one (a truncated or overwritten rank file, a missing or altered manifest). A checkpoint
written before manifests existed (its marker has no ``manifest_sha256``) is resumed unverified.

Owns no torch code: rank files are written by the actors (orchestrator.actors), which get their
path from :func:`rank_file`.
"""

from __future__ import annotations

import hashlib
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
MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_HASH_CHUNK = 1024**2
PORTABLE = "portable-1"  # runtime.portable's layout, in safetensors files
LEGACY = "torch-rank"  # the format before it: one torch.save pickle per rank, tied to its plan


class CheckpointError(LoomError):
    """A checkpoint cannot be resumed from (missing, damaged, or made for another plan)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint: the state after ``step`` steps of the plan with hash ``plan_hash``.

    ``manifest_sha256`` is None for a checkpoint written before manifests (nothing to verify against)."""

    path: Path
    step: int
    plan_hash: str
    num_ranks: int
    job: str
    manifest_sha256: str | None = None
    format: str = LEGACY

    def files(self) -> list[Path]:
        """Every rank file of this checkpoint, in rank order."""
        return [rank_file(self.path, r, self.format) for r in range(self.num_ranks)]


def checkpoint_root(out_dir: str | Path) -> Path:
    """Where a run keeps its checkpoints: ``<out_dir>/ckpt``."""
    return Path(out_dir) / CKPT_DIRNAME


def step_dir(out_dir: str | Path, step: int) -> Path:
    """The directory of the checkpoint taken after ``step`` completed steps."""
    return checkpoint_root(out_dir) / f"step_{step}"


def rank_file(directory: str | Path, rank: int, fmt: str = PORTABLE) -> Path:
    """The file rank ``rank`` writes in a checkpoint directory (``fmt``: the checkpoint's format)."""
    return Path(directory) / (f"rank_{rank}.safetensors" if fmt == PORTABLE else f"rank_{rank}.pt")


def step_dirs(out_dir: str | Path) -> dict[int, Path]:
    """Every ``step_<k>`` directory under ``<out_dir>/ckpt``, complete or not, by step."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return {}
    found = {}
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found[int(match.group(1))] = entry
    return found


def begin_checkpoint(out_dir: str | Path, step: int) -> Path:
    """Create (or reuse) ``step_<step>`` for writing: its old marker, if any, is removed first."""
    directory = step_dir(out_dir, step)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).unlink(missing_ok=True)
    return directory


def file_digest(path: Path) -> dict[str, int | str]:
    """``{"bytes": size, "sha256": hex digest}`` of one file, read in 1 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def mark_complete(directory: str | Path, step: int, plan_hash: str, num_ranks: int, job: str,
                  tensors: list[dict[str, list[int]]] | None = None) -> CheckpointInfo:
    """Write the manifest of every rank file, then the ``COMPLETE`` marker; an AssertionError if a rank file is
    missing (the actors' contract: every rank wrote its file before this is called). ``tensors``: per rank, the
    keys of its file with their shapes (merged into the manifest's ``tensors`` index; a key written twice is our
    bug)."""
    directory = Path(directory)
    missing = [r for r in range(num_ranks) if not rank_file(directory, r).is_file()]
    assert not missing, f"ranks {missing} did not write their checkpoint files in {directory}"
    files = {rank_file(directory, r).name: file_digest(rank_file(directory, r)) for r in range(num_ranks)}
    index: dict[str, dict] = {}
    for rank, keys in enumerate(tensors or []):
        for key, shape in keys.items():
            assert key not in index, f"{key} is written by {index[key]['file']} and rank {rank}"
            index[key] = {"file": rank_file(directory, rank).name, "shape": list(shape)}
    manifest = json.dumps({"files": files, "tensors": index}, sort_keys=True, indent=1) + "\n"
    write_atomically(directory / MANIFEST, manifest)
    manifest_sha256 = hashlib.sha256(manifest.encode()).hexdigest()
    body = {"step": step, "plan_hash": plan_hash, "num_ranks": num_ranks, "job": job,
            "manifest_sha256": manifest_sha256, "format": PORTABLE}
    write_atomically(directory / MARKER, json.dumps(body, sort_keys=True) + "\n")
    return CheckpointInfo(directory, step, plan_hash, num_ranks, job, manifest_sha256, PORTABLE)


def tensor_index(info: CheckpointInfo) -> dict[str, dict]:
    """The manifest's ``tensors`` index of a portable checkpoint (key -> {"file", "shape"})."""
    return json.loads((info.path / MANIFEST).read_text()).get("tensors", {})


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, flush it to disk, then rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_marker(directory: Path) -> CheckpointInfo | None:
    """The checkpoint in ``directory`` if it is complete (marker readable, every rank file present), else None.
    Its files' bytes are not checked here (:func:`damage`)."""
    try:
        body = json.loads((directory / MARKER).read_text())
        manifest_sha256 = body.get("manifest_sha256")
        info = CheckpointInfo(directory, int(body["step"]), str(body["plan_hash"]), int(body["num_ranks"]),
                              str(body.get("job", "")), None if manifest_sha256 is None else str(manifest_sha256),
                              str(body.get("format", LEGACY)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):  # not UTF-8, not JSON, too deep
        return None
    if any(not path.is_file() for path in info.files()):
        return None
    return info


def complete_checkpoints(out_dir: str | Path) -> list[CheckpointInfo]:
    """Every complete checkpoint under ``<out_dir>/ckpt`` (whose marker names its own step), newest first."""
    found = []
    for step, directory in step_dirs(out_dir).items():
        info = read_marker(directory)
        if info is not None and info.step == step:
            found.append(info)
    return sorted(found, key=lambda info: info.step, reverse=True)


def latest_complete(out_dir: str | Path) -> CheckpointInfo | None:
    """The complete checkpoint with the highest step under ``<out_dir>/ckpt``, or None when there is none."""
    found = complete_checkpoints(out_dir)
    return found[0] if found else None


def damage(info: CheckpointInfo) -> str | None:
    """What is wrong with a complete checkpoint's files (one phrase), or None when every rank file has the size and
    SHA-256 its manifest records and the manifest is the one the marker names (unverifiable old ones: None)."""
    if info.manifest_sha256 is None:
        return None
    try:
        data = (info.path / MANIFEST).read_bytes()
    except OSError as exc:
        return f"{MANIFEST} cannot be read ({exc.strerror or exc})"
    if hashlib.sha256(data).hexdigest() != info.manifest_sha256:
        return f"{MANIFEST} is not the one its {MARKER} marker names"
    try:
        files = json.loads(data.decode()).get("files", {})
    except (ValueError, AttributeError, RecursionError):  # not UTF-8, not JSON, not an object, too deep
        return f"{MANIFEST} is not a JSON object"
    for path in info.files():
        want = files.get(path.name)
        if want is None:
            return f"{MANIFEST} does not list {path.name}"
        try:
            have = file_digest(path)
        except OSError as exc:
            return f"{path.name} cannot be read ({exc.strerror or exc})"
        if have["bytes"] != want["bytes"]:
            return f"{path.name} has {have['bytes']} bytes, its manifest says {want['bytes']}"
        if have["sha256"] != want["sha256"]:
            return f"{path.name} does not match its manifest's SHA-256"
    return None


def find_resume_point(out_dir: str | Path, plan_hash: str) -> CheckpointInfo:
    """The checkpoint ``--resume`` continues from: the newest complete one whose files match their manifest.

    A damaged one is skipped with one warning line naming what is wrong. CheckpointError when none is left, or
    when it is an old per-rank pickle checkpoint of another plan. A portable checkpoint of another plan of the same
    job is returned: the workers reshard it on load (runtime.portable)."""
    skipped = []
    for info in complete_checkpoints(out_dir):
        problem = damage(info)
        if problem is not None:
            log.warning("checkpoint %s is damaged (%s); falling back to the previous complete checkpoint",
                        info.path, problem)
            skipped.append(info.path.name)
            continue
        if info.plan_hash != plan_hash and info.format != PORTABLE:
            raise CheckpointError(
                f"{info.path}: checkpoint was written for plan {info.plan_hash} in the old per-rank format, but this "
                f"run's plan is {plan_hash}; only portable checkpoints reshard. Pass the original plan with --plan, or "
                "start a new run in another --out directory."
            )
        return info
    damaged = f" (damaged: {', '.join(skipped)})" if skipped else ""
    raise CheckpointError(
        f"{checkpoint_root(out_dir)}: no complete checkpoint to resume from{damaged}. Run without --resume, or pass "
        "the --out directory of the run you want to continue."
    )


def check_job(info: CheckpointInfo, job: str) -> None:
    """CheckpointError when ``info`` was written by a job of another name (its parameters are checked on load)."""
    if info.job and info.job != job:
        raise CheckpointError(
            f"{info.path}: checkpoint was written by job '{info.job}', this run's job is '{job}'; a run resumes only "
            "its own job's checkpoints. Pass that job's spec, or start a new run in another --out directory."
        )


def remove_older_checkpoints(out_dir: str | Path, newest_step: int, keep_last: int) -> list[Path]:
    """Retention after checkpoint ``newest_step`` is complete: keep the ``keep_last`` newest complete checkpoints at
    or below it, delete the older complete ones and the unfinished directories older than those kept.

    Directories above ``newest_step`` (an abandoned later run, or damaged ones a resume skipped) are left alone.
    Returns the directories deleted."""
    assert keep_last >= 1, keep_last
    complete = [c.step for c in complete_checkpoints(out_dir) if c.step <= newest_step]
    assert newest_step in complete, f"step_{newest_step} is not complete: nothing may be deleted for it"
    if len(complete) <= keep_last:
        return []
    oldest_kept = complete[keep_last - 1]  # complete is newest first
    removed = []
    for step, directory in sorted(step_dirs(out_dir).items()):
        if step < oldest_kept:
            shutil.rmtree(directory)
            removed.append(directory)
    return removed
