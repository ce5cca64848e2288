"""Generation and sampling MetaOps: what a ``generate`` or ``sample`` use is, and the analytic price of decoding.

A generate or sample use is one MetaOp (all its layers; the agreed rule with the runtime, docs/planner.md): it is
built with ``num_layers`` 1 and a :class:`Generation` describing the whole use. Pure Python: the cost model
(:mod:`planner.costmodel`) prices it with :func:`generate_seconds` and :func:`kv_cache_bytes`; ``loom profile``
measures the same work on a machine so the two can be compared.

Decoding, for ``rows`` sequences on one device (its data-parallel share) at tensor-parallel degree ``tp``:

- prefill: a forward over the ``prompt`` positions of every row,
  ``max(rows * F_prefill / (peak * eff), (W + rows * A_prefill) / bw) + kernels * launch``;
- each of the ``new_tokens`` decode steps ``t`` (context ``c = prompt + t`` cached positions) reads every weight and
  every row's KV cache once and does one token's FLOPs per row:
  ``max(rows * (2 P + 4 L c h) / (peak * eff), (W + rows * 2 L kv c e) / bw) + kernels * launch``,

with ``P`` the parameters of the layers and the LM head, ``W = P * e`` the weight bytes read (``e`` bytes per
element in the compute dtype), ``L`` layers, ``h`` hidden size, ``kv`` the key/value width (kv_heads x head_dim),
``peak * eff`` the device's sustained FLOP/s, ``bw`` its memory bandwidth and ``launch`` its per-kernel latency.
FLOPs and bytes divide by ``tp`` (heads and weights are split). At a small batch the weight read dominates
(bandwidth-bound); at a large one the FLOPs do (compute-bound). The KV cache holds
``2 * L * kv * (prompt + new_tokens) * e`` bytes per row (:func:`kv_cache_bytes`).

A sample use runs ``denoise_steps`` forwards of the denoiser without gradient; with ``grad_last_step`` it stops at a
seeded step of ``stop_steps`` and runs that one with gradient (forward and backward), priced at the range's last
(``TaskComponentSpec.denoise_passes`` forwards): the cost model counts them as passes of the use's layers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

ROLLOUT_ELEMENT_BYTES = 4  # a packed rollout row crosses in float32 (token ids exact below 2^24; runtime.rollout.pack)


def rollout_width(prompt: int, new_tokens: int, rollout_lag: int = 0) -> int:
    """Elements of one packed rollout row, what a generate use's output carries (runtime.rollout.pack): the
    ``prompt + new_tokens`` token ids, the ``new_tokens`` generated mask, and with ``rollout_lag`` 1 the
    ``new_tokens`` behaviour log-probabilities: ``P + 2N``, ``P + 3N``."""
    return prompt + (3 if rollout_lag else 2) * new_tokens


@dataclass(frozen=True)
class Decoder:
    """The decoding facts of a generate use's causal LM: everything :func:`generate_seconds` needs besides the batch."""

    layers: int
    hidden: int
    kv_dim: int  # key/value width: kv_heads * head_dim
    params: float  # parameters of all layers plus the LM head (hidden x vocab)
    prompt: int  # prompt positions (the use's seq_len)
    new_tokens: int
    prefill_flops: float  # forward FLOPs of one row's prompt through all layers, plus its last position's LM head
    prefill_bytes: float  # activation bytes one row's prefill moves (saved-activation estimate of the layers)
    kernels: int  # kernel launches of one forward of all layers (a decode step or the prefill)


@dataclass(frozen=True)
class Generation:
    """What a generate or sample MetaOp runs (planner.spec.TaskComponentSpec's mode fields)."""

    mode: str  # "generate" or "sample"
    samples: int = 1
    new_tokens: int = 0
    denoise_steps: int = 0  # sample: denoiser forwards run (TaskComponentSpec.denoise_passes)
    grad_last_step: bool = False
    decoder: Decoder | None = None  # generate only
    # the runtime runs it tensor-parallel where the component allows it (runtime.tp_decode: a generate use, Loom's llama
    # kind or a pretrained Llama-family causal LM, on megatron-core blocks); a sample use runs at tensor_parallel 1
    tensor_parallel: bool = False
    # a generate use: the step's micro-batches (training.grad_accum_steps) whose rows it decodes at once, in the first;
    # the later ones hand on their share of those rollouts (:func:`decode_batches`)
    batches: int = 1


