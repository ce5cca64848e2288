"""`loom submit` / `status` / `logs` / `stop` against a real Ray head that this module starts.

The head is `ray start --head` on 127.0.0.1 with free ports and a private temp dir, token
authentication on the way Ray turns it on by default for `ray start` (a token in the default file
~/.ray/auth_token, with HOME pointing into the private dir so the real home is untouched). Every
process of that head carries a marker in its environment; teardown terminates exactly those
processes by pid and fails the test if any survive. Submitted entrypoints are cheap (`loom
validate`, `sleep`) through the hidden --entrypoint-command option, so most tests do not depend on
`loom run`; one runs the real default entrypoint, a 2-step `loom run` on the head.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.submit import SubmitError, build_entrypoint, check_address, job_status

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MARKER_VAR = "LOOM_TEST_RAY_HEAD"
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
JOB = textwrap.dedent("""\
    name: submit-job
    cluster: {num_nodes: 1, devices_per_node: 2, device: cpu}
    components:
      encoder: {kind: vit, num_layers: 2, hidden_size: 64, num_heads: 2, patch_size: 8, image_size: 32}
      decoder: {kind: transformer, num_layers: 2, hidden_size: 64, num_heads: 2, seq_len: 16}
    tasks:
      - {name: a, batch_size: 4, components: [{component: encoder}, {component: decoder}]}
      - {name: b, batch_size: 2, components: [{component: decoder}]}
    planner: {time_limit_s: 1}
    """)


@dataclass
class RayHead:
    url: str
    base: Path  # private dir: Ray's temp dir, HOME with .ray/auth_token
    token: str
    marker: str

    @property
    def token_file(self) -> Path:
        return self.base / "home" / ".ray" / "auth_token"

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (all held at once, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def head_pids(marker: str) -> list[int]:
    """Live processes started by our head: they inherit MARKER_VAR=marker (zombies are already dead)."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state not in ("Z", "X"):
                    found.append(int(entry.name))
        except (OSError, IndexError):
            continue  # gone, or another user's process
    return found


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_gone(marker: str, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (pids := head_pids(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


def stop_head(marker: str) -> list[str]:
    """SIGTERM every process of the head, SIGKILL what is left after a grace period; return survivors."""
    signal_all(head_pids(marker), signal.SIGTERM)
    for _ in range(3):  # gcs_server can hang in its SIGTERM handler; a dying raylet may spawn a worker
        pids = wait_gone(marker, 2)
        if not pids:
            return []
        signal_all(pids, signal.SIGKILL)
    survivors = []
    for pid in wait_gone(marker, 3):
        with contextlib.suppress(OSError):
            survivors.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120].decode())
    return survivors


def start_head(base: Path, marker: str) -> RayHead:
    token = secrets.token_hex(32)
    head = RayHead(url="", base=base, token=token, marker=marker)
    head.token_file.parent.mkdir(parents=True)
    head.token_file.write_text(token)
    gcs_port, dashboard_port, client_port, agent_port = free_ports(4)
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env.update(HOME=str(base / "home"), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT),
               **{MARKER_VAR: marker})
    command = [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
               f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
               "--num-cpus=2", f"--temp-dir={base / 'ray'}", "--disable-usage-stats"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90,
                            start_new_session=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        pytest.fail(f"`{' '.join(command)}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    head.url = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 30
    while True:  # the dashboard's job module comes up a little after `ray start` returns
        try:
            if requests.get(f"{head.url}/api/version", headers=head.auth(), timeout=2).status_code == 200:
                return head
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the Jobs API at {head.url} did not answer within 30 s of `ray start`")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def head() -> Iterator[RayHead]:
    base = Path(tempfile.mkdtemp(prefix="loomray-", dir="/tmp"))  # short: Ray's socket paths live under it
    marker = base.name
    started = time.monotonic()
    try:
        ray_head = start_head(base, marker)
        print(f"ray head up in {time.monotonic() - started:.1f} s at {ray_head.url}")
        yield ray_head
    finally:
        survivors = stop_head(marker)
        shutil.rmtree(base, ignore_errors=True)
        assert not survivors, f"Ray processes survived teardown: {survivors}"


@pytest.fixture
def client_env(head: RayHead, monkeypatch: pytest.MonkeyPatch) -> RayHead:
    """This process finds the head's token through RAY_AUTH_TOKEN_PATH (one of Ray's own sources)."""
    for name in AUTH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_file))
    return head


def loom(head: RayHead, *args: str):
    result = CliRunner().invoke(app, list(args))
    assert head.token not in result.stdout + result.stderr, "the auth token was printed"
    return result


