"""``python -m bench.kernels [--device cpu|cuda] [--skip-large] [--only KERNEL ...] [--results-dir DIR] [--no-write]``:
each kernel of kernels/ against the naive torch expression it replaces, forward + backward: peak memory, time,
gradient agreement.

Each case runs in its own process (bench.kernels.cases). On CPU the kernels run their plain-torch twins (what
``training.kernels: auto`` runs there); with ``--device cuda`` (a GPU host) their Triton implementations, peak memory
from the CUDA allocator. The issue's target (issue 15): linear + cross-entropy at vocabulary 128k, 4k positions,
hidden 4096, fp32: peak memory <= 1/4 of the naive expression's, gradients equal within 1e-5 relative.

Two memory figures per case: **peak** (bytes above what the process held before the run: everything the forward and
backward allocate, the returned loss and gradients included) and **working memory** (peak minus the returned loss
and gradients, which both variants must produce). The LM-head cases' weight keeps a persistent gradient buffer on
both sides (bench.kernels.cases: allocated before the runs, zeroed in place by each run's zero_grad, autograd's
naive side adding its fresh weight gradient into it, the kernel adding its blocks into it), as a training step has
it with the runtime's persistent buffers; the buffer is not counted as an output of either side. Subtracting the
outputs from the naive side understates its working memory (its peak comes before some of its gradients exist), so
the working-memory ratio is conservative. Writes bench/results/kernels.{json,md}, with ``--device cuda``
kernels-cuda.{json,md} (the CPU table stays).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

import torch

from bench.common import REPO_ROOT, environment, write_results

log = logging.getLogger("bench.kernels")
MIB = 2**20
TARGET = {"kernel": "linear_ce", "size": {"positions": 4096, "hidden": 4096, "vocab": 131072}}
TARGET_MEMORY_RATIO, TARGET_GRAD_REL_ERR = 0.25, 1e-5
# (kernel, size, repeats, warm-up runs); the target case once (about 3 min per variant on 2 CPU cores)
CASES = [
    (TARGET["kernel"], TARGET["size"], 1, 0),
    ("linear_ce", {"positions": 1024, "hidden": 1024, "vocab": 32768}, 3, 1),
    ("logprobs", {"positions": 1024, "hidden": 1024, "vocab": 32768}, 3, 1),
    ("topk_kl", {"positions": 1024, "hidden": 1024, "vocab": 32768, "k": 32}, 3, 1),
    ("infonce", {"batch": 16384, "dim": 512, "shard_rows": 2048}, 3, 1),
    ("rms_norm", {"rows": 8192, "hidden": 4096}, 3, 1),
    ("swiglu", {"rows": 4096, "ffn": 11008}, 3, 1),
]


GPU_RUNS = (3, 1)  # on a GPU every case, the target too, gets at least 3 timed runs after 1 warm-up run


def runs_on(device: str, repeats: int, warmup: int) -> tuple[int, int]:
    """(repeats, warm-up runs) of a case on ``device``. CASES sizes them for 2 CPU cores (the target once, cold); on a
    GPU a run takes a second, and a cold first run times Triton compiling its kernels for the case's block sizes
    (the tiny warm-up case in bench.kernels.cases compiles other ones), not the kernels."""
    if device == "cpu":
        return repeats, warmup
    return max(repeats, GPU_RUNS[0]), max(warmup, GPU_RUNS[1])


def run_case(kernel: str, size: dict, device: str, repeats: int, warmup: int) -> dict:
    """One case in a fresh process (bench.kernels.cases); its record."""
    case = {"kernel": kernel, "size": size, "device": device, "repeats": repeats, "warmup": warmup}
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([sys.executable, "-m", "bench.kernels.cases", json.dumps(case)], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def working(stats: dict) -> float:
    return stats["peak_bytes"] - stats["output_bytes"]


def ratio(a: float, b: float) -> float:
    """a / b; NaN when ``b`` is not positive (a case too small to raise the resident set)."""
    return a / b if b > 0 else float("nan")


def size_text(size: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in size.items())


def target_verdict(record: dict) -> list[str]:
    peak = ratio(record["fused"]["peak_bytes"], record["naive"]["peak_bytes"])
    work = ratio(working(record["fused"]), working(record["naive"]))
    grads_ok = record["grad_rel_err"] <= TARGET_GRAD_REL_ERR
    buffer = record.get("grad_buffer_bytes", 0)
    held = (f"the weight's {buffer / 2**30:.2f} GiB persistent gradient buffer, allocated before both sides, is "
            "not counted; " if buffer else "")
    return [
        f"**Target** (linear + cross-entropy, {size_text(record['size'])}, fp32, {record['backend']}): peak "
        f"{peak:.3f} of the naive expression's ({'met' if peak <= TARGET_MEMORY_RATIO else 'NOT met'}: <= "
        f"{TARGET_MEMORY_RATIO}; {held}the {record['fused']['output_bytes'] / 2**20:.0f} MiB of returned loss and "
        f"gradients are); working memory {work:.3f} ({'met' if work <= TARGET_MEMORY_RATIO else 'NOT met'}); "
        f"gradients {record['grad_rel_err']:.2e} relative (norm of the difference over the norm; largest element "
        f"difference {record['grad_max_rel_err']:.2e} of the largest gradient): {'met' if grads_ok else 'NOT met'} "
        f"(<= {TARGET_GRAD_REL_ERR:g}).",
    ]


def report(records: list[dict], device: str, load: str) -> str:
    lines = [
        "# Kernels: fused vs naive torch, forward + backward",
        "",
        f"Device `{device}`; on CPU the kernels' plain-torch twins (what `training.kernels: auto` runs there), on CUDA "
        "their Triton implementations. Each case in a fresh process; times are medians of the runs (after warm-up "
        f"runs where stated). Load while measuring: {load}. Timings on this shared machine are inflated and noisy; "
        "the memory figures and errors are not.",
        "",
        "| kernel | size | naive peak MiB | kernel peak MiB | peak ratio | working ratio | naive s | kernel s "
        "| grad rel err | output rel err | runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        n, f = r["naive"], r["fused"]
        lines.append(
            f"| {r['kernel']} | {size_text(r['size'])} | {n['peak_bytes'] / MIB:.0f} | {f['peak_bytes'] / MIB:.0f} "
            f"| {ratio(f['peak_bytes'], n['peak_bytes']):.3f} | {ratio(working(f), working(n)):.3f} | {n['median_s']:.2f} "
            f"| {f['median_s']:.2f} | {r['grad_rel_err']:.1e} | {r['output_rel_err']:.1e} "
            f"| {r['repeats']} (+{r['warmup']} warm-up) |")
    lines += ["", "Peak: bytes above what the process held before the run (CPU: resident-set high-water mark, CUDA: the "
              "allocator's), outputs included. Working: peak minus the returned loss and gradients (conservative for "
              "the kernels, see bench/kernels/__main__.py). linear_ce, logprobs and topk_kl: the weight's persistent "
              "gradient buffer exists before both sides run (a training step's `.grad`, zeroed in place), the naive "
              "side adds its weight gradient into it as autograd does, the kernel block by block; it is in neither "
              "side's peak. Errors: norm of the difference over the naive norm, the worst gradient.", ""]
    target = [r for r in records if r["kernel"] == TARGET["kernel"] and r["size"] == TARGET["size"]]
    if target:
        lines += target_verdict(target[0])
    lines += at_peak_lines(records)
    return "\n".join(lines) + "\n"


def at_peak_lines(records: list[dict]) -> list[str]:
    """For each case whose kernel held more than the naive expression at its peak (CUDA runs record what each side
    held there, bench.kernels.peak): both sides' largest allocations live at that moment, by the line that made them."""
    over = [r for r in records if "at_peak" in r["fused"] and r["fused"]["peak_bytes"] > r["naive"]["peak_bytes"]]
    if not over:
        return []
    lines = ["", "## Where the peak goes (kernels above the naive peak)", "",
             "Allocations made during one more, untimed forward + backward of each side and live at its highest "
             "allocated total (CUDA allocator history), grouped by the line that made them.", ""]
    for r in over:
        lines.append(f"**{r['kernel']}** ({size_text(r['size'])}):")
        lines.append("")
        for side in ("naive", "fused"):
            traced = r[side]["at_peak"]
            if "error" in traced:
                lines.append(f"- {side}: not traced ({traced['error']})")
                continue
            parts = "; ".join(f"{p['bytes'] / MIB:.1f} MiB x{p['count']} at `{p['where']}`" for p in traced["parts"])
            lines.append(f"- {side}: {traced['bytes'] / MIB:.1f} MiB: {parts}")
        lines.append("")
    return lines


