"""One kernel case of ``python -m bench.kernels``, measured in its own process: the naive torch expression, then the
kernel, each forward + backward, with peak memory, time and the kernel's gradients against the naive ones.

Run as ``python -m bench.kernels.cases '<json case>'``; prints one JSON record. A fresh process per case keeps one
case's allocations out of another's peak. Peak memory on CPU is the process's resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` before each run) above its resident set just before the run; on
CUDA, ``torch.cuda.max_memory_allocated`` above the allocated bytes before the run.

The LM-head cases' weight has a persistent gradient buffer on both sides, allocated and touched before either side
runs, as a training step with the runtime's persistent buffers has it (kernels.grad_buffers; runtime.executor keeps
one for every weight a loss kernel reads): each run starts with the step's zero_grad (the buffer zeroed in place),
then autograd's naive side adds its fresh weight gradient into it (AccumulateGrad, in place) and the kernel adds its
blocks into it directly. The buffer is neither side's output; the other inputs' gradients are returned fresh.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.kernels.peak import traced_peak
from kernels import infonce_rows, linear_cross_entropy, linear_logprobs, rms_norm, swiglu, topk_kl
from kernels.grad_buffers import has_grad_buffer, keep_grad_buffer, zero_grads

ROOT = Path(__file__).resolve().parents[2]

Case = tuple[list[torch.Tensor], Callable[..., torch.Tensor], Callable[..., torch.Tensor]]  # leaves, naive, kernel
BUFFERED = {"linear_ce", "logprobs", "topk_kl"}  # cases whose weight (leaf 1) keeps a persistent gradient buffer


def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1))


class PeakMemory:
    """Bytes allocated at the peak of a block above those allocated when it started (CPU: resident set)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.bytes = _status_kib("VmHWM") * 1024 - self.start


