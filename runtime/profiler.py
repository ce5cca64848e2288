"""Profile MetaOp layers on this device: the measured side of the cost model (``loom profile``).

For every distinct layer workload of a job (layer shape, backward factor, TP degree 1), a chain of up to
:data:`CHAIN_LAYERS` of its layers is built with the runtime's modules and timed forward+backward, per layer (forward
only for a frozen layer with nothing trainable upstream; input gradients only when a trainable layer feeds a frozen
one), and its forward apart (the cost file's ``forward`` shares: a backward is not twice a forward everywhere; on this
2-core host forward takes 37-48% of a layer's time) at every per-device batch the planner can ask for: ``batch / dp``
for each data-parallel degree dp that divides the batch and fits the cluster. Each point is the median of ``repeats``
timed runs after ``warmup`` runs, with one thread and freed memory kept (runtime.host), as a worker runs, in as many
processes at once as the job has workers per node on this host (:func:`profile_processes`; ``loom profile`` makes them
Ray actors, the processes a run computes in: orchestrator.actors.profile_in_actors), its samples taken round-robin
over the points and together (each the slowest process's: a wave ends with its slowest device, and on a shared host
the devices' times vary from step to step). A generate or sample MetaOp (one layer standing for the whole use) is
timed whole at the same local batches (runtime.profile_modes: the prefill and every decode step of its rows, or its
denoising steps, the last with gradient when it has one), so `loom plan --costs` prices decoding and denoising from
measurements too. The result is the JSON that :class:`planner.costmodel.ProfiledCostModel` reads (piecewise alpha-beta
between the points).

The work of a step outside the layers is measured too (:class:`planner.costmodel.MeasuredCosts`), beside as many
processes running the job's layers as a run has other workers on the node (:func:`busy_neighbours`):
per MetaOp with input modules, its embedding's forward and backward (``embed``); per task, its loss head's forward
and backward (``head``) and drawing its rows of the batch from its data source (``data``), all at the same local
batches; the
optimizer step over the job's real tensors, fitted ``a + b params + c tensors`` (``optimizer``), and the parameters and
tensors of the modules the planner does not size (``modules``) (runtime.profile_step).
For a CPU cluster with several devices per node, :func:`profile_links` also times a point-to-point
message, an all-reduce and an all-gather between two gloo worker processes on this host (``links``) at the job's own
message sizes, the link the runtime's transfers, gradient sync and ZeRO-1 gathers use there.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from planner.costmodel import Layout, profile_key
from planner.metagraph import MetaOp, build_metagraph
from planner.spec import JobSpec, micro_batch_counts
from runtime.data import synthetic_batch, task_batch
from runtime.checks import feature_shape
from runtime.assignment import input_order
from runtime.embeddings import build_input_module, first_input
from runtime.heads import build_head
from runtime.host import configure_worker_process, evict_caches, pinned, worker_device
from runtime.modules import build_layer, layer_kwargs
from runtime.profile_modes import mode_timer, output_shape, rollout_rows
from runtime.profile_step import message_sizes, module_sizes, optimizer_points
from planner.costfit import fit_step

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
CHAIN_LAYERS = 4  # layers of a workload timed one after another (at most the MetaOp's own)


def local_batches(op: MetaOp, num_devices: int, counts: tuple[int, ...] = (1,)) -> list[int]:
    """The per-device batches the planner evaluates for ``op`` (data parallel, TP 1), ascending: its batch in each of
    ``counts`` micro-batches (:func:`profiled_counts`), split over every data-parallel degree that divides it."""
    return sorted({op.batch_size // k // dp for k in counts if op.batch_size % k == 0
                   for dp in range(1, num_devices + 1) if op.batch_size // k % dp == 0})


def profiled_counts(job: JobSpec) -> tuple[int, ...]:
    """The counts of micro-batches a profile of ``job`` measures each MetaOp's local batches at: with
    ``grad_accum_steps: auto`` every count the planner plans (planner.spec.micro_batch_counts: their smaller local
    batches measured, not extrapolated), else one (the MetaGraph's batches are already one micro-batch's). A generate
    use decodes every micro-batch's rows at once, so its batches are the first count's alone."""
    return tuple(micro_batch_counts(job)) if job.micro_batches_auto else (1,)


def _run_chain(chain: list[torch.nn.Module], op: MetaOp, x: torch.Tensor, kwargs: dict) -> tuple[float, float]:
    """Seconds of one forward (and backward, when ``op`` has one) of ``chain`` on ``x`` (on ``x``'s device), from cold
    caches (runtime.host.evict_caches), and the seconds of its forward alone (the same when it has no backward)."""
    evict_caches(x.device)
    _synchronize(x.device)
    start = time.perf_counter()
    with torch.set_grad_enabled(op.backward_factor > 0):
        y = x
        for layer in chain:
            y = layer(y, **kwargs)
        _synchronize(x.device)
        forward = time.perf_counter() - start
        if op.backward_factor > 0:
            y.backward(torch.ones_like(y))
    _synchronize(x.device)
    seconds = time.perf_counter() - start
    for layer in chain:
        layer.zero_grad(set_to_none=True)
    x.grad = None
    return seconds, forward


Samples = dict[str, dict[int, list[float]]]  # profile key -> local batch -> samples


def sample_layers(job: JobSpec, repeats: int, warmup: int, barrier=None,
                  device: torch.device = torch.device("cpu")) -> tuple[Samples, Samples]:
    """Per distinct layer workload (its profile key) and local batch: ``repeats`` samples of seconds per layer of
    a chain of its layers, forward and backward; for a generate or sample MetaOp (one layer standing for the whole
    use) the seconds of the whole use (runtime.profile_modes: prefill and decode, or the denoising steps). Samples are taken round-robin (every point once per round), so
    each point's samples spread over the whole profile rather than one burst: a shared host's speed wanders by
    +-10% over seconds. With ``barrier`` (a multiprocessing Barrier) every process takes each sample together.
    Second, for the chains with a backward, each sample's share of forward (the planner splits a slice's time
    between its passes by it: CostModel.forward_fraction)."""
    timers = layer_timers(job, device)
    samples: Samples = {key: {b: [] for b in runs} for key, runs in timers.items()}
    shares: Samples = {}
    for i in range(warmup + repeats):
        for key, runs in timers.items():
            for b, run in runs.items():
                if barrier is not None:
                    barrier.wait()
                seconds, forward = run()
                if i >= warmup:
                    samples[key][b].append(seconds)
                    if forward is not None:
                        shares.setdefault(key, {}).setdefault(b, []).append(forward / seconds)
    return samples, shares


def layer_timers(job: JobSpec, device: torch.device
                 ) -> dict[str, dict[int, Callable[[], tuple[float, float | None]]]]:
    """Per distinct layer workload (its profile key) and local batch: a call that runs it once and returns its
    seconds per layer and, for a chain with a backward, the seconds of its forward (:func:`sample_layers`)."""
    timers: dict[str, dict[int, Callable[[], tuple[float, float | None]]]] = {}
    counts = profiled_counts(job)
    for op in build_metagraph(job).metaops:
        key = profile_key(op, Layout(1, 1))
        if key in timers:
            continue
        if op.gen is not None:  # a generate or sample use: the whole use's decode or denoising loop
            batches = local_batches(op, job.cluster.num_devices)
            timer = mode_timer(job, op, device)
            timers[key] = {b: (lambda b=b, timer=timer: (timer(b), None)) for b in batches}
            continue
        # a chain, as a slice runs them: the activations several layers keep for backward do not all stay in
        # cache, as one layer's can
        chain = [build_layer(job, op, i).to(device) for i in range(min(op.num_layers, CHAIN_LAYERS))]
        if op.backward_factor == 1:  # input gradients only: the layers' weights are frozen
            for layer in chain:
                layer.requires_grad_(False)
        shape = feature_shape(job, op, boundary=0)
        kwargs = layer_kwargs(job, op)
        timers[key] = {b: (lambda op=op, chain=chain, kwargs=kwargs,
                           x=torch.randn(b, *shape, device=device, requires_grad=op.backward_factor > 0):
                           _per_layer(_run_chain(chain, op, x, kwargs), len(chain), op))
                        for b in local_batches(op, job.cluster.num_devices, counts)}
    return timers


def _per_layer(timed: tuple[float, float], layers: int, op: MetaOp) -> tuple[float, float | None]:
    """A chain's (seconds, forward seconds) per layer; no forward for a chain without backward (all of it is)."""
    seconds, forward = timed
    return seconds / layers, forward / layers if op.backward_factor > 0 else None


