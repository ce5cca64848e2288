"""``python -m bench.generation [--repeats N] [--no-write]``: the analytic price of decoding (planner.generation with
the job's device entry, here the CPU row) against the time `loom profile` measures for the same generate MetaOp
(runtime.profile_modes: the runtime's KV-cache decode of the use's rows), per decode shape.

Shapes: Loom llama decoders (fp32, as every CPU job runs) at one row and at a few (each decode step reads every weight
once: bandwidth-bound) and at many rows (compute-bound). Per shape: the prefill and the decode steps measured apart
(the whole generation minus the prefill), each the best of ``--repeats`` runs after a warm-up, with one thread as a
worker runs (the machine is shared: the best run is the one least disturbed by other processes; the load average is
recorded next to the numbers), and the analytic prefill, decode and total with the share of decode steps the model
calls bandwidth-bound. Target: the analytic total within 30% of the measured one in every shape. Writes
bench/results/generation.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from bench.common import environment, write_results
from planner.api import make_cost_model
from planner.costmodel import Layout
from planner.generation import bandwidth_bound_fraction, generate_seconds, generate_time
from planner.metagraph import build_metagraph
from planner.spec import parse_job
from runtime.host import configure_worker_process
from runtime.profile_modes import generate_timer

log = logging.getLogger("bench.generation")
TARGET = 0.30  # |analytic / measured - 1| at most this, every shape

# name -> (model, prompt, new tokens, rows)
SMALL = {"num_layers": 4, "hidden_size": 512, "num_heads": 8, "num_kv_heads": 8, "ffn_hidden_size": 1536,
         "vocab_size": 8192}
WIDE = {"num_layers": 4, "hidden_size": 1024, "num_heads": 16, "num_kv_heads": 4, "ffn_hidden_size": 2816,
        "vocab_size": 16384}
SHAPES = {
    "small, 1 row": (SMALL, 32, 32, 1),
    "small, 8 rows": (SMALL, 32, 32, 8),
    "small, 64 rows": (SMALL, 32, 16, 64),
    "wide (GQA), 1 row": (WIDE, 32, 16, 1),
    "wide (GQA), 64 rows": (WIDE, 32, 8, 64),
}


def job_of(model: dict, prompt: int, new_tokens: int, rows: int):
    """A one-task job on one CPU device whose only use generates ``new_tokens`` after ``prompt`` for ``rows`` rows."""
    return parse_job({
        "name": "gen-bench", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
        "components": {"lm": {"kind": "llama", "seq_len": prompt + new_tokens, **model}},
        "tasks": [{"name": "gen", "batch_size": rows, "loss": "lm", "components": [
            {"component": "lm", "name": "rollout", "mode": "generate", "seq_len": prompt, "new_tokens": new_tokens,
             "temperature": 1.0}]}],
        "training": {"precision": "fp32"},
    })


def run_shape(name: str, repeats: int) -> dict:
    model, prompt, new_tokens, rows = SHAPES[name]
    job = job_of(model, prompt, new_tokens, rows)
    (op,) = build_metagraph(job).metaops
    cost_model = make_cost_model(job)
    dev, dec = cost_model.hw.device, op.gen.decoder
    rate, element = dev.peak_flops * dev.efficiency, cost_model.grad_bytes
    prefill, decode = generate_seconds(dec, rows, 1, rate, dev.mem_bandwidth, dev.launch_s, element)
    total = generate_time(cost_model, op, Layout(1, 1))
    timer = generate_timer(job, op, torch.device("cpu"), clock=time.thread_time)

    def best(prefill_only: bool) -> tuple[float, float]:
        """(CPU seconds, wall seconds), each the best of ``repeats`` runs after a warm-up."""
        timer(rows, prefill_only)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            runs.append((timer(rows, prefill_only), time.perf_counter() - start))
        return min(c for c, _ in runs), min(w for _, w in runs)

    (measured_total, wall_total), (measured_prefill, wall_prefill) = best(False), best(True)
    measured_decode = max(measured_total - measured_prefill, 0.0)
    record = {
        "shape": name, "layers": dec.layers, "hidden": dec.hidden, "kv_dim": dec.kv_dim, "params": dec.params,
        "vocab": model["vocab_size"], "prompt": prompt, "new_tokens": new_tokens, "rows": rows,
        "bandwidth_bound": bandwidth_bound_fraction(dec, rows, 1, rate, dev.mem_bandwidth, element),
        "analytic_prefill_s": prefill, "analytic_decode_s": decode, "analytic_s": total,
        "measured_prefill_s": measured_prefill, "measured_decode_s": measured_decode, "measured_s": measured_total,
        "wall_prefill_s": wall_prefill, "wall_s": wall_total, "ratio": total / measured_total,
        "ratio_wall": total / wall_total, "kernels_per_step": dec.kernels, "load_1min": os.getloadavg()[0],
    }
    log.info("%s: analytic %.1f ms (prefill %.1f), measured CPU %.1f ms (prefill %.1f; x%.2f), wall %.1f ms, load %.1f",
             name, total * 1e3, prefill * 1e3, measured_total * 1e3, measured_prefill * 1e3, record["ratio"],
             wall_total * 1e3, record["load_1min"])
    return record


NOTES = ["", "What the model got wrong and what changed (measured on this machine, one thread, CPU time):", "",
         "- The CPU row's memory bandwidth was 15 GB/s, from one 8192 x 4096 matrix-vector product (14-20 GB/s "
         "today). A decode step reads a model's many smaller matrices one `F.linear` at a time; through the 29 weight "
         "matrices of the small shape (71 MB, 1-16 MB each) at one row that streams at 9.2 GB/s, and the old entry "
         "priced the bandwidth-bound shapes at 0.53-0.64 of the measured CPU time (this bench before the change, "
         "load 13-18). The entry is now 9 GB/s (planner/devices.py), what the decode's own kernels read at.",
         "- The kernel latency per decode step (20 us x the layers' kernels) matches a decode of a tiny model "
         "(hidden 32, where no weight read matters): 0.45 ms per step at 1 layer, 1.3-1.5 ms at 4-8 layers against "
         "0.3, 1.3 and 2.6 ms priced. Unchanged.",
         "- Still low (0.70 at 8 rows): between the bandwidth- and compute-bound ends, MKL's small-M sgemm reads "
         "the weights slower than its matrix-vector product (the same 29 matrices: 7.7 ms at 1 row, 10.6 ms at 2, "
         "11.9 ms at 8; 59 GFLOP/s at 64 rows), and the roofline's max(FLOPs, bytes) takes no account of that "
         "ridge. A term for it would change every device's decode price (planner/generation.py is shared with "
         "bench/rl), so it is left as measured here; `loom profile` prices such a job from the measurement."]


def markdown(records: list[dict], device, repeats: int) -> str:
    worst = max(abs(r["ratio"] - 1) for r in records)
    lines = [
        "# Generation: the analytic price against `loom profile`'s measurement (CPU)", "",
        f"Device entry `cpu` (planner/devices.py): {device.peak_flops * device.efficiency / 1e9:.0f} GFLOP/s sustained, "
        f"{device.mem_bandwidth / 1e9:.1f} GB/s, {device.launch_s * 1e6:.0f} us per kernel. Measured: the runtime's "
        "KV-cache decode (runtime.profile_modes, as `loom profile` times a generate MetaOp), fp32, one thread, best of "
        f"{repeats} runs after a warm-up, as the thread's CPU time (`time.thread_time`: on this shared machine, the run "
        "without its waits for a core; wall times are in the JSON, equal within 2% at the loads below); decode = the "
        "whole generation minus the prefill timed alone. The 1-minute load average (2 CPUs) is given per shape.", "",
        "| shape | params | prompt + new | rows | bandwidth-bound steps | analytic prefill ms | measured prefill ms | "
        "analytic decode ms | measured decode ms | analytic ms | measured ms | analytic / measured | load |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e6:.1f} M | {r['prompt']} + {r['new_tokens']} | {r['rows']} | "
            f"{r['bandwidth_bound']:.0%} | {r['analytic_prefill_s'] * 1e3:.1f} | {r['measured_prefill_s'] * 1e3:.1f} | "
            f"{r['analytic_decode_s'] * 1e3:.1f} | {r['measured_decode_s'] * 1e3:.1f} | {r['analytic_s'] * 1e3:.1f} | "
            f"{r['measured_s'] * 1e3:.1f} | {r['ratio']:.2f} | {r['load_1min']:.1f} |")
    met = "met" if worst <= TARGET else "not met"
    lines += ["", f"**Target**: the analytic total within {TARGET:.0%} of the measured one in every shape: {met} "
              f"(worst {worst:.1%})."] + NOTES
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    configure_worker_process()  # one thread, as a CPU worker (and `loom profile`) runs
    records = [run_shape(name, args.repeats) for name in args.shapes]
    device = make_cost_model(job_of(*SHAPES[args.shapes[0]])).hw.device
    text = markdown(records, device, args.repeats)
    print(text)
    if not args.no_write:
        write_results("generation", records, text, {"repeats": args.repeats, "shapes": SHAPES, "target": TARGET},
                      env=environment(("torch", "numpy")))


if __name__ == "__main__":
    main()
