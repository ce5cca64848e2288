"""runtime.host: a worker process keeps freed memory in its heap for the next step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

# Free heap bytes (glibc's mallinfo2().fordblks) after a 16 MiB tensor is freed, before and after configuring the
# process: by default glibc serves the block by mmap and unmaps it on free (nothing kept, the next step faults it in
# again page by page); a configured worker keeps it in the heap.
SNIPPET = """
import ctypes, torch
from runtime.host import configure_worker_process

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def kept_after_free():
    block = torch.ones(16 << 20, dtype=torch.uint8)
    del block
    return libc.mallinfo2().fordblks

default = kept_after_free()
configure_worker_process()
print(default, kept_after_free(), torch.get_num_threads())
"""


def test_configured_worker_keeps_freed_memory_and_one_thread():
    out = subprocess.run([sys.executable, "-c", SNIPPET], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    default, kept, threads = (int(v) for v in out.stdout.split())
    assert default < 16 << 20 <= kept
    assert threads == 1


def job_on(device: str):
    from planner.spec import parse_job

    return parse_job({"name": "d", "cluster": {"num_nodes": 1, "devices_per_node": 4, "device": device},
                      "components": {"t": {"kind": "mlp", "num_layers": 1, "hidden_size": 8}},
                      "tasks": [{"name": "a", "batch_size": 4, "components": [{"component": "t"}]}]})


def test_workers_compute_on_a_gpu_only_for_a_gpu_job_that_sees_one(monkeypatch):
    import torch

    from runtime.host import backend_for, worker_device

    assert worker_device(job_on("cpu"), 3) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_device(job_on("h100"), 3) == torch.device("cpu")  # a GPU job sent to a cluster without GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert worker_device(job_on("h100"), 3) == torch.device("cuda", 1)  # this host's GPUs in turn
    assert worker_device(job_on("cpu"), 3) == torch.device("cpu")
    assert (backend_for(torch.device("cuda", 0)), backend_for(torch.device("cpu"))) == ("nccl", "gloo")


def test_a_cpu_worker_is_pinned_only_where_the_workers_are_exactly_the_cpus(monkeypatch):
    import os

    from runtime import host

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {5, 2, 7, 3})
    assert [host.pin_cpu(i, 4) for i in range(4)] == [2, 3, 5, 7]  # the i-th CPU this process may use
    assert host.pin_cpu(1, 3) is None and host.pin_cpu(1, 5) is None  # room left, or two to a core: the kernel's
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    assert host.pin_cpu(0, 1) is None  # one worker alone is never pinned


# Pinned for a block: every thread (one started before, one inside) on the one CPU, the process's CPUs back after.
PIN_SNIPPET = """
import os, threading
from runtime.host import pinned

cpus = sorted(os.sched_getaffinity(0))
stop = threading.Event()
before = threading.Thread(target=stop.wait); before.start()
with pinned(len(cpus) - 1, len(cpus)) as cpu:
    seen = {}
    inside = threading.Thread(target=lambda: seen.update(inside=os.sched_getaffinity(0))); inside.start(); inside.join()
    every = {tid: os.sched_getaffinity(int(tid)) for tid in os.listdir("/proc/self/task")}
after = os.sched_getaffinity(0)
stop.set(); before.join()
print(cpu, len(cpus), all(a == {cpu} for a in every.values()) and len(every) >= 2, seen["inside"] == {cpu},
      after == set(cpus))
"""


def test_pinned_puts_every_thread_on_one_cpu_and_gives_them_back():
    out = subprocess.run([sys.executable, "-c", PIN_SNIPPET], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    cpu, count, *checks = out.stdout.split()
    if int(count) < 2:  # one CPU: nothing to pin
        assert cpu == "None" and checks[-1] == "True"
        return
    assert checks == ["True", "True", "True"]


def test_every_profiled_sample_starts_from_cold_caches(monkeypatch):
    """loom profile writes EVICT_BYTES before each timed sample (runtime.host.evict_caches), warm-up included, so each
    op is timed as a run meets it once a step after other work wrote its caches full; the buffer is allocated once per
    device and every eviction writes all of it."""
    import torch

    import runtime.host as host
    import runtime.profiler as profiler

    events: list[str] = []
    real = host.evict_caches
    monkeypatch.setattr(profiler, "evict_caches", lambda device: (events.append("evict"), real(device)))
    profiler._median_seconds(lambda: events.append("run"), repeats=3, warmup=2)
    assert events == ["evict", "run"] * 5
    buffer = host._evict_buffers["cpu"]
    assert buffer.numel() * buffer.element_size() == host.EVICT_BYTES["cpu"]
    before = buffer.clone()
    host.evict_caches(torch.device("cpu"))
    assert host._evict_buffers["cpu"] is buffer
    assert bool((buffer == before + 1).all())


class _Work:
    """A collective in flight that completes after ``polls`` calls of is_completed."""

    def __init__(self, polls: int):
        self.polls, self.asked, self.waited = polls, 0, 0

    def is_completed(self) -> bool:
        self.asked += 1
        return self.asked > self.polls

    def wait(self) -> bool:
        self.waited += 1
        return True


def test_a_pinned_cpu_worker_polls_its_collective_before_it_waits(monkeypatch):
    """runtime.host.finish_collective: a CPU worker pinned to one CPU polls the collective (yielding) until it completes
    and then waits on it (which raises its error); a worker sharing CPUs, or a CUDA one, only waits; a collective that
    takes longer than POLL_SECONDS is waited for after polling that long."""
    import torch

    import runtime.host as host

    yields = []
    monkeypatch.setattr(host.os, "sched_yield", lambda: yields.append(1))
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: {0})
    work = _Work(polls=3)
    host.finish_collective(work, torch.device("cpu"))
    assert (work.asked, len(yields), work.waited) == (4, 3, 1)
    for affinity, device in (({0, 1}, "cpu"), ({0}, "cuda")):
        monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid, cpus=affinity: cpus)
        work = _Work(polls=3)
        host.finish_collective(work, torch.device(device))
        assert (work.asked, work.waited) == (0, 1)
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(host, "POLL_SECONDS", 0.01)
    work = _Work(polls=10**9)
    host.finish_collective(work, torch.device("cpu"))
    assert work.waited == 1 and work.asked > 1
