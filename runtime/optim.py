"""The optimizer side of a training step, shared by the distributed worker (runtime.executor), ZeRO-1
(runtime.zero) and the single-process reference (runtime.reference), so that all three train alike.

- Parameter groups: no weight decay on 1-d parameters (norm weights, biases), and each component's own
  learning rate (``components.<c>.lr``, absolute; default ``training.lr``). A group carries ``base_lr``;
  :func:`set_lr` scales it by the schedule before each optimizer step.
- The learning-rate schedule (:func:`lr_factor`): warmup, then constant, linear or cosine decay. A pure
  function of the step, so a resumed run continues exactly where the uninterrupted one would be.
- Gradient clipping by global norm: :func:`clip_coefficient` from the sum of squares of every trainable
  parameter counted once (each device adds what it owns, the worker all-reduces the sum), the same formula
  as ``torch.nn.utils.clip_grad_norm_``, which the reference calls.
- Persistent gradient buffers (:func:`keep_kernel_grad_buffers`, :func:`zero_gradients`): the weights a loss kernel
  reads keep their ``.grad`` between steps, zeroed in place, and the kernel adds into it (kernels.grad_buffers).
- Precision: :func:`compute_dtype` and :func:`autocast` (bf16/fp16 autocast around forward, fp32 master
  weights and optimizer state), and :class:`LossScaler` (dynamic loss scaling for fp16).

Imports no other runtime module but runtime.modules (the job's optimizer: AdamW or SGD).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
from torch import nn

from kernels.grad_buffers import adopt_grad_buffers, mark_grad_buffer, zero_grads
from planner.spec import JobSpec, TrainingSpec
from runtime.modules import build_optimizer

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: coefficient = max_norm / (norm + eps)


# --------------------------------------------------------------------------- parameter groups


def group_key(job: JobSpec, component: str | None, param: nn.Parameter) -> tuple[float, float]:
    """(learning rate, weight decay) of ``param``, a parameter of ``component`` (None: a task's loss head, which
    trains at ``training.lr``): no weight decay on 1-d parameters (norm weights and biases, also as tensor-parallel
    shards, which keep their dimension)."""
    comp = job.components.get(component) if component is not None else None
    lr = comp.lr if comp is not None and comp.lr is not None else job.training.lr
    return lr, 0.0 if param.dim() <= 1 else job.training.weight_decay


def param_groups(job: JobSpec, owned: Iterable[tuple[str | None, nn.Parameter]]) -> list[dict]:
    """Optimizer parameter groups over the trainable parameters of ``owned`` ((component, parameter) pairs), one per
    distinct :func:`group_key`, in order of first appearance (every process builds the same groups from the same
    order). Each group has ``lr``, ``base_lr`` (the unscheduled rate) and ``weight_decay``."""
    groups: dict[tuple[float, float], dict] = {}
    for component, param in owned:
        if not param.requires_grad:
            continue
        lr, decay = group_key(job, component, param)
        group = groups.setdefault((lr, decay), {"params": [], "lr": lr, "base_lr": lr, "weight_decay": decay})
        group["params"].append(param)
    return list(groups.values())


def module_component(metaops, name: str) -> str | None:
    """The component whose parameters module ``name`` holds: ``embed:<c>``/``adapt:<c>`` -> c, a parameter group ->
    its MetaOps' component (or the group's own component name), ``head:<task>`` -> None. ``metaops``: the plan's or the MetaGraph's."""
    if name.startswith(("embed:", "adapt:")):
        return name.split(":", 1)[1]
    if name.startswith("head:"):
        return None
    # a group no MetaOp names is a component's layers a sample use runs (runtime.sampleop): "<component>#<segment>"
    return next((op.component for op in metaops if op.param_group == name), name.split("#")[0])


def build_grouped_optimizer(job: JobSpec, owned: Iterable[tuple[str | None, nn.Parameter]]):
    """The job's optimizer (runtime.modules.build_optimizer: AdamW, or SGD for ``training.optimizer: sgd``) over
    :func:`param_groups` of ``owned``; None when nothing trains."""
    return build_optimizer(job, param_groups(job, owned))


# --------------------------------------------------------------------------- learning-rate schedule


def lr_factor(training: TrainingSpec, step: int) -> float:
    """The multiplier of every group's ``base_lr`` at ``step`` (0-based).

    Warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (step 0 already trains). Then, with
    ``p = (step - warmup) / (steps - warmup)`` the progress of the decay and ``m = min_lr_ratio``: constant ``1``;
    linear ``m + (1 - m) (1 - p)``; cosine ``m + (1 - m) (1 + cos(pi p)) / 2``. Steps past ``steps`` stay at ``m``.
    """
    warmup = training.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if training.lr_schedule == "constant":
        return 1.0
    p = min(1.0, (step - warmup) / max(1, training.steps - warmup))
    m = training.min_lr_ratio
    if training.lr_schedule == "linear":
        return m + (1.0 - m) * (1.0 - p)
    return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))


def set_lr(optimizer, training: TrainingSpec, step: int) -> None:
    """Set every parameter group's ``lr`` to ``base_lr * lr_factor(step)`` (groups without ``base_lr`` keep theirs)."""
    factor = lr_factor(training, step)
    for group in optimizer.param_groups:
        if "base_lr" in group:
            group["lr"] = group["base_lr"] * factor


# --------------------------------------------------------------------------- clipping


def clipping(training: TrainingSpec) -> bool:
    """Whether the job clips gradients (``grad_clip`` set and positive)."""
    return bool(training.grad_clip)


