"""Chunked linear + cross-entropy: per-position losses and log-probs of ``softmax(hidden @ weight.T + bias)`` without
ever holding the ``(positions, vocab)`` logits.

One custom op, ``loom::linear_ce`` (with ``loom::linear_ce_backward``), over soft targets (kernels.rows): positions
are taken ``chunk_rows`` at a time; each chunk's logits block is computed (a torch matmul), reduced to its loss and
logsumexp, and freed. Backward computes the block again from the saved hidden states and logsumexp, turns it into its
gradient in place and multiplies it into the hidden and weight gradients. Extra work: one more matmul (4 instead
of 3); memory: one block (kernels.rows.CHUNK_BYTES) instead of the logits, their log-softmax and their gradient.

The public functions built on it (what the runtime and recipes call):

- :func:`linear_cross_entropy`: next-token loss per position, 0 where the target is ``ignore_index``;
- :func:`linear_logprobs`: log-prob of each position's token (the gather of SFT, DPO and GRPO);
- :func:`topk_kl`: GRPO's top-k KL, the reference model's top-k logits against the policy.

Each takes ``backend`` (kernels.backend.resolve: None picks Triton on a GPU, else the reference) and runs under the
caller's autocast as ``F.linear`` would (hidden and weight cast to the autocast dtype, the loss in float32).
"""

from typing import Optional

import torch

from kernels.backend import resolve
from kernels.grad_buffers import accumulating_buffer, grad_buffer
from kernels.op import backward_call, kernel_op, library_op
from kernels.rows import ce_rows_backward_, ce_rows_forward, chunk_rows_for, spans


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.addmm(bias, hidden, weight.t()) if bias is not None else hidden @ weight.t()


def _linear_ce(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], index: torch.Tensor,
               target_weight: torch.Tensor, chunk_rows: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) float32 ``(N,)``: hidden ``(N, H)``, weight ``(V, H)``, bias ``(V,)`` or None (all one dtype);
    targets ``index`` int64 ``(N, K)`` with float32 ``target_weight`` ``(N, K)`` (kernels.rows)."""
    n = hidden.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for start, stop in spans(n, chunk_rows):
        z = _logits(hidden[start:stop], weight, bias)
        loss[start:stop], lse[start:stop] = ce_rows_forward(z, index[start:stop], target_weight[start:stop], backend)
        del z  # before the next block is computed
    return loss, lse


def _linear_ce_fake(hidden, weight, bias, index, target_weight, chunk_rows, backend):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


def _backward_blocks(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor], index: torch.Tensor, target_weight: torch.Tensor, lse: torch.Tensor,
                     chunk_rows: int, backend: str, grad_weight: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d hidden, d bias) of ``sum(grad_loss * loss)``, block by block; d weight is added into ``grad_weight`` (the
    weight's shape and dtype) one block at a time."""
    grad_hidden = torch.empty_like(hidden)
    grad_bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    for start, stop in spans(hidden.shape[0], chunk_rows):
        h = hidden[start:stop]
        z = _logits(h, weight, bias)
        ce_rows_backward_(z, index[start:stop], target_weight[start:stop], lse[start:stop], grad_loss[start:stop],
                          backend)
        torch.mm(z, weight, out=grad_hidden[start:stop])
        grad_weight.addmm_(z.t(), h)
        if bias is not None:
            grad_bias += z.sum(0)
        del z
    return grad_hidden, grad_bias


def _linear_ce_backward(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor], index: torch.Tensor, target_weight: torch.Tensor,
                        lse: torch.Tensor, chunk_rows: int, backend: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias) of ``sum(grad_loss * loss)``; d bias is ``(V,)`` zeros when there is no bias.
    The weight gradient accumulates over chunks in the weight's dtype."""
    grad_weight = torch.zeros_like(weight)
    grad_hidden, grad_bias = _backward_blocks(grad_loss, hidden, weight, bias, index, target_weight, lse, chunk_rows,
                                              backend, grad_weight)
    return grad_hidden, grad_weight, grad_bias


def _linear_ce_backward_fake(grad_loss, hidden, weight, bias, index, target_weight, lse, chunk_rows, backend):
    return torch.empty_like(hidden), torch.empty_like(weight), weight.new_empty(weight.shape[0])


linear_ce_backward = library_op("loom::linear_ce_backward", _linear_ce_backward, _linear_ce_backward_fake)