@contextlib.contextmanager
def busy_neighbours(job: JobSpec, count: int):
    """``count`` processes running the job's layers over and over (as a run's other workers on this host do) while
    the block runs: the work a worker does outside the layers (data, embeddings, heads, the optimizer) is timed beside
    them, as it runs. Nothing for ``count`` 0."""
    if count <= 0:
        yield
        return
    ctx = mp.get_context("spawn")
    stop, ready = ctx.Event(), ctx.Barrier(count + 1)
    procs = [ctx.Process(target=_keep_busy, args=(job.model_dump_json(), stop, ready, i + 1, count + 1), daemon=True)
             for i in range(count)]
    for proc in procs:
        proc.start()
    try:
        ready.wait()
        yield
    finally:
        stop.set()
        for proc in procs:
            proc.join()


@contextlib.contextmanager
def as_first_worker(job: JobSpec, processes: int):
    """The block runs in this process as a run's first worker on its node does: one intra-op thread, beside
    ``processes - 1`` busy neighbours (:func:`busy_neighbours`) and pinned as that worker is (runtime.host.pinned).
    The thread count matters with the pin: a process of two OpenMP threads pinned to one CPU took 1.7 s for an
    AdamW step of 10 ms (bench.runtime, session 24)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with busy_neighbours(job, processes - 1), pinned(0, processes):
            yield
    finally:
        torch.set_num_threads(threads)


def _keep_busy(job_json: str, stop, ready, index: int, workers: int) -> None:
    configure_worker_process(slot=(index, workers))  # pinned as a run's workers are (runtime.host)
    timers = [run for runs in layer_timers(JobSpec.model_validate_json(job_json), torch.device("cpu")).values()
              for run in runs.values()]
    ready.wait()
    while not stop.is_set():
        for run in timers:
            run()


def profile_processes(job: JobSpec) -> int:
    """How many processes time the layers at once: a CPU job's workers per node (at most this host's CPUs), since
    the workers of a run share the host's caches and memory bandwidth (a busy neighbour slowed a layer by ~5%);
    1 where the job's workers compute on GPUs (each has its own)."""
    if worker_device(job).type != "cpu":
        return 1
    return max(1, min(job.cluster.devices_per_node, os.cpu_count() or 1))


