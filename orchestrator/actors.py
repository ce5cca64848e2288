"""The Ray layer of a run: the embedded local cluster and the actor that runs one device's part of a plan.

:class:`EmbeddedRay` starts (and stops) a Ray cluster private to this process: one logical CPU per
worker, a short temp dir under /tmp, no dashboard, every Ray process listening on 127.0.0.1 only, and
token authentication with a fresh token in a 0600 file in a 0700 folder of that temp dir (unless
``RAY_AUTH_MODE`` is set): the cluster lives and dies with the run on this machine, and neither the
network nor another local user can reach it. :func:`join_cluster` connects to ``--address`` with a
timeout instead of Ray's minutes of retries.

:class:`WaveActor` is a thin shell around runtime's WaveWorker: one per device (rank) of the plan,
each taking one CPU (and a GPU on a GPU cluster) of its plan node's bundle in the run's placement
group (:func:`reserve_nodes`: each plan node on a Ray node of its own, see
:mod:`orchestrator.placement`). The driver creates them, then calls :meth:`WaveActor.setup` on all
of them at once: that call joins the gloo default group (rendezvous at ``master_addr:master_port``,
collective), builds the plan's sub-groups and the worker. After that every method is one
collective step of the run, called on every actor: ``train_steps``, ``save``, ``load`` (checkpoints in
runtime.portable's layout, which any plan of the job can load); ``progress`` answers beside a running step. The
driver sends the next call of steps before this one's results are back (hiding Ray's round trip); the actor runs its
steps in the order the driver names (``train_steps``' ``after``), never two at once, and the driver never sends a
step ahead of a ``save``. Worker
logic stays in :mod:`runtime.executor`; this module only moves values across the Ray boundary
(JSON for each rank's payload, plain dicts for results) and, for large activation pieces between CPU
workers, through the object store (:class:`ObjectStoreChannel`: peers call ``fetch`` while the
actor's ``train_steps`` runs, so actors run their calls in threads).

Imports torch and runtime lazily, inside the actor process: the driver only needs the class.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.placement import RankPlacement
from orchestrator.remote import note_step
from planner.errors import LoomError

log = logging.getLogger(__name__)

GLOO_TIMEOUT = timedelta(minutes=10)  # a collective that waits longer than this means a peer is gone (gloo or NCCL)
AUTH_ENV = "RAY_AUTH_MODE"
# Ray's token sources, by precedence: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, ~/.ray/auth_token
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
TOKEN_ENV = "RAY_AUTH_TOKEN"
# Ray 2.60: with this off, every Ray process takes 127.0.0.1 as its node IP and binds its servers to it (the switch Ray
# uses on macOS/Windows, where clusters are local only); processes read it from the environment at import
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray starts its worker processes at niceness 15 unless told otherwise; an embedded cluster's workers are the run
NICENESS_ENV = "RAY_worker_niceness"
LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT_S = 15.0  # --address: a GCS that does not answer within this is reported, not retried for minutes
OBJECT_STORE_BYTES = 256 * 1024**2  # a run moves only control data and, on request, parameters
# an actor's threads besides one ``fetch`` per peer (object-store pieces): the running ``train_steps``, the next one
# waiting for it (sent ahead by the driver), and ``progress`` (the step watchdog) or a probe (orchestrator.recovery)
ACTOR_THREADS = 3
QUIET = {"logging_level": logging.WARNING, "configure_logging": False, "log_to_driver": False}


class ClusterError(LoomError):
    """``--address`` names no reachable Ray cluster, or Ray refused the connection (one line, exit 2)."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now (the rendezvous port of the gloo group)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def rendezvous_store(master_addr: str, master_port: int, rank: int, world_size: int):
    """The gloo/NCCL group's TCPStore. Rank 0 serves it on ``master_addr`` only (torch's own server would listen on
    every interface), the others connect to it. On a loopback address gloo's own sockets stay on loopback too."""
    import torch.distributed as dist

    if is_loopback(master_addr):
        loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
        if loopback is not None:  # gloo binds the interface its hostname resolves to unless told which
            os.environ["GLOO_SOCKET_IFNAME"] = loopback
    if rank != 0:
        return dist.TCPStore(master_addr, master_port, world_size, False, timeout=GLOO_TIMEOUT)
    family = socket.AF_INET6 if ":" in master_addr else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((master_addr, master_port))
    server.listen(world_size + 16)
    return dist.TCPStore(master_addr, master_port, world_size, True, timeout=GLOO_TIMEOUT, wait_for_workers=False,
                         master_listen_fd=server.detach())


