"""A run's output folder (``--out``): its exclusive lock, paths kept inside it, and what an earlier run left there.

- :class:`OutDirLock`: ``fcntl.flock`` on ``<out>/.loom-run.lock``, held by one ``loom run`` for its whole
  life and released when it ends (the kernel releases it too when the process dies, so a crashed run never
  leaves a stale lock). The holder writes its pid, host and start time into the file for the refusal message.
- :func:`contained`: every path the run writes is resolved (symlinks followed) and must lie under ``--out``.
- :func:`check_fresh_run` and :func:`move_aside`: a fresh run into a folder with checkpoints is refused unless
  ``--overwrite``, which moves the earlier run into ``<out>/previous-<UTC time>/``; the driver deletes that
  folder only once the new run has a complete checkpoint of its own (or finished, when it writes none).

Entry point :class:`RunFolder` (one run's folder: checks, then claim), used by :mod:`orchestrator.run`; nothing
here touches Ray or torch.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.checkpoint import CheckpointInfo, find_resume_point, step_dirs
from orchestrator.run_inputs import RunInputError

log = logging.getLogger(__name__)

LOCK_FILE = ".loom-run.lock"
PREVIOUS_PREFIX = "previous-"


class RunFolder:
    """One run's output folder. :meth:`check` and :meth:`find_resume_point` only read (a refused run leaves the
    folder byte-identical); :meth:`claim` makes the run's first writes, after every other check; :meth:`release` at
    the end."""

    def __init__(self, out_dir: Path, *, resume: bool, overwrite: bool, outputs: tuple[str, ...]):
        self.out_dir, self.resume, self.overwrite = Path(out_dir), resume, overwrite
        self.outputs = outputs  # the names the run writes at the top of the folder
        self.lock = OutDirLock(self.out_dir)
        self.claimed = False  # True once the run has written here
        self.previous: Path | None = None  # the earlier run moved aside by --overwrite, until it may be deleted
        self.resume_point: CheckpointInfo | None = None  # what check found

    def path(self, *parts: str | Path) -> Path:
        """``out_dir / parts``, checked to resolve inside the folder (:func:`contained`)."""
        return contained(self.out_dir, *parts)

    def check(self) -> None:
        """Read-only, before planning: the lock (taken when the folder has a lock file; a RunInputError when another
        run holds it), the output names and the checkpoint folders resolving inside the folder, and for a fresh run
        the refusal of an earlier run's checkpoints without ``overwrite``."""
        if self.resume and self.overwrite:
            raise RunInputError("--resume continues the run in --out, --overwrite replaces it: pass one of them.")
        check_out_dir(self.out_dir)
        if self.out_dir.is_dir():
            self.lock.acquire(create=False)
        for name in self.outputs:
            self.path(name)
        for directory in step_dirs(self.out_dir).values():  # a resume reads them, retention deletes them
            self.path(directory.relative_to(self.out_dir))
        if not self.resume:
            check_fresh_run(self.out_dir, self.overwrite)

    def find_resume_point(self, plan_hash: str) -> CheckpointInfo | None:
        """Read-only: for a resume, the checkpoint it continues from (orchestrator.checkpoint.find_resume_point:
        the newest intact one; a CheckpointError when there is none or it is another plan's); else None."""
        self.resume_point = find_resume_point(self.out_dir, plan_hash) if self.resume else None
        return self.resume_point

    def claim(self, plan_hash: str) -> CheckpointInfo | None:
        """The run's first writes: create the folder, take the lock (checking again under it when the folder had no
        lock file: another run may have written since), record this process in the lock file, move the earlier run
        aside for ``overwrite``. Returns the resume point, as :meth:`find_resume_point`."""
        def recheck() -> None:
            self.check()
            self.find_resume_point(plan_hash)

        self.previous = claim_folder(self.out_dir, self.lock, self.overwrite, recheck, "has a checkpoint")
        self.claimed = True
        return self.resume_point

    def drop_previous(self) -> None:
        """Delete the earlier run moved aside: call once the new run has a complete checkpoint, or has finished."""
        if self.previous is not None:
            shutil.rmtree(self.previous)
            log.info("deleted the earlier run moved aside to %s", self.previous)
            self.previous = None

    def release(self) -> None:
        self.lock.release()


def claim_folder(out_dir: Path, lock: OutDirLock, overwrite: bool, recheck: Callable[[], None],
                 deleted_when: str) -> Path | None:
    """A run's first writes into ``out_dir``: create it, take ``lock`` (calling ``recheck`` under it when the folder
    had no lock file: another run may have written since the read-only checks), record this process in the lock
    file, and for ``overwrite`` move the earlier run aside (:func:`move_aside`; returned, None without one;
    ``deleted_when`` says when the caller deletes it). A RunInputError when the folder cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not lock.held:
            lock.acquire(create=True)
            recheck()
        lock.write_holder()
        previous = move_aside(out_dir) if overwrite else None
        if previous is not None:
            log.info("moved the earlier run in %s aside to %s (deleted once this run %s)", out_dir, previous,
                     deleted_when)
        return previous
    except OSError as exc:
        raise RunInputError(f"--out ({out_dir}): cannot write there ({exc.strerror or exc}). "
                            "Check the path and permissions.") from None


def check_out_dir(out_dir: Path) -> None:
    """A RunInputError unless ``out_dir`` is a folder, or none yet, that this process can write in or create
    (:func:`check_writable`): read-only, before anything else of a run is checked."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunInputError(f"--out ({out_dir}) is a file; give a directory.")
    check_writable(out_dir)


