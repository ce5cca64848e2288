"""Persistent gradient buffers that a fused kernel adds a weight's gradient into (Megatron's
``gradient_accumulation_fusion``).

A caller that keeps a parameter's ``.grad`` allocated between steps (zeroed in place, never set to None) marks the
parameter with :func:`keep_grad_buffer` (allocated now) or :func:`mark_grad_buffer` (its first gradient becomes the
buffer). In backward, the chunked loss kernels (kernels.linear_ce: linear +
cross-entropy, log-probs, top-k KL) then add the weight's gradient into that buffer block by block
(``buffer += z_block.T @ hidden_block``) and return none for autograd to add: the same sum autograd's AccumulateGrad
forms when ``.grad`` exists (it adds a returned gradient into ``.grad`` in place), without the full-size gradient
tensor in between.

Contract:

- the buffer is the parameter's ``.grad`` itself: other uses of the parameter accumulate into it through autograd as
  usual, and whoever reads ``.grad`` after backward sees every contribution;
- a kernel uses it only while ``param.grad is`` the marked buffer (:func:`grad_buffer`); when ``.grad`` was replaced
  or set to None, or the kernel reads a cast copy of the parameter (autocast), it returns the gradient as before;
- a kernel adds into it only in a backward that accumulates into the parameter (``backward()``); a
  ``torch.autograd.grad`` with respect to other tensors leaves it alone;
- hooks on the parameter (``register_hook``, ``register_post_accumulate_grad_hook``) do not see the kernel's part,
  and ``torch.autograd.grad`` with respect to a marked parameter gets nothing from it (the kernel's part goes into
  the buffer): mark only parameters whose gradient is read from ``.grad`` after backward.

Imports torch only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

_ATTR = "_loom_grad_buffer"  # on a marked parameter: its buffer, or None until it has one


def mark_grad_buffer(param: torch.Tensor) -> None:
    """Mark ``param`` (a leaf that requires grad) for a persistent gradient buffer, allocated lazily: the first
    ``.grad`` it gets (from an ordinary backward) becomes the buffer at the next :func:`zero_grads`. A parameter that
    never gets a gradient never holds one."""
    assert param.is_leaf and param.requires_grad, "a gradient buffer belongs to a leaf that requires grad"
    if not hasattr(param, _ATTR):
        setattr(param, _ATTR, None)


def keep_grad_buffer(param: torch.Tensor) -> torch.Tensor:
    """Mark ``param`` and give it its buffer now: its current ``.grad``, or zeros; returns it (also ``.grad``)."""
    mark_grad_buffer(param)
    buffer = getattr(param, _ATTR)
    if buffer is None:
        buffer = param.grad if param.grad is not None else torch.zeros_like(param)
        setattr(param, _ATTR, buffer)
    param.grad = buffer
    return buffer


def grad_buffer(param: torch.Tensor) -> torch.Tensor | None:
    """``param``'s persistent gradient buffer when it has one and it is ``param.grad`` now; else None."""
    buffer = getattr(param, _ATTR, None)
    return buffer if buffer is not None and param.grad is buffer else None


def accumulating_buffer(param: torch.Tensor) -> torch.Tensor | None:
    """Inside a backward: ``param``'s buffer (:func:`grad_buffer`) when this backward accumulates into ``param``
    (``backward()``, or ``torch.autograd.grad`` with respect to ``param`` itself, which the contract excludes); None
    when it does not reach ``param`` (``torch.autograd.grad`` with respect to other tensors): the buffer is then
    left alone, as autograd leaves ``.grad``."""
    buffer = grad_buffer(param)
    if buffer is None:
        return None
    node = torch.autograd.graph.get_gradient_edge(param).node
    return buffer if torch._C._will_engine_execute_node(node) else None


def has_grad_buffer(param: torch.Tensor) -> bool:
    """Whether ``param`` is marked for a persistent gradient buffer (allocated yet or not, ``.grad`` now or not)."""
    return hasattr(param, _ATTR)


def adopt_grad_buffers(params: Iterable[torch.Tensor]) -> None:
    """Every marked parameter of ``params`` that has a ``.grad`` but no buffer yet keeps that ``.grad`` as its buffer
    (before a ``zero_grad(set_to_none=True)`` drops it; :func:`zero_grads` then gives it back, zeroed)."""
    for p in params:
        if hasattr(p, _ATTR) and getattr(p, _ATTR) is None and p.grad is not None:
            setattr(p, _ATTR, p.grad)


def zero_grads(params: Iterable[torch.Tensor]) -> None:
    """``zero_grad`` for ``params``: a marked parameter's buffer (its first ``.grad``, adopted here) is zeroed in place
    and is ``.grad`` again; a marked one without a gradient yet, and every unmarked one, gets ``.grad = None``
    (``zero_grad(set_to_none=True)``)."""
    for p in params:
        if not hasattr(p, _ATTR):
            p.grad = None
        elif getattr(p, _ATTR) is not None or p.grad is not None:
            keep_grad_buffer(p).zero_()
        else:
            p.grad = None
