"""Scalability estimator: per-layer time T_m(n) and memory of a MetaOp on n devices.

One interface (:class:`CostModel`), two sources: :class:`AnalyticCostModel` (FLOPs and bytes
against the device table, alpha-beta collectives) and :class:`ProfiledCostModel` (measured
(local batch, seconds) points fitted piecewise alpha-beta). Both produce a :class:`Curve` per
MetaOp: the valid device counts with strictly decreasing per-layer times, so every scheduler sees
a non-increasing T_m(n). A count is valid when some layout (dp x tp = n, tp in the component's
allowed degrees and within one node; 1 for a sample use with ``modes_as_run``, planner.generation.as_run)
has dp dividing the MetaOp's batch (any dp up to the batch with ``uneven_rows``: planner.rows) and one layer fits in
device memory.
"""

from __future__ import annotations

import copy
import logging
import math
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

from planner.components import use_shape
from planner.costfile import CALIBRATION_PARTS, read_cost_file
from planner.costfit import alpha_beta
from planner.devices import Hardware
from planner.errors import PlanningError
from planner.generation import decode_batches, generate_time, kv_cache_bytes, runs_tensor_parallel
from planner.memory import ACT_BYTES, STREAM_BYTES
from planner.metagraph import MetaOp
from planner.spec import JobSpec
from planner.usegraph import leaf_uses, use_component

log = logging.getLogger(__name__)

# Parameter memory: what the runtime holds per parameter element on a device that runs the layer (docs/planner.md).
BYTES_WEIGHT = 4  # fp32 weights, whatever the precision: bf16/fp16 autocast computes from the fp32 parameters
BYTES_GRAD = 4  # their fp32 gradients
BYTES_COMPUTE_COPY = 2  # bf16/fp16: autocast's cast of each weight, kept from its forward use to its backward
BYTES_MASTER_SHARE = 4  # ZeRO-1 (dp > 1): the fp32 copy of its share that the inner optimizer steps (runtime.zero)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 0}  # per element stepped: AdamW's m and v; plain SGD keeps none
# The float32 logits block the chunked loss kernels hold at once: kernels.rows.CHUNK_BYTES (a test compares them; the
# planner may not import kernels).
LOGITS_CHUNK_BYTES = 256 * 2**20
NEXT_TOKEN_LOSSES = ("lm", "next_token")
STEP_REDUCE_BYTES = 64  # a step's closing all-reduce: a float64 per task (a few), or the gradient norm  # the losses whose head is a Linear(H, vocab) + cross-entropy per position


@dataclass(frozen=True)
class LogitsShape:
    """What one sample of a next-token task's LM head scores: ``positions`` rows of ``vocab_size`` logits."""

    positions: int
    vocab_size: int


