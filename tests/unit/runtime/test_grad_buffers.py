"""Persistent gradient buffers of the weights a loss kernel reads (runtime.optim.keep_kernel_grad_buffers,
kernels.grad_buffers): which weights get one, that a step with them trains exactly as with ``zero_grad(set_to_none=
True)``, and that the gradient sync and ZeRO-1's zero_grad keep the buffer as the gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels.grad_buffers import grad_buffer, has_grad_buffer, keep_grad_buffer
from runtime.gradsync import GradientSync
from runtime.heads import NextTokenHead, next_token_losses
from runtime.optim import keep_kernel_grad_buffers, lm_kernel_weights, zero_gradients
from runtime.steps import GradBucket


def head(kernels: str) -> NextTokenHead:
    torch.manual_seed(0)
    return NextTokenHead("caption", ["lm"], "text", 0, hidden_size=8, vocab_size=37, kernels=kernels)


def test_only_the_projection_a_kernel_reads_gets_a_buffer() -> None:
    h = head("auto")
    assert h.kernel_weights() == [h.out.weight]
    assert keep_kernel_grad_buffers([h, nn.Linear(3, 3)]) == [h.out.weight]
    assert has_grad_buffer(h.out.weight) and h.out.weight.grad is None  # lazily: its first gradient becomes it
    assert not has_grad_buffer(h.out.bias) and not has_grad_buffer(h.norm.weight)
    assert keep_kernel_grad_buffers([head("off")]) == []  # the naive expression: nothing to add into
    frozen = head("auto").requires_grad_(False)
    assert keep_kernel_grad_buffers([frozen]) == []
    assert lm_kernel_weights(nn.Sequential(nn.Linear(8, 37)), "auto") == []  # not a plain linear: no kernel


def train(buffered: bool, steps: int = 3, micro: int = 2) -> tuple[list[torch.Tensor], int]:
    """A next-token head trained ``steps`` AdamW steps of ``micro`` accumulated micro-batches: its parameters, and
    how many full-size weight gradients autograd handed on (a tensor hook sees each)."""
    h = head("auto")
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(steps, micro, 5, 8, generator=gen)
    targets = torch.randint(0, 37, (steps, micro, 5), generator=gen)
    handed = []
    h.out.weight.register_hook(lambda g: handed.append(g is not None))
    params = list(h.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    buffers = keep_kernel_grad_buffers([h]) if buffered else []
    for step in range(steps):
        for m in range(micro):
            next_token_losses(h.normed(hidden[step, m]), h.out, targets[step, m], "auto").sum().backward()
        first = h.out.weight.grad if step == 0 else first
        optimizer.step()
        zero_gradients(optimizer, buffers)
        if buffered:  # the first step's gradient is kept, zeroed, and the kernel adds into it from then on
            assert h.out.weight.grad is first and grad_buffer(h.out.weight) is first
            assert float(first.abs().sum()) == 0
        else:
            assert h.out.weight.grad is None
    return [p.detach() for p in params], sum(handed)


def test_a_step_with_the_buffer_trains_as_with_set_to_none() -> None:
    got, handed_buffered = train(buffered=True)
    want, handed_plain = train(buffered=False)
    # the first step's 2 micro-batches hand their gradients to autograd; the 4 after go into the kept buffer
    assert handed_buffered == 2 and handed_plain == 6
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


class _Done:
    def wait(self) -> None:
        pass


def test_the_gradient_sync_sums_into_the_buffer() -> None:
    """After the all-reduce the parameter's gradient is still its buffer, holding the summed values; a parameter
    without one gets the summed bucket's view as before."""
    a, b = nn.Parameter(torch.ones(2, 3)), nn.Parameter(torch.ones(4))
    buffer = keep_grad_buffer(a)
    b.grad = torch.zeros(4)
    flat = torch.arange(10, dtype=torch.float32)
    sync = GradientSync()
    bucket = GradBucket(0, (0, 1), [a, b])
    sync.__dict__["_grad_buckets"] = [bucket]  # the cached property, as a worker computes it
    sync._sync_gradients([(bucket, flat, _Done())])
    assert a.grad is buffer and torch.equal(buffer, flat[:6].view(2, 3))
    assert b.grad.data_ptr() == flat[6:].data_ptr()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero1_zero_grad_keeps_the_buffer(set_to_none: bool) -> None:
    from runtime.zero import ShardedAdamW

    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    buffer = keep_grad_buffer(a)
    buffer.fill_(2.0)
    b.grad = torch.ones(3)
    optimizer = ShardedAdamW.__new__(ShardedAdamW)  # only its shares: no process group needed for zero_grad
    optimizer.inner, optimizer.shares = None, [type("Share", (), {"params": [a, b]})()]
    optimizer.zero_grad(set_to_none=set_to_none)
    assert a.grad is buffer and float(buffer.abs().sum()) == 0 and b.grad is None


def test_a_marked_weight_without_a_gradient_gets_no_buffer() -> None:
    """A head this device holds but computes no loss with (a rollout worker's copy of the policy's): no buffer, no
    gradient, as with set_to_none."""
    h = head("auto")
    buffers = keep_kernel_grad_buffers([h])
    zero_gradients(None, buffers)
    assert h.out.weight.grad is None and grad_buffer(h.out.weight) is None
