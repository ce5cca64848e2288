"""A kernel op with an eager twin: one forward, setup and backward, two ways in.

- the ``torch.library`` custom op (``loom::*``, its fake implementation, ``register_autograd``): what
  ``torch.compile``, fake-tensor tracing and ``torch.library.opcheck`` see;
- an ``autograd.Function`` running the very same functions: what an eager call runs. The library's dispatch
  (schema checks, redispatch, the autograd wrapper) costs about 0.1-0.2 ms a call in Python, forward and backward,
  which on a CPU worker training a small model is a tenth of its step.

:func:`kernel_op` makes both and returns the op and the entry point that picks one; inside a backward,
:func:`backward_call` names what to call for a backward op (the custom op when the library runs the backward, its
function in the twin), so a compiled graph still holds only ``loom::*`` ops.
"""

from __future__ import annotations

from typing import Callable

import torch


def kernel_op(name: str, forward: Callable, fake: Callable, setup_context: Callable, backward: Callable
              ) -> tuple[torch.library.CustomOpDef, Callable]:
    """``(op, call)``: ``forward`` registered as the custom op ``name`` (no argument mutated) with ``fake`` and the
    autograd formula (``setup_context``, ``backward`` as ``register_autograd`` takes them), and ``call``, which runs
    the op under ``torch.compile`` and the eager twin otherwise."""
    op = library_op(name, forward, fake)
    op.register_autograd(backward, setup_context=setup_context)

    class Twin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.eager = True
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def call(*inputs):
        return op(*inputs) if torch.compiler.is_compiling() else Twin.apply(*inputs)

    return op, call


def library_op(name: str, function: Callable, fake: Callable, mutates_args: tuple[str, ...] = ()
               ) -> torch.library.CustomOpDef:
    """``function`` registered as the custom op ``name`` with its fake implementation (a backward op has no autograd
    formula of its own)."""
    op = torch.library.custom_op(name, function, mutates_args=mutates_args)
    op.register_fake(fake)
    return op


def backward_call(ctx, op: Callable, function: Callable) -> Callable:
    """What a backward formula calls for its backward op: ``function`` itself in the eager twin (:func:`kernel_op`),
    the custom op ``op`` (``torch.ops.loom.*``) where the library runs the formula."""
    return function if getattr(ctx, "eager", False) else op