class WaveActor:
    """One rank of a run. ``payload_json`` is this rank's runtime.payload.WorkerPayload as JSON: its Assignment
    (planner.program.assignment: the plan cut to what the rank runs, sends, receives and holds), the component and
    task specs it builds and runs, the training settings; never the whole job.

    Ray runs a threaded actor's calls on a pool of threads, so consecutive steps ran on different threads: each
    thread's first step paid its own warm-up (glibc gives each thread its own heap arena, oneDNN its own scratch
    buffers), which showed as steps of 1-2 s at random among the first ~8 (quickstart-cpu, steady 0.5 s), and the
    steady steps reused memory another thread had touched. The worker is built and every step runs on one compute
    thread of the actor's own (:meth:`_compute`); the other threads only wait for it or answer the driver
    (``progress``, ``fetch``). Interleaved runs of quickstart-cpu (session 25): the slowest step after the first
    0.72-0.89 s on the pool, 0.58-0.63 s on one thread, the mean step 4-9% shorter."""

    def __init__(self, payload_json: str, rank: int, world_size: int, use_gpu: bool = False):
        self.payload_json = payload_json
        self.rank, self.world_size, self.use_gpu = rank, world_size, use_gpu
        self.worker = None
        self.channel = None
        # the steps' order on this actor (train_steps' ``after``): the last step finished here, a step that failed
        self._turn = threading.Condition()
        self._finished: int | None = None
        self._failed: int | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loom-compute")

    def _compute(self, fn, *args):
        """``fn(*args)`` on this actor's compute thread (class docstring); its result, or its exception raised here."""
        return self._thread.submit(fn, *args).result()

    def node_id(self) -> str:
        """The Ray node this actor runs on (hex id): the driver checks it against the plan's node of this rank."""
        return ray.get_runtime_context().get_node_id()

    def endpoint(self) -> tuple[str, int]:
        """(this node's IP, a free port on it): rank 0's answer is the rendezvous address on a real cluster."""
        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def setup(self, master_addr: str, master_port: int, peers: list | None = None, store_from_bytes: int = 0) -> int:
        """Collective: join the default gloo group, build the plan's sub-groups and the worker; returns the pid.
        With ``peers`` (every rank's actor, in rank order) and ``store_from_bytes`` > 0, a CPU worker moves pieces
        of that size and more through the object store (:class:`ObjectStoreChannel`).

        ValueError or NotImplementedError from the worker mean the job or plan cannot run (user input)."""
        return self._compute(self._setup, master_addr, master_port, peers, store_from_bytes)

    def _setup(self, master_addr: str, master_port: int, peers: list | None, store_from_bytes: int) -> int:
        import torch
        import torch.distributed as dist

        from orchestrator.recipes import load_recipe
        from runtime.executor import Groups, WaveWorker
        from runtime.host import backend_for, configure_worker_process, worker_device
        from runtime.payload import WorkerPayload

        payload = WorkerPayload.from_json(self.payload_json, f"rank {self.rank}'s payload")
        load_recipe(payload)  # the recipe's losses and dataset (by the job's recipe name), registered in this process
        # Ray shows an actor given a GPU that GPU alone, as cuda:0; an actor given none computes on CPU whatever it sees
        device = worker_device(payload) if self.use_gpu else torch.device("cpu")
        per_node = payload.cluster.devices_per_node  # on CPU, its own CPU where they are the node's CPUs
        configure_worker_process(device, (self.rank % per_node, per_node))
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        store = rendezvous_store(master_addr, master_port, self.rank, self.world_size)
        dist.init_process_group(backend_for(device), store=store, rank=self.rank, world_size=self.world_size,
                                timeout=GLOO_TIMEOUT)
        if peers and store_from_bytes > 0 and device.type == "cpu":  # NCCL moves GPU pieces faster than any store
            self.channel = ObjectStoreChannel(peers, store_from_bytes)
        self.worker = WaveWorker(payload, Groups.create(payload), device, self.channel)
        return os.getpid()

    def fetch(self, key) -> object:
        """A piece this rank posted to its :class:`ObjectStoreChannel` (waits for it): another rank's ``take``."""
        return self.channel.fetch(key, GLOO_TIMEOUT.total_seconds())

    def train_steps(self, first: int, count: int = 1, after: int | None = None) -> list[dict]:
        """Collective: training steps ``first .. first + count - 1``, one after another on the compute thread (one Ray
        call for several steps of a job whose steps are short: orchestrator.run's ``call_seconds``). Returns per step
        {"losses": {task: mean loss}, "seconds": this rank's time in the step, "timing": where it went
        (``StepTiming.to_dict()``)}.

        ``after``: the last step of the call the driver sent just before this one without waiting for its results
        (it sends the next call ahead, orchestrator.run). Ray runs a threaded actor's calls in any order and at once,
        so this call waits until step ``after`` has finished here; when that step failed, this one raises at once
        (the driver kills the actors after a failure anyway, and a step run after a failed one would pair its
        collectives with nothing)."""
        if after is not None:
            self._wait_turn(first, after)
        return self._compute(self._run_steps, first, count)

    def _run_steps(self, first: int, count: int) -> list[dict]:
        results = []
        for step in range(first, first + count):
            start = time.perf_counter()
            try:
                losses = self.worker.train_step(step)
            except BaseException as exc:
                with self._turn:
                    self._failed = step
                    self._turn.notify_all()
                if count > 1:
                    note_step(exc, step)
                raise
            seconds = time.perf_counter() - start
            with self._turn:
                self._finished = step
                self._turn.notify_all()
            timing = self.worker.last_timing
            results.append({"losses": losses, "seconds": seconds,
                            "timing": timing.to_dict() if timing is not None else None})
        return results

    def _wait_turn(self, step: int, after: int) -> None:
        """Block until step ``after`` has finished on this actor (see :meth:`train_steps`)."""
        with self._turn:
            ready = self._turn.wait_for(lambda: self._finished == after or self._failed is not None,
                                        timeout=GLOO_TIMEOUT.total_seconds())
            if self._failed is not None:
                raise RuntimeError(f"step {step} not run: step {self._failed} failed on this worker")
            if not ready:
                raise TimeoutError(f"step {step} waited {GLOO_TIMEOUT} for step {after} to finish on this worker")

    def save(self, path: str) -> dict[str, list[int]]:
        """Collective: write this rank's part of a portable checkpoint (runtime.portable) to ``path`` (a temporary
        name, then rename); returns its keys and shapes for the manifest's index."""
        from safetensors.torch import save_file

        from runtime.portable import export_state

        tensors = export_state(self.worker)
        tmp = path + ".tmp"
        save_file(tensors, tmp)
        os.replace(tmp, path)
        return {key: list(t.shape) for key, t in tensors.items()}

    def load(self, directory: str, index: dict, fmt: str) -> int:
        """Restore this rank's state from the checkpoint in ``directory``: a portable one (``index``: its manifest's
        tensors) written under any plan of this job, reading only what this rank holds; or an old per-rank pickle
        of this same plan and rank. Returns the number of tensors (or slices) read. A checkpoint of another job is
        a CheckpointMismatch (ValueError, one line)."""
        from orchestrator.checkpoint import PORTABLE, rank_file
        from runtime.portable import PortableReader, import_state

        if fmt != PORTABLE:
            import torch

            state = torch.load(rank_file(directory, self.rank, fmt), weights_only=True)
            self._compute(self.worker.load_state_dict, state)
            return 0
        reader = PortableReader(directory, index, directory)
        self._compute(import_state, self.worker, reader)
        return reader.tensors_read

    def progress(self) -> dict | None:
        """Where this rank's step is now (``WaveWorker.where``: step, micro-batch, wave, phase), None before its first
        step; answered while ``train_steps`` runs (the actor runs its calls in threads), for the step watchdog."""
        where = self.worker.where if self.worker is not None else None
        return dict(zip(("step", "micro", "wave", "phase"), where)) if where is not None else None

    def named_parameters(self) -> dict:
        """Every parameter this rank holds (copies), keyed as ``WaveWorker.named_parameters``."""
        return self.worker.named_parameters()

    def close(self) -> None:
        """Leave the process group (best effort; the driver kills the actor afterwards anyway)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class ObjectStoreChannel:
    """runtime.channel.PieceChannel over Ray's object store. ``post`` keeps the piece in this rank's mailbox; a
    consumer's ``take`` calls the producer's :meth:`WaveActor.fetch`, whose return value Ray hands over through
    the object store (on one host the consumer reads it in place, without a copy)."""

    def __init__(self, peers: list, min_bytes: int):
        self.peers, self.min_bytes = peers, min_bytes
        self._mailbox: dict = {}
        self._posted = threading.Condition()

    def post(self, key, tensor) -> None:
        with self._posted:
            self._mailbox[key] = tensor.detach().cpu().numpy()  # shares the tensor's memory and keeps it alive
            self._posted.notify_all()

    def fetch(self, key, timeout_s: float):
        with self._posted:
            if not self._posted.wait_for(lambda: key in self._mailbox, timeout=timeout_s):
                raise TimeoutError(f"piece {key} was not posted within {timeout_s:g} s; a peer may be gone")
            return self._mailbox.pop(key)

    def take(self, src: int, key):
        import torch

        array = ray.get(self.peers[src].fetch.remote(key))
        with warnings.catch_warnings():  # a read-only view of the shared-memory object; the executor only reads it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array)


def create_actors(payloads: list[str], placement: RankPlacement, group: PlacementGroup) -> list:
    """One :class:`WaveActor` handle per rank, given its payload's JSON (``payloads[rank]``; creation is asynchronous; call ``setup`` next), rank r in bundle
    ``placement.node_of(r)`` of ``group`` (from :func:`reserve_nodes`), i.e. on its plan node's Ray node. Each actor
    runs its calls in threads (:data:`ACTOR_THREADS` beside the peers' fetches)."""
    world_size = placement.world_size
    remote = ray.remote(num_cpus=placement.cpus_per_rank, num_gpus=placement.gpus_per_rank, max_restarts=0,
                        max_task_retries=0, max_concurrency=world_size - 1 + ACTOR_THREADS)(WaveActor)
    use_gpu = placement.gpus_per_rank > 0
    return [remote.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=placement.node_of(rank)))
            .remote(payloads[rank], rank, world_size, use_gpu)
            for rank in range(world_size)]


