"""``python -m bench.kernels.step_peak [--no-write]``: whether keeping the LM head's gradient buffer between steps
raises a training step's peak memory (docs/kernels.md, "Weight-gradient accumulation fusion").

A small next-token model (4 ``Linear + GELU`` layers, LayerNorm, a ``(vocab, hidden)`` LM head through
kernels.linear_cross_entropy) trains AdamW steps of 1 and 2 accumulated micro-batches twice: once as Loom's runtime
did before (``zero_grad(set_to_none=True)``: the kernel returns a fresh weight gradient, autograd adopts or adds it),
once with the head's persistent buffer (runtime.optim: zeroed in place, the kernel adds into it). The peak is the
highest total of bytes the CPU allocator holds during a steady-state step (the third: AdamW state exists), from the
profiler's memory events, plus what was held when the step began (parameters, AdamW state, the buffer).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from bench.common import environment, write_results
from runtime.heads import next_token_losses
from runtime.optim import keep_kernel_grad_buffers, lm_kernel_weights, zero_gradients

MIB = 2**20
SIZE = {"positions": 2048, "hidden": 512, "vocab": 32768, "layers": 4}


class Model(nn.Module):
    def __init__(self, hidden: int, vocab: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, vocab, bias=False)

    def kernel_weights(self) -> list[nn.Parameter]:
        return lm_kernel_weights(self.out, "auto")

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.gelu(layer(x))
        return next_token_losses(self.norm(x), self.out, targets, "auto").mean()


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the parameters, their ``.grad`` s and the optimizer's state (each storage once)."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def step_peak(buffered: bool, micro: int, steps: int = 3) -> dict:
    torch.manual_seed(0)
    model = Model(SIZE["hidden"], SIZE["vocab"], SIZE["layers"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    buffers = keep_kernel_grad_buffers([model]) if buffered else []
    gen = torch.Generator().manual_seed(1)
    rows = SIZE["positions"] // micro
    x = torch.randn(micro, rows, SIZE["hidden"], generator=gen)
    targets = torch.randint(0, SIZE["vocab"], (micro, rows), generator=gen)
    for step in range(steps):
        last = step == steps - 1
        start = held_bytes(model, optimizer)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) if last else _nothing() as prof:
            for m in range(micro):
                model.loss(x[m], targets[m]).backward()
            optimizer.step()
            zero_gradients(optimizer, buffers)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return {"buffered": buffered, "micro_batches": micro, "held_at_start_bytes": start, "peak_above_bytes": peak,
            "peak_bytes": start + peak, "head_weight_bytes": model.out.weight.numel() * 4}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def report(records: list[dict]) -> str:
    lines = ["# A training step's peak with and without the LM head's persistent gradient buffer", "",
             f"Model: {SIZE['layers']} x (Linear + GELU) at hidden {SIZE['hidden']}, LayerNorm, LM head vocab "
             f"{SIZE['vocab']} (weight {records[0]['head_weight_bytes'] / MIB:.0f} MiB) through "
             f"kernels.linear_cross_entropy (reference twin), {SIZE['positions']} positions per step, fp32, AdamW; the "
             "third step measured (CPU allocator, profiler memory events).", "",
             "| micro-batches | set_to_none: held at start MiB | peak MiB | buffer: held at start MiB | peak MiB "
             "| peak ratio |", "|---:|---:|---:|---:|---:|---:|"]
    for micro in sorted({r["micro_batches"] for r in records}):
        plain, kept = (next(r for r in records if r["micro_batches"] == micro and r["buffered"] == b)
                       for b in (False, True))
        lines.append(f"| {micro} | {plain['held_at_start_bytes'] / MIB:.1f} | {plain['peak_bytes'] / MIB:.1f} "
                     f"| {kept['held_at_start_bytes'] / MIB:.1f} | {kept['peak_bytes'] / MIB:.1f} "
                     f"| {kept['peak_bytes'] / plain['peak_bytes']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels.step_peak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    records = [step_peak(buffered, micro) for micro in (1, 2) for buffered in (False, True)]
    text = report(records)
    print(text)
    if not args.no_write:
        write_results("kernels-step-peak", records, text, {"size": SIZE}, env=environment(("torch",)))
    else:
        print(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
