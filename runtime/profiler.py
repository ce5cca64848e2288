"""Profile MetaOp layers on this device: the measured side of the cost model (``loom profile``).

For every distinct layer workload of a job (layer shape, backward factor, TP degree 1), one layer is
built with the runtime's modules and timed forward+backward (forward only for a frozen layer with
nothing trainable upstream; input gradients only when a trainable layer feeds a frozen one) at every
per-device batch the planner can ask for: ``batch / dp`` for each data-parallel degree dp that
divides the batch and fits the cluster. Each point is the median of ``repeats`` timed runs after
``warmup`` runs, with one thread, as a worker runs. The result is the JSON that
:class:`planner.costmodel.ProfiledCostModel` reads (piecewise alpha-beta between the points).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import torch

from planner.costmodel import Layout, profile_key
from planner.metagraph import MetaOp, build_metagraph
from planner.spec import JobSpec
from runtime.executor import feature_shape
from runtime.modules import build_layer

log = logging.getLogger(__name__)

PROFILE_VERSION = 1


def local_batches(op: MetaOp, num_devices: int) -> list[int]:
    """The per-device batches the planner evaluates for ``op`` (data parallel, TP 1), ascending."""
    return sorted({op.batch_size // dp for dp in range(1, num_devices + 1) if op.batch_size % dp == 0})


def time_layer(layer: torch.nn.Module, op: MetaOp, seq: int, hidden: int, batch: int, repeats: int,
               warmup: int) -> float:
    """Median seconds of one forward(+backward) of ``layer`` on a (batch, seq, hidden) input."""
    needs_input_grad = op.backward_factor > 0
    x = torch.randn(batch, seq, hidden, requires_grad=needs_input_grad)
    samples = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        if op.backward_factor > 0:
            y = layer(x)
            y.backward(torch.ones_like(y))
        else:
            with torch.no_grad():
                layer(x)
        if i >= warmup:
            samples.append(time.perf_counter() - start)
        layer.zero_grad(set_to_none=True)
        x.grad = None
    return statistics.median(samples)


def profile_job(job: JobSpec, *, repeats: int = 5, warmup: int = 2,
                progress: Callable[[str], None] | None = None) -> dict:
    """Measure every distinct layer workload of ``job``; returns the profiled cost file as a dict."""
    say = progress or log.info
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, like each worker
    try:
        points: dict[str, list[list[float]]] = {}
        for op in build_metagraph(job).metaops:
            key = profile_key(op, Layout(1, 1))
            if key in points:
                continue
            layer = build_layer(job, op, 0)
            if op.backward_factor == 1:  # input gradients only: the layer's weights are frozen
                layer.requires_grad_(False)
            seq, hidden = feature_shape(job, op)
            points[key] = [[b, time_layer(layer, op, seq, hidden, b, repeats, warmup)]
                           for b in local_batches(op, job.cluster.num_devices)]
            say(f"profiled {op.name}: " + ", ".join(f"b={b}: {t * 1e3:.2f} ms" for b, t in points[key]))
        return {"version": PROFILE_VERSION, "device": job.cluster.device, "points": points}
    finally:
        torch.set_num_threads(threads)