# ``launcher(job, repeats, warmup, processes)``: every process's :func:`measure_as_worker` result, the processes
# started by the caller (``loom profile``: Ray actors, as a run's workers; orchestrator.actors.profile_in_actors)
Launcher = Callable[[JobSpec, int, int, int], list[dict]]


def profile_layers(job: JobSpec, repeats: int, warmup: int, processes: int = 1, launcher: Launcher | None = None
                   ) -> tuple[dict[str, list[list[float]]], dict[str, list[list[float]]]]:
    """The cost file's ``points`` (per layer workload, ``[[local batch, median seconds per layer], ...]`` over the
    samples of :func:`sample_layers`): the layers measured in ``processes`` worker processes at once, each sample the
    slowest process's (the median of those); the processes are ``launcher``'s, else spawned here. Second, its
    ``forward``: per workload with a backward, the median share of forward over every process's samples."""
    if processes <= 1:  # here, on the device a worker would use
        pooled = [json.loads(json.dumps(_measure_worker_side(job, repeats, warmup, None, worker_device(job))))]
    elif launcher is not None:
        pooled = launcher(job, repeats, warmup, processes)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            barrier = mp.get_context("spawn").Barrier(processes)
            mp.spawn(_measure_in_worker, args=(job.model_dump_json(), repeats, warmup, barrier, tmp, processes),
                     nprocs=processes, join=True)
            pooled = [json.loads(path.read_text()) for path in sorted(Path(tmp).glob("*.json"))]
    return slowest_medians([p["points"] for p in pooled]), median_shares([p["forward"] for p in pooled])


