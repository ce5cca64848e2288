"""Loom jobs on an existing Ray cluster through Ray's Jobs API (``ray.job_submission``).

Owns ``loom submit`` / ``status`` / ``logs`` / ``stop`` as library calls: validating a job (and
its plan) locally before anything is sent, shipping only the job file and plan to the cluster,
the entrypoint that runs ``loom run`` there, the token authentication header, and turning the
Jobs API's failures into one-line :class:`SubmitError` messages.

Token authentication (Ray >= 2.52; on by default for new local clusters since 2.59): the dashboard
answers ``GET /api/authentication_mode`` without a token. When it says ``token``, the token is
read with Ray's own loader, so the sources and their precedence are Ray's: ``RAY_AUTH_TOKEN``,
then the file named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token`` (the file ``ray.init``
writes). It is sent as ``authorization: Bearer <token>`` through ``JobSubmissionClient(headers=)``,
the SDK's documented way to authenticate; a cluster without token auth never receives it. The
token is never logged, printed or put in an error message.

Imports ray; the CLI imports this module only inside its job commands so that ``loom validate``
and ``loom plan`` stay fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from ray.job_submission import JobSubmissionClient

from planner.errors import LoomError
from orchestrator.recipes import job_losses, load_job
from planner.spec import JobSpec

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0  # connect/read timeout of the first request; the SDK sets none itself
# Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address given to JobSubmissionClient.
# Inside a Ray job RAY_ADDRESS names that job's own cluster, so `--address` would be ignored silently.
_ADDRESS_OVERRIDES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
_WORKING_DIR_EXCLUDES = [".git", ".venv", "__pycache__"]
_STATUS_CODE = re.compile(r"status code (\d{3})")
# Ray's submission ids are raysubmit_<16 alphanumerics>; a caller-chosen id (JobSubmissionClient(submission_id=)) may
# use more. The id becomes a path segment of the Jobs API's URLs, so '/', '..', '%', '?' or '#' must never pass.
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
DEFAULT_ENTRYPOINT = "loom run {job} --address auto"


class SubmitError(LoomError):
    """The Jobs API cannot be reached, refuses the request, or does not know the job."""


@dataclass(frozen=True)
class JobState:
    """One Ray job as the Jobs API reports it.

    ``status`` is Ray's JobStatus name: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED.
    Times are Unix seconds (None until the job starts / ends).
    """

    job_id: str
    status: str
    message: str
    entrypoint: str
    start_time_s: float | None
    end_time_s: float | None

    @property
    def terminal(self) -> bool:
        """True once the job will not change status any more."""
        return self.status in ("STOPPED", "SUCCEEDED", "FAILED")


# --------------------------------------------------------------------------- connection


def check_address(address: str) -> str:
    """The Jobs API base URL ``http(s)://HOST[:PORT]`` without a trailing slash; SubmitError otherwise. No message
    repeats a user name or password given before the host (they are refused: Loom authenticates with the cluster's
    token, docs/submit.md)."""
    url = address.strip()
    if not url:
        raise SubmitError("--address is empty; give the Ray dashboard's HTTP address (the Jobs API), e.g. "
                          "'http://127.0.0.1:8265'.")
    redacted = _CREDENTIALS.sub(r"\1***@", url)
    if redacted != url:
        raise SubmitError(f"--address ('{redacted}') carries a user name or password; Loom authenticates with the "
                          "cluster's token file instead (docs/submit.md). Give http://HOST:PORT.")
    if "://" not in url:
        raise SubmitError(f"--address ('{address}') has no scheme; the Jobs API is the dashboard's HTTP "
                          f"address, e.g. 'http://{url.rstrip('/') or 'HOST'}' (port 8265 by default).")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (parsed lazily: raises for a port that is not a number in 0-65535)
    except ValueError as exc:  # e.g. 'http://[::1' (an unclosed IPv6 bracket)
        raise SubmitError(f"--address ('{address}') is not a URL ({exc}); give the dashboard's address, e.g. "
                          "'http://127.0.0.1:8265' or 'http://[::1]:8265'.") from None
    if parts.scheme not in ("http", "https"):
        raise SubmitError(f"--address ('{address}') uses scheme '{parts.scheme}://'; the Jobs API needs "
                          f"http:// or https://, e.g. 'http://{parts.hostname or 'HOST'}:8265' (the dashboard "
                          f"port, not the Ray Client or GCS port).")
    if not parts.hostname or parts.path.strip("/") or parts.query or parts.fragment:
        raise SubmitError(f"--address ('{address}') is not of the form http://HOST:PORT; "
                          f"give the dashboard's address, e.g. 'http://127.0.0.1:8265'.")
    return f"{parts.scheme}://{parts.netloc}"


_CREDENTIALS = re.compile(r"^(\s*(?:[A-Za-z][\w+.-]*://)?)[^/@\s]*@")  # 'user:pw@' before the host


def check_job_id(job_id: str) -> str:
    """``job_id`` when it is a safe Jobs API id (1-128 of A-Z a-z 0-9 _ . -, starting alphanumeric, no '..');
    SubmitError otherwise, before it is put into a URL."""
    if not _JOB_ID.fullmatch(job_id) or ".." in job_id:
        shown = job_id if len(job_id) <= 80 else job_id[:77] + "..."
        raise SubmitError(f"JOB_ID ({shown!r}) is not a Ray job id; expected 1-128 characters from A-Z a-z 0-9 _ . -, "
                          "starting with a letter or digit, without '..' (e.g. 'raysubmit_a1B2c3D4e5F6g7H8'). Use "
                          "the id `loom submit` printed.")
    return job_id


def auth_headers(address: str) -> dict[str, str]:
    """The ``authorization`` header the cluster at ``address`` needs ({} when it has no token auth).

    Asks the dashboard's public ``/api/authentication_mode``; doubles as the reachability check,
    with a timeout. Raises SubmitError when the address does not answer like a Ray dashboard or
    when the cluster wants a token and none is configured here.
    """
    url = check_address(address)
    try:
        response = requests.get(f"{url}/api/authentication_mode", timeout=PROBE_TIMEOUT_S)
    except requests.RequestException as exc:
        raise SubmitError(_unreachable(url, exc)) from None
    if response.status_code == 404:
        return {}  # Ray < 2.52: no token authentication at all
    try:
        mode = response.json()["authentication_mode"]
    except (ValueError, KeyError, TypeError):
        raise SubmitError(f"{url} answered HTTP {response.status_code} but is not a Ray dashboard; give the "
                          "dashboard's address (port 8265 by default).") from None
    if mode != "token":
        return {}
    headers = _load_token_header()
    if not headers:
        raise SubmitError(f"the Ray cluster at {url} requires an auth token and none is configured here; "
                          "set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it, or put it in "
                          "~/.ray/auth_token (`ray get-auth-token` on the head node prints it).")
    return headers


def _load_token_header() -> dict[str, str]:
    """Ray's own token lookup (RAY_AUTH_TOKEN > RAY_AUTH_TOKEN_PATH > ~/.ray/auth_token), as a header."""
    from ray._raylet import AuthenticationTokenLoader  # what the SDK itself calls when RAY_AUTH_MODE=token
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    # The loader is a process-wide cache that a later ray.init in this process also consults: read
    # fresh (the environment may have changed) and leave it empty, so no token of ours lingers there.
    loader.reset_cache()
    try:
        return dict(loader.get_token_for_http_header(ignore_auth_mode=True))
    except AuthenticationError as exc:
        first = str(exc).split(". ")[0]  # Ray's message names the source, never the token
        raise SubmitError(f"cannot read the Ray auth token: {first}. Fix the variable or the file.") from None
    finally:
        loader.reset_cache()


