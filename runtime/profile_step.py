"""What ``loom profile`` measures of a step outside the layers' compute: the modules' sizes, the optimizer step and the
sizes of the job's messages (the curves and the file: runtime.profiler).

- :func:`module_sizes`: ``[parameters, tensors, matrix parameters]`` of every module the runtime builds that the
  planner does not size from the spec (a MetaOp's input modules and a task's loss head, whole) and, per layer of each
  parameter group, its tensors. The planner puts them into its gradient buckets (planner.program.holdings), so the
  sync of those buckets is priced, counts the optimizer's tensors per device, and prices the matrices a copy only to
  decode with receives in the compute precision (planner.handoff).
- :func:`optimizer_points`: one optimizer step (the runtime's grouped AdamW/SGD, ``step`` then ``zero_grad`` as a worker
  runs them) over prefixes of the job's real trainable tensors (a generate or sample use's layers among them), and over
  the same parameters as one flat tensor (and over at least :data:`FLAT_PARAMS_MIN` in one):
  ``(params, tensors, seconds)`` points that planner.costfit.fit_step turns into ``a + b params + c tensors``.
- :func:`message_sizes`: the bytes of the job's pieces (a MetaOp's output rows at every local batch) and gradient
  buckets (a layer, a whole parameter group, an input module, a head) in the compute precision, a few of them spread
  over their range: the sizes the gloo links are timed at (runtime.profiler.profile_links).
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from planner.metagraph import build_metagraph
from planner.spec import JobSpec
from runtime.embeddings import build_input_module
from runtime.heads import build_head
from runtime.host import evict_caches
from runtime.modules import build_layer
from runtime.optim import build_grouped_optimizer, module_component
from runtime.tp_decode import is_matrix

LINK_SIZES = 6  # message sizes the links are timed at
MIN_MESSAGE_BYTES, MAX_MESSAGE_BYTES = 4, 1 << 28
STEP_PARAMS_CAP = 32_000_000  # parameters the optimizer timing builds at most (its state is 4x that in floats)
# the fewest parameters the optimizer is timed over in one tensor: a job of a few thousand parameters is all per-tensor
# work, which left the per-parameter term at its floor while ZeRO-1 steps a share of ~10^5 (feedback-cpu)
FLAT_PARAMS_MIN = 1 << 20


def _count(module: torch.nn.Module, trainable: bool = False) -> list[int]:
    params = [p for p in module.parameters() if p.requires_grad or not trainable]
    return [sum(p.numel() for p in params), len(params), sum(p.numel() for p in params if is_matrix(p))]


def module_sizes(job: JobSpec) -> dict[str, list[int]]:
    """Module name -> ``[parameters, tensors, matrix parameters]`` (runtime.tp_decode.is_matrix): ``embed:``/``adapt:`` input modules whole, ``head:<task>``'s trainable
    ones (what its bucket syncs and its optimizer steps), a parameter group per layer (module docstring). Generate and
    sample uses (whole-use MetaOps) are left out."""
    out: dict[str, list[int]] = {}
    for op in build_metagraph(job).metaops:
        if op.gen is None and op.param_group not in out:
            out[op.param_group] = _count(build_layer(job, op, 0))
        for name in op.input_modules:
            if name not in out:
                out[name] = _count(build_input_module(job, name))
    for t, task in enumerate(job.tasks):  # a head's frozen modules (a feedback loss's VAE) are neither synced nor stepped
        out["head:" + task.name] = _count(build_head(job, t), trainable=True)
    return out


def _trainable(job: JobSpec, device: torch.device) -> list[tuple[str | None, torch.nn.Parameter]]:
    """(component, parameter) of every trainable tensor the job's modules hold (layers up to STEP_PARAMS_CAP)."""
    from runtime.sampleop import twin_ops

    graph = build_metagraph(job)
    owned: list[tuple[str | None, torch.nn.Parameter]] = []
    seen: set[str] = set()
    # a generate or sample use runs its component's layers as a train use's would (its twins): those train too when
    # the use keeps a gradient and no train use holds them
    ops = [twin for op in graph.metaops for twin in (twin_ops(job, op) if op.gen is not None else [op])]
    for op in ops:
        if op.frozen or op.param_group in seen:
            continue
        seen.add(op.param_group)
        for layer in range(op.num_layers):
            if sum(p.numel() for _, p in owned) >= STEP_PARAMS_CAP:
                break
            owned += [(op.component, p) for p in build_layer(job, op, layer).to(device).parameters() if p.requires_grad]
    names = {name for op in graph.metaops if not op.frozen for name in op.input_modules}
    modules = {name: build_input_module(job, name) for name in sorted(names)}
    modules |= {"head:" + task.name: build_head(job, t) for t, task in enumerate(job.tasks)}
    for name, module in modules.items():
        owned += [(module_component(graph.metaops, name), p) for p in module.to(device).parameters() if p.requires_grad]
    return owned