def reserve_nodes(placement: RankPlacement, timeout_s: float) -> PlacementGroup | None:
    """Reserve the run's nodes: a placement group of one bundle per plan node (``placement.bundles()``) with
    ``STRICT_SPREAD``, so every bundle sits on a different Ray node. Returns the ready group, or None when Ray could
    not place it within ``timeout_s``; the group is removed then, since Ray keeps a pending group waiting forever and
    would place it later for nobody.

    Why this shape (Ray 2.60): a run needs each plan node's ranks together on one Ray node and different plan nodes
    on different Ray nodes. STRICT_SPREAD over node-sized bundles says exactly that, in one group that Ray reserves
    atomically. One bundle per device cannot: STRICT_PACK groups per plan node keep a node's ranks together but may
    put two plan nodes on one big Ray node, and per-bundle label selectors (``ray.io/node-id``, beta since 2.49)
    would make the driver pick the nodes itself from a snapshot of the cluster. Ranks still take one CPU (and GPU)
    each out of their node's bundle."""
    group = placement_group(placement.bundles(), strategy="STRICT_SPREAD", name=f"loom-{os.getpid()}-{time.time_ns()}")
    if group.wait(timeout_s):
        return group
    remove_placement_group(group)
    return None


def release_nodes(group: PlacementGroup) -> None:
    """Remove a placement group from :func:`reserve_nodes` (best effort: a joined cluster may be gone)."""
    try:
        remove_placement_group(group)
    except Exception as exc:  # noqa: BLE001 - the cluster or the connection is gone: nothing left to free
        log.debug("removing the placement group: %s", exc)