def time_optimizer(job: JobSpec, repeats: int, warmup: int) -> dict:
    """The cost file's optimizer keys (:func:`optimizer_keys`: ``optimizer_s_per_param`` and the fitted ``optimizer``
    step), timed here on the device a worker would use, since the step covers the loss heads, which a recipe
    registers in this process only (orchestrator.recipes). Time it inside :func:`as_first_worker`, as a run steps
    beside its other workers."""
    return optimizer_keys(optimizer_points(job, repeats, warmup, worker_device(job)))


def slowest_medians(samples: list[dict[str, dict]]) -> dict[str, list[list[float]]]:
    """Per workload and local batch, the median over the samples of the slowest process's time: ``samples[r][key][b]``
    are process r's samples, taken together with the other processes' (a barrier before each), and a wave of the run
    ends with its slowest device."""
    return {key: [[int(b), statistics.median(map(max, zip(*(s[key][b] for s in samples))))] for b in points]
            for key, points in samples[0].items()}


def median_shares(shares: list[dict[str, dict]]) -> dict[str, list[list[float]]]:
    """Per workload and local batch, the median of every process's forward shares (``shares[r][key][b]``): a share
    is the same work's split wherever it ran, so the processes' samples pool."""
    keys = {key: sorted({b for s in shares for b in s.get(key, {})}, key=int) for s in shares for key in s}
    return {key: [[int(b), statistics.median(v for s in shares for v in s.get(key, {}).get(b, []))] for b in batches]
            for key, batches in keys.items()}


MIN_SECONDS_PER_PARAM = 1e-15  # the fitted per-parameter term's floor (the cost file refuses 0)


def optimizer_keys(points: list[list[float]]) -> dict:
    """The cost file's ``optimizer_s_per_param`` (the step over all the job's trainable tensors, per parameter) and
    ``optimizer`` (planner.costfit.fit_step over ``points``), both None when nothing trains."""
    if not points:
        return {"optimizer_s_per_param": None, "optimizer": None}
    tensors = max(q[1] for q in points)  # the step over all the job's tensors (not the extra flat point)
    params = max(q[0] for q in points if q[1] == tensors)
    whole = [p for p in points if (p[0], p[1]) == (params, tensors)]
    a, b, c = fit_step([tuple(p) for p in points])
    b = max(b, MIN_SECONDS_PER_PARAM)  # noise may leave the parameters nothing to explain: they still cost
    return {"optimizer_s_per_param": max(statistics.median(p[2] for p in whole) / whole[0][0], 1e-15),
            "optimizer": {"step_s": a, "s_per_param": b, "s_per_tensor": c}}


def _measure_worker_side(job: JobSpec, repeats: int, warmup: int, barrier=None,
                         device: torch.device = torch.device("cpu")) -> dict:
    points, forward = sample_layers(job, repeats, warmup, barrier, device)
    return {"points": points, "forward": forward}


def measure_as_worker(rank: int, job_json: str, repeats: int, warmup: int, barrier, workers: int) -> dict:
    """In a CPU worker process of ``workers`` (pinned as a run's, runtime.host): this process's samples of every
    layer workload (:func:`sample_layers`, ``barrier.wait()`` before each sample)."""
    configure_worker_process(slot=(rank, workers))
    return _measure_worker_side(JobSpec.model_validate_json(job_json), repeats, warmup, barrier)


def _measure_in_worker(rank: int, job_json: str, repeats: int, warmup: int, barrier, out_dir: str,
                       workers: int) -> None:
    result = measure_as_worker(rank, job_json, repeats, warmup, barrier, workers)
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(result))


