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
