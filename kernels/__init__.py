"""Loom's fused kernels: each a ``torch.library`` custom op (``loom::*``) with a fake implementation (shapes traced
without running it), a Triton implementation for GPUs and a plain-torch reference twin (the CPU path, the oracle);
eager calls run the op's functions as an ``autograd.Function``, past the library's dispatch (kernels.op).

- :func:`linear_cross_entropy`, :func:`linear_logprobs`, :func:`topk_kl` (kernels.linear_ce): the LM head's
  cross-entropy, log-prob gather and GRPO's top-k KL, chunked over positions: never the ``(positions, vocab)`` logits;
- :func:`rms_norm` (+ residual add) and :func:`swiglu` (kernels.norms): Llama's norm and MLP activation, fused;
- :func:`infonce_rows` (kernels.contrastive): CLIP's loss for one data-parallel shard's rows of a gathered batch.

Which implementation runs: :func:`backend_for` (kernels.backend) of the job's ``training.kernels`` switch
(``auto | reference | off``) and the device. Imports torch only; triton is imported on first use of the Triton
backend (kernels.triton_kernels). Must not import planner, runtime or orchestrator. docs/kernels.md.
"""

from kernels.backend import KERNEL_MODES, backend_for, triton_installed, triton_usable
from kernels.contrastive import infonce_rows
from kernels.linear_ce import linear_cross_entropy, linear_logprobs, topk_kl
from kernels.norms import rms_norm, swiglu

__all__ = ["KERNEL_MODES", "backend_for", "infonce_rows", "linear_cross_entropy", "linear_logprobs", "rms_norm",
           "swiglu", "topk_kl", "triton_installed", "triton_usable"]