def profile_job(job: JobSpec, *, repeats: int = 5, warmup: int = 2, links: bool = True,
                progress: Callable[[str], None] | None = None, launcher: Launcher | None = None) -> dict:
    """Measure every distinct layer workload of ``job`` (in :func:`profile_processes` processes at once, started by
    ``launcher`` when given) and the work outside the layers (and, with ``links``, for a CPU cluster of several
    devices per node, the gloo links: two processes); returns the cost file as a dict."""
    say = progress or log.info
    threads = torch.get_num_threads()
    device = worker_device(job)
    configure_worker_process(device)  # as each worker: on CPU one thread and freed memory kept (the latter stays on)
    try:
        processes = profile_processes(job)
        points, forward = profile_layers(job, repeats, warmup, processes, launcher)
        names = {profile_key(op, Layout(1, 1)): op.name for op in reversed(build_metagraph(job).metaops)}
        for key, pts in points.items():
            shares = f" (forward {forward[key][-1][1]:.0%})" if key in forward else ""
            say(f"profiled {names[key]} ({processes} at once): "
                + ", ".join(f"b={b}: {t * 1e3:.2f} ms" for b, t in pts) + shares)
        with as_first_worker(job, processes):  # beside the other workers' layers, pinned, as in a run
            optimizer = time_optimizer(job, repeats, warmup)
            embed, head = time_embeddings(job, repeats, warmup, device), time_heads(job, repeats, warmup, device)
            data = time_data(job, repeats, warmup, device)
        rate, fit = optimizer["optimizer_s_per_param"], optimizer["optimizer"]
        say("profiled outside the layers: embeddings " + ", ".join(f"{k} {v[-1][1] * 1e3:.2f} ms" for k, v in embed.items())
            + "; heads " + ", ".join(f"{k} {v[-1][1] * 1e3:.2f} ms" for k, v in head.items())
            + "; data " + ", ".join(f"{k} {v[-1][1] * 1e3:.2f} ms" for k, v in data.items())
            + (f"; optimizer step {fit['step_s'] * 1e3:.2f} ms + {fit['s_per_param'] * 1e9:.2f} ns/parameter + "
               f"{fit['s_per_tensor'] * 1e6:.1f} us/tensor" if fit is not None else ""))
        sizes = module_sizes(job)
        points, embed, head, data = (rising_curves(curves, say) for curves in (points, embed, head, data))
        out = {"version": PROFILE_VERSION, "device": job.cluster.device, "points": points, "forward": forward,
               "embed": embed, "head": head, "data": data, "optimizer_s_per_param": rate, "optimizer": fit,
               "modules": sizes}
        if links and job.cluster.device.lower() == "cpu" and job.cluster.devices_per_node > 1:
            out["links"] = profile_links(max(repeats, LINK_REPEATS), warmup, message_sizes(job, sizes), processes)
            say("profiled gloo links between two processes: " + "; ".join(
                f"{kind} {b / 1024:.1f} KiB {t * 1e3:.2f} ms" for kind, pts in out["links"].items() for b, t in pts))
        return out
    finally:
        torch.set_num_threads(threads)


def rising_curves(curves: dict[str, list[list[float]]],
                  say: Callable[[str], None] = log.info) -> dict[str, list[list[float]]]:
    """Each ``[[x, seconds], ...]`` curve sorted by x, with every time lowered to the least time measured at an equal
    or larger x: more work never takes less time, so a point above a larger x's is a spike of a busy host (seen:
    a loss head at 23 ms for 8 samples and 11 ms for 16, under load 20 on 2 cores), and it takes the larger x's time
    (as :func:`profile_links` does). The cost file then always passes planner.costfile's monotone check; a point
    lowered by more than half is reported through ``say``."""
    out = {}
    for key, curve in curves.items():
        ordered = sorted(curve)
        for i in range(len(ordered) - 2, -1, -1):
            x, t = ordered[i]
            if t > ordered[i + 1][1]:
                if ordered[i + 1][1] < 0.5 * t:
                    say(f"{key}: {t * 1e3:.2f} ms at {x:g} is above {ordered[i + 1][1] * 1e3:.2f} ms at a larger "
                        f"size (the machine was busy?); kept the latter for both")
                ordered[i] = [x, ordered[i + 1][1]]
        out[key] = ordered
    return out