def _step_seconds(job: JobSpec, owned: list[tuple[str | None, torch.nn.Parameter]], repeats: int, warmup: int,
                  device: torch.device) -> float:
    """Median seconds of ``step`` + ``zero_grad(set_to_none=True)`` of the job's optimizer over ``owned``."""
    grads = [torch.randn_like(p) for _, p in owned]
    optimizer = build_grouped_optimizer(job, owned)
    samples = []
    for i in range(warmup + repeats):
        for (_, p), g in zip(owned, grads):
            p.grad = g
        evict_caches(device)  # the step meets parameters, gradients and state cold, after backward
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def optimizer_points(job: JobSpec, repeats: int, warmup: int,
                     device: torch.device = torch.device("cpu")) -> list[list[float]]:
    """``[[params, tensors, seconds], ...]`` of the job's optimizer step over the first quarter, half and all of its
    trainable tensors, and over each prefix's parameters as one flat tensor (module docstring); empty when nothing
    trains."""
    owned = _trainable(job, device)
    if not owned:
        return []
    points = []
    for k in sorted({max(1, len(owned) // 4), max(1, len(owned) // 2), len(owned)}):
        prefix = owned[:k]
        params = sum(p.numel() for _, p in prefix)
        points.append([params, k, _step_seconds(job, prefix, repeats, warmup, device)])
        points.append([params, 1, _flat_step_seconds(job, params, repeats, warmup, device)])
    if points[-1][0] < FLAT_PARAMS_MIN:  # a small job: the per-tensor work hides the per-parameter term
        points.append([FLAT_PARAMS_MIN, 1, _flat_step_seconds(job, FLAT_PARAMS_MIN, repeats, warmup, device)])
    return points


def _flat_step_seconds(job: JobSpec, params: int, repeats: int, warmup: int, device: torch.device) -> float:
    """:func:`_step_seconds` over ``params`` parameters in one tensor (as ZeRO-1 steps a bucket's share)."""
    return _step_seconds(job, [(None, torch.nn.Parameter(torch.zeros(params, device=device)))], repeats, warmup, device)


def message_sizes(job: JobSpec, sizes: dict[str, list[int]] | None = None, count: int = LINK_SIZES) -> tuple[int, ...]:
    """Up to ``count`` of the job's message sizes in bytes, from the smallest to the largest (module docstring);
    ``sizes``: :func:`module_sizes`, when already counted."""
    element = 4 if job.training.precision == "fp32" else 2
    found: set[int] = set()
    graph = build_metagraph(job)
    for op in graph.metaops:
        row = math.prod(op.out_shapes[-1]) * element if op.out_shapes else op.layer.out_bytes
        found.update(int(row * (op.batch_size // dp)) for dp in range(1, job.cluster.num_devices + 1)
                     if op.batch_size % dp == 0)
        if not op.frozen:
            found.update({int(op.layer.params * element), int(op.layer.params * element * op.num_layers)})
    found.update(int(params * element) for params, *_ in (sizes or {}).values())
    ordered = sorted(min(max(n, MIN_MESSAGE_BYTES), MAX_MESSAGE_BYTES) for n in found if n > 0)
    if len(ordered) <= count:
        return tuple(dict.fromkeys(ordered))
    picks = [ordered[round(i * (len(ordered) - 1) / (count - 1))] for i in range(count)]
    return tuple(dict.fromkeys(picks))