def decode_batches(op) -> int:
    """The micro-batches generate MetaOp ``op`` decodes at once (1 for any other MetaOp). With gradient accumulation
    a step decodes its rollouts once, every micro-batch's rows together in the first micro-batch (each decode step
    reads every weight once however many rows it carries), and each micro-batch then scores and trains its share:
    the cost model prices that decode of ``batches`` micro-batches' rows, 1 / ``batches`` of it per micro-batch (so
    ``batches`` passes of the waves add up to one decode), and its KV cache whole; the simulator puts all of it in
    the first micro-batch (:func:`planner.simulator.walk`)."""
    return op.gen.batches if op.gen is not None and op.gen.decoder is not None else 1


def decode_shard_params(layer_params: float, dec: Decoder, tp: int) -> float:
    """Parameters of one TP rank's shard of a decoded llama layer of ``layer_params`` (runtime.tp_decode, as
    megatron-core lays it out): its two RMSNorm weights (``2 * hidden``) whole on every rank, the projections split
    ``tp`` ways."""
    norms = 2.0 * dec.hidden if tp > 1 else 0.0
    return (layer_params - norms) / tp + norms


def kv_cache_bytes(layers: int, kv_dim: int, positions: int, element_bytes: float, rows: float) -> float:
    """Bytes of the KV cache of ``rows`` sequences of ``positions``: a key and a value of ``kv_dim`` per layer and
    position, ``2 * layers * kv_dim * positions * element_bytes * rows``."""
    return 2.0 * layers * kv_dim * positions * element_bytes * rows


def generate_seconds(dec: Decoder, rows: int, tp: int, flops_per_s: float, mem_bandwidth: float, launch_s: float,
                     element_bytes: float) -> tuple[float, float]:
    """(prefill, decode) seconds of generating for ``rows`` sequences on one device at tensor-parallel degree ``tp``
    (module docstring formula); ``flops_per_s`` is the sustained rate (peak x efficiency)."""
    weights = dec.params * element_bytes
    prefill = max(rows * dec.prefill_flops / tp / flops_per_s,
                  (weights + rows * dec.prefill_bytes) / tp / mem_bandwidth) + dec.kernels * launch_s
    context = dec.prompt + np.arange(dec.new_tokens, dtype=np.float64)
    flops = rows * (2.0 * dec.params + 4.0 * dec.layers * context * dec.hidden) / tp
    read = (weights + kv_cache_bytes(dec.layers, dec.kv_dim, 1, element_bytes, rows) * context) / tp
    steps = np.maximum(flops / flops_per_s, read / mem_bandwidth) + dec.kernels * launch_s
    return float(prefill), float(steps.sum())


def bandwidth_bound_fraction(dec: Decoder, rows: int, tp: int, flops_per_s: float, mem_bandwidth: float,
                             element_bytes: float) -> float:
    """Fraction of the decode steps whose memory read takes longer than their FLOPs (1: all bandwidth-bound)."""
    context = dec.prompt + np.arange(dec.new_tokens, dtype=np.float64)
    flops = rows * (2.0 * dec.params + 4.0 * dec.layers * context * dec.hidden) / tp / flops_per_s
    read = (dec.params * element_bytes + kv_cache_bytes(dec.layers, dec.kv_dim, 1, element_bytes, rows) * context)
    return float(np.mean(read / tp / mem_bandwidth > flops)) if dec.new_tokens else 0.0