def one_error_line(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def wait_for(url: str, job_id: str, statuses: set[str], timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        state = job_status(url, job_id)
        if state.status in statuses:
            return state.status
        assert not state.terminal, f"{job_id} ended {state.status}: {state.message}"
        assert time.monotonic() < deadline, f"{job_id} still {state.status} after {timeout_s} s"
        time.sleep(0.3)


def count_jobs(head: RayHead) -> int:
    """Jobs the cluster knows, asked over plain HTTP (independent of orchestrator.submit)."""
    response = requests.get(f"{head.url}/api/jobs/", headers=head.auth(), timeout=10)
    response.raise_for_status()
    return len(response.json())


# --------------------------------------------------------------------------- pure parts


def test_entrypoint_runs_loom_run_on_the_shipped_files() -> None:
    assert build_entrypoint("job.yaml") == "loom run job.yaml --address auto"
    assert build_entrypoint("my job.yaml", "p.json") == "loom run 'my job.yaml' --address auto --plan p.json"
    assert build_entrypoint("a.yaml", "p.json", "loom validate {job} && cat {plan}") == \
        "loom validate a.yaml && cat p.json"


@pytest.mark.parametrize("address, fragment", [
    ("127.0.0.1:8265", "has no scheme"),
    ("ray://127.0.0.1:10001", "uses scheme 'ray://'"),
    ("http://", "is not of the form"),
    ("http://host:8265/api", "is not of the form"),
])
def test_bad_addresses_are_refused(address: str, fragment: str) -> None:
    with pytest.raises(SubmitError, match=re.escape(fragment)):
        check_address(address)
    assert check_address("http://127.0.0.1:8265/") == "http://127.0.0.1:8265"


# --------------------------------------------------------------------------- against the head


def test_head_enforces_token_auth(head: RayHead) -> None:
    mode = requests.get(f"{head.url}/api/authentication_mode", timeout=10).json()
    assert mode == {"authentication_mode": "token"}
    assert requests.get(f"{head.url}/api/jobs/", timeout=10).status_code == 401


def test_submit_ships_job_and_plan_then_status_and_logs(client_env: RayHead, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from planner.api import plan_job
    from planner.spec import load_job

    head = client_env
    (tmp_path / "job.yaml").write_text(JOB)
    plan = plan_job(load_job(tmp_path / "job.yaml"), with_baselines=False).plan
    plan.save(tmp_path / "plan.json")
    monkeypatch.chdir(tmp_path)
    expected_line = loom(head, "validate", "job.yaml").stdout.strip()  # what validate prints here
    plan_digest = hashlib.sha256((tmp_path / "plan.json").read_bytes()).hexdigest()

    result = loom(head, "submit", "job.yaml", "--address", head.url, "--plan", "plan.json",
                  "--entrypoint-command", "loom validate {job} && sha256sum {plan}")
    assert result.exit_code == 0, result.stderr
    job_id = result.stdout.strip()
    assert re.fullmatch(r"raysubmit_\w+", job_id), result.stdout
    assert wait_for(head.url, job_id, {"SUCCEEDED"}) == "SUCCEEDED"
    assert job_status(head.url, job_id).entrypoint == "loom validate job.yaml && sha256sum plan.json"

    status = loom(head, "status", job_id, "--address", head.url)
    assert status.exit_code == 0 and status.stdout.startswith(f"{job_id}: SUCCEEDED"), status.stdout
    for args in ([], ["--follow"]):
        logs = loom(head, "logs", job_id, "--address", head.url, *args)
        assert logs.exit_code == 0, logs.stderr
        assert expected_line in logs.stdout.splitlines()  # the shipped file validates the same way remotely
        assert f"{plan_digest}  plan.json" in logs.stdout.splitlines()  # the plan arrived byte for byte


def test_bad_spec_is_refused_before_submission(client_env: RayHead, tmp_path: Path) -> None:
    head = client_env
    bad = tmp_path / "bad.yaml"
    bad.write_text(JOB.replace("kind: vit", "kind: vitt"))
    before = count_jobs(head)
    expected = loom(head, "validate", str(bad))
    line = one_error_line(expected, "('vitt') is not a registered component")

    result = loom(head, "submit", str(bad), "--address", head.url)
    assert one_error_line(result) == line  # exactly validate's line
    assert result.stdout == ""

    other = tmp_path / "other.yaml"
    other.write_text(JOB.replace("name: submit-job", "name: other-job").replace(  # other MetaOps: 3 decoder layers
        "decoder: {kind: transformer, num_layers: 2,", "decoder: {kind: transformer, num_layers: 3,"))
    (tmp_path / "good.yaml").write_text(JOB)
    from planner.api import plan_job
    from planner.spec import load_job

    plan_job(load_job(other), with_baselines=False).plan.save(tmp_path / "other.plan.json")
    mismatch = loom(head, "submit", str(tmp_path / "good.yaml"), "--address", head.url,
                    "--plan", str(tmp_path / "other.plan.json"))
    one_error_line(mismatch, "plan was made for job 'other-job'", "Re-run `loom plan")
    (tmp_path / "wd").mkdir()
    outside = loom(head, "submit", str(tmp_path / "good.yaml"), "--address", head.url,
                   "--working-dir", str(tmp_path / "wd"))
    one_error_line(outside, "is not inside the working directory")
    untrainable = tmp_path / "untrainable.yaml"  # a valid spec whose loss the runtime does not run
    untrainable.write_text(JOB.replace("{name: b, batch_size: 2,", "{name: b, batch_size: 2, loss: dpo,"))
    assert loom(head, "validate", str(untrainable)).exit_code == 0
    refused = loom(head, "submit", str(untrainable), "--address", head.url)
    one_error_line(refused, "loom run would refuse this job: tasks[1] ('b').loss ('dpo') is not run by the runtime")
    assert count_jobs(head) == before  # nothing reached the cluster


def test_stop_running_job(client_env: RayHead, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    head = client_env
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # Ray's SDK would let this override --address
    (tmp_path / "job.yaml").write_text(JOB)
    submitted = loom(head, "submit", str(tmp_path / "job.yaml"), "--address", head.url,
                     "--entrypoint-command", "sleep 60")
    assert submitted.exit_code == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    wait_for(head.url, job_id, {"RUNNING"})
    stopped = loom(head, "stop", job_id, "--address", head.url)
    assert stopped.exit_code == 0 and stopped.stdout == f"{job_id}: stop requested\n", stopped.stdout
    assert wait_for(head.url, job_id, {"STOPPED"}, timeout_s=20) == "STOPPED"
    again = loom(head, "stop", job_id, "--address", head.url)
    assert again.stdout == f"{job_id}: not running; nothing to stop\n"


def test_errors_are_one_line(client_env: RayHead, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    head = client_env
    for command in ("status", "logs", "stop"):
        one_error_line(loom(head, command, "raysubmit_nope", "--address", head.url),
                       "job 'raysubmit_nope' does not exist")
    (closed_port,) = free_ports(1)
    one_error_line(loom(head, "status", "raysubmit_x", "--address", f"http://127.0.0.1:{closed_port}"),
                   "cannot reach the Ray Jobs API")
    one_error_line(loom(head, "status", "raysubmit_x", "--address", head.url.replace("http", "https")),
                   "cannot reach the Ray Jobs API", "SSLError")
    one_error_line(loom(head, "status", "raysubmit_x", "--address", head.url.replace("http", "ray")),
                   "uses scheme 'ray://'")

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    one_error_line(loom(head, "status", "raysubmit_x", "--address", head.url),
                   "cannot read the Ray auth token: RAY_AUTH_TOKEN_PATH is set but file cannot be opened")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_file))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)  # Ray's loader prefers this over the token file
    one_error_line(loom(head, "status", "raysubmit_x", "--address", head.url), "rejected the auth token")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token there
    one_error_line(loom(head, "status", "raysubmit_x", "--address", head.url),
                   "requires an auth token and none is configured")


def test_console_script_uses_the_default_token_file(client_env: RayHead, tmp_path: Path) -> None:
    """Real processes, token found only in $HOME/.ray/auth_token (where `ray.init` writes it); --working-dir."""
    head = client_env  # this process: RAY_AUTH_TOKEN_PATH; the subprocesses below: only $HOME
    (tmp_path / "job.yaml").write_text(JOB)
    (tmp_path / "data.txt").write_text("shipped with --working-dir\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "big.bin").write_bytes(b"x" * 1024)
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env.update(HOME=str(head.token_file.parents[1]), PYTHONPATH=str(ROOT))
    script = shutil.which("loom", path=str(BIN))
    loom_cmd = [script] if script else [sys.executable, "-m", "orchestrator"]

    def run(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([*loom_cmd, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                                timeout=60, stdin=subprocess.DEVNULL)
        assert head.token not in result.stdout + result.stderr, "the auth token was printed"
        return result

    submitted = run("submit", "job.yaml", "--address", head.url, "--working-dir", ".",
                    "--entrypoint-command", "ls -A && echo loom-remote-ok")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    followed = run("logs", job_id, "--address", head.url, "--follow", "--verbose")
    assert followed.returncode == 0, followed.stderr
    lines = followed.stdout.splitlines()
    assert "loom-remote-ok" in lines
    assert "data.txt" in lines and "job.yaml" in lines and ".venv" not in lines  # the working dir, minus .venv
    assert job_status(head.url, job_id).status == "SUCCEEDED"


def test_submit_real_loom_run(client_env: RayHead, tmp_path: Path) -> None:
    """The default entrypoint: `loom run job.yaml --address auto` joins the head and trains 2 steps."""
    head = client_env
    job = JOB.replace("kind: vit, num_layers: 2, hidden_size: 64, num_heads: 2, patch_size: 8, image_size: 32",
                      "kind: transformer, num_layers: 2, hidden_size: 64, num_heads: 2, seq_len: 16")
    (tmp_path / "job.yaml").write_text(job + "training: {steps: 2, checkpoint_every: 0}\n")
    submitted = loom(head, "submit", str(tmp_path / "job.yaml"), "--address", head.url)
    assert submitted.exit_code == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    logs = loom(head, "logs", job_id, "--address", head.url, "--follow")
    state = job_status(head.url, job_id)
    assert state.entrypoint == "loom run job.yaml --address auto"
    assert state.status == "SUCCEEDED", logs.stdout[-2000:]
    assert "submit-job: trained steps 0..1 on 2 workers" in logs.stdout