class EmbeddedRay:
    """A local Ray cluster owned by this process (``with EmbeddedRay(num_cpus) as cluster: ...``).

    ``address="local"`` never attaches to another cluster on this machine (nor to ``RAY_ADDRESS``).
    The temp dir is short because Ray's socket paths must fit in 107 bytes; it is removed on
    :meth:`stop`, after the workers' logs that say something were copied out if asked.

    Network: every Ray process (GCS, raylet, workers, dashboard and runtime-env agents, autoscaler monitor) takes
    127.0.0.1 as its node IP and listens there only (``LOCAL_ONLY_ENV``), and the workers' gloo rendezvous stays on
    127.0.0.1 (:func:`rendezvous_store`). Auth: unless ``RAY_AUTH_MODE`` is set, token authentication is on, with a
    fresh random token in ``<temp dir>/auth-*/auth_token`` (0600, in a 0700 folder) that only this run's processes
    are given (``RAY_AUTH_TOKEN_PATH``), so another user of this machine cannot drive the cluster through loopback.
    The token is never logged; Ray never writes ``~/.ray/auth_token`` for it. The environment, Ray's cached config and
    its token cache are restored on :meth:`stop`.

    Priority: Ray starts its workers at niceness 15 (``RAY_worker_niceness``), below its own GCS, raylet and this
    driver; on a machine with as many cores as workers those then take the workers' cores whenever they wake, so an
    embedded cluster starts its workers at the driver's priority (0) unless ``RAY_worker_niceness`` is set."""

    def __init__(self, num_cpus: int):
        self.num_cpus = num_cpus
        self.temp_dir: Path | None = None
        self._saved_env: dict[str, str | None] = {}

    def start(self) -> EmbeddedRay:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="loom-ray-", dir="/tmp"))
        self._saved_env = {name: os.environ.get(name) for name in (AUTH_ENV, TOKEN_PATH_ENV, LOCAL_ONLY_ENV,
                                                                   NICENESS_ENV)}
        os.environ[LOCAL_ONLY_ENV] = "0"
        os.environ.setdefault(NICENESS_ENV, "0")
        os.environ.setdefault(AUTH_ENV, "token")
        if os.environ[AUTH_ENV].lower() == "token" and TOKEN_ENV not in os.environ and TOKEN_PATH_ENV not in os.environ:
            # a folder of its own: Ray makes its temp dir world-readable (0777) once it starts
            private = Path(tempfile.mkdtemp(prefix="auth-", dir=self.temp_dir))
            os.environ[TOKEN_PATH_ENV] = str(write_token(private / "auth_token"))
        _reload_ray_auth()
        log.info("starting an embedded Ray cluster (%d CPUs, temp dir %s)", self.num_cpus, self.temp_dir)
        log.debug("listening on %s only, RAY_AUTH_MODE=%s", LOOPBACK, os.environ[AUTH_ENV])
        try:
            with _local_only_driver():
                ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False, dashboard_host=LOOPBACK,
                         _temp_dir=str(self.temp_dir), object_store_memory=OBJECT_STORE_BYTES, **QUIET)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, keep_logs_in: Path | None = None) -> None:
        """``ray.shutdown()``, then copy the worker logs to ``keep_logs_in`` (if given), remove the temp dir (and the
        token in it) and restore the environment."""
        ray.shutdown()
        if self.temp_dir is None:
            return
        if keep_logs_in is not None:
            copy_worker_logs(self.temp_dir, keep_logs_in)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir = None
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reload_ray_auth()

    def __enter__(self) -> EmbeddedRay:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class ProfileActor:
    """One CPU worker process of ``loom profile``'s layer timing (:func:`profile_in_actors`): a Ray actor, as a run's
    :class:`WaveActor`, timing on a compute thread of its own (as WaveActor computes), its samples started together
    with the other actors' through a gloo barrier."""

    def measure(self, rank: int, job_json: str, repeats: int, warmup: int, workers: int, port: int) -> dict:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loom-compute") as thread:
            return thread.submit(self._measure, rank, job_json, repeats, warmup, workers, port).result()

    @staticmethod
    def _measure(rank: int, job_json: str, repeats: int, warmup: int, workers: int, port: int) -> dict:
        import torch.distributed as dist

        from runtime.profiler import measure_as_worker

        store = rendezvous_store(LOOPBACK, port, rank, workers)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=workers, timeout=GLOO_TIMEOUT)
        try:
            return measure_as_worker(rank, job_json, repeats, warmup, _GlooBarrier(), workers)
        finally:
            dist.destroy_process_group()


