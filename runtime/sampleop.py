"""A ``mode: sample`` use at run time: one MetaOp (the agreed rule; the planner builds it as one layer) that runs the
component's whole denoiser from noise (runtime.sample), data parallel over its rows.

The plan's MetaOp of a sample use has one layer under its own parameter group (``<component>`` or
``<component>@sample``); the worker holds no module for it (an empty placeholder) but the component's real modules:
the layers a ``train`` use of the same component would run (:func:`twin_ops`: the same parameter groups, layers and
seeds, so the weights are the component's), its input module, and the UNet's output layer (GroupNorm, SiLU, conv:
``norm_out`` and ``conv_out``), which lives in the task's loss head (runtime.feedback.FeedbackHead) and so trains and
is saved with it. runtime.rollout.Roles places these modules on the sample use's devices (extra copies: with
``grad_last_step`` they train there and join the gradient all-reduce of their holders; without it they receive the
weights of a use that trains them after every step).

Output: with ``grad_last_step`` the predicted x0 of every sample, flattened ``(rows, C * h * w)``, carrying the
gradient to the denoiser (the loss host sends back its gradient and the executor calls ``x0.backward(grad)``);
without it the final latents, detached. Seeded per sample by (seed, step, task, input row, sample index) and the stop
step by (seed, step, task): any data-parallel split samples what one process does.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn

from planner.components import resolve_shape
from planner.spec import JobSpec, TaskComponentSpec
from runtime.kinds import image_channels
from runtime.payload import WorkerPayload
from runtime.sample import (
    SampleConfig, build_scheduler, layer_denoiser, row_generators, sample_with_grad_last, sample_without_grad,
    stop_index,
)

Key = tuple[str, int]
# modes whose MetaOp is the whole use as one planned layer, run over the component's real layers (:func:`twin_ops`)
WHOLE_USE_MODES = ("sample", "generate")


def _use(job: JobSpec, op) -> tuple[int, int, TaskComponentSpec]:
    t = next(i for i, task in enumerate(job.tasks) if task.name == op.task)
    u = next(i for i, use in enumerate(job.tasks[t].components) if use.use_name == op.use)
    return t, u, job.tasks[t].components[u]


def twin_ops(job: JobSpec | WorkerPayload, op) -> list:
    """The MetaOps a ``train`` use of whole-use MetaOp ``op``'s component would be (its layer segments, parameter groups
    and seeds): what the sample use runs, in order. (A generate use's MetaOp maps the same way.) A worker's payload
    carries them (the plan's records of them, built by the driver): a worker never rebuilds the MetaGraph."""
    if isinstance(job, WorkerPayload):
        return job.twins[op.id]
    from planner.metagraph import build_metagraph

    t, u, use = _use(job, op)
    modal = ("new_tokens", "temperature", "samples", "denoise_steps", "grad_last_step", "stop_steps", "scheduler")
    train = use.model_copy(update={"mode": "train", **{f: type(use).model_fields[f].default for f in modal}})
    uses = list(job.tasks[t].components)
    uses[u] = train
    tasks = list(job.tasks)
    tasks[t] = job.tasks[t].model_copy(update={"components": uses})
    graph = build_metagraph(job.model_copy(update={"tasks": tasks}))
    return [o for o in graph.metaops if o.task == op.task and o.use == op.use]


def layer_keys(job: JobSpec, op) -> list[Key]:
    """The (parameter group, layer) keys of the component's layers a sample or generate MetaOp runs (:func:`twin_ops`):
    the component's own weights, never the planner's one-layer stand-in (which would be a fresh, untrained copy)."""
    return [(o.param_group, i) for o in twin_ops(job, op) for i in range(o.num_layers)]


def module_keys(job: JobSpec, op) -> list[Key]:
    """Every module a sample MetaOp's device needs: the component's input module, its layers and the task's head
    (the UNet's output layer)."""
    return [("embed:" + op.component, 0), *layer_keys(job, op), ("head:" + op.task, 0)]


def latent_shape(job: JobSpec, op) -> tuple[int, int, int]:
    """(channels, side, side) of the latents sample MetaOp ``op`` denoises."""
    t, u, use = _use(job, op)
    comp = job.components[use.component]
    side = resolve_shape(comp, use.component, use, f"tasks[{t}].components[{u}]").image_size
    return image_channels(comp), side, side


def sample_config(job: JobSpec, op) -> SampleConfig:
    """The runtime.sample.SampleConfig of a sample use: its scheduler (diffusers' default training schedule) over
    ``denoise_steps``, its stop range, the job's seed."""
    use = _use(job, op)[2]
    return SampleConfig(steps=use.denoise_steps, stop=use.stop_range, seed=job.training.seed, scheduler=use.scheduler)


def denoiser_of(job: JobSpec, op, module: Callable[[str, int], nn.Module]):
    """The denoiser a sample MetaOp runs over the modules ``module(name, layer)`` gives (runtime.sample.layer_denoiser:
    the input module, the layers of :func:`layer_keys`, the head's norm_out and conv_out)."""
    head = module("head:" + op.task, 0)
    return layer_denoiser(module("embed:" + op.component, 0), [module(*k) for k in layer_keys(job, op)],
                          head.norm_out, head.conv_out, latent_shape(job, op)[1])


def sample_context(inputs: list[torch.Tensor]) -> torch.Tensor | None:
    """The context a sample MetaOp's denoiser cross-attends to: its upstream outputs ``(rows, L_i, W)`` in ``after:``
    order, joined along the sequence (as a train use of the UNet reads them); None for an unconditional use."""
    return (torch.cat(inputs, dim=1) if len(inputs) > 1 else inputs[0]) if inputs else None


def run_sample(job: JobSpec, op, module: Callable[[str, int], nn.Module], step: int, start: int, stop: int,
               device: torch.device | str = "cpu", context: torch.Tensor | None = None) -> torch.Tensor:
    """Samples [start, stop) of the task's batch of sample MetaOp ``op`` at training ``step``, flattened: x0 with its
    gradient (``grad_last_step``) or the final latents, detached. Sample r is input row ``r // samples``'s sample
    ``r % samples`` (a row's samples adjacent, as runtime.feedback.sample_rows lays them out). ``context``: rows
    [start, stop) of :func:`sample_context` for a conditioned use (one sample per row, runtime.checks.feedback_leaf);
    the step with gradient passes the gradient on to it."""
    use = _use(job, op)[2]
    config = sample_config(job, op)
    scheduler = build_scheduler(config)
    denoiser = denoiser_of(job, op, module)
    generators = row_generators(config.seed, step, op.task, [(r // use.samples, r % use.samples)
                                                              for r in range(start, stop)])
    shape = latent_shape(job, op)
    if use.grad_last_step:
        x = sample_with_grad_last(denoiser, scheduler, context, shape, stop_index(config, step, op.task), generators,
                                  device).x0
    else:
        with torch.no_grad():
            x = sample_without_grad(denoiser, scheduler, context, shape, generators, device)
    return x.flatten(1)


def sample_pixels(job: JobSpec, op, samples: torch.Tensor) -> torch.Tensor:
    """The images ``(rows, C, I, I)`` the first layer of image use ``op`` embeds when it reads a sample use's samples
    (planner.usegraph.sample_source; runtime.checks.check_sample_reader let it): the sample use's flattened output
    ``(rows, C * h * h)`` (x0, with its gradient) as pixel-space images in [-1, 1] (diffusers' convention), mapped to
    [0, 1] and clamped (runtime.feedback.to_unit), normalised as the component's image data is (runtime.sources:
    a pretrained folder's preprocessor mean and std, else [-1, 1]) and resized to the use's side ``I`` (bilinear,
    antialiased) when it differs, as the diffusion recipe's reward_model scorer prepared its reward models' images.
    Differentiable: the gradient of the images flows back to x0."""
    import torch.nn.functional as F

    from planner.usegraph import sample_source, use_index
    from runtime.feedback import to_unit
    from runtime.sources import image_normalisation

    t, u = use_index(job, op)
    use = job.tasks[t].components[u]
    source = job.tasks[t].components[sample_source(job, t, u)]
    channels, side, _ = latent_shape(job, SimpleNamespace(task=op.task, use=source.use_name))
    images = to_unit(samples.reshape(-1, channels, side, side))
    mean, std = image_normalisation(job.components[use.component].pretrained)
    mean, std = (mean, std) if len(mean) == channels else ((mean[0],) * channels, (std[0],) * channels)
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    images = (images - m) / s
    want = resolve_shape(job.components[use.component], use.component, use, f"tasks[{t}].components[{u}]").image_size
    if want != side:
        images = F.interpolate(images, size=(want, want), mode="bilinear", antialias=True)
    return images


def build_module(job: JobSpec, plan_ops, key: Key) -> nn.Module | None:
    """The module a worker builds for ``key`` when a sample or generate MetaOp of ``plan_ops`` (the plan's) decides it:
    an empty placeholder for the MetaOp's own one-layer parameter group, the component's layer (built as a train use's,
    same seed) for a key of :func:`layer_keys`; None for every other key."""
    from runtime.modules import build_layer

    samples = [op for op in plan_ops if op.mode in WHOLE_USE_MODES]
    for op in samples:
        for twin in twin_ops(job, op):
            if twin.param_group == key[0] and key[1] < twin.num_layers:
                return build_layer(job, twin, key[1])
    if any(op.param_group == key[0] for op in samples):
        return nn.Module()  # the plan's one layer of a sample or generate use: its weights are the component's (above)
    return None


def build_modules(job: JobSpec, op) -> dict[Key, nn.Module]:
    """Every module of :func:`module_keys` built as the workers build them (same seeds; the head with its VAE and
    scorers): a sample use in one process (tests' reference, evaluation of a trained model)."""
    from runtime.embeddings import build_input_module
    from runtime.heads import build_head
    from runtime.modules import build_layer

    modules: dict[Key, nn.Module] = {("embed:" + op.component, 0): build_input_module(job, "embed:" + op.component)}
    for twin in twin_ops(job, op):
        for layer in range(twin.num_layers):
            modules[(twin.param_group, layer)] = build_layer(job, twin, layer)
    modules[("head:" + op.task, 0)] = build_head(job, next(i for i, t in enumerate(job.tasks) if t.name == op.task))
    return modules
