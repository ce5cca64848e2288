"""Timing a generate or sample MetaOp on this device: the measured side of their price (``loom profile``).

A generate or sample use is one MetaOp of one layer that stands for the whole use (planner.generation.whole_use), so
its profile point is the seconds of the whole use at a local batch, not of one of its layers:

- **generate**: the decode :func:`runtime.generate.generate` runs (the use's component input module, every layer of
  the use and the LM head the task's loss head decodes with, the grpo head's ``policy``), on the task's synthetic
  prompts, each row with its own seeded sampler at the use's ``temperature``: a prefill of the prompt, then
  ``new_tokens`` decode steps against the KV cache. No end-of-sequence stop: every row decodes all its tokens, the
  work the planner prices. :func:`generate_timer` also times the prefill alone (the bench's split);
- **sample**: what runtime.sampleop.run_sample runs (:func:`sample_timer`): every row's seeded noise, then per
  denoising step the use's input module, layers, output norm and convolution and the scheduler's update, without
  gradient up to the stop step; with ``grad_last_step`` on a trained component the stop step with gradient and the
  backward of its x0. The stop step cycles through the use's stop range, so the profile holds the run's mean where
  :meth:`planner.costmodel.CostModel.passes` (the analytic model's count) takes the range's last. Until session 27
  only the layers were timed, ``denoise_passes`` times: feedback-cpu's sample use ran 16-20% longer than priced.

The layers are the whole use's (:func:`use_layers`: every layer segment of the use rebuilt as the layered MetaOps a
``train`` use of it would have, with the runtime's modules), since the one-layer MetaOp does not name them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from planner.components import expand_use
from planner.metagraph import MetaOp, build_metagraph, contract_segments
from planner.spec import JobSpec
from planner.usegraph import use_index
from runtime.assignment import input_order
from runtime.checks import feature_shape
from runtime.data import synthetic_batch
from runtime.embeddings import build_input_module
from runtime.generate import decoder_for, generate, lm_logits, row_generators
from runtime.heads import build_head
from runtime.host import evict_caches
from runtime.modules import build_layer
from runtime.sample import build_scheduler, sample_with_grad_last, sample_without_grad
from runtime.sample import row_generators as noise_generators
from runtime.sampleop import build_modules, denoiser_of, latent_shape, sample_config, twin_ops


def use_layers(job: JobSpec, op: MetaOp) -> list[tuple[MetaOp, list[nn.Module]]]:
    """The layers of generate or sample MetaOp ``op``'s whole use: ``(MetaOp, its layers)`` for each MetaOp a train use
    of the component would be (runtime.sampleop.twin_ops: the layers the runtime runs for the use)."""
    return [(twin, [build_layer(job, twin, i) for i in range(twin.num_layers)]) for twin in twin_ops(job, op)]


Clock = Callable[[], float]


def _timed(run: Callable[[], object], device: torch.device, clock: Clock) -> float:
    evict_caches(device)  # from cold caches, as runtime.profiler times every sample
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def generate_timer(job: JobSpec, op: MetaOp, device: torch.device,
                   clock: Clock = time.perf_counter) -> Callable[[int, bool], float]:
    """``time(rows, prefill_only=False)``: seconds of generate MetaOp ``op`` decoding ``rows`` rows on ``device`` (the
    whole generation, or its prefill alone); the modules are built once, the prompts drawn before the clock starts.
    ``clock``: wall time (as `loom profile`), or ``time.thread_time`` for the CPU time of a one-thread CPU run (what it
    takes without other processes competing for the core: bench.generation on a shared machine)."""
    t, u = use_index(job, op)
    use = job.tasks[t].components[u]
    layers = [layer.to(device).eval() for _, part in use_layers(job, op) for layer in part]
    head = build_head(job, t).to(device).eval()
    decoder = decoder_for(build_input_module(job, "embed:" + op.component).to(device).eval(), layers,
                          lm_logits(getattr(head, "policy", head)))
    prompts: dict[int, torch.Tensor] = {}

    def time_rows(rows: int, prefill_only: bool = False) -> float:
        if rows not in prompts:
            ids = synthetic_batch(job, t, 0, 0, rows).inputs[op.use]
            prompts[rows] = ids[[r - r % use.samples for r in range(rows)]].to(device)  # a group shares its prompt
        ids = prompts[rows]
        if prefill_only:
            def run():
                with torch.no_grad():
                    decoder.start()
                    decoder(ids, 0)
        else:
            generators = row_generators(job.training.seed, 0, op.task, range(rows), use.samples)
            def run():  # noqa: E306
                generate(decoder, ids, use.new_tokens, use.temperature, generators)
        return _timed(run, device, clock)

    return time_rows


def sample_timer(job: JobSpec, op: MetaOp, device: torch.device) -> Callable[[int], float]:
    """``time(rows)``: seconds of sample MetaOp ``op`` on ``rows`` rows on ``device``, run as a worker runs it
    (runtime.sampleop.run_sample's parts, over the modules a worker builds for it): every row's noise from its seeded
    generator, each denoising step's input module, layers, output norm and convolution and the scheduler's update, and
    with ``grad_last_step`` the step with gradient and the backward of its x0. The stop step cycles through the use's
    stop range from one call to the next, so the median of several calls is the run's mean (the runtime draws it
    uniformly per step). With a context (a conditioned use) stand-in upstream outputs of its producers' shapes."""
    t, u = use_index(job, op)
    use = job.tasks[t].components[u]
    graph = build_metagraph(job)
    modules = {key: module.to(device) for key, module in build_modules(job, op).items()}  # as a worker's
    denoiser = denoiser_of(job, op, lambda name, layer: modules[name, layer])
    config = sample_config(job, op)
    scheduler, shape, grad = build_scheduler(config), latent_shape(job, op), op.backward_factor > 0
    context_shapes = [feature_shape(job, graph.metaops[op.deps[i]]) for i in input_order(job, graph, op.id)]
    stops = itertools.cycle(range(config.stop[0], config.stop[1] + 1))
    contexts: dict[int, torch.Tensor | None] = {}

    def run(rows: int, stop: int) -> None:
        samples = [(r // use.samples, r % use.samples) for r in range(rows)]  # (input row, its sample), as run_sample
        generators = noise_generators(config.seed, 0, op.task, samples)
        if not grad:
            with torch.no_grad():
                sample_without_grad(denoiser, scheduler, contexts[rows], shape, generators, device)
            return
        x0 = sample_with_grad_last(denoiser, scheduler, contexts[rows], shape, stop, generators, device).x0
        x0.backward(torch.ones_like(x0))
        for module in modules.values():
            module.zero_grad(set_to_none=True)

    def time_rows(rows: int) -> float:
        if rows not in contexts:
            parts = [torch.randn(rows, *s, device=device, requires_grad=grad) for s in context_shapes]
            contexts[rows] = (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]) if parts else None
        return _timed(lambda stop=next(stops): run(rows, stop), device, time.perf_counter)

    return time_rows


def output_shape(job: JobSpec, op: MetaOp) -> tuple[int, ...]:
    """Per-sample shape of what MetaOp ``op`` hands on (runtime.checks.feature_shape), for a sample MetaOp its use's
    last layer's output (its one stand-in layer names only the first segment)."""
    if op.gen is None or op.gen.mode != "sample":
        return feature_shape(job, op)
    t, u = use_index(job, op)
    segments = contract_segments(expand_use(job, t, u))
    last = replace(op, layer=segments[-1], num_layers=segments[-1].count, segment=len(segments) - 1, gen=None)
    return feature_shape(job, last)


def rollout_rows(job: JobSpec, op: MetaOp, rows: int, device: torch.device) -> torch.Tensor:
    """``rows`` rows of what generate MetaOp ``op`` hands a loss head (runtime.rollout.pack: the prompt and random new
    tokens of the component's vocabulary, all counting): a stand-in rollout for timing the head that reads it."""
    from runtime.rollout import pack  # rollout imports runtime.heads; keep this module's imports light

    t, u = use_index(job, op)
    prompts = synthetic_batch(job, t, 0, 0, rows).inputs[op.use]
    new = torch.randint(job.components[op.component].vocab_size, (rows, op.gen.new_tokens))
    return pack(torch.cat([prompts, new], dim=1), torch.ones_like(new, dtype=torch.bool)).to(device)


def mode_timer(job: JobSpec, op: MetaOp, device: torch.device) -> Callable[[int], float]:
    """The timer of a generate or sample MetaOp (seconds of the whole use at a number of rows)."""
    return generate_timer(job, op, device) if op.gen.mode == "generate" else sample_timer(job, op, device)