class _GlooBarrier:
    def wait(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def profile_in_actors(job, repeats: int, warmup: int, processes: int) -> list[dict]:
    """runtime.profiler's layer timing in ``processes`` Ray actors of an embedded cluster, the processes a run's
    workers compute in: a layer ran 8-12% slower in a run's actor than in a plain worker process of the same plan
    (feedback-cpu, session 27), and `loom profile` times what the run will pay (runtime.profiler.Launcher)."""
    with EmbeddedRay(processes):
        remote = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(ProfileActor)
        actors = [remote.remote() for _ in range(processes)]
        port = free_port()
        return ray.get([actor.measure.remote(rank, job.model_dump_json(), repeats, warmup, processes, port)
                        for rank, actor in enumerate(actors)])


def write_token(path: Path) -> Path:
    """A fresh random token (256 bits, hex) in a new file ``path`` created with mode 0600 (never widened by the
    umask, never readable by others for an instant); the token itself is not returned, to keep it out of logs."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    return path


def _reload_ray_auth() -> None:
    """Make this process see the current RAY_AUTH_* environment: Ray caches its config (the auth mode) and the token
    at first use, so a change made after ``import ray`` is invisible to ``ray.init`` without this (Ray 2.60 does the
    same in ``ray._private.authentication.authentication_token_setup``)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


class _local_only_driver:  # noqa: N801 - used as a context manager
    """While active, this (already imported) driver resolves its own node IP to 127.0.0.1 as a process started with
    ``LOCAL_ONLY_ENV=0`` would: Ray read that variable into ``ray_constants`` at import, and ``ray.init`` asks
    ``services.get_node_ip_address``, which reads the constant. Restored on exit."""

    def __enter__(self) -> None:
        from ray._private import ray_constants

        self._saved = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False

    def __exit__(self, *exc_info) -> None:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = self._saved


def join_cluster(address: str, timeout_s: float | None = None) -> None:
    """``ray.init(address=...)`` (token auth as Ray is configured), after checking within ``timeout_s`` (default
    ``CONNECT_TIMEOUT_S``) that the GCS at ``address`` answers: Ray itself retries a dead address for minutes.
    ClusterError (one line) when it does not, or when Ray refuses the connection."""
    from ray._private.services import canonicalize_bootstrap_address

    timeout_s = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        target = canonicalize_bootstrap_address(address)  # host:port; "auto" -> RAY_ADDRESS or this machine's cluster
    except ValueError:
        raise ClusterError(f"--address ({address!r}) is not HOST:PORT; give the Ray head's GCS address, e.g. "
                           "'10.0.0.1:6379' (what `ray start --head` prints), or 'auto'.") from None
    if target is not None:
        probe_gcs(address, target, timeout_s)
    log.info("joining the Ray cluster at %s", target or address)
    from ray.exceptions import AuthenticationError

    try:
        ray.init(address=address, **QUIET)
    except (ConnectionError, TimeoutError, RuntimeError, AuthenticationError) as exc:
        first = " ".join(str(exc).split())[:300]
        raise ClusterError(f"--address ({address}): Ray could not connect: {first}. Check the address and, for a "
                           "cluster with token auth, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH.") from None


def probe_gcs(address: str, target: str, timeout_s: float) -> None:
    """ClusterError unless something at ``target`` (host:port) accepts a TCP connection and completes a gRPC
    (HTTP/2) handshake, both within ``timeout_s`` in all."""
    import grpc

    deadline = time.monotonic() + timeout_s
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    # Ray connects to its canonical form of the address (a loopback address becomes this machine's IP): say so
    where = f"--address ({address})" if target == address else f"--address ({address}, to Ray {target})"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except socket.gaierror:
        raise ClusterError(f"{where}: host '{host}' cannot be resolved. Check the name.") from None
    except (socket.timeout, TimeoutError):
        raise ClusterError(f"{where}: {target} did not answer within {timeout_s:g} s; check the address and that no "
                           "firewall drops it (the GCS port, 6379 by default).") from None
    except OSError as exc:
        raise ClusterError(f"{where}: cannot connect to {target} ({exc.strerror or exc}); start the head there "
                           "(`ray start --head`) or give its GCS address.") from None
    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=max(deadline - time.monotonic(), 0.1))
    except grpc.FutureTimeoutError:
        raise ClusterError(f"{where}: {target} accepts connections but is not a Ray GCS (no gRPC answer within "
                           f"{timeout_s:g} s); give the head's GCS address (port 6379 by default), not the "
                           "dashboard's.") from None
    finally:
        channel.close()


def copy_worker_logs(temp_dir: Path, target: Path) -> None:
    """Copy the worker stdout/stderr files of a Ray temp dir that hold real output into ``target``."""
    shutil.rmtree(target, ignore_errors=True)
    for path in sorted(temp_dir.glob("session_*/logs/worker-*")):
        if not path.is_file() or path.is_symlink():
            continue
        text = path.read_text(errors="replace")
        # Ray opens every file with ":job_id:..." / ":actor_name:..." lines; keep only real output
        if any(line.strip() and not line.startswith(":") for line in text.splitlines()):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / path.name)


def end_processes(pids: list[int]) -> None:
    """SIGKILL each of ``pids`` that is still there: an embedded run's own actor processes after ``kill_actors``, since
    Ray's kill reaches no process that stopped answering (SIGSTOP, a hang in C code) until its keepalive times out."""
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def kill_actors(actors: list) -> None:
    """Kill every actor (no restart); one that is already gone is skipped."""
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - already dead or the cluster is gone: nothing to kill
            log.debug("killing an actor: %s", exc)
