"""RMSNorm (+ residual add) and SwiGLU, fused: one pass forward, one backward, only the inputs (and RMSNorm's
per-row ``1/rms``) saved.

- ``loom::rms_norm``: ``s = x + residual`` (no add without a residual), ``y = s / sqrt(mean(s^2) + eps) * weight``
  over the last dimension; returns ``y`` and ``s`` (the new residual stream), as ``nn.RMSNorm`` after an add.
- ``loom::swiglu``: ``silu(gate) * up``, Llama's MLP activation.

Both compute in float32 and round once to the input dtype. Public entry points: :func:`rms_norm`, :func:`swiglu`
(``backend`` as kernels.backend.resolve).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from kernels.backend import resolve, triton_module
from kernels.op import backward_call, kernel_op, library_op


def _rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
              backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, rstd) for rows ``x`` ``(N, H)``; ``s`` is ``x + residual``, an empty ``(0,)`` tensor without a residual
    (an output may not alias an input); ``rstd`` float32 ``(N,)``."""
    if backend == "triton":
        y, summed, rstd = triton_module().rms_norm_forward(x, residual, weight, eps)
    else:  # in place where it can: one float32 row-block temporary besides the outputs
        s = x.float() if residual is None else x.float() + residual.float()
        rstd = torch.rsqrt(torch.einsum("nh,nh->n", s, s) / s.shape[-1] + eps)
        y = (s * rstd[:, None]).mul_(weight.float()).to(x.dtype)
        summed = s.to(x.dtype)
    return y, summed if residual is not None else x.new_empty(0), rstd


def _rms_norm_fake(x, residual, weight, eps, backend):
    return torch.empty_like(x), torch.empty_like(x) if residual is not None else x.new_empty(0), \
        x.new_empty(x.shape[0], dtype=torch.float32)


def _rms_norm_backward(grad_y: torch.Tensor, grad_sum: Optional[torch.Tensor], summed: torch.Tensor,
                       weight: torch.Tensor, rstd: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(d s, d weight); ``d s`` (the gradient of x and of the residual) includes ``grad_sum``, what reached ``s``."""
    if backend == "triton":
        return triton_module().rms_norm_backward(grad_y.contiguous(), grad_sum, summed, weight, rstd)
    dy = grad_y.float()
    xhat = summed.float() * rstd[:, None]
    grad_weight = torch.einsum("nh,nh->h", dy, xhat).to(weight.dtype)
    wdy = dy * weight.float()
    mean = torch.einsum("nh,nh->n", xhat, wdy) / summed.shape[-1]
    dx = wdy.sub_(xhat.mul_(mean[:, None])).mul_(rstd[:, None])  # rstd * (w dy - xhat * mean(xhat * w dy))
    if grad_sum is not None:
        dx.add_(grad_sum)
    return dx.to(summed.dtype), grad_weight


def _rms_norm_backward_fake(grad_y, grad_sum, summed, weight, rstd, backend):
    return torch.empty_like(summed), torch.empty_like(weight)


rms_norm_backward = library_op("loom::rms_norm_backward", _rms_norm_backward, _rms_norm_backward_fake)


def _setup_rms_norm(ctx, inputs, output):
    x, residual, weight, eps, backend = inputs
    ctx.has_residual, ctx.backend = residual is not None, backend
    ctx.save_for_backward(output[1] if residual is not None else x, weight, output[2])
    ctx.mark_non_differentiable(output[2])


def _backward_rms_norm(ctx, grad_y, grad_sum, grad_rstd):
    summed, weight, rstd = ctx.saved_tensors
    has_sum = ctx.has_residual and grad_sum is not None and grad_sum.numel() > 0
    dx, dw = backward_call(ctx, rms_norm_backward, _rms_norm_backward)(
        grad_y, grad_sum.contiguous() if has_sum else None, summed, weight, rstd, ctx.backend)
    return dx, dx if ctx.has_residual else None, dw, None, None


rms_norm_op, rms_norm_call = kernel_op("loom::rms_norm", _rms_norm, _rms_norm_fake, _setup_rms_norm,
                                       _backward_rms_norm)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nn.RMSNorm(x + residual), x + residual)`` over the last dimension (``(y, x)`` without a residual). ``x``
    and ``residual`` are promoted to one dtype (the residual stream's), as ``x + residual`` would."""
    chosen = resolve(backend, x.device)
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    rows = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    res = residual.reshape(rows.shape).to(dtype).contiguous() if residual is not None else None
    y, summed, _ = rms_norm_call(rows, res, weight.to(dtype), float(eps), chosen)
    return y.reshape(x.shape), summed.reshape(x.shape) if residual is not None else x


def _swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    """``silu(gate) * up`` of two contiguous tensors of one shape and dtype."""
    if backend == "triton":
        return triton_module().swiglu_forward(gate, up)
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def _swiglu_fake(gate, up, backend):
    return torch.empty_like(gate)


def _swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of ``silu(gate) * up``."""
    if backend == "triton":
        return triton_module().swiglu_backward(grad.contiguous(), gate, up)
    g, u, d = gate.float(), up.float(), grad.float()
    sig = torch.sigmoid(g)
    silu = g * sig
    # d silu / d g = sig + silu (1 - sig) = sig + silu - silu sig; in place: one temporary besides the outputs
    grad_gate = (silu * sig).neg_().add_(sig).add_(silu).mul_(u).mul_(d)
    del sig
    return grad_gate.to(gate.dtype), silu.mul_(d).to(up.dtype)


def _swiglu_backward_fake(grad, gate, up, backend):
    return torch.empty_like(gate), torch.empty_like(up)


swiglu_backward = library_op("loom::swiglu_backward", _swiglu_backward, _swiglu_backward_fake)


def _setup_swiglu(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(gate, up)


def _backward_swiglu(ctx, grad):
    gate, up = ctx.saved_tensors
    dg, du = backward_call(ctx, swiglu_backward, _swiglu_backward)(grad, gate, up, ctx.backend)
    return dg, du, None


swiglu_op, swiglu_call = kernel_op("loom::swiglu", _swiglu, _swiglu_fake, _setup_swiglu, _backward_swiglu)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``F.silu(gate) * up`` (one shape; promoted to one dtype)."""
    dtype = torch.promote_types(gate.dtype, up.dtype)
    return swiglu_call(gate.to(dtype).contiguous(), up.to(dtype).contiguous(), resolve(backend, gate.device))
