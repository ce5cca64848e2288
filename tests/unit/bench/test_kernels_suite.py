"""bench.kernels on tiny cases: every kernel's record (the kernel agrees with the naive expression, memory and
times are measured) and the report; --device cuda without a GPU is one error line and exit code 2; what a CUDA run
held at its peak, from a written allocator trace (bench.kernels.peak)."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.kernels.__main__ import CASES as BENCH_CASES
from bench.kernels.__main__ import TARGET, main, report, runs_on
from bench.kernels.cases import CASES, run_case
from bench.kernels.peak import live_at_peak, traced_peak, where

ROOT = Path(__file__).resolve().parents[3]

TINY = {"linear_ce": {"positions": 9, "hidden": 4, "vocab": 33}, "logprobs": {"positions": 9, "hidden": 4, "vocab": 33},
        "topk_kl": {"positions": 9, "hidden": 4, "vocab": 33, "k": 3}, "infonce": {"batch": 12, "dim": 4, "shard_rows": 5},
        "rms_norm": {"rows": 6, "hidden": 10}, "swiglu": {"rows": 6, "ffn": 10}}


def test_every_kernel_case_agrees_with_its_naive_expression() -> None:
    assert set(TINY) == set(CASES)
    records = [run_case(kernel, size, "cpu", repeats=1, warmup=0) for kernel, size in TINY.items()]
    for r in records:
        assert r["grad_rel_err"] < 1e-5 and r["output_rel_err"] < 1e-5, r
        for side in ("naive", "fused"):
            assert len(r[side]["samples_s"]) == 1 and r[side]["output_bytes"] > 0
    target = dict(records[0], size=TARGET["size"])  # the verdict line appears for the target's size only
    text = report([*records, target], "cpu", "load average 1.0")
    assert text.count("\n| ") == len(records) + 2 and "**Target**" in text


def test_without_cuda_the_gpu_run_refuses_in_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--device", "cuda", "--no-write"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no CUDA device here;")


def frames(path: str, line: int, name: str) -> list[dict]:
    """An allocation's Python stack as the allocator records it, innermost first (a torch frame above Loom's)."""
    return [{"filename": "/usr/lib/python3/site-packages/torch/functional.py", "line": 1, "name": "inner"},
            {"filename": str(ROOT / "bench/kernels/cases.py"), "line": 5, "name": "forward_backward"},
            {"filename": str(ROOT / path), "line": line, "name": name}]


def test_live_at_peak_keeps_what_was_allocated_and_not_yet_freed_at_the_highest_total() -> None:
    mib = 2**20
    events = [
        {"action": "alloc", "addr": 1, "size": 128 * mib, "frames": frames("kernels/norms.py", 10, "fwd")},
        {"action": "alloc", "addr": 2, "size": 64 * mib, "frames": frames("kernels/norms.py", 20, "tmp")},
        {"action": "free_requested", "addr": 2, "size": 64 * mib},
        {"action": "free_completed", "addr": 2, "size": 64 * mib},
        {"action": "free_requested", "addr": 99, "size": 8 * mib},  # allocated before the trace: not counted
        {"action": "alloc", "addr": 3, "size": 16 * mib, "frames": frames("kernels/triton_kernels.py", 30, "bwd")},
        {"action": "alloc", "addr": 4, "size": 16 * mib, "frames": frames("kernels/triton_kernels.py", 30, "bwd")},
        {"action": "alloc", "addr": 5, "size": 48 * mib, "frames": []},
        {"action": "free_requested", "addr": 5, "size": 48 * mib},
        {"action": "free_requested", "addr": 1, "size": 128 * mib},
    ]
    traced = live_at_peak(events, ROOT)
    assert traced["bytes"] == (128 + 16 + 16 + 48) * mib  # above the 192 MiB of the first two; 1 and 2 never coexist
    assert traced["parts"] == [
        {"where": "kernels/norms.py:10 fwd", "bytes": 128 * mib, "count": 1},
        {"where": "no Python frame (the autograd engine's backward)", "bytes": 48 * mib, "count": 1},
        {"where": "kernels/triton_kernels.py:30 bwd", "bytes": 32 * mib, "count": 2},
    ]
    # a naive expression's allocation has only the bench's frames: its line there
    assert where(frames("kernels/norms.py", 20, "tmp")[:2], ROOT) == "bench/kernels/cases.py:5 forward_backward"


def test_the_report_says_where_a_kernel_above_the_naive_peak_holds_its_memory() -> None:
    record = run_case("rms_norm", TINY["rms_norm"], "cpu", repeats=1, warmup=0)
    assert "Where the peak goes" not in report([record], "cpu", "load average 1.0")  # CPU runs trace nothing
    naive = {"bytes": 512 * 2**20, "parts": [{"where": "x.py:1 f", "bytes": 512 * 2**20, "count": 4}]}
    fused = {"bytes": 560 * 2**20, "parts": [{"where": "kernels/triton_kernels.py:160 rms_norm_backward",
                                              "bytes": 16 * 2**20, "count": 1}]}
    cuda = dict(record, naive=dict(record["naive"], peak_bytes=naive["bytes"], at_peak=naive),
                fused=dict(record["fused"], peak_bytes=fused["bytes"], at_peak=fused))
    text = report([cuda], "cuda", "load average 1.0")
    assert "- fused: 560.0 MiB: 16.0 MiB x1 at `kernels/triton_kernels.py:160 rms_norm_backward`" in text
    assert "- naive: 512.0 MiB: 512.0 MiB x4 at `x.py:1 f`" in text
    below = dict(cuda, fused=dict(cuda["fused"], peak_bytes=100))
    assert "Where the peak goes" not in report([below], "cuda", "load average 1.0")


def test_a_gpu_run_warms_up_every_case_the_target_too() -> None:
    target = next(c for c in BENCH_CASES if c[0] == TARGET["kernel"] and c[1] == TARGET["size"])
    assert target[2:] == (1, 0)  # on 2 CPU cores the target runs once, cold (minutes per variant)
    assert runs_on("cpu", 1, 0) == (1, 0)
    assert all(runs_on("cuda", r, w) >= (3, 1) and runs_on("cuda", r, w)[1] >= 1 for _, _, r, w in BENCH_CASES)


def test_a_peak_that_cannot_be_traced_is_an_error_entry_not_a_failed_case(monkeypatch) -> None:
    """Without the CUDA allocator's history (here: no GPU) the timed figures stand and the trace says why it is
    missing; ``run`` is not called without a history to record it in."""
    calls = []

    def broken_history(*args, **kwargs):
        raise RuntimeError("no CUDA allocator here")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", broken_history)
    traced = traced_peak(lambda: calls.append(1), ROOT)
    assert traced == {"error": "RuntimeError: no CUDA allocator here"} and calls == []
