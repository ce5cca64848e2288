"""Cross-entropy of the rows of one logits block against weighted targets: the step every chunked loss shares.

Row ``r`` of ``z`` ``(R, V)`` has ``K`` target columns ``index[r]`` (int64) with float weights ``weight[r]``:
``loss[r] = lse(z_r) * sum_k weight[r, k] - sum_k weight[r, k] * z[r, index[r, k]]`` (soft-target cross-entropy;
a hard target is K = 1, weight 1, or 0 where the position is ignored). The gradient of ``sum_r grad[r] * loss[r]``
is ``(softmax(z_r) * sum_k weight[r, k] - weight[r] scattered at index[r]) * grad[r]`` and overwrites ``z``
(in place: the block's memory is reused for its gradient).

Two twins with one contract: plain torch (the reference, any device) and kernels.triton_kernels.
"""

from __future__ import annotations

import torch

from kernels.backend import Backend, triton_module


def ce_rows_forward(z: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, backend: Backend
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) float32 ``(R,)`` of the rows of ``z``; ``z`` is left as it is."""
    if backend == "triton":
        return triton_module().ce_rows_forward(z, index, weight)
    zf = z.float()
    lse = torch.logsumexp(zf, dim=-1)
    loss = lse * weight.sum(-1) - (weight * zf.gather(1, index)).sum(-1)
    return loss, lse


def ce_rows_backward_(z: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, lse: torch.Tensor,
                      grad: torch.Tensor, backend: Backend) -> torch.Tensor:
    """``z`` overwritten with the gradient of ``sum_r grad[r] * loss[r]`` with respect to it; returns ``z``."""
    if backend == "triton":
        return triton_module().ce_rows_backward_(z, index, weight, lse, grad)
    zf = z if z.dtype == torch.float32 else z.float()  # in place for float32 blocks, the common case on CPU
    zf.sub_(lse[:, None]).exp_().mul_(weight.sum(-1, keepdim=True))
    zf.scatter_add_(1, index, -weight.to(zf.dtype))
    zf.mul_(grad[:, None].to(zf.dtype))
    if zf is not z:
        z.copy_(zf)
    return z


CHUNK_BYTES = 256 * 2**20  # float32 bytes of the logits block a chunked loss holds at once (per block it keeps)


def chunk_rows_for(num_rows: int, width: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a float32 ``(rows, width)`` block stays within ``chunk_bytes`` (at least 1 row)."""
    return max(1, min(num_rows, chunk_bytes // (4 * max(width, 1))))


def spans(num_rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each chunk of ``chunk_rows`` rows; the last one ragged."""
    assert chunk_rows >= 1, f"chunk_rows {chunk_rows} < 1"
    return [(start, min(start + chunk_rows, num_rows)) for start in range(0, num_rows, chunk_rows)]
