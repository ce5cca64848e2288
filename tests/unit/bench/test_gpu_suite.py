"""bench.gpu without a GPU: one error line and exit code 2 before any work (the CPU self-check runs it for real)."""

from __future__ import annotations

import torch

from bench.gpu.__main__ import main


def test_without_cuda_the_gpu_check_refuses_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--no-write"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no CUDA device here;") and "--device cpu" in err[0]


def test_a_failing_check_is_reported_and_the_others_still_run(monkeypatch, capsys, tmp_path):
    import bench.gpu.__main__ as suite

    ran = []

    def broken(*args):
        ran.append(args)
        raise RuntimeError("NCCL error: unhandled system error\nmore detail")

    monkeypatch.setattr(suite, "training_check", broken)
    monkeypatch.setattr(suite, "pretrained_check", broken)
    monkeypatch.setattr(suite, "save_check_llama", lambda folder: folder)
    monkeypatch.setattr(suite, "megatron_check", lambda device: [{"check": "megatron", "variant": "llama",
                                                                  "max_out_diff": 0.0, "max_grad_diff": 0.0,
                                                                  "ok": True}])
    assert main(["--device", "cpu", "--results-dir", str(tmp_path)]) == 1
    assert len(ran) == 5  # both precisions of both training checks and the profiled one ran although each failed
    text = (tmp_path / "gpu.md").read_text()
    assert text.count("| FAIL | RuntimeError: NCCL error: unhandled system error |") == 5
    assert "| megatron-core llama block, TP=1 | PASS |" in text
