"""CLIP's symmetric InfoNCE loss for one data-parallel shard's rows of a gathered batch, chunked.

``a`` and ``b`` ``(N, D)`` are every row of the batch (gathered from the data-parallel shards, unit length); this
shard owns rows ``[first_row, first_row + num_rows)``. Row i's loss is
``0.5 * (CE(scale * a_i . b_j over j, target i) + CE(scale * b_i . a_j over j, target i))``. Only the owned rows'
logits are formed, ``chunk_rows`` at a time (a ``(chunk, N)`` block, not ``(N, N)``), and backward forms them again;
the gradients reach every row of ``a`` and ``b`` (the other shards' rows through the caller's gather, whose backward
sums them back), so the shards' summed losses have the full batch's gradient.

Op ``loom::infonce`` (``loom::infonce_backward``); public entry point :func:`infonce_rows`.
"""

import torch

from kernels.backend import resolve
from kernels.op import backward_call, kernel_op, library_op
from kernels.rows import ce_rows_backward_, ce_rows_forward, chunk_rows_for, spans


def _targets(start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.arange(start, stop, device=device).reshape(-1, 1)
    return index, torch.ones(index.shape, dtype=torch.float32, device=device)


def _infonce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, first_row: int, num_rows: int, chunk_rows: int,
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse of the a->b rows, lse of the b->a rows), float32 ``(num_rows,)`` each; ``scale`` a 0-d tensor."""
    loss = torch.empty(num_rows, dtype=torch.float32, device=a.device)
    lse_a, lse_b = torch.empty_like(loss), torch.empty_like(loss)
    for start, stop in spans(num_rows, chunk_rows):
        rows = slice(first_row + start, first_row + stop)
        index, weight = _targets(rows.start, rows.stop, a.device)
        loss_a, lse_a[start:stop] = ce_rows_forward(torch.mm(a[rows], b.t()).mul_(scale), index, weight, backend)
        loss_b, lse_b[start:stop] = ce_rows_forward(torch.mm(b[rows], a.t()).mul_(scale), index, weight, backend)
        loss[start:stop] = 0.5 * (loss_a + loss_b)
    return loss, lse_a, lse_b


def _infonce_fake(a, b, scale, first_row, num_rows, chunk_rows, backend):
    return tuple(a.new_empty(num_rows, dtype=torch.float32) for _ in range(3))


def _infonce_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, lse_a: torch.Tensor,
                      lse_b: torch.Tensor, first_row: int, chunk_rows: int, backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d a, d b, d scale) of ``sum(grad * loss)``."""
    grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
    grad_scale = torch.zeros((), dtype=torch.float32, device=a.device)
    half = 0.5 * grad.float()
    for start, stop in spans(grad.shape[0], chunk_rows):
        rows = slice(first_row + start, first_row + stop)
        index, weight = _targets(rows.start, rows.stop, a.device)
        # each direction: z = scale * x_mine @ y.T; dz in place; d x_mine = scale dz @ y, d y = scale dz.T @ x_mine,
        # d scale = sum(dz * x_mine @ y.T) = sum(x_mine * (dz @ y))
        for mine, other, grad_mine, grad_other, lse in ((a, b, grad_a, grad_b, lse_a), (b, a, grad_b, grad_a, lse_b)):
            x = mine[rows]
            dz = ce_rows_backward_(torch.mm(x, other.t()).mul_(scale), index, weight, lse[start:stop],
                                   half[start:stop], backend)
            dx = dz @ other
            grad_scale += (x.float() * dx.float()).sum()
            grad_mine[rows] += dx * scale
            grad_other += (dz.t() @ x) * scale
    return grad_a, grad_b, grad_scale.to(scale.dtype)


def _infonce_backward_fake(grad, a, b, scale, lse_a, lse_b, first_row, chunk_rows, backend):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale)


infonce_backward = library_op("loom::infonce_backward", _infonce_backward, _infonce_backward_fake)


def _setup_infonce(ctx, inputs, output):
    a, b, scale, first_row, num_rows, chunk_rows, backend = inputs
    ctx.save_for_backward(a, b, scale, output[1], output[2])
    ctx.first_row, ctx.chunk_rows, ctx.backend = first_row, chunk_rows, backend
    ctx.mark_non_differentiable(output[1], output[2])


def _backward_infonce(ctx, grad, grad_lse_a, grad_lse_b):
    a, b, scale, lse_a, lse_b = ctx.saved_tensors
    da, db, ds = backward_call(ctx, infonce_backward, _infonce_backward)(
        grad.contiguous(), a, b, scale, lse_a, lse_b, ctx.first_row, ctx.chunk_rows, ctx.backend)
    return da, db, ds, None, None, None, None


infonce_op, infonce_call = kernel_op("loom::infonce", _infonce, _infonce_fake, _setup_infonce,
                                     _backward_infonce)


def infonce_rows(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, first_row: int, num_rows: int, *,
                 backend: str | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """Per-row symmetric InfoNCE of rows ``[first_row, first_row + num_rows)`` of the gathered batch ``a``, ``b``
    ``(N, D)`` at logit scale ``scale`` (a 0-d tensor, e.g. ``logit_scale.exp()``): float32 ``(num_rows,)``. Equals
    ``0.5 * (F.cross_entropy(L[mine], mine) + F.cross_entropy(L.T[mine], mine))`` with ``L = scale * a @ b.T``.
    Runs under the caller's autocast as the matmul would (``a`` and ``b`` in the autocast dtype)."""
    if not 0 <= first_row <= first_row + num_rows <= a.shape[0]:
        raise ValueError(f"rows [{first_row}, {first_row + num_rows}) are not within the batch's {a.shape[0]} rows")
    device = a.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else \
        torch.promote_types(a.dtype, b.dtype)
    rows = chunk_rows or chunk_rows_for(num_rows, 2 * a.shape[0])
    with torch.autocast(device.type, enabled=False):
        loss, _, _ = infonce_call(a.to(dtype).contiguous(), b.to(dtype).contiguous(), scale.float(), first_row,
                                  num_rows, rows, resolve(backend, device))
    return loss
