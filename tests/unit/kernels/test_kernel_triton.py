"""Every Triton kernel against its reference twin under ``TRITON_INTERPRET=1`` (CPU tensors): forward and gradients,
ragged shapes (rows not a multiple of the chunk, vocabularies and widths not a multiple of the block), and blocks
shrunk so that the kernels' loops run several times.

Triton picks its interpreter when it is first imported, so the checks need a process where ``TRITON_INTERPRET=1``
was set before anything imported triton (torch.compile's inductor does, elsewhere in the suite):
:func:`test_triton_kernels_under_the_interpreter` runs this file in a fresh interpreter with it set, where the
checks below run; in a process without it they are skipped (that test reports their failures). Everything is
skipped only where triton is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import infonce_rows, linear_cross_entropy, rms_norm, swiglu, topk_kl
from kernels.grad_buffers import keep_grad_buffer

ROOT = Path(__file__).resolve().parents[3]
INSTALLED = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INSTALLED, reason="triton is not installed (pip install 'loom[test]' pins it)")
in_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="needs TRITON_INTERPRET=1 from the process start: test_triton_kernels_under_the_interpreter "
    "runs these in such a process")
if INSTALLED and INTERPRETED:
    from kernels import triton_kernels


@pytest.mark.skipif(INTERPRETED, reason="this process is the interpreter run")
def test_triton_kernels_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", __file__],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    # every check ran there; the only skip is this test itself
    summary = re.search(r"\b(\d+) passed, 1 skipped\b", run.stdout)
    assert summary and int(summary.group(1)) >= 16, run.stdout[-2000:]


def twins(fn, inputs: list[torch.Tensor], *args, **kwargs):
    """(output, input gradients) of ``fn(*inputs, *args, backend=b)`` for b = triton, reference."""
    out = {}
    for backend in ("triton", "reference"):
        leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
        value = fn(*leaves, *args, backend=backend, **kwargs)
        value = value if isinstance(value, tuple) else (value,)
        weight = [torch.linspace(-1, 2, v.numel()).reshape(v.shape) for v in value]
        total = sum((v * w).sum() for v, w in zip(value, weight))
        out[backend] = (value, torch.autograd.grad(total, [x for x in leaves if x is not None]))
    return out["triton"], out["reference"]


def assert_twins_equal(fn, inputs, *args, **kwargs) -> None:
    (tri_out, tri_grads), (ref_out, ref_grads) = twins(fn, inputs, *args, **kwargs)
    for got, want in zip(tri_out + tri_grads, ref_out + ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.fixture(params=[16, None], ids=["block16", "default-block"])
def block_v(request, monkeypatch):
    """Rows of logits read 16 columns at a time (several blocks, the last ragged), or the default block."""
    if request.param is not None:
        monkeypatch.setattr(triton_kernels, "MAX_BLOCK_V", request.param)


@in_interpreter
@pytest.mark.parametrize("n,h,v,chunk", [(13, 8, 37, 5), (9, 16, 50, 9)])
def test_linear_cross_entropy(block_v, n, h, v, chunk) -> None:
    gen = torch.Generator().manual_seed(n)
    hidden, weight, bias = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen), torch.randn(v)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[1::4] = -100
    assert_twins_equal(linear_cross_entropy, [hidden, weight, bias], targets, chunk_rows=chunk)
    assert_twins_equal(linear_cross_entropy, [hidden, weight, None], targets, chunk_rows=chunk)


@in_interpreter
def test_topk_kl(block_v) -> None:
    gen = torch.Generator().manual_seed(5)
    hidden, weight, bias = torch.randn(7, 6, generator=gen), torch.randn(45, 6, generator=gen), torch.randn(45)
    ref_logits = torch.randn(7, 3, generator=gen)
    ref_index = torch.stack([torch.randperm(45, generator=gen)[:3] for _ in range(7)])
    assert_twins_equal(topk_kl, [hidden, weight, bias], ref_logits, ref_index, chunk_rows=3)


@in_interpreter
@pytest.mark.parametrize("loss", ["linear_ce", "topk_kl"])
def test_weight_gradient_into_its_buffer(block_v, loss) -> None:
    """With the weight's persistent gradient buffer (kernels.grad_buffers), the Triton path adds the weight gradient
    of two micro-batches into it and returns none to autograd, and ends where the reference returning its gradients
    ends (every gradient, fp32)."""
    gen = torch.Generator().manual_seed(7)
    n, h, v, k = 12, 8, 45, 3
    hidden, weight, bias = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen), torch.randn(v)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::5] = -100
    ref_logits, ref_index = torch.randn(n, k, generator=gen), torch.randint(0, v, (n, k), generator=gen)
    fns = {"linear_ce": lambda h, w, b, rows, backend: linear_cross_entropy(h, w, b, targets[rows], backend=backend,
                                                                            chunk_rows=4),
           "topk_kl": lambda h, w, b, rows, backend: topk_kl(h, w, b, ref_logits[rows], ref_index[rows],
                                                             backend=backend, chunk_rows=4)}
    ends = {}
    for backend, buffered in (("triton", True), ("reference", False)):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        handed = []
        leaves[1].register_hook(lambda g: handed.append(g is not None))
        if buffered:
            buffer = keep_grad_buffer(leaves[1])
        for rows in (slice(0, 7), slice(7, n)):  # two micro-batches, one ragged
            out = fns[loss](leaves[0][rows], leaves[1], leaves[2], rows, backend)
            (out * torch.linspace(-1, 2, out.numel())).sum().backward()
        assert sum(handed) == (0 if buffered else 2), backend
        assert not buffered or leaves[1].grad is buffer
        ends[backend] = [t.grad for t in leaves]
    for got, want in zip(ends["triton"], ends["reference"], strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@in_interpreter
@pytest.mark.parametrize("n,d,first,num,chunk", [(11, 6, 2, 5, 2), (4, 3, 0, 4, 4)])
def test_infonce_rows(block_v, n, d, first, num, chunk) -> None:
    gen = torch.Generator().manual_seed(n)
    a, b = (F.normalize(torch.randn(n, d, generator=gen), dim=-1) for _ in range(2))
    assert_twins_equal(infonce_rows, [a, b, torch.tensor(3.0)], first, num, chunk_rows=chunk)


@in_interpreter
@pytest.mark.parametrize("rows,width", [(7, 19), (5, 32), (1, 3)])
@pytest.mark.parametrize("residual", [True, False])
def test_rms_norm(monkeypatch, rows, width, residual) -> None:
    monkeypatch.setattr(triton_kernels, "ROW_PROGRAMS", 3)  # several rows per program: the weight gradient's loop
    gen = torch.Generator().manual_seed(rows)
    x, r, w = torch.randn(rows, width, generator=gen), torch.randn(rows, width, generator=gen), torch.randn(width)

    def fn(x, w, r=None, *, backend):
        return rms_norm(x, w, 1e-6, r, backend=backend)

    assert_twins_equal(fn, [x, w, r] if residual else [x, w])


@in_interpreter
@pytest.mark.parametrize("shape", [(2500,), (3, 5, 7)])
def test_swiglu(shape) -> None:
    gen = torch.Generator().manual_seed(len(shape))
    assert_twins_equal(swiglu, [torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)])


def saved_storages(fn) -> dict[int, tuple[torch.dtype, int]]:
    """{storage pointer: (dtype, elements)} of every tensor autograd saves while ``fn()`` runs, and ``fn()``."""
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = (t.dtype, t.untyped_storage().nbytes() // t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@in_interpreter
@pytest.mark.parametrize("residual", [True, False])
def test_rms_norm_saves_only_its_input_and_the_per_row_rstd(residual) -> None:
    """Backward keeps the normalised input (x + residual) at its own dtype, the weight and one float32 1/rms per row:
    no float32 copy, no output, no full-width rstd (issue 15: the GPU run measured the Triton path above torch's)."""
    rows, width = 6, 40
    gen = torch.Generator().manual_seed(5)
    x, r = (torch.randn(rows, width, generator=gen).to(torch.bfloat16).requires_grad_() for _ in range(2))
    w = torch.randn(width, generator=gen).to(torch.bfloat16).requires_grad_()
    for backend in ("triton", "reference"):
        saved, (y, s) = saved_storages(lambda: rms_norm(x, w, 1e-6, r if residual else None, backend=backend))
        expected = {s.untyped_storage().data_ptr(): (torch.bfloat16, rows * width),
                    w.untyped_storage().data_ptr(): (torch.bfloat16, width)}
        assert len(saved) == 3, (backend, saved)
        rstd = [v for k, v in saved.items() if k not in expected]
        assert rstd == [(torch.float32, rows)], (backend, saved)
        assert all(saved[k] == v for k, v in expected.items()), (backend, saved)


@in_interpreter
def test_row_programs_on_a_gpu_fill_its_multiprocessors(monkeypatch) -> None:
    """RMSNorm's backward keeps a float32 ``(programs, H)`` weight-gradient partial: on a GPU two programs per
    multiprocessor (an H200's 132: 264 rows, 4 MiB at H 4096, where 1024 programs held 16 MiB), never more than rows."""
    props = type("Props", (), {"multi_processor_count": 132})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert triton_kernels.row_programs(8192, torch.device("cuda")) == 2 * 132  # dW partials: 264 rows, not 1024
    assert triton_kernels.row_programs(100, torch.device("cuda")) == 100
    assert triton_kernels.row_programs(8192, torch.device("cpu")) == triton_kernels.ROW_PROGRAMS


class _NoLaunch:
    """A Triton kernel whose launches do nothing: what its launcher allocates stays, what it computes does not."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@in_interpreter
def test_rms_norm_triton_path_allocates_no_full_size_temporary(monkeypatch) -> None:
    """Forward + backward of ``rms_norm(x, w, eps, r)`` summed with its residual output, as bench.kernels runs it, at
    the peak of what the torch allocator holds (profiler memory events, kernel launches stubbed): the output, its
    gradient, the saved sum and the input gradient (4 full tensors), the weight-gradient partials (one float32 row
    per program) and per-row or per-column vectors; no fifth full tensor (a float32 copy, a kept output)."""
    from torch.profiler import ProfilerActivity, profile

    for name in ("_rms_forward_kernel", "_rms_backward_kernel"):
        monkeypatch.setattr(triton_kernels, name, _NoLaunch())
    monkeypatch.setattr(triton_kernels, "ROW_PROGRAMS", 4)
    rows, width = 256, 512
    full = rows * width * 4
    gen = torch.Generator().manual_seed(3)
    x, r = (torch.randn(rows, width, generator=gen).requires_grad_() for _ in range(2))
    w = torch.randn(width, generator=gen).requires_grad_()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y, s = rms_norm(x, w, 1e-6, r, backend="triton")
        out = y + s
        del y, s
        torch.autograd.grad(out, [x, r, w], grad_outputs=torch.ones_like(out))
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    small = 8 * 4 * (rows + width)  # a few per-row (rstd) and per-column (dW) float32 vectors
    assert 4 * full <= peak <= 4 * full + 4 * width * 4 + small, (peak / full, [e.nbytes() for e in events])
