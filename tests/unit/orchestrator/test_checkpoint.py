"""Checkpoint manifests, the fall-back past a damaged checkpoint, retention (orchestrator.checkpoint), and the output
folder's lock, contained paths, refusal and move-aside (orchestrator.outdir), on files only: no Ray, no torch."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest

from orchestrator.checkpoint import (
    LEGACY, MANIFEST, MARKER, PORTABLE, CheckpointError, check_job, complete_checkpoints, damage, find_resume_point,
    mark_complete, rank_file, read_marker, remove_older_checkpoints, step_dir, step_dirs, tensor_index,
)
from orchestrator.outdir import LOCK_FILE, OutDirLock, RunFolder, contained, move_aside
from orchestrator.run_inputs import RunInputError
from orchestrator.signals import RunStopped, StopSignals

PLAN = "0123456789abcdef"


def write_checkpoint(out, step: int, ranks: int = 2, complete: bool = True, plan_hash: str = PLAN):
    """A checkpoint as the driver leaves it: rank files with distinct bytes, then manifest and marker."""
    directory = step_dir(out, step)
    directory.mkdir(parents=True)
    for rank in range(ranks):
        rank_file(directory, rank).write_bytes(f"state of rank {rank} after step {step}".encode() * 50)
    return mark_complete(directory, step, plan_hash, ranks, "job") if complete else None


# --------------------------------------------------------------------------- manifests and fall-back


def test_manifest_records_each_rank_file_before_the_marker(tmp_path):
    info = write_checkpoint(tmp_path, 2)
    manifest = json.loads((info.path / MANIFEST).read_text())["files"]
    assert set(manifest) == {"rank_0.safetensors", "rank_1.safetensors"}
    assert manifest["rank_1.safetensors"]["bytes"] == rank_file(info.path, 1).stat().st_size
    assert len(manifest["rank_1.safetensors"]["sha256"]) == 64
    assert manifest["rank_0.safetensors"] != manifest["rank_1.safetensors"]
    assert read_marker(info.path) == info and info.manifest_sha256 and damage(info) is None


@pytest.mark.parametrize("harm, phrase", [
    (lambda d: rank_file(d, 1).write_bytes(rank_file(d, 1).read_bytes()[:100]), "rank_1.safetensors has 100 bytes"),
    (lambda d: rank_file(d, 0).write_bytes(os.urandom(rank_file(d, 0).stat().st_size)), "rank_0.safetensors does not match"),
    (lambda d: (d / MANIFEST).write_text('{"files": {}}'), "MANIFEST.json is not the one"),
    (lambda d: (d / MANIFEST).unlink(), "MANIFEST.json cannot be read"),
    (lambda d: (d / MANIFEST).write_bytes(bytes(range(128, 256)) * 8), "MANIFEST.json is not the one"),
])
def test_damaged_latest_checkpoint_falls_back_with_one_warning(tmp_path, caplog, harm, phrase):
    write_checkpoint(tmp_path, 2)
    latest = write_checkpoint(tmp_path, 4)
    harm(latest.path)
    with caplog.at_level(logging.WARNING, logger="orchestrator.checkpoint"):
        assert find_resume_point(tmp_path, PLAN).step == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "step_4 is damaged" in warnings[0] and phrase in warnings[0], warnings


def test_no_intact_checkpoint_is_an_error_naming_the_damaged(tmp_path):
    info = write_checkpoint(tmp_path, 2)
    rank_file(info.path, 0).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint to resume from \(damaged: step_2\)"):
        find_resume_point(tmp_path, PLAN)


def test_a_portable_checkpoint_of_another_plan_is_resumed_an_old_one_refused(tmp_path):
    write_checkpoint(tmp_path, 2)
    info = write_checkpoint(tmp_path, 4, plan_hash="ffffffffffffffff")
    assert info.format == PORTABLE and find_resume_point(tmp_path, PLAN) == info  # the workers reshard it
    old = step_dir(tmp_path, 6)
    old.mkdir()
    rank_file(old, 0, LEGACY).write_bytes(b"pickle")
    (old / MARKER).write_text(json.dumps({"step": 6, "plan_hash": "ffffffffffffffff", "num_ranks": 1, "job": "job"}))
    with pytest.raises(CheckpointError, match="written for plan ffffffffffffffff in the old per-rank format"):
        find_resume_point(tmp_path, PLAN)


def test_a_checkpoint_of_another_job_is_refused(tmp_path):
    info = write_checkpoint(tmp_path, 2)
    check_job(info, "job")
    with pytest.raises(CheckpointError, match="written by job 'job', this run's job is 'other'"):
        check_job(info, "other")


def test_manifest_indexes_each_tensor_once_by_file(tmp_path):
    directory = step_dir(tmp_path, 1)
    directory.mkdir(parents=True)
    for rank in range(2):
        rank_file(directory, rank).write_bytes(b"x")
    info = mark_complete(directory, 1, PLAN, 2, "job", [{"p:a/0/w": [2, 3]}, {"p:b/0/w": [4]}])
    assert tensor_index(info) == {"p:a/0/w": {"file": "rank_0.safetensors", "shape": [2, 3]},
                                  "p:b/0/w": {"file": "rank_1.safetensors", "shape": [4]}}
    with pytest.raises(AssertionError, match="written by rank_0.safetensors and rank 1"):
        mark_complete(directory, 1, PLAN, 2, "job", [{"p:a/0/w": [2, 3]}, {"p:a/0/w": [2, 3]}])


def test_checkpoint_from_before_manifests_resumes_unverified(tmp_path):
    directory = step_dir(tmp_path, 3)
    directory.mkdir(parents=True)
    rank_file(directory, 0, LEGACY).write_bytes(b"old")
    (directory / MARKER).write_text(json.dumps({"step": 3, "plan_hash": PLAN, "num_ranks": 1, "job": "j"}))
    info = find_resume_point(tmp_path, PLAN)
    assert info.step == 3 and info.manifest_sha256 is None and damage(info) is None


def test_unfinished_and_mislabelled_checkpoints_are_not_complete(tmp_path):
    write_checkpoint(tmp_path, 2)
    write_checkpoint(tmp_path, 6, complete=False)
    moved = write_checkpoint(tmp_path, 8)
    os.rename(moved.path, step_dir(tmp_path, 10))  # its marker says step 8
    assert [c.step for c in complete_checkpoints(tmp_path)] == [2]
    assert sorted(step_dirs(tmp_path)) == [2, 6, 10]


# --------------------------------------------------------------------------- retention


def test_keep_last_deletes_older_checkpoints_only_below_the_newest_complete_one(tmp_path):
    for step in (2, 3, 5):
        write_checkpoint(tmp_path, step)
    write_checkpoint(tmp_path, 1, complete=False)  # a run killed while saving step 1: older than those kept
    write_checkpoint(tmp_path, 4, complete=False)
    write_checkpoint(tmp_path, 9)  # above the newest: an abandoned later run, left alone
    removed = remove_older_checkpoints(tmp_path, 5, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_1", "step_2"]
    assert sorted(step_dirs(tmp_path)) == [3, 4, 5, 9]
    assert remove_older_checkpoints(tmp_path, 5, keep_last=2) == []
    write_checkpoint(tmp_path, 6, complete=False)
    with pytest.raises(AssertionError):  # nothing is deleted for a checkpoint that is not complete
        remove_older_checkpoints(tmp_path, 6, keep_last=1)
    assert sorted(step_dirs(tmp_path)) == [3, 4, 5, 6, 9]


# --------------------------------------------------------------------------- the output folder


def test_a_second_lock_on_the_folder_is_refused_naming_the_holder(tmp_path):
    first = OutDirLock(tmp_path)
    assert not first.acquire(create=False)  # no lock file yet: nothing created by a check
    assert not (tmp_path / LOCK_FILE).exists()
    assert first.acquire(create=True)
    second = OutDirLock(tmp_path)
    (tmp_path / LOCK_FILE).write_text('{"pid": 1, "host": "old", "started": "then"}')  # an earlier holder's record
    with pytest.raises(RunInputError, match=rf"in use by another `loom run` \(pid {os.getpid()}\)"):  # the kernel's
        second.acquire(create=False)
    first.write_holder()
    with pytest.raises(RunInputError, match=rf"is in use by another `loom run` \(pid {os.getpid()} on "):
        second.acquire(create=False)
    first.release()
    assert second.acquire(create=False)  # released: the next run takes it
    second.release()
    second.release()  # twice is harmless


def test_two_runs_started_together_into_a_new_folder_one_claims_it(tmp_path):
    out = tmp_path / "new"
    first, second = (RunFolder(out, resume=False, overwrite=False, outputs=()) for _ in range(2))
    first.check()
    second.check()  # both looked before either wrote
    assert not out.exists()
    first.claim(PLAN)
    with pytest.raises(RunInputError, match=rf"in use by another `loom run` \(pid {os.getpid()} "):
        second.claim(PLAN)
    first.release()


def test_unreadable_manifests_and_markers_are_damage_not_a_crash(tmp_path):
    """Binary bytes in every manifest, then a marker nested too deep for json: no UnicodeDecodeError or
    RecursionError, each checkpoint is skipped and the error names the damaged ones."""
    for step in (2, 4):
        (write_checkpoint(tmp_path, step).path / MANIFEST).write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(CheckpointError, match=r"\(damaged: step_4, step_2\)"):
        find_resume_point(tmp_path, PLAN)
    info = write_checkpoint(tmp_path, 6)
    (info.path / MARKER).write_text("[" * 100_000 + "]" * 100_000)
    assert read_marker(info.path) is None
    assert [c.step for c in complete_checkpoints(tmp_path)] == [4, 2]


def test_a_checkpoint_folder_linked_outside_the_folder_is_refused_before_any_write(tmp_path):
    """A resume would skip it as incomplete, train from an older one and only fail when writing there."""
    out, outside = tmp_path / "out", tmp_path / "elsewhere"
    write_checkpoint(out, 2)
    outside.mkdir()
    step_dir(out, 4).symlink_to(outside)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(RunInputError, match=r"step_4: resolves to .*elsewhere, outside --out"):
        RunFolder(out, resume=True, overwrite=False, outputs=("plan.json",)).check()
    assert sorted(p.name for p in out.rglob("*")) == before


def test_paths_that_resolve_outside_the_folder_are_refused(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    outside.mkdir()
    assert contained(out, "ckpt", "step_1", "rank_0.pt") == out / "ckpt" / "step_1" / "rank_0.pt"
    for parts in (("..", "x"), ("ckpt", "..", "..", "x"), (str(outside),)):
        with pytest.raises(RunInputError, match="outside --out"):
            contained(out, *parts)
    (out / "ckpt").symlink_to(outside)
    with pytest.raises(RunInputError, match=r"ckpt: resolves to .*elsewhere, outside --out"):
        contained(out, "ckpt")
    with pytest.raises(RunInputError, match="outside --out"):
        RunFolder(out, resume=False, overwrite=False, outputs=("plan.json", "ckpt")).check()


def test_fresh_run_over_checkpoints_needs_overwrite_which_moves_them_aside(tmp_path):
    write_checkpoint(tmp_path, 2)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunInputError, match=r"holds checkpoints of an earlier run \(ckpt/step_2\).*--resume.*"
                                            r"--overwrite"):
        RunFolder(tmp_path, resume=False, overwrite=False, outputs=()).check()
    folder = RunFolder(tmp_path, resume=False, overwrite=True, outputs=())
    folder.check()
    folder.claim(PLAN)
    previous = folder.previous
    assert previous.name.startswith("previous-") and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [LOCK_FILE, previous.name])
    assert latest_step(previous) == 2 and (previous / "metrics.jsonl").read_text() == "{}\n"
    with pytest.raises(RunInputError, match="in use by another"):  # the claim holds the lock
        RunFolder(tmp_path, resume=False, overwrite=False, outputs=()).check()
    folder.release()
    # a run that ended before its first checkpoint leaves the earlier run moved aside: a fresh run is refused
    with pytest.raises(RunInputError, match=previous.name):
        RunFolder(tmp_path, resume=False, overwrite=False, outputs=()).check()
    folder.drop_previous()
    assert not previous.exists()


def latest_step(out) -> int:
    return complete_checkpoints(out)[0].step


def test_move_aside_nests_an_earlier_move(tmp_path):
    (tmp_path / "plan.json").write_text("a")
    first = move_aside(tmp_path)
    (tmp_path / "plan.json").write_text("b")
    second = move_aside(tmp_path)
    assert first != second and (second / first.name / "plan.json").read_text() == "a"
    assert (second / "plan.json").read_text() == "b" and [p.name for p in tmp_path.iterdir()] == [second.name]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / LOCK_FILE).write_text("")
    assert move_aside(empty) is None  # only the lock file: nothing to move


# --------------------------------------------------------------------------- signals


def test_stop_signal_waits_for_the_step_then_raises_at_once_outside_it():
    stop = StopSignals()
    before = signal.getsignal(signal.SIGTERM)
    stop.install()
    try:
        stop.graceful = True
        os.kill(os.getpid(), signal.SIGTERM)  # delivered at the next bytecode: recorded, no exception
        assert stop.requested == signal.SIGTERM
        with pytest.raises(RunStopped) as second:  # a second signal does not wait
            os.kill(os.getpid(), signal.SIGINT)
        assert second.value.exit_code == 130
        stop.graceful, stop.requested = False, None
        with pytest.raises(RunStopped) as first:
            os.kill(os.getpid(), signal.SIGTERM)
        assert first.value.exit_code == 143 and str(first.value) == "stopped by SIGTERM"
        stop.shielded = True  # cleanup: recorded only
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before
