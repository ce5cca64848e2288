"""What a gloo collective costs after a stretch without one (``python -m bench.gloo_idle``).

``loom profile`` times its links (runtime.profiler.profile_links) right after a barrier, with gloo's threads awake. A
run's messages and collectives follow a wave's compute instead. This benchmark times one all-reduce (and one
point-to-point message) of ``BYTES`` between two processes pinned as a run's two CPU workers (runtime.host), each
sample after a barrier and then ``gap`` milliseconds of work that sends nothing (the same small matmuls, an
elementwise add, or a loop of ``time.sleep(0)``) on both ranks. Per case the slower rank's median. Then the two
remedies the runtime uses after matmuls: the all-reduce waited for by runtime.host.finish_collective (polled,
yielding the CPU) and the message's receive posted before the gap (runtime.transfers posts a boundary's receives one
boundary ahead).
The spawned ranks import this module (a function of a ``-m`` module's ``__main__`` cannot be spawned).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

BYTES = 229_376  # chat-sft-cpu's gradient bucket (its two llama layers and embedding)
GAPS_MS = (0, 2, 3, 4, 5, 8)
WORK = ("matmul 128", "add 16k", "sleep(0)")
REMEDIES = ("all-reduce, polled wait", "p2p, receive posted first")
REMEDY_GAPS_MS = (0, 5, 8)


def cases() -> list[tuple[str, str, float]]:
    """(operation, work in the gap, gap in ms): every gap with matmuls, then 5 ms of each other work, then each
    remedy after matmuls."""
    out = [(op, "matmul 128", gap) for op in ("all-reduce", "p2p") for gap in GAPS_MS]
    out += [(op, work, 5) for op in ("all-reduce", "p2p") for work in WORK[1:]]
    return out + [(op, "matmul 128", gap) for op in REMEDIES for gap in REMEDY_GAPS_MS]


def _rank(rank: int, port: int, repeats: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from runtime.host import configure_worker_process, finish_collective
    from runtime.profiler import one_message

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    configure_worker_process(slot=(rank, 2))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x, a, v = torch.zeros(BYTES // 4), torch.randn(128, 128), torch.randn(16384)
    work = {"matmul 128": lambda: a @ a, "add 16k": lambda: v + v, "sleep(0)": lambda: time.sleep(0)}
    runs = {"all-reduce": lambda posted: dist.all_reduce(x), "p2p": lambda posted: one_message(x, rank),
            "all-reduce, polled wait": lambda posted: finish_collective(dist.all_reduce(x, async_op=True), x.device),
            "p2p, receive posted first": lambda posted: [r.wait() for r in posted or dist.batch_isend_irecv(
                [dist.P2POp(dist.isend, x, 1)])]}

    try:
        medians = []
        for op, kind, gap in cases():
            run, fill, samples = runs[op], work[kind], []
            for i in range(2 + repeats):
                dist.barrier()
                posted = dist.batch_isend_irecv([dist.P2POp(dist.irecv, x, 0)]) if (
                    op == REMEDIES[1] and rank == 1) else None
                until = time.perf_counter() + gap / 1e3
                while time.perf_counter() < until:
                    fill()
                start = time.perf_counter()
                run(posted)
                if i >= 2:
                    samples.append(time.perf_counter() - start)
            medians.append(statistics.median(samples))
        slowest = torch.tensor(medians, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:
            (Path(out_dir) / "medians.json").write_text(json.dumps(slowest.tolist()))
    finally:
        dist.destroy_process_group()


def measure(repeats: int) -> list[dict]:
    import torch.multiprocessing as mp

    from runtime.local_world import free_port

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(free_port(), repeats, tmp), nprocs=2, join=True)
        medians = json.loads((Path(tmp) / "medians.json").read_text())
    return [{"operation": op, "work": kind, "gap_ms": gap, "seconds": s}
            for (op, kind, gap), s in zip(cases(), medians)]


def report(records: list[dict], repeats: int) -> str:
    lines = ["# A gloo collective after a stretch without one", "",
             f"Two processes pinned as a run's two CPU workers; {BYTES / 1024:.0f} KiB; per case the slower rank's "
             f"median of {repeats} samples, each after a barrier and then the gap's work on both ranks. "
             "`loom profile` times its links with no gap. The last rows are the runtime's remedies after matmuls: "
             "the all-reduce's wait polled (runtime.host.finish_collective) and the receive posted before the gap "
             "(runtime.transfers posts a boundary's receives one boundary ahead).", "",
             "| operation | work in the gap | gap | time |", "|---|---|---|---|"]
    lines += [f"| {r['operation']} | {r['work']} | {r['gap_ms']:g} ms | {r['seconds'] * 1e3:.3f} ms |" for r in records]
    return "\n".join(lines)