def clip_coefficient(total_square: float, max_norm: float) -> float:
    """What every gradient is multiplied by, given the sum of squares of all of them: ``min(1, max_norm / (norm +
    1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` (which multiplies by 1.0 too when under the limit)."""
    return min(1.0, max_norm / (math.sqrt(total_square) + CLIP_EPS))


def scale_gradients(params: Iterable[nn.Parameter], coefficient: float) -> None:
    """Multiply every existing gradient of ``params`` by ``coefficient`` in place (each tensor once)."""
    grads = {id(p.grad): p.grad for p in params if p.grad is not None}
    if grads:
        torch._foreach_mul_(list(grads.values()), coefficient)


# --------------------------------------------------------------------------- persistent gradient buffers


def lm_kernel_weights(out: nn.Module, kernels: str) -> list[nn.Parameter]:
    """``[out.weight]`` when the loss kernels read it (``kernels``, training.kernels, is not ``off`` and ``out`` is a
    plain ``nn.Linear``: kernels.linear_cross_entropy, linear_logprobs, topk_kl) and it is trained; else ``[]``. What
    an LM head's ``kernel_weights()`` returns for its output projection."""
    if kernels == "off" or not isinstance(out, nn.Linear) or not out.weight.requires_grad:
        return []
    return [out.weight]


def keep_kernel_grad_buffers(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Mark every weight that a loss kernel reads (each module's ``kernel_weights()``, declared by the heads that hand
    their LM projection to kernels/) for a persistent gradient buffer (kernels.grad_buffers.mark_grad_buffer); returns
    those parameters. The first step's backward gives such a weight its gradient as before; :func:`zero_gradients`
    then keeps that tensor as the weight's ``.grad``, zeroed in place instead of dropped, and from the next step on
    the kernel adds its gradient into it block by block instead of returning a new ``(vocab, hidden)`` tensor. A
    weight this device holds but never computes a loss with (a rollout worker's copy of the policy's head) never
    gets a gradient, so never a buffer.

    A weight whose loss runs gets a gradient in every step (the kernel writes zeros for ignored positions), so a
    zeroed buffer is what the optimizer would see anyway. What the buffer costs in a step's peak: docs/kernels.md."""
    out = []
    for module in modules:
        declared = getattr(module, "kernel_weights", None)
        for p in declared() if declared is not None else []:
            if all(p is not q for q in out):
                mark_grad_buffer(p)
                out.append(p)
    return out


def zero_gradients(optimizer, params: Iterable[nn.Parameter]) -> None:
    """The step's ``zero_grad``: ``optimizer.zero_grad(set_to_none=True)``, then every parameter of ``params`` marked
    for a persistent gradient buffer gets it back as ``.grad``, zeroed in place (its first gradient becomes it:
    kernels.grad_buffers); one that never had a gradient stays None."""
    params = list(params)
    adopt_grad_buffers(params)  # a first gradient becomes the buffer before the optimizer drops it
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    zero_grads(params)


# --------------------------------------------------------------------------- precision


class PrecisionError(ValueError):
    """A precision the device cannot run (one line for the user)."""


def compute_dtype(job: JobSpec, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``job`` on ``device``: bf16 or fp16, None for fp32. fp16 on a CPU is refused (the
    spec refuses it for CPU clusters; this catches a GPU job sent to a host without GPUs)."""
    precision = job.training.precision
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise PrecisionError(
            f"training.precision ('fp16') cannot run on {device.type}: fp16 with loss scaling is a GPU path. "
            "Set precision: bf16 or fp32."
        )
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(job: JobSpec, device: torch.device) -> contextlib.AbstractContextManager:
    """The context every forward (layers, input modules, loss heads) runs in: ``torch.autocast`` in the job's
    compute dtype on ``device``'s type, or nothing for fp32. Parameters, gradients and optimizer state stay fp32
    (the master weights); backward runs outside it, as autocast requires."""
    dtype = compute_dtype(job, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class LossScaler:
    """Dynamic loss scaling for fp16 (``torch.amp.GradScaler``'s policy, made collective by the caller): the loss
    is multiplied by :attr:`scale` before backward; after the gradients are synchronised they are divided by it; a
    step whose gradients hold an inf or NaN anywhere (the caller all-reduces the flag) is skipped and the scale
    halves, and after ``growth_interval`` good steps in a row it doubles. Inactive (scale 1, never skips) unless
    ``enabled``; only fp16 enables it."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.enabled, self.growth_interval = enabled, growth_interval
        self.scale = init_scale if enabled else 1.0
        self.good_steps = 0

    def update(self, found_inf: bool) -> bool:
        """Record one step's outcome; whether the optimizer may step (False: skip it, gradients overflowed)."""
        if not self.enabled:
            return True
        if found_inf:
            self.scale, self.good_steps = self.scale * 0.5, 0
            return False
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale, self.good_steps = self.scale * 2.0, 0
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = state["scale"], state["good_steps"]


def owned_square_sum(modules: dict, replicas: dict[int, int], fractions: dict, device: torch.device) -> torch.Tensor:
    """The sum of squares (float64) of the gradients of ``modules`` ({key: module}) that this device owns, so that the
    sum over all devices counts every element once: a parameter held by ``replicas[id(p)]`` devices (a gradient
    bucket's holders, each with the summed gradient) counts ``1 / replicas``, a parameter named ``n`` of a
    tensor-parallel module ``key`` counts ``fractions[key][n]`` more (runtime.megatron_backend.owned_fractions)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for key, module in modules.items():
        parts = fractions.get(key, {})
        for name, p in module.named_parameters():
            if p.grad is not None:
                total += parts.get(name, 1.0) / replicas.get(id(p), 1) * p.grad.detach().double().pow(2).sum()
    return total