def logits_bytes(num_positions: int, vocab_size: int, kernels: str, act_bytes: int) -> float:
    """Bytes the LM head's loss holds at its peak for ``num_positions`` positions on one device. With the fused
    kernels (training.kernels ``auto``/``reference``) one float32 block of the rows that fit LOGITS_CHUNK_BYTES (at
    least one row), as kernels.rows.chunk_rows_for picks; with ``off`` the logits in the compute dtype
    (``act_bytes``), their float32 log-softmax kept for backward and their float32 gradient."""
    if kernels == "off":
        return float(num_positions * vocab_size * (act_bytes + 8))
    rows = max(1, min(num_positions, LOGITS_CHUNK_BYTES // (4 * vocab_size)))
    return float(rows * vocab_size * 4)


@dataclass(frozen=True)
class Layout:
    """How a MetaOp slice uses its devices: ``dp_degree * tp_degree`` devices."""

    dp_degree: int
    tp_degree: int

    @property
    def num_devices(self) -> int:
        return self.dp_degree * self.tp_degree


@dataclass(frozen=True)
class Curve:
    """T_m(n) on the valid counts of one MetaOp: ``counts`` ascending, ``times`` (s/layer) strictly decreasing."""

    counts: tuple[int, ...]
    times: tuple[float, ...]
    layouts: tuple[Layout, ...]
    memory: tuple[float, ...]  # bytes per device per layer at each count
    forward: tuple[float, ...] = ()  # the share of each count's time that runs in forward (CostModel.forward_fraction)

    def __post_init__(self) -> None:
        # count -> position: the planner's searches ask a curve for a count's time hundreds of thousands of times
        object.__setattr__(self, "_position", {n: i for i, n in enumerate(self.counts)})

    def index(self, n: int) -> int:
        i = self._position.get(n)
        if i is None:
            raise KeyError(f"{n} is not a valid device count (valid: {self.counts})")
        return i

    def time(self, n: int) -> float:
        i = self._position.get(n)
        return self.times[i] if i is not None else self.times[self.index(n)]

    def layout(self, n: int) -> Layout:
        return self.layouts[self.index(n)]

    def forward_fraction(self, n: int) -> float | None:
        """The share of a layer's time on ``n`` devices that runs in forward; None for a curve built without them."""
        return self.forward[self.index(n)] if self.forward else None

    def speedup(self, n: float) -> float:
        """T(1-equivalent)/T(n) interpolated linearly between valid counts (and from 0 at n=0)."""
        base = self.times[0] * self.counts[0]
        xs = (0,) + self.counts
        ys = (0.0,) + tuple(base / t for t in self.times)
        if n >= xs[-1]:
            return ys[-1]
        i = bisect_left(xs, n)
        if xs[i] == n:
            return ys[i]
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (n - x0) / (x1 - x0)

    def concave_hull(self, max_count: int | None = None) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The valid counts (up to ``max_count``) on the upper concave hull of the speed-up points, and their speed-ups.

        The right object is *throughput against devices*: a MetaOp on ``n`` devices processes ``1 / T(n)`` layers
        per second, and a schedule may run it on different counts at different times (or not at all, the point
        (0, 0)). Over any window its average device use and its average throughput are the same mixture of those
        points, so every achievable (devices, throughput) pair lies under the upper concave hull of ``(0, 0)`` and
        the ``(n, 1 / T(n))``. Times do not mix that way (time-sharing averages rates, not times), so the hull is
        taken of throughput; speed-up ``W / T(n)`` (:meth:`speedup`'s scale) is throughput times a constant, so
        its hull has the same vertices. Linear interpolation between adjacent counts (:meth:`speedup`) equals
        the hull only where the speed-up is concave; elsewhere it lies under it and is no bound. Returns the
        hull's vertices without (0, 0), ascending; empty when no count is <= ``max_count``.
        """
        k = len(self.counts) if max_count is None else bisect_left(self.counts, max_count + 1)
        base = self.times[0] * self.counts[0]
        hull: list[tuple[float, float]] = [(0.0, 0.0)]
        for n, t in zip(self.counts[:k], self.times[:k]):
            p = (float(n), base / t)
            # Pop the last vertex while it lies on or under the chord from its predecessor to p.
            while len(hull) >= 2:
                (ax, ay), (bx, by) = hull[-2], hull[-1]
                if (by - ay) * (p[0] - ax) <= (p[1] - ay) * (bx - ax):
                    hull.pop()
                else:
                    break
            hull.append(p)
        return tuple(int(x) for x, _ in hull[1:]), tuple(y for _, y in hull[1:])


class CostModel:
    """Base of the cost models. Subclasses implement :meth:`layout_time`; the rest is shared."""

    source = "base"

    def __init__(self, hardware: Hardware, shard_optimizer: bool = True, grad_bytes: int = 2, weight_bytes: int = 2,
                 precision: str = "bf16", optimizer: str = "adamw"):
        self.hw = hardware
        self.shard_optimizer = shard_optimizer
        self.precision, self.optimizer = precision, optimizer  # training.precision, training.optimizer: memory terms
        self.grad_bytes = grad_bytes  # bytes per gradient element all-reduced (2 for bf16/fp16, 4 for fp32)
        # Bytes per element of activations and their gradients crossing devices at wave boundaries: the compute
        # precision (2 at bf16/fp16 autocast, 4 at fp32), as the runtime sends them (runtime.executor's wire dtype).
        self.weight_bytes = weight_bytes
        # Bytes per parameter element wherever parameters move or are copied: ZeRO-1's all-gather of the updated
        # shares and weight hand-offs. The runtime's parameters are float32 in every
        # precision (autocast computes from them), so it moves BYTES_WEIGHT (but a copy only to decode with:
        # decode_matrix_bytes); docs/planner.md "What moves".
        self.param_bytes_moved = BYTES_WEIGHT
        self._curves: dict[tuple, Curve] = {}
        # The LM heads the memory model prices (:meth:`head_memory`): per next-token task, set by the caller
        # (planner.api.make_cost_model: :func:`lm_heads`), and the job's training.kernels.
        self.heads: dict[str, LogitsShape] = {}
        self.kernels = "auto"
        # all-reduces over every device that end each step (runtime.executor: the task losses, and the gradient norm
        # when the job clips or scales), set by the caller for a job (planner.api.make_cost_model); 0: not priced
        self.step_reduces = 0
        self.uneven_rows = False  # layouts whose dp does not divide the batch (planner.rows; the RL role searches)
        # sample uses at tensor_parallel 1 only, as the runtime runs them (planner.generation.as_run)
        self.modes_as_run = False
        # micro-batches whose saved activations a device holds at once: 1, or training.grad_accum_steps when their
        # forwards are pipelined (planner.phases.step_walk, which the timeline walks when this is above 1)
        self.in_flight = 1
        # with in_flight > 1: the micro-batches walk 1F1B (planner.phases.one_forward_one_backward), each wave holding
        # planner.phases.pipelined_in_flight of them (the ledger: planner.placement.placed_ledger), not GPipe's k
        self.one_f_one_b = False

    def with_shard_optimizer(self, shard: bool) -> CostModel:
        """This model with ZeRO-1 on or off (``training.shard_optimizer: auto``, planner.candidates.zero_choice): a
        copy without its private attributes, which a model uses for memos only (its curves; the simulations and flow
        prices planner.simulator and planner.timeline keep on it), since memory and the optimizer's step are priced
        otherwise."""
        return self if shard == self.shard_optimizer else self._twin(shard_optimizer=shard)

    def with_in_flight(self, micro_batches: int) -> CostModel:
        """This model with ``micro_batches`` micro-batches' activations held at once (their forwards pipelined: the
        timeline walks :func:`planner.phases.step_walk` pipelined) or 1 (in order); a copy as
        :meth:`with_shard_optimizer` makes, since the curves' layouts depend on memory."""
        return self if micro_batches == self.in_flight else self._twin(in_flight=micro_batches)

    def with_one_f_one_b(self, flag: bool) -> CostModel:
        """This model with its pipelined micro-batches walked 1F1B (``flag``) or GPipe's fill and drain; a copy as
        :meth:`with_in_flight` makes."""
        return self if flag == self.one_f_one_b else self._twin(one_f_one_b=flag)

    def _twin(self, **changes) -> CostModel:
        """A copy with ``changes`` and without the private attributes (memos: the curves, and the simulations and flow
        prices planner.simulator and planner.timeline keep on a model), which the changes may invalidate."""
        twin = copy.copy(self)
        twin.__dict__ = {k: v for k, v in self.__dict__.items() if not k.startswith("_")} | changes
        twin._curves = {}
        return twin

    # ---- what subclasses provide
    def layout_time(self, op: MetaOp, layout: Layout) -> float:
        """Seconds for forward+backward of one layer of ``op`` (its whole batch) under ``layout``."""
        raise NotImplementedError

    # ---- shared
    def local_batch(self, op: MetaOp, layout: Layout) -> int:
        return math.ceil(op.batch_size / layout.dp_degree)

    def bytes_per_param(self, op: MetaOp, layout: Layout) -> float:
        """Bytes of state per (TP-sharded) parameter on one device, as the runtime holds it: the fp32 weight, and
        under bf16/fp16 autocast's low-precision copy of it wherever backward runs through the layer (saved for
        it); trainable, also its fp32 gradient and the optimizer state (AdamW 8, SGD 0). With ZeRO-1 over dp > 1
        holders, each keeps 1/dp of the state beside an fp32 master copy of that share (4/dp); alone (dp 1, or
        ``shard_optimizer: false``) the weight is the master. A generate MetaOp's copy of its layers under bf16/fp16:
        the compute dtype's bytes (its matrices are held in it; norms, under 0.1% of a layer, priced with them)."""
        if op.gen is not None and op.gen.decoder is not None and self.precision != "fp32":
            return float(self.grad_bytes)  # a copy to decode with: its matrices in the compute dtype (runtime.rollout)
        copy = BYTES_COMPUTE_COPY if self.precision != "fp32" and op.backward_factor > 0 else 0
        weight = BYTES_WEIGHT + copy
        if op.frozen:
            return weight
        state = OPTIMIZER_STATE_BYTES[self.optimizer]
        if self.shard_optimizer and layout.dp_degree > 1:
            return weight + BYTES_GRAD + (BYTES_MASTER_SHARE + state) / layout.dp_degree
        return weight + BYTES_GRAD + state

    def moved_bytes_per_param(self, trainable: bool) -> tuple[float, float]:
        """Bytes per parameter element that moving a parameter to new holders carries: the fp32 weight, and (trainable)
        the optimizer state, which ZeRO-1 splits over the holders. The gradient, the low-precision copy and a ZeRO-1
        master share are rebuilt where they land."""
        return float(BYTES_WEIGHT), float(OPTIMIZER_STATE_BYTES[self.optimizer] if trainable else 0)

    def param_bytes(self, op: MetaOp, layout: Layout) -> float:
        """Bytes of parameter state (weights, and for trainable layers gradients and optimizer state) per device per
        layer."""
        return op.layer.params * self.bytes_per_param(op, layout) / layout.tp_degree

    def activation_bytes(self, op: MetaOp, layout: Layout, in_flight: int | None = None) -> float:
        """Bytes per device per layer kept for backward (planner.memory; under recompute the layer's input), of
        ``in_flight`` micro-batches (default :attr:`in_flight`). Without backward, its last output spread over its
        layers; a generate MetaOp, its KV cache. Inputs and outputs kept are the float32 stream whatever the precision
        (``out_bytes`` is what crosses devices, in compute dtype)."""
        if op.gen is not None and op.gen.decoder is not None:  # generate: the KV cache, sharded by heads over TP
            dec = op.gen.decoder
            return kv_cache_bytes(dec.layers, dec.kv_dim, dec.prompt + dec.new_tokens, self.grad_bytes,
                                  self.local_batch(op, layout) * op.gen.batches) / layout.tp_degree
        stream = op.layer.out_bytes * STREAM_BYTES / ACT_BYTES[self.precision]
        rows = self.local_batch(op, layout) * (in_flight or self.in_flight)  # pipelined: micro-batches in flight
        if op.backward_factor == 0:
            return stream * rows / layout.tp_degree / op.num_layers
        return (stream if op.recompute else op.layer.act_bytes) * rows / layout.tp_degree

    def decode_cast_bytes(self, op: MetaOp, layout: Layout, trained_layers, trained: bool) -> float:
        """Bytes autocast's cast cache holds while generate MetaOp ``op`` decodes on ``layout``: under bf16/fp16 torch
        casts a float32 leaf weight that requires a gradient to the compute precision once per autocast region and
        keeps the cast until the region ends, and runtime.executor decodes a whole generation in one region. A copy of
        a layer held only to decode with is in the compute precision already (runtime.rollout.lower_matrices: nothing
        cast); the ``trained_layers`` (a count, or an array of counts per device) the device trains itself at this TP
        degree are decoded from their float32 modules, so their shards are held a second time, and so is the LM head
        (whole) where the component is ``trained`` (counted whether the device trains it or holds a copy: at most the
        head's bytes too many). 0 in fp32."""
        if self.precision == "fp32" or not trained:
            return 0.0 * trained_layers
        dec = op.gen.decoder
        head = dec.params - op.layer.params  # the LM head (hidden x vocab)
        return (trained_layers * op.layer.params / dec.layers / layout.tp_degree + head) * self.grad_bytes

    def layer_memory(self, op: MetaOp, layout: Layout) -> float:
        """Bytes per device for one layer: parameter state plus activations saved for backward."""
        return self.param_bytes(op, layout) + self.activation_bytes(op, layout)

    @staticmethod
    def passes(op: MetaOp) -> float:
        """Forward-pass equivalents per layer: 1 + backward (+1 forward again under recompute); a sample use runs
        ``denoise_steps`` forwards, the backward of its last step when it has one (a generate use is priced apart:
        :meth:`AnalyticCostModel.layout_time`)."""
        forwards = op.gen.denoise_steps if op.gen is not None and op.gen.mode == "sample" else 1.0
        return forwards + op.backward_factor + (1.0 if op.recompute else 0.0)

    @staticmethod
    def passes_fraction(op: MetaOp) -> float:
        """The part of a MetaOp's compute that runs in forward (before the loss) when every pass costs a forward:
        1 / passes, all of it for a generate use and every denoising step of a sample use."""
        if op.gen is not None:
            forwards = op.gen.denoise_steps if op.gen.mode == "sample" else 1.0
            return forwards / (forwards + op.backward_factor + (1.0 if op.recompute else 0.0))
        return 1.0 / CostModel.passes(op)

    def forward_fraction(self, op: MetaOp, layout: Layout) -> float:
        """The part of ``op``'s compute on ``layout`` that runs in forward: :meth:`passes_fraction` here (a backward
        costs two forwards); a profiled model uses the share it measured."""
        return self.passes_fraction(op)

    def layouts(self, op: MetaOp, n: int) -> list[Layout]:
        out = []
        for tp in op.allowed_tp:
            if n % tp or tp > self.hw.devices_per_node or (
                    tp > 1 and self.modes_as_run and not runs_tensor_parallel(op)):
                continue
            dp = n // tp
            if op.batch_size % dp == 0 or (self.uneven_rows and dp <= op.batch_size):
                out.append(Layout(dp, tp))
        return out

    def curve(self, op: MetaOp) -> Curve:
        """The valid counts of ``op`` with strictly decreasing times (cached per workload)."""
        # Everything _build_curve reads: recompute changes time and memory, num_layers the memory preference.
        cache_key = (op.key, op.num_layers, op.batch_size, op.backward_factor, op.frozen, op.recompute, op.allowed_tp,
                     op.gen, self.uneven_rows, self.modes_as_run)
        if cache_key not in self._curves:
            self._curves[cache_key] = self._build_curve(op)
        return self._curves[cache_key]

    def _build_curve(self, op: MetaOp) -> Curve:
        # Prefer layouts that could hold the whole MetaOp (a device may run all its layers over the waves);
        # only when none can, fall back to layouts where one layer fits and let placement judge.
        curve = self._build_curve_within(op, self.hw.memory_bytes / op.num_layers)
        return curve if curve is not None else self._build_curve_within(op, self.hw.memory_bytes) or self._no_curve(op)

    def _build_curve_within(self, op: MetaOp, limit: float) -> Curve | None:
        counts, times, layouts, memory = [], [], [], []
        for n in range(1, self.hw.num_devices + 1):
            best: tuple[float, Layout, float] | None = None
            for layout in self.layouts(op, n):
                mem = self.layer_memory(op, layout)
                if mem > limit:
                    continue
                t = self.layout_time(op, layout)
                if best is None or t < best[0]:
                    best = (t, layout, mem)
            if best is None or (times and best[0] >= times[-1]):
                continue  # invalid, or no faster than a smaller count: keep T non-increasing
            counts.append(n)
            times.append(best[0])
            layouts.append(best[1])
            memory.append(best[2])
        if not counts:
            return None
        return Curve(tuple(counts), tuple(times), tuple(layouts), tuple(memory),
                     tuple(self.forward_fraction(op, lay) for lay in layouts))

    def _no_curve(self, op: MetaOp) -> Curve:
        layouts = [lay for n in range(1, self.hw.num_devices + 1) for lay in self.layouts(op, n)]
        need = min((self.layer_memory(op, lay) for lay in layouts), default=float("nan"))
        raise PlanningError(
            f"MetaOp {op.name}: no valid device count; one layer needs {need / 2**30:.1f} GiB per device at best "
            f"and a device has {self.hw.memory_bytes / 2**30:.1f} GiB (batch {op.batch_size}, tensor_parallel "
            f"{[1] if self.modes_as_run and not runs_tensor_parallel(op) else list(op.allowed_tp)}). Allow a larger "
            "tensor_parallel degree, lower the batch size, or use larger devices."
        )

    # ---- communication (alpha-beta)
    def allreduce_time(self, nbytes: float, num_devices: int, cross_node: bool) -> float:
        """Ring all-reduce of ``nbytes`` over ``num_devices``."""
        if num_devices <= 1 or nbytes <= 0:
            return 0.0
        bw = self.hw.inter_bandwidth if cross_node else self.hw.intra_bandwidth
        alpha = self.hw.device.inter_latency_s if cross_node else self.hw.device.intra_latency_s
        steps = 2 * (num_devices - 1)
        return steps * alpha + steps / num_devices * nbytes / bw

    def allgather_time(self, nbytes: float, num_devices: int, cross_node: bool) -> float:
        """Ring all-gather of ``nbytes`` in all (each of ``num_devices`` contributes ``nbytes / num_devices``):
        ``n - 1`` steps, each moving one share over every device's link, on the links the all-reduce uses."""
        if num_devices <= 1 or nbytes <= 0:
            return 0.0
        bw = self.hw.inter_bandwidth if cross_node else self.hw.intra_bandwidth
        alpha = self.hw.device.inter_latency_s if cross_node else self.hw.device.intra_latency_s
        steps = num_devices - 1
        return steps * alpha + steps / num_devices * nbytes / bw

    def p2p_time(self, nbytes: float, cross_node: bool) -> float:
        """One point-to-point message of ``nbytes``."""
        if nbytes <= 0:
            return 0.0
        if cross_node:
            return self.hw.device.inter_latency_s + nbytes / self.hw.inter_bandwidth
        return self.hw.device.intra_latency_s + nbytes / self.hw.intra_bandwidth

    def optimizer_time(self, num_params: float, num_tensors: float = 0.0) -> float:
        """AdamW step over ``num_params`` parameters in ``num_tensors`` tensors held by one device (memory bound, ~32
        bytes/param; the tensors cost nothing here: see :meth:`ProfiledCostModel.optimizer_time`)."""
        return num_params * 32 / self.hw.device.mem_bandwidth

    def step_reduce_time(self, num_devices: int) -> float:
        """Seconds of the step's closing all-reduces over ``num_devices`` (:attr:`step_reduces` of
        :data:`STEP_REDUCE_BYTES` each): their latency, which a small job on a shared host pays every step. A
        message of a few bytes is latency-bound and collective libraries reduce it along a tree (NCCL's tree
        algorithm; 2 devices: one exchange), so ``ceil(log2 n)`` two-device exchanges, not a ring's ``2(n - 1)``
        hops (a800 table, 10,240 devices: 0.28 ms, where a ring would take 205 ms)."""
        if num_devices <= 1:
            return 0.0
        cross = num_devices > self.hw.devices_per_node
        exchange = self.allreduce_time(STEP_REDUCE_BYTES, 2, cross_node=cross)
        return self.step_reduces * math.ceil(math.log2(num_devices)) * exchange

    def module_size(self, name: str) -> tuple[float, float]:
        """(parameters, tensors) of module ``name`` as the runtime builds it: a MetaOp's input module
        (``embed:<c>``, ``adapt:<c>``) or a task's loss head (``head:<task>``) whole, a parameter group per layer
        (with its norms and biases, which ``layer.params`` leaves out). (0, 0) when unknown: without a profile the
        planner does not size input modules and heads, prices a layer's bucket at ``layer.params`` and counts no
        tensors."""
        return 0.0, 0.0

    def module_matrices(self, name: str) -> float | None:
        """Parameters of module ``name`` in matrices (2-D tensors: its linear layers' weights), as the runtime builds
        it; None when unknown (a cost file without them, or no profile): a copy only to decode with holds and
        receives them in the compute precision (planner.handoff)."""
        return None

    @property
    def decode_matrix_bytes(self) -> float:
        """Bytes per matrix parameter of a copy only to decode with, as it is held and handed off: the compute
        dtype's (runtime.rollout.lower_matrices; float32 under fp32)."""
        return float(self.grad_bytes) if self.precision != "fp32" else float(self.param_bytes_moved)

    # ---- work outside the layers (0 unless measured: see ProfiledCostModel)
    def embed_time(self, op: MetaOp, local_batch: int) -> float:
        """Seconds one device of a MetaOp's first slice spends per step on ``local_batch`` samples before and after
        its layers: drawing the data and its input modules' forward and backward (a root's embedding, a bridge,
        a connector)."""
        return 0.0

    def head_time(self, task: str, local_batch: int) -> float:
        """Seconds one loss device of ``task`` spends per step on its loss head, forward and backward."""
        return 0.0

    def data_time(self, task: str, local_batch: int) -> float:
        """Seconds one device spends per step drawing ``local_batch`` rows of ``task``'s batch from its data source
        (reading, decoding, tokenising) and moving them to the device."""
        return 0.0

    def head_memory(self, task: str, local_batch: int) -> float:
        """Bytes one loss device of ``task`` holds for its loss head's logits at the loss stage (:func:`logits_bytes`
        at the job's precision and kernels); 0 for tasks without an LM head in :attr:`heads`."""
        shape = self.heads.get(task)
        if shape is None:
            return 0.0
        return logits_bytes(local_batch * shape.positions, shape.vocab_size, self.kernels, self.grad_bytes)


class AnalyticCostModel(CostModel):
    """T = kernel launches x latency + max(FLOPs / (peak x efficiency), bytes / bandwidth) + TP all-reduces."""

    source = "analytic"

    def layout_time(self, op: MetaOp, layout: Layout) -> float:
        dev, layer = self.hw.device, op.layer
        b = self.local_batch(op, layout)
        if op.gen is not None and op.gen.decoder is not None:
            return generate_time(self, op, layout)
        passes = self.passes(op)
        compute = layer.flops_fwd * b * passes / layout.tp_degree / (dev.peak_flops * dev.efficiency)
        moved = (2 * layer.params * passes + 2 * layer.act_bytes * b) / layout.tp_degree
        memory = moved / dev.mem_bandwidth
        launches = layer.num_kernels * passes * dev.launch_s
        tp = 0.0
        if layout.tp_degree > 1:
            rounds = 2 * (2 if op.backward_factor > 0 else 1)
            tp = rounds * self.allreduce_time(layer.tp_comm_bytes / 2 * b, layout.tp_degree, cross_node=False)
        return launches + max(compute, memory) + tp


class ProfiledCostModel(CostModel):
    """Per-layer times measured at a few local batch sizes, fitted piecewise alpha-beta (linear between points).

    File format (JSON): ``{"version": 1, "device": "cpu", "points": {"<profile key>": [[local_batch, seconds], ...]}}``
    where the profile key is :func:`profile_key` of the MetaOp and layout. Keys missing from the file
    fall back to ``fallback`` when given, else they are a PlanningError naming the MetaOp. Optional keys
    (:class:`MeasuredCosts`): ``"embed"`` (root MetaOp name -> points: its data and embedding per
    device), ``"head"`` (task -> points: its loss head per loss device), ``"data"`` (task -> points: drawing its rows
    of the batch per device), ``"optimizer_s_per_param"``
    (AdamW seconds per parameter held) and ``"links": {"p2p": [[bytes, s], ...], "allreduce": [...],
    "allgather": [...]}`` (two processes of one node, fitted to a latency and a bandwidth:
    :meth:`link_time`; ``allgather`` may be missing, see :meth:`allgather_time`). Without them, embeddings, heads and data cost 0 and the optimizer and links
    follow the device table. ``"forward"`` (profile key -> ``[[local_batch, share], ...]``): the share of a layer's
    time that its forward took (:meth:`forward_fraction`; without it, by passes). ``"calibration"`` (``compute``,
    ``loss``, ``optimizer`` -> ratio, orchestrator.calibrate): what the runtime measured over what these times
    predicted; the layers, embeddings and data draws are priced times ``compute``, the loss heads ``loss``, the
    optimizer step ``optimizer`` (the fallback model's times are not).
    """

    source = "profiled"

    def __init__(self, hardware: Hardware, points: dict[str, list[tuple[float, float]]], fallback: CostModel | None = None,
                 shard_optimizer: bool = True, grad_bytes: int = 2, measured: MeasuredCosts | None = None,
                 weight_bytes: int = 2, precision: str = "bf16", optimizer: str = "adamw",
                 forward: dict[str, list[tuple[float, float]]] | None = None,
                 calibration: dict[str, float] | None = None):
        super().__init__(hardware, shard_optimizer, grad_bytes, weight_bytes, precision, optimizer)
        self.calibration = {part: (calibration or {}).get(part, 1.0) for part in CALIBRATION_PARTS}
        self.points = {k: sorted((float(b), float(t)) for b, t in v) for k, v in points.items()}
        self.forward = {k: sorted((float(b), float(f)) for b, f in v) for k, v in (forward or {}).items()}
        self.fallback = fallback
        self.measured = measured or MeasuredCosts()
        # per link kind, the fitted per-message latency and seconds per byte (planner.costfit.alpha_beta)
        self.links = {kind: alpha_beta(pts) for kind in ("p2p", "allreduce", "allgather")
                      if (pts := getattr(self.measured, kind))}

    @classmethod
    def load(cls, path: str | Path | dict, hardware: Hardware, fallback: CostModel | None = None,
             shard_optimizer: bool = True, grad_bytes: int = 2, weight_bytes: int = 2, precision: str = "bf16",
             optimizer: str = "adamw") -> ProfiledCostModel:
        """The cost model of the cost file at ``path`` (or of its parsed contents), checked first (planner.costfile: NaN, zero batches,
        duplicate or non-monotone points, wrong types and unknown keys are a one-line SpecError naming the entry)."""
        costs = read_cost_file(path, hardware.device.name)
        measured = MeasuredCosts(costs.embed, costs.head, costs.optimizer_s_per_param,
                                 *(costs.links.get(kind, []) for kind in ("p2p", "allreduce", "allgather")),
                                 optimizer=costs.optimizer, modules=costs.modules or {}, data=costs.data or {})
        return cls(hardware, costs.points, fallback, shard_optimizer, grad_bytes, measured, weight_bytes, precision,
                   optimizer, costs.forward, costs.calibration)

    def layout_time(self, op: MetaOp, layout: Layout) -> float:
        pts = self.points.get(profile_key(op, layout))
        if not pts:
            if self.fallback is not None:
                return self.fallback.layout_time(op, layout)
            raise PlanningError(
                f"MetaOp {op.name}: the cost file has no points for '{profile_key(op, layout)}'. "
                "Re-run `loom profile` for this job."
            )
        # a generate use decodes its micro-batches' rows at once, priced per micro-batch (planner.generation)
        m = decode_batches(op)
        return fit_piecewise(pts, self.local_batch(op, layout) * m) / m * self.calibration["compute"]

    def forward_fraction(self, op: MetaOp, layout: Layout) -> float:
        """The share of ``op``'s layer time that its forward took in the profile, at this local batch (between the
        measured batches linear, beyond them the nearest one's); by passes for a generate or sample use, under
        recompute (profiled without it) and for a workload the file has no shares of."""
        pts = self.forward.get(profile_key(op, layout)) if op.gen is None and not op.recompute else None
        if not pts:
            return self.passes_fraction(op)
        return fit_piecewise(pts, min(max(self.local_batch(op, layout), pts[0][0]), pts[-1][0]))

    def embed_time(self, op: MetaOp, local_batch: int) -> float:
        pts = self.measured.embed.get(op.name)
        return fit_piecewise(pts, local_batch) * self.calibration["compute"] if pts else 0.0

    def head_time(self, task: str, local_batch: int) -> float:
        pts = self.measured.head.get(task)
        return fit_piecewise(pts, local_batch) * self.calibration["loss"] if pts else 0.0

    def data_time(self, task: str, local_batch: int) -> float:
        pts = self.measured.data.get(task)
        return fit_piecewise(pts, local_batch) * self.calibration["compute"] if pts else 0.0

    def optimizer_time(self, num_params: float, num_tensors: float = 0.0) -> float:
        """The fitted step (``loom profile``: a whole optimizer step over the job's real tensors) ``a + b params + c
        tensors`` on a device that steps something (0 otherwise); without the fit, the measured seconds per parameter;
        without either, the device table."""
        fit, scale = self.measured.optimizer, self.calibration["optimizer"]
        if fit is not None:
            step_s, per_param, per_tensor = fit
            return (step_s + per_param * num_params + per_tensor * num_tensors) * scale if num_params > 0 else 0.0
        rate = self.measured.optimizer_s_per_param
        return num_params * rate * scale if rate is not None else super().optimizer_time(num_params)

    def module_size(self, name: str) -> tuple[float, float]:
        return self.measured.modules.get(name, (0.0, 0.0))[:2]

    def module_matrices(self, name: str) -> float | None:
        found = self.measured.modules.get(name, ())
        return found[2] if len(found) > 2 else None

    def p2p_time(self, nbytes: float, cross_node: bool) -> float:
        if cross_node or not self.measured.p2p or nbytes <= 0:
            return super().p2p_time(nbytes, cross_node)
        return self.link_time("p2p", nbytes)

    def link_time(self, kind: str, nbytes: float) -> float:
        """Seconds of one ``kind`` message (``p2p``, ``allreduce``, ``allgather``) of ``nbytes`` between two processes:
        the measured points' fitted latency plus bytes over bandwidth (:func:`planner.costfit.alpha_beta`)."""
        alpha, beta = self.links[kind]
        return alpha + beta * nbytes

    def allreduce_time(self, nbytes: float, num_devices: int, cross_node: bool) -> float:
        """Measured between two processes: t2(b) = alpha + beta b. A ring over n devices takes 2(n-1) steps of
        b/n bytes, i.e. (n-1) alpha + 2(n-1)/n b beta = (n-1) t2(2b/n)."""
        if cross_node or not self.measured.allreduce or num_devices <= 1 or nbytes <= 0:
            return super().allreduce_time(nbytes, num_devices, cross_node)
        return (num_devices - 1) * self.link_time("allreduce", 2 * nbytes / num_devices)

    def allgather_time(self, nbytes: float, num_devices: int, cross_node: bool) -> float:
        """Measured between two processes: t2(b) gathers ``b`` bytes in all (b/2 from each). A ring over n devices
        takes n-1 steps of b/n bytes, i.e. (n-1) t2(2b/n). Without all-gather points, derived from the measured
        all-reduce: a ring all-reduce is a reduce-scatter plus an all-gather, twice the steps and twice the bytes
        per device of a ring all-gather of the same tensor, so the all-gather takes half the all-reduce's time."""
        if cross_node or num_devices <= 1 or nbytes <= 0:
            return super().allgather_time(nbytes, num_devices, cross_node)
        if self.measured.allgather:
            return (num_devices - 1) * self.link_time("allgather", 2 * nbytes / num_devices)
        if self.measured.allreduce:
            return self.allreduce_time(nbytes, num_devices, cross_node) / 2
        return super().allgather_time(nbytes, num_devices, cross_node)


@dataclass(frozen=True)
class MeasuredCosts:
    """What ``loom profile`` measures besides the layers; every curve is sorted (x, seconds) points.

    ``embed``: per MetaOp name with input modules (a root's embedding, a bridge, a connector), (local batch, s) of
    those modules' forward and backward on one device. ``head``: per task, (local batch, s) of its loss head forward
    and backward on one loss device. ``data``: per task, (local batch, s) of drawing that many rows of its batch on
    one device (its data source's reading, decoding and tokenising; the synthetic or a recipe's data otherwise). ``optimizer_s_per_param``: AdamW seconds per parameter a device holds (None: not
    measured). ``p2p``, ``allreduce`` and ``allgather``: (bytes, s) of one message, of one all-reduce and of
    one all-gather (bytes gathered in all) between two worker processes of one node (empty: not measured).
    ``optimizer``: the fitted step ``(a, b, c)``: ``a + b params + c tensors`` seconds on a device that steps
    (None: not measured). ``modules``: module name -> (parameters, tensors) as the runtime builds it
    (:meth:`CostModel.module_size`), and its matrix parameters third where the file has them
    (:meth:`CostModel.module_matrices`).
    """

    embed: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    head: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    optimizer_s_per_param: float | None = None
    p2p: list[tuple[float, float]] = field(default_factory=list)
    allreduce: list[tuple[float, float]] = field(default_factory=list)
    allgather: list[tuple[float, float]] = field(default_factory=list)
    optimizer: tuple[float, float, float] | None = None
    modules: dict[str, tuple[float, ...]] = field(default_factory=dict)
    data: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> MeasuredCosts:
        """The optional keys of a cost file; TypeError/ValueError when one has the wrong shape."""
        def points(value) -> list[tuple[float, float]]:
            return sorted((float(x), float(t)) for x, t in value)

        def curves(key: str) -> dict[str, list[tuple[float, float]]]:
            return {str(k): points(v) for k, v in dict(data.get(key, {})).items()}

        rate = data.get("optimizer_s_per_param")
        links = dict(data.get("links", {}))
        fit = data.get("optimizer")
        return cls(curves("embed"), curves("head"), float(rate) if rate is not None else None,
                   *(points(links.get(kind, [])) for kind in ("p2p", "allreduce", "allgather")),
                   optimizer=tuple(float(fit[k]) for k in ("step_s", "s_per_param", "s_per_tensor")) if fit else None,
                   modules={str(k): tuple(float(x) for x in v[:3]) for k, v in dict(data.get("modules", {})).items()},
                   data=curves("data"))


def profile_key(op: MetaOp, layout: Layout) -> str:
    """Key of a profiled curve: layer workload, backward factor, recompute and TP degree (batch is the x axis)."""
    recompute = "|recompute" if op.recompute else ""
    return f"{op.key}|bwd={op.backward_factor:g}{recompute}|tp={layout.tp_degree}"


def fit_piecewise(points: list[tuple[float, float]], x: float) -> float:
    """Evaluate the piecewise alpha-beta fit of sorted (x, t) points at ``x`` (end segments extrapolate)."""
    if len(points) == 1:
        x0, t0 = points[0]
        return t0 * max(x, 1e-9) / x0
    i = min(max(bisect_left([p[0] for p in points], x), 1), len(points) - 1)
    (x0, t0), (x1, t1) = points[i - 1], points[i]
    beta = (t1 - t0) / (x1 - x0)
    return max(t0 + beta * (x - x0), 1e-9)


def lm_heads(job: JobSpec) -> dict[str, LogitsShape]:
    """The LM heads of ``job``'s next-token tasks whose leaf component declares ``vocab_size`` (without one the
    runtime's 256-token default head is too small to matter): one logits row per position of the leaf use."""
    out: dict[str, LogitsShape] = {}
    for t, task in enumerate(job.tasks):
        leaves = leaf_uses(job, t) if task.loss in NEXT_TOKEN_LOSSES else []
        if len(leaves) != 1 or not (comp := use_component(job, t, leaves[0])[1]).vocab_size:
            continue
        u = next(i for i, use in enumerate(task.components) if use.use_name == leaves[0])
        out[task.name] = LogitsShape(use_shape(job, t, u).seq_len, comp.vocab_size)
    return out