def _leaf(gen: torch.Generator, device: torch.device, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(device).requires_grad_()


def _lm(size: dict, device, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, h, v = size["positions"], size["hidden"], size["vocab"]
    hidden, weight = _leaf(gen, device, n, h), _leaf(gen, device, v, h, scale=h**-0.5)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    return hidden, weight, targets


def linear_ce_case(size: dict, device: torch.device, gen: torch.Generator, backend: str) -> Case:
    hidden, weight, targets = _lm(size, device, gen)
    targets[::16] = -100  # some ignored positions (prompt tokens)
    naive = lambda h, w: F.cross_entropy(F.linear(h, w), targets, reduction="none")  # noqa: E731
    fused = lambda h, w: linear_cross_entropy(h, w, None, targets, backend=backend)  # noqa: E731
    return [hidden, weight], naive, fused


def logprobs_case(size: dict, device: torch.device, gen: torch.Generator, backend: str) -> Case:
    hidden, weight, tokens = _lm(size, device, gen)
    naive = lambda h, w: torch.log_softmax(F.linear(h, w), -1).gather(-1, tokens[:, None])[:, 0]  # noqa: E731
    fused = lambda h, w: linear_logprobs(h, w, None, tokens, backend=backend)  # noqa: E731
    return [hidden, weight], naive, fused


def topk_kl_case(size: dict, device: torch.device, gen: torch.Generator, backend: str) -> Case:
    hidden, weight, _ = _lm(size, device, gen)
    k = size["k"]
    ref_logits = torch.randn(hidden.shape[0], k, generator=gen).to(device)
    ref_index = torch.randint(0, weight.shape[0], (hidden.shape[0], k), generator=gen).to(device)
    q = torch.softmax(ref_logits, -1)

    def naive(h, w):
        return (q * (q.log() - torch.log_softmax(F.linear(h, w), -1).gather(-1, ref_index))).sum(-1)

    fused = lambda h, w: topk_kl(h, w, None, ref_logits, ref_index, backend=backend)  # noqa: E731
    return [hidden, weight], naive, fused


def rms_norm_case(size: dict, device: torch.device, gen: torch.Generator, backend: str) -> Case:
    n, h = size["rows"], size["hidden"]
    x, r, w = _leaf(gen, device, n, h), _leaf(gen, device, n, h), _leaf(gen, device, h)

    def naive(x, r, w):
        s = x + r
        return F.rms_norm(s, (h,), w, 1e-6) + s

    def fused(x, r, w):
        y, s = rms_norm(x, w, 1e-6, r, backend=backend)
        return y + s

    return [x, r, w], naive, fused


def swiglu_case(size: dict, device: torch.device, gen: torch.Generator, backend: str) -> Case:
    gate, up = _leaf(gen, device, size["rows"], size["ffn"]), _leaf(gen, device, size["rows"], size["ffn"])
    return [gate, up], lambda g, u: F.silu(g) * u, lambda g, u: swiglu(g, u, backend=backend)


def infonce_case(size: dict, device: torch.device, gen: torch.Generator, backend: str) -> Case:
    n, d, mine = size["batch"], size["dim"], size["shard_rows"]
    a, b = (F.normalize(torch.randn(n, d, generator=gen), dim=-1).to(device).requires_grad_() for _ in range(2))
    log_scale = torch.tensor(2.5, device=device, requires_grad=True)
    rows = torch.arange(mine, device=device)

    def naive(a, b, s):  # what the plain InfoNCE head computes: the whole batch's logits, then this shard's rows
        logits = s.exp() * a @ b.T
        return 0.5 * (F.cross_entropy(logits[rows], rows, reduction="none")
                      + F.cross_entropy(logits.T[rows], rows, reduction="none"))

    fused = lambda a, b, s: infonce_rows(a, b, s.exp(), 0, mine, backend=backend)  # noqa: E731
    return [a, b, log_scale], naive, fused


CASES = {"linear_ce": linear_ce_case, "logprobs": logprobs_case, "topk_kl": topk_kl_case,
         "rms_norm": rms_norm_case, "swiglu": swiglu_case, "infonce": infonce_case}


def forward_backward(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
    """One step's forward + backward of ``fn``: zero_grad first (a persistent buffer zeroed in place, other ``.grad`` s
    dropped), then ``backward``; (output, every input's gradient). A buffered input's gradient is its buffer."""
    zero_grads(inputs)
    out = fn(*inputs)
    grad_out = torch.linspace(-1.0, 2.0, out.numel(), device=out.device).reshape(out.shape)  # per-row weights
    out.backward(grad_out)
    grads = [x.grad for x in inputs]
    zero_grads(x for x in inputs if not has_grad_buffer(x))  # the fresh gradients are the caller's now
    return out.detach(), grads


def fresh_bytes(out: torch.Tensor, grads: list[torch.Tensor], inputs: list[torch.Tensor]) -> int:
    """Bytes of what a run returned new: its output and the gradients of the inputs without a persistent buffer."""
    fresh = [g for g, x in zip(grads, inputs, strict=True) if not has_grad_buffer(x)]
    return out.numel() * out.element_size() + sum(g.numel() * g.element_size() for g in fresh)


def relative_error(got: torch.Tensor, want: torch.Tensor, rows: int = 1024) -> tuple[float, float]:
    """(||got - want|| / ||want||, max|got - want| / max|want|), in slices of ``rows`` (no full-size temporaries)."""
    diff_sq = want_sq = max_diff = max_want = 0.0
    g, w = got.reshape(got.shape[0] if got.dim() else 1, -1), want.reshape(want.shape[0] if want.dim() else 1, -1)
    for start in range(0, g.shape[0], rows):
        d = (g[start:start + rows].double() - w[start:start + rows].double())
        ws = w[start:start + rows].double()
        diff_sq += float(d.square().sum())
        want_sq += float(ws.square().sum())
        max_diff, max_want = max(max_diff, float(d.abs().max())), max(max_want, float(ws.abs().max()))
    return (diff_sq / want_sq) ** 0.5 if want_sq else 0.0, max_diff / max_want if max_want else 0.0


def _timed(fn, inputs, device: torch.device, repeats: int, warmup: int) -> tuple[dict, torch.Tensor, list]:
    for _ in range(warmup):
        forward_backward(fn, inputs)
    samples = []
    with PeakMemory(device) as peak:  # the first timed run gives the peak
        start = time.perf_counter()
        out, grads = forward_backward(fn, inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    for _ in range(repeats - 1):
        del out, grads
        start = time.perf_counter()
        out, grads = forward_backward(fn, inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    output_bytes = fresh_bytes(out, grads, inputs)
    stats = {"peak_bytes": peak.bytes, "output_bytes": output_bytes,
                 "median_s": sorted(samples)[len(samples) // 2], "samples_s": samples}
    return stats, out, grads


def run_case(kernel: str, size: dict, device: str, repeats: int, warmup: int, seed: int = 0) -> dict:
    """The record of one case: naive and kernel peak bytes, times, outputs' and gradients' relative errors."""
    dev = torch.device(device)
    backend = "triton" if dev.type == "cuda" else "reference"
    # one-time costs first (the custom ops' first call imports torch._dynamo): both variants on a tiny case
    tiny, tiny_naive, tiny_fused = CASES[kernel]({k: min(v, 8) for k, v in size.items()}, dev,
                                                 torch.Generator().manual_seed(seed), backend)
    if kernel in BUFFERED:  # the buffered op's first call too
        keep_grad_buffer(tiny[1])
    forward_backward(tiny_naive, tiny)
    forward_backward(tiny_fused, tiny)
    wrt, naive, fused = CASES[kernel](size, dev, torch.Generator().manual_seed(seed), backend)
    if kernel in BUFFERED:
        keep_grad_buffer(wrt[1]).zero_()  # allocated and written (resident) before either side is measured
    naive_stats, naive_out, naive_grads = _timed(naive, wrt, dev, repeats, warmup)
    naive_grads = [g.clone() if has_grad_buffer(x) else g for g, x in zip(naive_grads, wrt)]  # the kernel reuses it
    kernel_stats, kernel_out, kernel_grads = _timed(fused, wrt, dev, repeats, warmup)
    errors = [relative_error(g, w) for g, w in zip(kernel_grads, naive_grads, strict=True)]
    output_error = relative_error(kernel_out.float(), naive_out.float())[0]
    if dev.type == "cuda":  # one more untimed run of each side: what it holds at its peak (bench.kernels.peak)
        del naive_out, naive_grads, kernel_out, kernel_grads
        naive_stats["at_peak"] = traced_peak(lambda: forward_backward(naive, wrt), ROOT)
        kernel_stats["at_peak"] = traced_peak(lambda: forward_backward(fused, wrt), ROOT)
    return {"kernel": kernel, "size": size, "device": device, "backend": backend, "repeats": repeats,
            "warmup": warmup, "threads": torch.get_num_threads(), "naive": naive_stats, "fused": kernel_stats,
            "grad_buffer_bytes": sum(x.numel() * x.element_size() for x in wrt if has_grad_buffer(x)),
            "output_rel_err": output_error,
            "grad_rel_err": max(e[0] for e in errors), "grad_max_rel_err": max(e[1] for e in errors)}


if __name__ == "__main__":
    case = json.loads(sys.argv[1])
    print(json.dumps(run_case(**case)))