def load_text() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} CPUs at the end of the run"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the Triton kernels on a GPU")
    parser.add_argument("--skip-large", action="store_true", help="leave out the 128k-vocabulary target case")
    parser.add_argument("--only", nargs="+", help="only these kernels (linear_ce logprobs topk_kl infonce ...)")
    parser.add_argument("--results-dir", help="write the results here instead of bench/results")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; --device cuda runs the Triton kernels on a GPU. Use --device cpu.",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cases = [c for c in CASES if not (args.skip_large and c[1] == TARGET["size"] and c[0] == TARGET["kernel"])]
    cases = [c for c in cases if not args.only or c[0] in args.only]
    records, failed = [], []
    for kernel, size, repeats, warmup in cases:
        log.info("%s (%s) on %s", kernel, size_text(size), args.device)
        try:
            records.append(run_case(kernel, size, args.device, *runs_on(args.device, repeats, warmup)))
        except RuntimeError as error:  # one broken case must not cost the others (a GPU lease is short)
            log.error("%s", error)
            failed.append({"kernel": kernel, "size": size, "error": str(error)})
    text = report(records, args.device, load_text()) + "".join(
        f"\n**FAILED**: {f['kernel']} ({size_text(f['size'])}): {f['error'].strip().splitlines()[-1]}\n" for f in failed)
    if args.no_write:
        print(text)
        return 1 if failed else 0
    env = environment(("torch", "triton", "numpy"))
    from pathlib import Path

    write_results("kernels" if args.device == "cpu" else f"kernels-{args.device}", records, text,
                  {"device": args.device, "cases": cases, "failed": failed}, env=env,
                  results_dir=Path(args.results_dir) if args.results_dir else None)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
