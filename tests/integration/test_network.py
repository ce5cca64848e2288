"""What a `loom run` exposes on the network (docs/reliability.md, "Network"), checked on a real run.

While a `loom run` process trains on its embedded Ray cluster, every TCP socket that any of its processes (the
driver, GCS, raylet, dashboard and runtime-env agents, autoscaler monitor, the WaveActor workers and their gloo
rendezvous) listens on is read from /proc: each must be bound to loopback. The cluster runs with token
authentication, its token file is mode 0600 inside a 0700 folder, and the token never appears in the run's output.
Its workers run at the driver's priority, not at Ray's default niceness 15 (orchestrator.actors.EmbeddedRay).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import yaml

from test_cli_subprocess import ROOT, loom_command
from test_run import descendants

JOB = {
    "name": "network",
    "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
    "components": {"t": {"kind": "transformer", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "seq_len": 4}},
    "tasks": [{"name": "a", "batch_size": 4, "loss": "mse", "components": [{"component": "t"}]}],
    "training": {"steps": 1_000_000, "precision": "fp32"},  # stopped by the test once it has looked
    "planner": {"time_limit_s": 1},
}


def listening_sockets(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, local address, port) of every listening TCP socket (IPv4 and IPv6) that a process of ``pids`` holds."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:  # the process ended meanwhile
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            found.append((inodes[fields[9]], decode_address(address), int(port, 16)))
    return found


def decode_address(hex_address: str) -> str:
    """/proc/net/tcp's address (32-bit words in host byte order, little-endian here) as text."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()[:120]
    except OSError:
        return "?"


def test_embedded_run_listens_on_loopback_only_with_a_private_token(tmp_path: Path) -> None:
    assert decode_address("0100007F") == "127.0.0.1" and not is_loopback("0.0.0.0") and is_loopback("::ffff:127.0.0.1")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_AUTH_MODE", None)
    with stdout.open("w") as out, stderr.open("w") as err:
        proc = subprocess.Popen([*loom_command(), "run", str(job), "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        try:
            seen, names, token_files, niceness = watch_run(proc, stderr)
        finally:
            proc.send_signal(signal.SIGINT)  # stop after the step in flight
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert seen, "no listening socket seen: the run ended before the test looked"
    outside = sorted({(names[pid], address, port) for pid, address, port in seen if not is_loopback(address)})
    assert not outside, f"listening beyond loopback: {outside}"
    listeners = " ".join(names[pid] for pid, _, _ in seen)
    for process in ("gcs_server", "raylet", "WaveActor"):  # the test saw the cluster and its workers, not a part
        assert process in listeners, listeners
    assert len(token_files) == 1, token_files
    (path, (file_mode, folder_mode, token)), = token_files.items()
    assert (file_mode, folder_mode) == (0o600, 0o700), token_files  # read while the run lived
    assert len(token) >= 32
    output = stdout.read_text() + stderr.read_text()
    assert "step 1/" in output
    assert token not in output
    assert not Path(path).exists(), "the token file outlived the run"
    workers = {pid: value for pid, value in niceness.items() if "WaveActor" in names.get(pid, "")}
    assert workers, names
    assert set(workers.values()) == {os.getpriority(os.PRIO_PROCESS, 0)}, workers  # not Ray's default 15 below it


def watch_run(proc: subprocess.Popen, stderr: Path, timeout_s: float = 240) -> tuple[set, dict, dict, dict]:
    """Sample the run's listening sockets from start until its workers have trained a few steps (then 10 more
    times, 0.2 s apart); also the token file its Ray processes were given (see :func:`token_file_of`) and each
    process's niceness {pid: nice}."""
    deadline = time.monotonic() + timeout_s
    seen: set[tuple[int, str, int]] = set()
    names: dict[int, str] = {}
    token_files: dict[str, tuple[int, int, str]] = {}
    niceness: dict[int, int] = {}
    samples_after_training = 0
    while samples_after_training < 10:
        assert proc.poll() is None, f"loom run ended early (exit {proc.returncode}): {stderr.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no training step within {timeout_s} s: {stderr.read_text()[-2000:]}"
        pids = set(descendants(proc.pid)) | {proc.pid}
        for pid, address, port in listening_sockets(pids):
            seen.add((pid, address, port))
            names[pid] = f"{names.get(pid, '')} {process_name(pid)}"  # ray::IDLE, then ray::WaveActor
        for pid in pids:
            token_files.update(token_file_of(pid))
            try:
                niceness[pid] = os.getpriority(os.PRIO_PROCESS, pid)
            except OSError:  # the process ended meanwhile
                pass
        if "step 3/" in stderr.read_text():
            samples_after_training += 1
        time.sleep(0.2)
    return seen, names, token_files, niceness


def token_file_of(pid: int) -> dict[str, tuple[int, int, str]]:
    """{RAY_AUTH_TOKEN_PATH: (file mode, folder mode, token)} from a process's environment (Ray's processes are
    given it at start)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    for entry in environ:
        if entry.startswith(b"RAY_AUTH_TOKEN_PATH="):
            path = Path(entry.split(b"=", 1)[1].decode())
            try:
                return {str(path): (stat.S_IMODE(path.stat().st_mode), stat.S_IMODE(path.parent.stat().st_mode),
                                    path.read_text())}
            except OSError:
                return {}
    return {}