def whole_use(job, t: int, u: int, segments: list) -> tuple:
    """The one layer segment, :class:`Generation` and output shape of generate or sample use ``u`` of task ``t``
    (``segments``: the use's contracted layer segments). The segment sums the use's layers (FLOPs, parameters,
    saved activations of one pass, kernels) under a key naming the mode and its fields, so equal keys are equal
    work; its output is the sampled token ids (prompt + new positions) of a generate use, which cross as packed rows
    (:func:`rollout_width` elements of :data:`ROLLOUT_ELEMENT_BYTES`: the segment's ``out_bytes``), or a sample use's
    x0 (or final latents), ``in_channels * side^2`` elements per sample."""
    from planner.components import use_shape  # local: components imports the spec, this module stays light
    from planner.kinds import LayerSegment, kind_of
    from planner.memory import ACT_BYTES

    use = job.tasks[t].components[u]
    comp = job.components[use.component]
    total = lambda attr: float(sum(getattr(s, attr) * s.count for s in segments))  # noqa: E731
    layers = sum(s.count for s in segments)
    digest = "+".join(f"{s.key}x{s.count}" for s in segments)
    if use.mode == "generate":
        shape = use_shape(job, t, u)
        h, vocab = comp.hidden_size, comp.vocab_size or 0
        dec = Decoder(layers=layers, hidden=h, kv_dim=h * (comp.num_kv_heads or comp.num_heads) // comp.num_heads,
                      params=total("params") + h * vocab, prompt=shape.seq_len, new_tokens=use.new_tokens,
                      prefill_flops=total("flops_fwd") + 2.0 * h * vocab, prefill_bytes=2 * total("act_bytes"),
                      kernels=int(total("num_kernels")))
        gen = Generation("generate", use.samples, new_tokens=use.new_tokens, decoder=dec, tensor_parallel=True,
                         batches=job.training.micro_batches)
        key = f"generate[{digest},v={vocab},new={use.new_tokens}]"
        out = (shape.seq_len + use.new_tokens,)
        out_bytes = float(ROLLOUT_ELEMENT_BYTES
                          * rollout_width(shape.seq_len, use.new_tokens, job.training.rollout_lag))
    else:
        gen = Generation("sample", use.samples, denoise_steps=use.denoise_passes, grad_last_step=use.grad_last_step)
        key = f"sample[{digest},steps={use.denoise_passes},grad={int(use.grad_last_step)}]"
        # what crosses is x0 (or the final latents): the denoiser's channels at the use's side, not its last block's
        # feature map (the output layer runs inside the use), as runtime.sampleop.run_sample flattens it
        side = use_shape(job, t, u).image_size
        out = ((comp.in_channels or kind_of(comp).in_channels) * side * side,)
        out_bytes = float(ACT_BYTES[job.training.precision] * out[0])  # at the precision it crosses in
    seg = LayerSegment(key, 1, total("flops_fwd"), total("params"), total("act_bytes"), out_bytes,
                       total("tp_comm_bytes"), int(total("num_kernels")))
    return seg, gen, out


def generate_time(cost_model, op, layout) -> float:
    """A generate MetaOp ``op`` on ``layout`` under ``cost_model`` (a planner.costmodel.CostModel): prefill and decode
    (:func:`generate_seconds`) for its local rows at the device table's rates, plus two TP all-reduces of one token's
    hidden state per layer and decode step (and of the prompt's in prefill) when tp > 1; the rows of its
    :func:`decode_batches` micro-batches decoded together, per micro-batch."""
    dev, dec = cost_model.hw.device, op.gen.decoder
    b = cost_model.local_batch(op, layout) * op.gen.batches
    element = cost_model.grad_bytes  # the compute dtype's bytes (2 bf16/fp16, 4 fp32)
    prefill, decode = generate_seconds(dec, b, layout.tp_degree, dev.peak_flops * dev.efficiency, dev.mem_bandwidth,
                                       dev.launch_s, element)
    tp = 0.0
    if layout.tp_degree > 1:
        token = b * dec.hidden * element
        tp = 2 * dec.layers * (dec.new_tokens * cost_model.allreduce_time(token, layout.tp_degree, cross_node=False)
                               + cost_model.allreduce_time(token * dec.prompt, layout.tp_degree, cross_node=False))
    return (prefill + decode + tp) / op.gen.batches


@contextlib.contextmanager
def as_run(cost_model):
    """``cost_model`` (a planner.costmodel.CostModel) with ``modes_as_run`` on inside the block: a generate or sample
    use takes only the tensor-parallel degrees the runtime runs it at (any allowed degree for a use whose
    ``Generation.tensor_parallel`` is set: a decode, runtime.tp_decode; tensor_parallel 1 for a sample use), so every
    placement made inside runs as planned. Outside it a placement may sample tensor-parallel, which the runtime does
    not: priced, not run (:func:`modes_refused`)."""
    before, cost_model.modes_as_run = cost_model.modes_as_run, True
    try:
        yield cost_model
    finally:
        cost_model.modes_as_run = before


def runs_tensor_parallel(op) -> bool:
    """Whether the runtime runs MetaOp ``op`` at tensor_parallel > 1 when its component allows it: every MetaOp but a
    sample use (:attr:`Generation.tensor_parallel`)."""
    return op.gen is None or op.gen.tensor_parallel


def layer_tp_groups(ops, placed, groups: set[str] | None = None) -> dict[tuple[str, int, int], tuple[int, ...]]:
    """(parameter group, layer, device) -> the devices of the TP group in which the device runs that layer, for every
    layered slice (train or forward; a generate or sample slice's stand-in is skipped) of ``placed`` (a whole group
    of one at tensor_parallel 1) of the parameter groups ``groups`` (None: all): the layout the runtime builds those
    layers in (runtime.assignment.layer_tp_groups)."""
    out: dict[tuple[str, int, int], tuple[int, ...]] = {}
    for wave in placed.waves:
        for s in wave.slices:
            op = ops[s.metaop]
            if op.gen is not None or (groups is not None and op.param_group not in groups):
                continue
            tp, g = s.layout.tp_degree, op.param_group
            tp_groups = [tuple(s.devices[i:i + tp]) for i in range(0, len(s.devices), tp)]
            out.update(((g, j, d), members) for j in range(s.first_layer, s.first_layer + s.num_layers)
                       for members in tp_groups for d in members)
    return out


