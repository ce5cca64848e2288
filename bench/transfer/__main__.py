"""Transfer benchmark: moving one activation piece between two workers on this host, point-to-point over gloo
(what the runtime does) vs through Ray's object store.

The runtime issue asks for point-to-point transfers inside the default group and the object store "where that
is cheaper". This measures both for message sizes from 16 KiB to 128 MiB: gloo's ``batch_isend_irecv`` between two
worker processes (one thread each, as the runtime's transfers; runtime.profiler.profile_links, the slower rank,
a larger size never faster than a smaller one), and an object-store hand-over between two Ray
actors (the producer ``ray.put``\\s the piece and tells the consumer with an actor call, the consumer ``ray.get``\\s
it as a zero-copy view and touches it), timed from the producer's put to the consumer holding the tensor. Writes
bench/results/transfer.{json,md}: the medians, the ratio, and the smallest size from which the object store was
cheaper, next to the largest piece the runtime benchmark's plans move.

    python -m bench.transfer [--repeats 15] [--no-write]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np
import torch

from bench.common import write_results
from runtime.profiler import profile_links

log = logging.getLogger("bench.transfer")
SIZES = (1 << 14, 1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 25, 1 << 26, 1 << 27)  # bytes: 16 KiB .. 128 MiB
# the largest piece bench/runtime's hetero.yaml plans move: 16 rows of the big tower's 64 x 128 activation (fp32)
RUNTIME_BENCH_PIECE = 16 * 64 * 128 * 4


def measure_gloo(repeats: int) -> dict[int, float]:
    """The runtime profiler's link measurement (runtime.profiler.profile_links) at :data:`SIZES`."""
    return {int(n): s for n, s in profile_links(repeats, warmup=2, sizes=SIZES)["p2p"]}


def measure_object_store(repeats: int) -> dict[int, float]:
    import ray

    @ray.remote(num_cpus=1)
    class Consumer:
        def take(self, refs: list, started: float) -> float:
            piece = torch.from_numpy(ray.get(refs[0]))  # zero-copy view of the shared-memory object
            float(piece[-1])  # touch it
            return time.time() - started

    @ray.remote(num_cpus=1)
    class Producer:
        def __init__(self, consumer):
            self.consumer = consumer

        def hand_over(self, nbytes: int, repeats: int) -> float:
            piece = np.zeros(nbytes // 4, dtype=np.float32)
            samples = []
            for i in range(repeats + 2):
                started = time.time()  # one host: the two processes share the clock
                ref = ray.put(piece)
                seconds = ray.get(self.consumer.take.remote([ref], started))  # a list: passed as a reference
                if i >= 2:
                    samples.append(seconds)
            return statistics.median(samples)

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2, log_to_driver=False)
    try:
        producer = Producer.remote(Consumer.remote())
        return {nbytes: ray.get(producer.hand_over.remote(nbytes, repeats)) for nbytes in SIZES}
    finally:
        ray.shutdown()


def report(gloo: dict[int, float], store: dict[int, float], repeats: int) -> str:
    cheaper = [n for n in SIZES if store[n] < gloo[n]]
    lines = [
        "# Transfer benchmark: gloo point-to-point vs Ray's object store, measured on this machine",
        "",
        f"One activation piece between two workers on this host; median of {repeats} transfers per size after 2 "
        "warm-up ones. gloo: `batch_isend_irecv` between two worker processes (one thread each), as the runtime's "
        "wave-boundary transfers; object store: the producer actor `ray.put`s the piece and tells the consumer "
        "actor with a call, which `ray.get`s it (zero-copy) and touches it.",
        "",
        "| piece | gloo p2p | object store | object store / gloo |",
        "|---|---|---|---|",
    ]
    for n in SIZES:
        lines.append(f"| {n / 1024**2:.3g} MiB | {gloo[n] * 1e3:.2f} ms | {store[n] * 1e3:.2f} ms | "
                     f"{store[n] / gloo[n]:.2f} |")
    first = f"{cheaper[0] / 1024**2:.3g} MiB" if cheaper else "none of the sizes"
    lines += [
        "",
        f"The object store was cheaper from: **{first}**. The largest piece bench/runtime's plans move is "
        f"{RUNTIME_BENCH_PIECE / 1024**2:.2g} MiB; GPU runs move pieces over NCCL. The runtime therefore moves "
        "every piece point-to-point (see docs/runtime.md, Transfers).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed transfers per size")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.info("gloo point-to-point, %d sizes", len(SIZES))
    gloo = measure_gloo(args.repeats)
    log.info("Ray object store, %d sizes", len(SIZES))
    store = measure_object_store(args.repeats)
    text = report(gloo, store, args.repeats)
    if args.no_write:
        print(text)
        return 0
    records = [{"bytes": n, "gloo_p2p_s": gloo[n], "object_store_s": store[n]} for n in SIZES]
    write_results("transfer", records, text, {"repeats": args.repeats, "runtime_bench_piece_bytes": RUNTIME_BENCH_PIECE})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