def check_writable(out_dir: Path) -> None:
    """A RunInputError unless ``out_dir`` is a folder this process can write in or can create: its nearest existing
    ancestor must be such a folder. Proved by making and removing an empty temporary folder there (permission bits
    do not tell: root passes them on /sys, which refuses new files), so a refused run leaves nothing behind."""
    existing = next(path for path in (out_dir, *out_dir.parents) if path.exists() or path == Path())
    if not existing.is_dir():
        raise RunInputError(f"--out ({out_dir}): {existing} is a file, so the folder cannot be created. Give a path "
                            "under a directory.")
    where = "there" if existing == out_dir else f"in {existing}, where it would be created"
    try:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        tempfile.TemporaryDirectory(dir=existing, prefix=".loom-check-").cleanup()
    except OSError as exc:
        raise RunInputError(f"--out ({out_dir}): cannot write {where} ({exc.strerror or exc}). Check the path and "
                            "permissions, or pick another --out.") from None


def contained(out_dir: Path, *parts: str | Path) -> Path:
    """``out_dir / parts``, after checking that it resolves (symlinks followed) to a path under ``out_dir``'s own
    resolved path; a RunInputError naming both otherwise. Returns the unresolved path (as the user named it)."""
    path = Path(out_dir).joinpath(*parts)
    root, resolved = Path(out_dir).resolve(), path.resolve()
    if resolved != root and root not in resolved.parents:
        raise RunInputError(
            f"{path}: resolves to {resolved}, outside --out ({root}); a run writes only inside its output folder. "
            "Remove the symbolic link or pick another --out."
        )
    return path


class OutDirLock:
    """The exclusive lock of one output folder (see the module docstring); ``release`` is safe to call twice."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, create: bool) -> bool:
        """Take the lock; True when held. Without ``create`` a folder with no lock file is left as it is (False):
        the caller checks first and takes it with ``create`` once it is going to write. A RunInputError, naming
        the holder, when another process holds it."""
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and not create:
                return False
            if not self.out_dir.is_dir():
                raise RunInputError(f"--out ({self.out_dir}): the folder does not exist; it could not be created.") \
                    from None
            raise RunInputError(f"--out ({self.out_dir}): cannot open its lock file {self.path} "
                                f"({exc.strerror or exc}). Check the path and permissions.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunInputError(
                f"--out ({self.out_dir}) is in use by another `loom run` ({holder}); two runs never share an output "
                "folder. Wait for it to end (or `loom stop` it), or pass another --out."
            ) from None
        self._fd = fd
        return True

    def write_holder(self) -> None:
        """Record this process as the holder (pid, host, start time) in the lock file; the lock must be held."""
        assert self._fd is not None, "write_holder without the lock"
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode() + b"\n", 0)

    def release(self) -> None:
        """Unlock and close. The file stays: removing it would let a process that opened it before the removal
        hold a lock on a file no one else sees."""
        if self._fd is None:
            return
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> str:
    """Who holds the lock on ``fd``'s file: the pid the kernel reports (/proc/locks, Linux) with the host and start
    time the holder recorded when they are its own, else what is known."""
    try:
        recorded = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        recorded = f"pid {recorded['pid']} on {recorded['host']} since {recorded['started']}", recorded["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    pid = _lock_holder_pid(fd)
    if pid is not None and (recorded is None or recorded[1] != pid):
        return f"pid {pid}"  # it has not recorded itself yet: the file still names an earlier run
    return recorded[0] if recorded else "owner unknown"


def _lock_holder_pid(fd: int) -> int | None:
    """The pid holding a flock on ``fd``'s file, from /proc/locks (``FLOCK ADVISORY WRITE <pid> MAJ:MIN:INODE``);
    None where the kernel does not say (another OS, a holder on another host of a network file system)."""
    st = os.fstat(fd)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            return int(fields[4])
    return None


def earlier_run(out_dir: Path) -> str | None:
    """What an earlier run left in ``out_dir`` that a fresh run would lose (its checkpoint folders, complete or not,
    and runs moved aside by ``--overwrite``), as a short phrase; None when there is none."""
    if not out_dir.is_dir():
        return None
    found = [f"ckpt/step_{step}" for step in sorted(step_dirs(out_dir))]
    found += sorted(p.name for p in out_dir.iterdir() if p.name.startswith(PREVIOUS_PREFIX) and p.is_dir())
    if not found:
        return None
    return ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")


def check_fresh_run(out_dir: Path, overwrite: bool) -> None:
    """A fresh run (no ``--resume``) into a folder with an earlier run's checkpoints needs ``--overwrite``."""
    found = earlier_run(out_dir)
    if found and not overwrite:
        raise RunInputError(
            f"--out ({out_dir}) holds checkpoints of an earlier run ({found}); a fresh run would replace them. "
            "Pass --resume to continue that run, --overwrite to start over (the earlier run is moved aside and "
            "deleted once the new run has a checkpoint), or another --out."
        )


def move_aside(out_dir: Path) -> Path | None:
    """Move everything in ``out_dir`` except the lock file into ``out_dir/previous-<UTC time>/``; that folder, or
    None when there was nothing to move. Renames only (same file system): nothing is copied or deleted."""
    entries = [p for p in out_dir.iterdir() if p.name != LOCK_FILE]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = out_dir / f"{PREVIOUS_PREFIX}{stamp}"
    suffix = 1
    while target.exists():  # two overwrites within one second
        target, suffix = out_dir / f"{PREVIOUS_PREFIX}{stamp}-{suffix}", suffix + 1
    target.mkdir()
    for entry in entries:
        os.rename(entry, target / entry.name)
    return target