def _synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on a CUDA ``device`` (a no-op on CPU): a timed region then holds its work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(run: Callable[[], None], repeats: int, warmup: int,
                    device: torch.device = torch.device("cpu")) -> float:
    """The median seconds of ``run`` over ``repeats`` samples after ``warmup``, each from cold caches
    (runtime.host.evict_caches)."""
    samples = []
    for i in range(warmup + repeats):
        evict_caches(device)
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        if i >= warmup:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_embeddings(job: JobSpec, repeats: int, warmup: int,
                    device: torch.device = torch.device("cpu")) -> dict[str, list[list[float]]]:
    """Per MetaOp whose first layer runs input modules (MetaOp.input_modules: a root's embedding, a
    decoder's or UNet's bridge, a connector), by name: median seconds of running those modules forward and backward
    (backward only when they train) on inputs of its producers' output shapes and a drawn batch, at every local batch
    the planner can ask for."""
    graph, counts = build_metagraph(job), profiled_counts(job)
    index = {t.name: i for i, t in enumerate(job.tasks)}
    modules: dict[str, torch.nn.Module] = {}
    out = {}
    for op in graph.metaops:
        names = list(op.input_modules)
        if not names or op.mode == "sample":  # a sample use draws its own noise: its input module runs in its loop
            continue
        for name in names:
            modules.setdefault(name, build_input_module(job, name).to(device))
        shapes = [feature_shape(job, graph.metaops[op.deps[i]]) for i in input_order(job, graph, op.id)]

        def run(batch, inputs: list[torch.Tensor], op: MetaOp = op) -> None:
            y = first_input(job, graph, op, inputs, modules.__getitem__, lambda: batch)
            if y.requires_grad:
                y.backward(torch.ones_like(y))
            for t in [*inputs, *(p for m in modules.values() for p in m.parameters())]:
                t.grad = None

        out[op.name] = []
        for b in local_batches(op, job.cluster.num_devices, counts):
            inputs = [torch.randn(b, *shape, device=device).requires_grad_(True) for shape in shapes]  # as received
            batch = synthetic_batch(job, index[op.task], 0, 0, b).to(device)  # drawing it is `data`'s (time_data)
            seconds = _median_seconds(lambda batch=batch, inputs=inputs, run=run: run(batch, inputs), repeats, warmup,
                                      device)
            out[op.name].append([b, seconds])
    return out


