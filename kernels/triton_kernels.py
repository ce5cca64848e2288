"""The Triton kernels and their launchers: row-wise cross-entropy over a logits block, RMSNorm (+ residual), SwiGLU.

Imported only when a caller asks for the Triton backend (kernels.backend.triton_usable): on a GPU, or on CPU tensors
under ``TRITON_INTERPRET=1``, which must be set before this module is first imported (``triton.jit`` reads it when
it decorates). Each launcher takes and returns torch tensors and matches its twin in kernels.rows / kernels.norms;
matrix products stay in torch (cuBLAS), the kernels fuse what would otherwise be several passes over memory.

Cross-entropy works on "soft" targets: row ``r`` of a logits block ``z`` has ``K`` target columns ``index[r]`` with
weights ``weight[r]``; its loss is ``lse(z_r) * sum(weight[r]) - sum_k weight[r, k] * z[r, index[r, k]]``. A hard
target is ``K = 1`` with weight 1 (0 for an ignored position); GRPO's top-k KL uses the reference's k tokens and
their renormalised probabilities.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 4096  # columns of a logits row one step of the row loop reads
ROW_PROGRAMS = 1024  # at most this many programs share a reduction over rows (RMSNorm's weight gradient)
PROGRAMS_PER_SM = 2  # on a GPU, RMSNorm's backward runs this many programs per multiprocessor (its dW partials)


@triton.jit
def _ce_forward_kernel(z_ptr, stride, index_ptr, weight_ptr, lse_ptr, loss_ptr, V, K,
                       BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per-lane running max and sum of exp (online logsumexp)
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that saw only padding stay at s = 0
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    top = tl.max(m, 0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), 0))
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    idx = tl.load(index_ptr + row * K + ks, mask=kmask, other=0)
    w = tl.load(weight_ptr + row * K + ks, mask=kmask, other=0.0).to(tl.float32)
    picked = tl.load(base + idx, mask=kmask, other=0.0).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, lse * tl.sum(w, 0) - tl.sum(w * picked, 0))


@triton.jit
def _ce_backward_kernel(z_ptr, stride, index_ptr, weight_ptr, lse_ptr, grad_ptr, V, K,
                        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    idx = tl.load(index_ptr + row * K + ks, mask=kmask, other=-1)
    w = tl.load(weight_ptr + row * K + ks, mask=kmask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_ptr + row).to(tl.float32)
    total = tl.sum(w, 0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        cmask = cols < V
        x = tl.load(base + cols, mask=cmask, other=0.0).to(tl.float32)
        # the target weights that fall in this block, without a scatter (no race with the dense store below)
        hit = tl.sum(tl.where(cols[:, None] == idx[None, :], w[None, :], 0.0), 1)
        d = (tl.exp(x - lse) * total - hit) * g
        tl.store(base + cols, d.to(z_ptr.dtype.element_ty), mask=cmask)


HIT_ELEMENTS = 2**15  # BLOCK_V x BLOCK_K of the backward's target comparison: many targets read fewer columns a step


def _blocks(z: torch.Tensor, index: torch.Tensor) -> tuple[int, int]:
    block_k = triton.next_power_of_2(max(index.shape[1], 1))
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(z.shape[1]), max(16, HIT_ELEMENTS // block_k))
    return block_v, block_k


def ce_rows_forward(z: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) per row of ``z`` ``(R, V)`` (unit stride along V) for targets ``index``/``weight`` ``(R, K)``."""
    rows, vocab = z.shape
    lse = torch.empty(rows, dtype=torch.float32, device=z.device)
    loss = torch.empty(rows, dtype=torch.float32, device=z.device)
    if rows:
        block_v, block_k = _blocks(z, index)
        _ce_forward_kernel[(rows,)](z, z.stride(0), index.contiguous(), weight.contiguous(), lse, loss, vocab,
                                    index.shape[1], BLOCK_V=block_v, BLOCK_K=block_k)
    return loss, lse