def connect(address: str) -> JobSubmissionClient:
    """A Jobs API client for ``address``, authenticated as the cluster requires; SubmitError if unusable."""
    url = check_address(address)
    headers = auth_headers(url)
    with _jobs_api_errors(url), _without_address_overrides():
        return JobSubmissionClient(url, headers=headers)


@contextlib.contextmanager
def _without_address_overrides() -> Iterator[None]:
    """Hide RAY_ADDRESS / RAY_API_SERVER_ADDRESS while the client is built, so the explicit address wins."""
    saved = {name: os.environ.pop(name) for name in _ADDRESS_OVERRIDES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _jobs_api_errors(url: str, job_id: str | None = None) -> Iterator[None]:
    """Turn the SDK's exceptions into one-line SubmitErrors."""
    import aiohttp
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        # Ray's SDK words HTTP 403 "Authentication failed" and 401 "Authentication required".
        rejected = str(exc).startswith("Authentication failed")
        what = "rejected the auth token" if rejected else "requires an auth token and got none"
        raise SubmitError(f"the Ray cluster at {url} {what}; use that cluster's token (`ray get-auth-token` "
                          "on its head node) in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.") from None
    except (ConnectionError, requests.RequestException, aiohttp.ClientError) as exc:  # the SDK raises all three
        raise SubmitError(_unreachable(url, exc)) from None
    except RuntimeError as exc:
        match = _STATUS_CODE.search(str(exc))
        if job_id is not None and match and match.group(1) == "404":
            raise SubmitError(f"job '{job_id}' does not exist on the Ray cluster at {url}; check the id that "
                              "`loom submit` printed.") from None
        raise SubmitError(f"the Ray Jobs API at {url} refused the request: {exc}") from None


def _unreachable(url: str, exc: BaseException) -> str:
    kind = type(exc).__name__
    return (f"cannot reach the Ray Jobs API at {url} ({kind}); check the address (the dashboard, "
            "http://HOST:8265 by default) and that the head node runs with its dashboard reachable "
            "(ray start --head --dashboard-host 0.0.0.0).")


# --------------------------------------------------------------------------- submit


def build_entrypoint(job_name: str, plan_name: str | None = None, command: str | None = None) -> str:
    """The shell command the cluster runs, from inside the shipped working directory.

    Default ``loom run <job> --address auto [--plan <plan>]``. ``command`` replaces it whole; the
    text ``{job}`` (and ``{plan}``) in it is replaced by the shell-quoted file names.
    """
    quoted_job = shlex.quote(job_name)
    quoted_plan = shlex.quote(plan_name) if plan_name else ""
    if command is None:
        entrypoint = DEFAULT_ENTRYPOINT.replace("{job}", quoted_job)
        return f"{entrypoint} --plan {quoted_plan}" if plan_name else entrypoint
    return command.replace("{job}", quoted_job).replace("{plan}", quoted_plan)


def _check_plan(plan_path: Path, job: JobSpec) -> None:
    """The plan must be readable, sealed and belong to this job, as ``loom run`` checks it
    (runtime.checks.check_plan_matches_job; else SpecError)."""
    from orchestrator.run_inputs import load_plan_option, plan_option
    from planner.metagraph import build_metagraph
    from planner.plan import job_for_plan
    from runtime.checks import check_plan_matches_job

    plan = load_plan_option(plan_path)
    check_plan_matches_job(plan, build_metagraph(job_for_plan(job, plan)), plan_option(plan_path), job.name)


def _relative_inside(path: Path, directory: Path) -> str:
    try:
        return path.resolve().relative_to(directory.resolve()).as_posix()
    except ValueError:
        raise SubmitError(f"{path} is not inside the working directory {directory}; move it there or leave "
                          "--working-dir out (then only the job file and plan are shipped).") from None


def submit_job(job_path: str | Path, address: str, *, plan: str | Path | None = None,
               runtime_env: dict[str, Any] | None = None, entrypoint: str | None = None) -> str:
    """Validate the job (and plan) here, then submit ``loom run`` for it to the cluster; return the job id.

    Nothing is sent when the spec or plan is invalid (the SpecError is exactly `loom validate`'s) or, for the
    default entrypoint, when ``loom run`` would refuse the job (its one-line error, as a SubmitError).
    Without a ``working_dir`` in ``runtime_env``, a temporary directory holding only the job file
    and the plan is shipped (Ray uploads it during the call, so it is deleted right after). With
    one, the job file and plan must lie inside it and the entrypoint names them relative to it.
    ``entrypoint`` replaces the ``loom run`` command (see :func:`build_entrypoint`).
    """
    url = check_address(address)  # first: a malformed address is refused before the job is loaded
    job_path = Path(job_path)
    job = load_job(job_path)
    plan_path = Path(plan) if plan is not None else None
    if plan_path is not None:
        _check_plan(plan_path, job)
    if entrypoint is None:
        _check_trainable(job)
    env = dict(runtime_env or {})
    with contextlib.ExitStack() as stack:
        if env.get("working_dir"):
            working_dir = Path(env["working_dir"])
            if not working_dir.is_dir():
                raise SubmitError(f"--working-dir ({working_dir}) is not a directory. Check the path.")
            job_name = _relative_inside(job_path, working_dir)
            plan_name = _relative_inside(plan_path, working_dir) if plan_path else None
            env["excludes"] = [*env.get("excludes", []), *_WORKING_DIR_EXCLUDES]
        else:
            staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loom-submit-")))
            job_name, plan_name = _stage(staging, job_path, plan_path)
            env["working_dir"] = str(staging)
        command = build_entrypoint(job_name, plan_name, entrypoint)
        client = connect(url)
        with _jobs_api_errors(url):
            job_id = client.submit_job(entrypoint=command, runtime_env=env,
                                       metadata={"loom_job": job.name})
    log.info("submitted job '%s' as %s to %s: %s", job.name, job_id, url, command)
    return job_id


def _check_trainable(job: JobSpec) -> None:
    """``loom run``'s own check of the job (losses, shapes between uses), here rather than on the cluster."""
    from runtime.checks import check_trainable

    try:
        check_trainable(job, job_losses(job))
    except ValueError as exc:
        raise SubmitError(f"loom run would refuse this job: {exc}") from None


def _stage(staging: Path, job_path: Path, plan_path: Path | None) -> tuple[str, str | None]:
    """Copy the job file (and plan) into ``staging``; return their names there."""
    job_name = job_path.name
    shutil.copyfile(job_path, staging / job_name)
    if plan_path is None:
        return job_name, None
    plan_name = plan_path.name if plan_path.name != job_name else "plan.json"
    shutil.copyfile(plan_path, staging / plan_name)
    return job_name, plan_name


# --------------------------------------------------------------------------- status, logs, stop


def job_status(address: str, job_id: str) -> JobState:
    """The job's current state; SubmitError when the cluster does not know ``job_id``."""
    check_job_id(job_id)
    url = check_address(address)
    client = connect(url)
    with _jobs_api_errors(url, job_id):
        info = client.get_job_info(job_id)
    return JobState(
        job_id=info.submission_id or job_id,
        status=str(getattr(info.status, "value", info.status)),
        message=info.message or "",
        entrypoint=info.entrypoint,
        start_time_s=info.start_time / 1000 if info.start_time else None,
        end_time_s=info.end_time / 1000 if info.end_time else None,
    )


def job_logs(address: str, job_id: str, follow: bool = False) -> Iterator[str]:
    """The job's driver output as text chunks: everything so far, or with ``follow`` until the job ends.

    The job's existence is checked before returning (SubmitError), so errors surface at the call.
    """
    check_job_id(job_id)
    url = check_address(address)
    client = connect(url)
    with _jobs_api_errors(url, job_id):
        client.get_job_info(job_id)
        if not follow:
            return iter([client.get_job_logs(job_id)])
    return _follow(url, job_id, client.tail_job_logs(job_id))


def _follow(url: str, job_id: str, chunks: AsyncIterator[str]) -> Iterator[str]:
    """Drive the SDK's async log tail from synchronous code, one chunk at a time."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            with _jobs_api_errors(url, job_id):
                try:
                    chunk = loop.run_until_complete(anext(chunks))
                except StopAsyncIteration:
                    return
            yield chunk
    finally:
        with contextlib.suppress(Exception):  # the websocket may already be closed by the server
            loop.run_until_complete(chunks.aclose())  # type: ignore[attr-defined]
        loop.close()


def stop_job(address: str, job_id: str) -> bool:
    """Ask the cluster to stop the job (SIGTERM, then SIGKILL after Ray's grace period).

    Returns True when the job was still running, False when it had already ended. Asynchronous:
    poll :func:`job_status` for STOPPED.
    """
    check_job_id(job_id)
    url = check_address(address)
    client = connect(url)
    with _jobs_api_errors(url, job_id):
        client.get_job_info(job_id)  # a clear "does not exist" before the stop request
        return bool(client.stop_job(job_id))
