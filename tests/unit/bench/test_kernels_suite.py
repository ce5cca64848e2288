"""bench.kernels on tiny cases: every kernel's record (the kernel agrees with the naive expression, memory and
times are measured) and the report; --device cuda without a GPU is one error line and exit code 2."""

from __future__ import annotations

import torch

from bench.kernels.__main__ import TARGET, main, report
from bench.kernels.cases import CASES, run_case

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
