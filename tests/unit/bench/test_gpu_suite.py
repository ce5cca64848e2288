"""bench.gpu without a GPU: one error line and exit code 2 before any work (the CPU self-check runs it for real)."""

from __future__ import annotations

import torch

from bench.gpu.__main__ import main


def test_without_cuda_the_gpu_check_refuses_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--no-write"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no CUDA device here;") and "--device cpu" in err[0]