def _linear_ce_backward_into(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor], index: torch.Tensor, target_weight: torch.Tensor,
                             lse: torch.Tensor, chunk_rows: int, backend: str, grad_weight: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`linear_ce_backward` with the weight gradient added into ``grad_weight`` (the weight's persistent
    gradient buffer, kernels.grad_buffers) block by block instead of returned: (d hidden, d bias)."""
    return _backward_blocks(grad_loss, hidden, weight, bias, index, target_weight, lse, chunk_rows, backend,
                            grad_weight)


def _linear_ce_backward_into_fake(grad_loss, hidden, weight, bias, index, target_weight, lse, chunk_rows, backend,
                                  grad_weight):
    return torch.empty_like(hidden), weight.new_empty(weight.shape[0])


linear_ce_backward_into = library_op("loom::linear_ce_backward_into", _linear_ce_backward_into,
                                     _linear_ce_backward_into_fake, mutates_args=("grad_weight",))


def _setup_linear_ce(ctx, inputs, output):
    hidden, weight, bias, index, target_weight, chunk_rows, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, index, target_weight, output[1])
    ctx.chunk_rows, ctx.backend, ctx.has_bias = chunk_rows, backend, bias is not None
    # the parameter itself (not a cast copy) with a persistent gradient buffer: backward adds into it
    ctx.buffered = weight if grad_buffer(weight) is not None else None
    ctx.mark_non_differentiable(output[1])


def _backward_linear_ce(ctx, grad_loss, grad_lse):
    hidden, weight, bias, index, target_weight, lse = ctx.saved_tensors
    args = (grad_loss.contiguous(), hidden, weight, bias, index, target_weight, lse, ctx.chunk_rows, ctx.backend)
    buffer = accumulating_buffer(ctx.buffered) if ctx.buffered is not None and ctx.needs_input_grad[1] else None
    if buffer is not None:  # still the parameter's .grad: the weight gradient goes straight into it
        grad_hidden, grad_bias = backward_call(ctx, linear_ce_backward_into, _linear_ce_backward_into)(*args, buffer)
        grad_weight = None
    else:
        grad_hidden, grad_weight, grad_bias = backward_call(ctx, linear_ce_backward, _linear_ce_backward)(*args)
    return grad_hidden, grad_weight, grad_bias if ctx.has_bias else None, None, None, None, None


linear_ce_op, linear_ce_call = kernel_op("loom::linear_ce", _linear_ce, _linear_ce_fake, _setup_linear_ce,
                                         _backward_linear_ce)


def _apply(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor,
           target_weight: torch.Tensor, backend: str | None, chunk_rows: int | None) -> torch.Tensor:
    """The per-position loss of the op, ``hidden.shape[:-1]``, cast and chunked as the module docstring says."""
    device = hidden.device
    chosen = resolve(backend, device)
    h = hidden.reshape(-1, hidden.shape[-1])
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = torch.promote_types(h.dtype, weight.dtype)
    h, w = h.to(dtype), weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    rows = chunk_rows or chunk_rows_for(h.shape[0], w.shape[0])
    with torch.autocast(device.type, enabled=False):
        loss, _ = linear_ce_call(h.contiguous(), w, b, index.reshape(h.shape[0], -1),
                                 target_weight.reshape(h.shape[0], -1).float(), rows, chosen)
    return loss.reshape(hidden.shape[:-1])


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, ignore_index: int = -100, *, backend: str | None = None,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="none", ignore_index=ignore_index)``:
    hidden ``(..., H)``, targets ``(...)`` int64 in ``[0, V)`` or ``ignore_index`` -> float32 ``(...)``, 0 where
    ignored. Targets are not range-checked (that would synchronise a GPU): an out-of-range one is an error on
    the reference backend and undefined on Triton."""
    keep = targets != ignore_index
    index = torch.where(keep, targets, torch.zeros_like(targets)).reshape(-1, 1)
    return _apply(hidden, weight, bias, index, keep.reshape(-1, 1).float(), backend, chunk_rows)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor,
                    *, backend: str | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """``log_softmax(F.linear(hidden, weight, bias))`` gathered at ``tokens`` ``(...)``: float32 ``(...)``."""
    index = tokens.reshape(-1, 1)
    return -_apply(hidden, weight, bias, index, torch.ones(index.shape, device=index.device), backend, chunk_rows)


def topk_kl(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ref_logits: torch.Tensor,
            ref_index: torch.Tensor, *, backend: str | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """GRPO's top-k KL per position: ``sum_k q_k (log q_k - log pi(t_k))`` where ``t_k = ref_index[..., k]`` are the
    reference model's top-k tokens, ``q = softmax(ref_logits)`` their probabilities renormalised over the k, and
    ``pi = softmax(F.linear(hidden, weight, bias))`` the policy over the whole vocabulary. Non-negative (the
    policy's mass on the k tokens is at most 1), 0 only when the policy puts exactly ``q`` on them.

    ``ref_logits``/``ref_index``: ``(..., k)``; gradients flow to the policy only (the reference is detached)."""
    q = torch.softmax(ref_logits.detach().float(), dim=-1)
    k = q.shape[-1]
    soft_ce = _apply(hidden, weight, bias, ref_index.reshape(-1, k), q.reshape(-1, k), backend, chunk_rows)
    return soft_ce + (q * torch.log(q.clamp_min(torch.finfo(q.dtype).tiny))).sum(-1)