def time_heads(job: JobSpec, repeats: int, warmup: int,
               device: torch.device = torch.device("cpu")) -> dict[str, list[list[float]]]:
    """Per task: median seconds of its loss head forward and backward on outputs of its leaf MetaOps' shapes (and
    rollout tokens of its generate uses) and a drawn batch, at every local batch the planner can ask for."""
    graph, counts = build_metagraph(job), profiled_counts(job)
    read = {d for op in graph.metaops for d in op.deps}
    out = {}
    for t, task in enumerate(job.tasks):
        leaves = [op for op in graph.metaops if op.task == task.name and op.id not in read]
        if not leaves:
            continue
        head = build_head(job, t).to(device)
        points = []
        for b in local_batches(leaves[0], job.cluster.num_devices, counts):
            outputs = {op.use: torch.randn(b, *output_shape(job, op), device=device, requires_grad=True)
                       for op in leaves}
            # the rollouts of the task's generate uses (a grpo head reads the tokens), without gradient
            outputs |= {op.use: rollout_rows(job, op, b, device) for op in graph.metaops
                        if op.task == task.name and op.gen is not None and op.gen.mode == "generate"}

            # the loss host's rows' labels (and inputs); drawing them is `data`'s (time_data)
            batch = synthetic_batch(job, t, 0, 0, b).to(device)
            rows = leaves[0].batch_size
            if b < rows:  # a head reading every row of the batch (grpo's groups, infonce) gets the batch's rows
                batch.gather_rows = lambda x, b=b, rows=rows: x.repeat(-(-rows // b), *[1] * (x.dim() - 1))[:rows]

            def run(outputs: dict = outputs, batch=batch) -> None:
                head(outputs, batch).sum().backward()
                head.zero_grad(set_to_none=True)

            points.append([b, _median_seconds(run, repeats, warmup, device)])
        out[task.name] = points
    return out


def time_data(job: JobSpec, repeats: int, warmup: int,
              device: torch.device = torch.device("cpu")) -> dict[str, list[list[float]]]:
    """Per task: median seconds of drawing ``b`` rows of its batch (runtime.data.task_batch: its data source's
    reading, decoding and tokenising, or the synthetic or a recipe's data) and moving them to ``device``, at every
    local batch the planner can ask for: what a worker pays once a step for each task whose rows it reads
    (runtime.steps.StepState.batch; planner.simulator.batch_draws). Every draw is of the next step's rows, as a run
    draws them from its first step: a source's caches (each record encoded once, decoded images) warm as they do in
    a run, so a small dataset's epochs after the first are timed as cached and a large one's rows as fresh."""
    graph, counts = build_metagraph(job), profiled_counts(job)
    out = {}
    for t, task in enumerate(job.tasks):
        op = next((op for op in graph.metaops if op.task == task.name), None)
        if op is None:
            continue
        steps = itertools.count()
        out[task.name] = [[b, _median_seconds(lambda b=b, t=t: task_batch(job, t, next(steps), 0, b).to(device),
                                              repeats, warmup, device)]
                          for b in local_batches(op, job.cluster.num_devices, counts)]
    return out


LINK_BYTES = (1 << 14, 1 << 18, 1 << 20, 1 << 22)  # message sizes the link curves are measured at
LINK_REPEATS = 25  # a message takes about a millisecond, and single samples on a shared host vary a lot


def profile_links(repeats: int = 5, warmup: int = 2, sizes: tuple[int, ...] = LINK_BYTES, workers: int = 2
                  ) -> dict[str, list[list[float]]]:
    """``{"p2p": [[bytes, s], ...], "allreduce": [...], "allgather": [...]}``: median seconds of one message
    (``batch_isend_irecv``, as the runtime's transfers), of one all-reduce (as its gradient sync) and of one
    all-gather of ``bytes`` in all (as ZeRO-1's, runtime.zero) between two gloo worker processes on this host, one
    thread each, at ``sizes`` (`loom profile`: the job's own message sizes, runtime.profile_step.message_sizes); per
    size, the slower of the two ranks, and never more than at a larger size (a longer message cannot be faster: a
    slower median is noise of a shared host). The two are pinned as the first two of a run's ``workers`` on this host
are (runtime.host.pin_worker). The planner fits each to a latency and a bandwidth."""
    from runtime.local_world import free_port

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_time_links, args=(free_port(), repeats, warmup, sizes, tmp, workers), nprocs=2, join=True)
        return json.loads((Path(tmp) / "links.json").read_text())


def one_message(x: torch.Tensor, rank: int) -> None:
    """Rank 0 sends ``x`` to rank 1 (``batch_isend_irecv``, as the runtime's transfers); rank 1 receives it."""
    op = dist.P2POp(dist.isend, x, 1) if rank == 0 else dist.P2POp(dist.irecv, x, 0)
    for request in dist.batch_isend_irecv([op]):
        request.wait()


def _time_links(rank: int, port: int, repeats: int, warmup: int, sizes: tuple[int, ...], out_dir: str,
                workers: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    configure_worker_process(slot=(rank, workers))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        def timed(run: Callable[[], None]) -> float:
            samples = []
            for i in range(warmup + repeats):
                dist.barrier()  # both ranks start together: a sample is one operation, not a wait for the peer
                start = time.perf_counter()
                run()
                if i >= warmup:
                    samples.append(time.perf_counter() - start)
            return statistics.median(samples)

        def gather(mine: torch.Tensor) -> None:
            dist.all_gather([torch.empty_like(mine) for _ in range(2)], mine)

        medians = torch.tensor([[timed(lambda x=torch.zeros(max(1, n // 4)): one_message(x, rank)),
                                 timed(lambda x=torch.zeros(max(1, n // 4)): dist.all_reduce(x)),
                                 timed(lambda x=torch.zeros(max(1, n // 8)): gather(x))] for n in sizes],
                               dtype=torch.float64)
        dist.all_reduce(medians, op=dist.ReduceOp.MAX)
        if rank == 0:
            rising = torch.cummin(medians.flip(0), dim=0).values.flip(0)  # a spike at one size: take a larger one's
            out = {kind: [[n, float(rising[i, j])] for i, n in enumerate(sizes)]
                   for j, kind in enumerate(("p2p", "allreduce", "allgather"))}
            (Path(out_dir) / "links.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()