def decode_refused(ops, placed) -> str | None:
    """Why the runtime cannot give the devices of a generate slice of ``placed`` the weights they decode with (None:
    it can). A device of a generate slice at tensor_parallel t decodes with TP rank r's shard of its group of t
    (runtime.tp_decode; t = 1: the whole layer). For every layer of the use's component that another use runs (train
    or forward) it either holds that layer in the same TP group (tensor_parallel 1: alone), and decodes with it, or
    holds none of it and, when the layer trains, receives its cut after each step (runtime.rollout.Roles: a
    trainer's own shard at the same degree and rank, cut from a whole layer, or from the layer its TP group gathers
    first). A device that runs the layer in another group would need a second, differently cut copy of it beside
    the one it holds: not run. The first such device, layer and group is named: the generate slices in order, their TP
    groups in order, the component's (group, layer) pairs sorted, the group's devices in order."""
    decodes = [s for wave in placed.waves for s in wave.slices
               if ops[s.metaop].gen is not None and ops[s.metaop].gen.mode == "generate"]
    if not decodes:
        return None  # nothing decodes
    layers: dict[str, dict[str, set[int]]] = {}  # component -> group -> its layers other uses run (train or forward)
    for wave in placed.waves:
        for s in wave.slices:
            op = ops[s.metaop]
            if op.gen is None:
                layers.setdefault(op.component, {}).setdefault(op.param_group, set()).update(
                    range(s.first_layer, s.first_layer + s.num_layers))
    held, ids = _tp_group_table(ops, placed, {g for s in decodes for g in layers.get(ops[s.metaop].component, {})})
    members_of = {k: m for m, k in ids.items()}
    for s in decodes:
        op = ops[s.metaop]
        tp = s.layout.tp_degree
        runs = layers.get(op.component, {})
        for i in range(0, len(s.devices), tp):
            members = tuple(s.devices[i:i + tp])
            me = ids.get(members, -2)
            for group in sorted(runs):
                js = np.array(sorted(runs[group]))
                found = held[group][np.ix_(members, js)]  # per member and layer, the TP group it runs it in
                other = (found >= 0) & (found != me)
                if other.any():
                    col = int(other.any(axis=0).argmax())
                    row = int(other[:, col].argmax())
                    return (f"{op.name} decodes on device {members[row]} in TP group {list(members)}, which runs "
                            f"layer {js[col]} of {group} in TP group {list(members_of[int(found[row, col])])}")
    return None


def _tp_group_table(ops, placed, groups: set[str]) -> tuple[dict[str, np.ndarray], dict[tuple[int, ...], int]]:
    """:func:`layer_tp_groups` of ``groups`` as a table per group: devices x layers, the id of the TP group the
    device runs the layer in (-1: it does not run it; the last slice that does decides), and the ids by TP group."""
    layered = [(s, ops[s.metaop].param_group) for wave in placed.waves for s in wave.slices
               if ops[s.metaop].gen is None and ops[s.metaop].param_group in groups]
    devices = 1 + max(d for wave in placed.waves for s in wave.slices for d in s.devices)
    size: dict[str, int] = {}
    for s, g in layered:
        size[g] = max(size.get(g, 0), s.first_layer + s.num_layers)
    table = {g: np.full((devices, n), -1, dtype=np.int64) for g, n in size.items()}
    ids: dict[tuple[int, ...], int] = {}
    for s, g in layered:
        tp = s.layout.tp_degree
        for i in range(0, len(s.devices), tp):
            members = tuple(s.devices[i:i + tp])
            table[g][list(members), s.first_layer:s.first_layer + s.num_layers] = ids.setdefault(members, len(ids))
    return table, ids


def modes_refused(ops, placed) -> str | None:
    """Why the runtime would refuse the generate and sample slices of ``placed`` (a PlacedSchedule over MetaOps
    ``ops``): a sample use at tensor_parallel > 1 (:func:`runs_tensor_parallel`), or a decode whose weights the
    runtime cannot place (:func:`decode_refused`); None when it runs them all."""
    for wave in placed.waves:
        for s in wave.slices:
            op = ops[s.metaop]
            if not runs_tensor_parallel(op) and s.layout.tp_degree > 1:
                return f"{op.name} {op.gen.mode}s at tensor_parallel {s.layout.tp_degree}"
    return decode_refused(ops, placed)
