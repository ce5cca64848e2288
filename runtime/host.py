"""How a worker process is set up: which device it computes on and its process-group backend (a CUDA device with
NCCL for a GPU job in a process that sees one, else the CPU with gloo); on CPU, one compute thread and freed
memory kept for the next step.

glibc hands freed memory back to the kernel (it trims the top of the heap and serves large blocks by
``mmap``), so every training step faults its activations in again, page by page, each page zeroed by
the kernel: one forward and backward of a 512-token, 128-wide transformer layer took about 7,700
minor page faults and 20-24 ms; with the memory kept, none and 17-18 ms (bench/runtime's workloads
ran 18-40% faster in an interleaved comparison). :func:`keep_freed_memory` raises glibc's trim and
mmap thresholds (``mallopt``), so a process keeps its peak heap and reuses it, as GPU frameworks'
caching allocators keep device memory. It is a no-op where glibc is absent.

When a CPU job's workers on a node are exactly the CPUs a worker may use (2 workers on a 2-core host), each worker is
pinned to a CPU of its own (:func:`pin_worker`): unpinned, the kernel moves a worker to whichever core is free when
Ray's own processes (driver, raylet, GCS) wake, its caches go cold, and the other worker waits for it at the next
collective. Interleaved `loom run`s with one profile (session 24, beside a test run at load 3-5): chat-sft's median
step 17.8-19.6 ms unpinned, 13.0-13.3 ms pinned; caption's 39-47 against 27-28 ms. Fewer workers than CPUs leave the
kernel room to place them (and other jobs' workers), more would pin two to a core while another core idles: neither
is pinned. ``loom profile``'s timing processes and runtime.local_world's gloo worlds (bench.runtime, the equivalence
tests) are pinned by the same rule (``configure_worker_process``'s ``slot``, :func:`pinned`), so the profile measures
the layers as the run computes them. For the same reason every timed sample of the profile starts from cold caches
(:func:`evict_caches`).

On this kind of VM a gloo message or collective between two workers that both computed for several milliseconds
before it costs ~3 ms instead of ~0.1-0.3 ms when the waiting thread blocks (``python -m bench.gloo_idle``: one
scheduler tick, the cliff between 3 and 4 ms of compute), and ``loom profile`` times links without it. Two ways
around it, measured there: a receive posted before the compute (runtime.transfers posts each boundary's receives one
boundary ahead) and a wait that polls the collective, yielding the CPU, instead of blocking
(:func:`finish_collective`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from planner.spec import JobSpec

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never trim below 2 GiB of free heap top
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap and are reused


@functools.cache
def keep_freed_memory() -> bool:
    """Make this process's allocator keep freed memory for reuse; True when glibc took the settings."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.info("no glibc mallopt here; freed memory goes back to the system as usual")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def worker_device(job: JobSpec, local_rank: int = 0) -> torch.device:
    """Where a worker of ``job`` computes: for a job on a GPU cluster (``cluster.device`` not cpu) in a process that
    sees CUDA devices, ``cuda:<local_rank mod their count>`` (a Ray actor given one GPU sees it as cuda:0); else the
    CPU (a CPU job, or a GPU job sent to a cluster without GPUs)."""
    if job.cluster.device.lower() == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def backend_for(device: torch.device) -> str:
    """The torch.distributed backend of a worker on ``device``: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


POLL_SECONDS = 0.02  # how long finish_collective polls before it blocks (a peer still computing: no cliff then)


def finish_collective(work: dist.Work, device: torch.device) -> None:
    """Wait for the asynchronous collective ``work`` on ``device``. On CPU (gloo) the waiting thread polls it and
    yields the CPU for up to :data:`POLL_SECONDS` before it blocks: a blocked wait right after both ends computed
    several milliseconds pays ~3 ms more (module docstring). ``wait`` still raises the collective's error (and its
    timeout). Only a worker pinned to a CPU of its own polls: where workers share CPUs, one that waits leaves its CPU to
    another instead of idle (the cliff needs an idle CPU), and polling would take turns from it. Point-to-point
    requests never report completion before ``wait``: not for them."""
    if device.type == "cpu" and len(os.sched_getaffinity(0)) == 1:
        until = time.perf_counter() + POLL_SECONDS
        while not work.is_completed() and time.perf_counter() < until:
            os.sched_yield()
    work.wait()


def configure_worker_process(device: torch.device | str = "cpu", slot: tuple[int, int] | None = None) -> None:
    """A device's worker process: on CPU one intra-op thread (one logical CPU per worker; more only oversubscribe
    the cores), freed memory kept and, with ``slot`` (its index among the node's workers, their number), pinned by
    :func:`pin_worker`'s rule; on a GPU, that GPU as the process's current device."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        return
    torch.set_num_threads(1)
    keep_freed_memory()
    if slot is not None:
        pin_worker(*slot)


def pin_cpu(index: int, workers: int) -> int | None:
    """The CPU the ``index``-th of ``workers`` CPU workers on a node runs on: the ``index``-th CPU this process may
    use when ``workers`` equals their number (and is at least 2), else None (not pinned; module docstring)."""
    if not hasattr(os, "sched_getaffinity") or workers < 2:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[index] if len(cpus) == workers and 0 <= index < workers else None


def _set_affinity(cpus: set[int]) -> None:
    """Every thread of this process (Ray's and gloo's threads included) on ``cpus``; threads started later inherit it
    from the thread that starts them."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile, or a host that refuses: left as it was
            os.sched_setaffinity(int(tid), cpus)


def pin_worker(index: int, workers: int) -> int | None:
    """Pin this CPU worker process to :func:`pin_cpu`'s CPU, if any; returns it."""
    cpu = pin_cpu(index, workers)
    if cpu is not None:
        _set_affinity({cpu})
    return cpu


@contextlib.contextmanager
def pinned(index: int, workers: int) -> Iterator[int | None]:
    """:func:`pin_worker` for the duration of the block; the process's CPUs as before afterwards."""
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cpu = pin_worker(index, workers)
    try:
        yield cpu
    finally:
        if cpu is not None:
            _set_affinity(before)


# bytes read before every timed sample of `loom profile`, per device type: more than a core's share of this host's
# caches (2 MiB of L2 per core, a shared L3) on CPU; on a GPU Triton's do_bench choice, 256 MiB (an H100: 50 MB of L2)
EVICT_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
_evict_buffers: dict[str, torch.Tensor] = {}


def evict_caches(device: torch.device) -> None:
    """Write :data:`EVICT_BYTES` of memory on ``device`` so that the next timed sample starts with cold caches full of
    dirty lines, as a run meets each layer, embedding, head and optimizer step once a step after other work that wrote
    its activations and gradients (a profile that repeats one back to back keeps its weights and activations cached:
    timed so, the optimizer step and loss heads came out at about half what a run of quickstart-cpu spends in them).
    Until session 27 the buffer was read, which leaves clean lines: the layers of diffusion-cpu timed 5-30% faster so
    than after a write (the sample pays the write-back of what the run wrote before it), and the run's waves computed
    8-30% longer than that profile predicted."""
    key = str(device)
    if key not in _evict_buffers:
        _evict_buffers[key] = torch.ones(EVICT_BYTES.get(device.type, EVICT_BYTES["cpu"]) // 4, device=device)
    _evict_buffers[key].add_(1.0)