def ce_rows_backward_(z: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, lse: torch.Tensor,
                      grad: torch.Tensor) -> torch.Tensor:
    """``z`` overwritten with d(sum_r grad[r] * loss[r]) / dz: ``(softmax(z_r) * sum(w_r) - w_r at index_r) * grad[r]``."""
    rows, vocab = z.shape
    if rows:
        block_v, block_k = _blocks(z, index)
        _ce_backward_kernel[(rows,)](z, z.stride(0), index.contiguous(), weight.contiguous(), lse.contiguous(),
                                     grad.contiguous(), vocab, index.shape[1], BLOCK_V=block_v, BLOCK_K=block_k)
    return z


@triton.jit
def _rms_forward_kernel(x_ptr, res_ptr, w_ptr, y_ptr, sum_ptr, rstd_ptr, H, eps,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(res_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(sum_ptr + row * H + cols, x.to(sum_ptr.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * H + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_backward_kernel(dy_ptr, dsum_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, N, H,
                         HAS_DSUM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    for r in range(pid, N, programs):
        row = tl.full([], 0, tl.int64) + r  # 64-bit offsets (the interpreter hands a Python int)
        x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        wdy = w * dy
        dx = rstd * (wdy - xhat * (tl.sum(xhat * wdy, 0) / H))
        if HAS_DSUM:
            dx += tl.load(dsum_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * H + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(dw_ptr + pid.to(tl.int64) * H + cols, dw, mask=mask)


def rms_norm_forward(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, x + residual (``x`` itself without a residual), rstd) of rows ``(N, H)``."""
    rows, width = x.shape
    y = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else x
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(width)
        _rms_forward_kernel[(rows,)](x, residual if residual is not None else x, weight, y, summed, rstd, width, eps,
                                     HAS_RES=residual is not None, BLOCK=block, num_warps=_warps(block))
    return y, summed, rstd


def rms_norm_backward(grad_y: torch.Tensor, grad_sum: torch.Tensor | None, summed: torch.Tensor,
                      weight: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d input, d weight): the input's gradient includes ``grad_sum``, the gradient reaching x + residual."""
    rows, width = summed.shape
    programs = row_programs(rows, summed.device)
    dx = torch.empty_like(summed)
    dw = torch.zeros(programs, width, dtype=torch.float32, device=summed.device)
    if rows:
        block = triton.next_power_of_2(width)
        _rms_backward_kernel[(programs,)](grad_y, grad_sum if grad_sum is not None else grad_y, summed, weight, rstd,
                                          dx, dw, rows, width, HAS_DSUM=grad_sum is not None, BLOCK=block,
                                          num_warps=_warps(block))
    return dx, dw.sum(0).to(weight.dtype)


def row_programs(rows: int, device: torch.device) -> int:
    """Programs of RMSNorm's backward: each loops over every ``programs``-th row and keeps one float32 row of weight
    gradient, so the ``(programs, H)`` partials it leaves cost memory: on a GPU enough programs to fill its
    multiprocessors (PROGRAMS_PER_SM each), never more than ROW_PROGRAMS or the rows."""
    programs = ROW_PROGRAMS
    if device.type == "cuda":
        programs = min(programs, PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count)
    return max(1, min(rows, programs))


def _warps(block: int) -> int:
    """Warps of a program that holds ``block`` columns of a row: 16 columns per thread, 4 to 16 warps."""
    return max(4, min(16, block // 512))


@triton.jit
def _swiglu_forward_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(dout_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(dg_ptr + offs, (d * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (d * g * sig).to(du_ptr.dtype.element_ty), mask=mask)


SWIGLU_BLOCK = 1024


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` elementwise (contiguous tensors of one shape)."""
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_forward_kernel[(triton.cdiv(n, SWIGLU_BLOCK),)](gate, up, out, n, BLOCK=SWIGLU_BLOCK)
    return out


def swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of ``silu(gate) * up`` for ``grad`` of its output."""
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_backward_kernel[(triton.cdiv(n, SWIGLU_BLOCK),)](grad, gate, up, dg, du, n, BLOCK=SWIGLU_BLOCK)
    return dg, du
