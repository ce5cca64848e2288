"""Torch layers built from a job spec (input modules: runtime.embeddings; loss heads: runtime.heads).

Owns the exact math of every layer the runtime runs (built per kind by the runtime's component registry,
runtime.kinds, keyed by the planner's kind names), the initialisation shared by every module the runtime
builds (:func:`build_initialised`), the job's AdamW, and the task graph of uses (upstream, root and leaf uses; the widths feeding a use).
Every module is built deterministically: parameters are drawn from a ``torch.Generator`` seeded by
:func:`layer_seed`, so every process (and every task sharing a component, i.e. the same
``param_group``) builds bit-identical weights without communicating. Modules are float32 on CPU;
callers move them.

A layer maps ``(B, S, H) -> (B, S, H)``; what a use's first layer reads (its component's input module,
the upstream output) is runtime.embeddings' contract. Imports no other runtime module at import time but
runtime.kinds (which imports none).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from kernels import backend_for, rms_norm, swiglu
from planner.components import UseShape, upstream_width, use_shape
from planner.errors import SpecError
from planner.spec import ComponentSpec, JobSpec
from runtime.kinds import runtime_kind
from runtime.init_from import load_initial

if TYPE_CHECKING:  # planner MetaOps and the plan's alike; a worker never loads the MetaGraph builder
    from planner.metagraph import MetaOp


DEFAULT_VOCAB = 256  # vocabulary of a token component without vocab_size
INIT_STD = 0.02  # embeddings, queries, the [cls] token and its position


# --------------------------------------------------------------------------- seeds and init


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from JSON-serialisable ``parts``; the same in every process and Python run."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def layer_seed(job_seed: int, name: str, index: int) -> int:
    """Seed of layer ``index`` of parameter group ``name`` (or of an embedding/head named by ``name``)."""
    return stable_seed("layer", job_seed, name, index)


def build_initialised(factory, seed: int) -> nn.Module:
    """Build ``factory()`` without touching the global RNG, then initialise every parameter from ``seed``.

    Parameters are visited in registration order: biases zero, 1-d weights (norms) one, linear and
    conv weights normal(0, 1/sqrt(fan_in)), everything else (embedding tables, cls tokens, positions,
    queries) normal(0, INIT_STD); then every submodule with an ``init_structure()`` method sets its
    deterministic parts (the ViT's position grid). Fan-in scaling keeps attention logits O(1) at small
    widths: with a flat 0.02 a 64-wide decoder started with uniform attention and took thousands of
    steps to learn where to look.
    """
    with torch.device("meta"):  # no default init: it would consume the global RNG and be discarded
        module = factory()
    for sub in module.modules():  # by hand: Module.to_empty costs a one-off ~0.3 s of lazy imports
        assert not any(b is not None for b in sub._buffers.values()), "buffers are not materialised"
        for name, param in sub._parameters.items():
            if param is not None:
                sub._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype))
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    fan_in = {f"{prefix}.weight".lstrip("."): math.prod(sub.weight.shape[1:])
              for prefix, sub in module.named_modules() if isinstance(sub, (nn.Linear, nn.Conv2d))}
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif name.endswith("weight") and param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, fan_in[name] ** -0.5 if name in fan_in else INIT_STD, generator=gen)
        for sub in module.modules():
            if hasattr(sub, "init_structure"):
                sub.init_structure()
    return module


# --------------------------------------------------------------------------- layers


class TransformerBlock(nn.Module):
    """Pre-LN encoder block (transformer and vit kinds), non-causal, no dropout.

    ``x + proj(attn(ln1(x)))`` then ``x + fc2(gelu(fc1(ln2(x))))``; ``qkv`` output is ``[q | k | v]``
    (each ``h`` wide), heads split as ``(num_heads, h / num_heads)``, attention
    ``softmax(q k^T / sqrt(d)) v``, exact (erf) GELU. The key third of ``qkv.bias`` is not applied (it
    cannot change the output; see forward), so it stays at its initial zero. The megatron backend maps
    weights from these attribute names, so they and this math are a contract.
    """

    def __init__(self, hidden_size: int, num_heads: int, ffn_hidden_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.ln1 = nn.LayerNorm(hidden_size, eps=1e-5)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.ln2 = nn.LayerNorm(hidden_size, eps=1e-5)
        self.fc1 = nn.Linear(hidden_size, ffn_hidden_size, bias=True)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1]
        # The key part of the qkv bias cannot change the output (softmax ignores a per-query constant), so its
        # true gradient is zero; leaving it out makes it exactly zero instead of float noise that AdamW's
        # normalisation would turn into updates (and into differences between equivalent runs).
        bias = self.qkv.bias
        bias = torch.cat([bias[:h], torch.zeros_like(bias[h:2 * h]), bias[2 * h:]])
        q, k, v = F.linear(self.ln1(x), self.qkv.weight, bias).split(h, dim=-1)
        x = x + self.proj(attend(q, k, v, self.num_heads))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, causal: bool = False,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head ``softmax(q k^T / sqrt(d)) v``: q ``(B, S, H)``, k and v ``(B, C, H)`` -> ``(B, S, H)``; heads
    split as ``(num_heads, H / num_heads)``; ``causal`` masks key j > query i (needs S == C); ``mask`` ``(B, 1, S, C)``
    bool, True where a query may attend (replaces ``causal``: runtime.tokenizer.document_mask). Through
    ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU, bf16 under autocast)."""
    b, s, h = q.shape
    d = h // num_heads
    q = q.reshape(b, s, num_heads, d).transpose(1, 2)  # (b, heads, s, d)
    k, v = (t.reshape(b, t.shape[1], num_heads, d).transpose(1, 2) for t in (k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    return out.transpose(1, 2).reshape(b, s, h)


class DecoderBlock(nn.Module):
    """Pre-LN decoder layer (decoder kind) over ``(B, S + C, H)``: the first ``stream_len`` = S rows are the
    stream, the last C rows the memory it attends to (carried in the same tensor so that a decoder crosses
    wave boundaries like any layer).

    Stream: ``x + self_proj(attn(ln1(x)))`` (causal for token decoders), then ``x + cross_proj(attn(q = ln2(x),
    k, v = ln_mem(memory)))``, then ``x + fc2(gelu(fc1(ln3(x))))``. The memory rows pass through unchanged,
    so their gradient is the sum of every layer's use of them. Key projections have no bias (it could not
    change the output).
    """

    def __init__(self, hidden_size: int, num_heads: int, ffn_hidden_size: int, causal: bool):
        super().__init__()
        h = hidden_size
        self.num_heads, self.causal = num_heads, causal
        self.ln1 = nn.LayerNorm(h, eps=1e-5)
        self.q_self, self.k_self, self.v_self = nn.Linear(h, h), nn.Linear(h, h, bias=False), nn.Linear(h, h)
        self.self_proj = nn.Linear(h, h)
        self.ln2, self.ln_mem = nn.LayerNorm(h, eps=1e-5), nn.LayerNorm(h, eps=1e-5)
        self.q_cross, self.k_cross, self.v_cross = nn.Linear(h, h), nn.Linear(h, h, bias=False), nn.Linear(h, h)
        self.cross_proj = nn.Linear(h, h)
        self.ln3 = nn.LayerNorm(h, eps=1e-5)
        self.fc1, self.fc2 = nn.Linear(h, ffn_hidden_size), nn.Linear(ffn_hidden_size, h)

    def forward(self, state: torch.Tensor, stream_len: int) -> torch.Tensor:
        x, memory = state[:, :stream_len], state[:, stream_len:]
        y = self.ln1(x)
        x = x + self.self_proj(attend(self.q_self(y), self.k_self(y), self.v_self(y), self.num_heads, self.causal))
        y, m = self.ln2(x), self.ln_mem(memory)
        x = x + self.cross_proj(attend(self.q_cross(y), self.k_cross(m), self.v_cross(m), self.num_heads))
        x = x + self.fc2(F.gelu(self.fc1(self.ln3(x))))
        return torch.cat([x, memory], dim=1)


class LlamaBlock(nn.Module):
    """Llama decoder block: RMSNorm pre-norm, causal grouped-query attention, SwiGLU MLP, no biases.

    No rotary embedding: positions come from the component's embedding. ``k_proj``/``v_proj`` are
    ``num_kv_heads * d`` wide; each kv head serves ``num_heads / num_kv_heads`` consecutive q heads.
    ``kernels`` (training.kernels): unless ``off``, both RMSNorms (the second fused with the residual add before it)
    and the SwiGLU run as the fused kernels (kernels.rms_norm, kernels.swiglu): the same math within float
    tolerance, fewer saved activations.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, ffn_hidden_size: int,
                 kernels: str = "off"):
        super().__init__()
        d = hidden_size // num_heads
        self.num_heads, self.num_kv_heads, self.kernels = num_heads, num_kv_heads, kernels
        self.attn_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.q_proj = nn.Linear(hidden_size, num_heads * d, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(num_heads * d, hidden_size, bias=False)
        self.mlp_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """``segments``: a packed row's segment ids (runtime.modules.row_kwargs): attention stays within each document.
        ``positions`` are read by the component's embedding (learned positions), not here."""
        backend = backend_for(self.kernels, x.device)
        y = self.attn_norm(x) if backend is None else rms_norm(x, self.attn_norm.weight, self.attn_norm.eps,
                                                               backend=backend)[0]
        mask = None
        if segments is not None:
            from runtime.tokenizer import document_mask  # local: this module imports no runtime module but kinds

            mask = document_mask(segments)
        k, v = self._shared_kv(self.k_proj(y)), self._shared_kv(self.v_proj(y))
        attn = attend(self.q_proj(y), k, v, self.num_heads, causal=True, mask=mask)
        if backend is None:
            x = x + self.o_proj(attn)
            y = self.mlp_norm(x)
            return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))
        y, x = rms_norm(self.o_proj(attn), self.mlp_norm.weight, self.mlp_norm.eps, residual=x, backend=backend)
        return x + self.down_proj(swiglu(self.gate_proj(y), self.up_proj(y), backend=backend))

    def _shared_kv(self, t: torch.Tensor) -> torch.Tensor:
        """Keys or values ``(B, S, kv_heads * d)`` widened to ``(B, S, heads * d)``: each kv head serves
        ``heads / kv_heads`` consecutive query heads."""
        b, s, _ = t.shape
        d = self.q_proj.out_features // self.num_heads
        return t.reshape(b, s, self.num_kv_heads, d).repeat_interleave(self.num_heads // self.num_kv_heads,
                                                                        dim=2).reshape(b, s, -1)

    def decode(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The layer on new positions with a KV cache (runtime.generate): ``x`` ``(B, s, H)`` are the positions after
        the ``past`` keys and values ``(B, P, kv_heads * d)`` each (None: none, the prompt's prefill, attended
        causally); one position at a time after a prefill, which attends to every cached position. Returns the
        output and the keys and values of all ``P + s`` positions. The same math as :meth:`forward` without kernels
        (what ``tests/unit/runtime/test_generate.py`` checks against full recomputation)."""
        assert past is None or x.shape[1] == 1, "decode takes the whole prompt, then one position at a time"
        y = self.attn_norm(x)
        k, v = self.k_proj(y), self.v_proj(y)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        attn = attend(self.q_proj(y), self._shared_kv(k), self._shared_kv(v), self.num_heads, causal=past is None)
        x = x + self.o_proj(attn)
        y = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y)), (k, v)


class MlpBlock(nn.Module):
    """Residual MLP layer: ``x + gelu(fc(x))`` per token, ``fc`` a ``Linear(h, h)`` with bias."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.fc(x))


def freeze_if(module: nn.Module, comp: ComponentSpec) -> nn.Module:
    """``module`` with gradients turned off when ``comp`` is frozen (in place; returned for chaining)."""
    if comp.frozen:
        module.requires_grad_(False)
    return module


def build_layer(job: JobSpec, op: MetaOp, layer_index: int) -> nn.Module:
    """Layer ``layer_index`` (0-based within ``op``) of MetaOp ``op``: ``(B, S, H) -> (B, S, H)`` float32.

    Seeded by ``layer_seed(job.training.seed, op.param_group, layer_index)``, so MetaOps of the same
    parameter group get bit-identical layers (a component with ``init_from`` then takes its model file's weights). Frozen components return frozen modules. Decoder and unet2d
    layers take further keyword arguments (see :func:`layer_kwargs`); unet2d layers run on a flat state
    ``(B, N)`` (runtime.unet).
    """
    if not 0 <= layer_index < op.num_layers:
        raise IndexError(f"layer_index {layer_index} is outside MetaOp {op.name}'s {op.num_layers} layers")
    comp = job.components[op.component]
    if comp.pretrained:  # the model's own layer and weights (runtime.pretrained)
        from runtime import pretrained

        return freeze_if(pretrained.build_op_layer(job, op, layer_index), comp)
    factory = runtime_kind(comp, op.component).layer(job, op, layer_index)
    module = build_initialised(factory, layer_seed(job.training.seed, op.param_group, layer_index))
    module = load_initial(module, op.component, comp.init_from, op.param_group, layer_index)  # runtime.init_from
    return freeze_if(module, comp)


def run_layers(layers: list[nn.Module], x: torch.Tensor, kwargs: dict[str, int], recompute: bool) -> torch.Tensor:
    """Apply ``layers`` in order. With ``recompute`` (the component's activation checkpointing) each layer keeps
    only its input for backward and runs its forward again there: the same math, less memory."""
    for layer in layers:
        if recompute and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False, **kwargs)
        else:
            x = layer(x, **kwargs)
    return x


def build_optimizer(job: JobSpec, params: list) -> torch.optim.Optimizer | None:
    """The job's optimizer over ``params`` (parameters or param-group dicts; None when empty), the same on every
    worker and in the reference: AdamW, or plain SGD (``training.optimizer: sgd``: no momentum, weight decay added to
    the gradient as torch.optim.SGD does). Fused (one kernel over all tensors) where every parameter is a float tensor
    on a CPU or CUDA device: on this 2-core host 4x faster than the multi-tensor (``foreach``) implementation for
    AdamW and 6x for SGD with weight decay, with identical results; ``foreach`` elsewhere."""
    train = job.training
    if not params:
        return None
    kind = {"fused": True} if _fusable(params) else {"foreach": True}
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, weight_decay=train.weight_decay, **kind)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, eps=train.adam_eps, **kind)


def _fusable(params: list) -> bool:
    """Whether torch's fused optimizers take every parameter of ``params`` (tensors or param-group dicts)."""
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    return all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors)


# --------------------------------------------------------------------------- layer arguments


def use_shape_of(job: JobSpec, op: MetaOp) -> UseShape:
    """The shape of MetaOp ``op``'s use (planner.components.use_shape)."""
    t = next(i for i, task in enumerate(job.tasks) if task.name == op.task)
    u = next(i for i, use in enumerate(job.tasks[t].components) if use.use_name == op.use)
    return use_shape(job, t, u)


def row_kwargs(job: JobSpec, op: MetaOp, batch) -> dict[str, torch.Tensor]:
    """Per-row keyword arguments of MetaOp ``op``'s layers: a packed task's position and segment ids of its token use
    (runtime.sources; ``batch()`` the rows' runtime.data.TaskBatch, drawn only when needed), so that attention
    stays within each document; for a use reading a generate use whose prompts are masked
    (runtime.tokenizer.prompt_mask_key), the rollout's positions and attended tokens (:func:`rollout_kwargs`); empty
    for every other use."""
    task = job.tasks[next(i for i, t in enumerate(job.tasks) if t.name == op.task)]
    data = task.data
    if data is None or not data.pack:
        return rollout_kwargs(job, op, batch)
    from runtime.tokenizer import positions_key, segments_key

    targets = batch().targets
    if segments_key(op.use) not in targets:
        return {}
    return {"positions": targets[positions_key(op.use)], "segments": targets[segments_key(op.use)]}


def rollout_kwargs(job: JobSpec, op: MetaOp, batch) -> dict[str, torch.Tensor]:
    """A use reading a generate use's rollout, whose prompts carry a mask (runtime.tokenizer.prompt_mask_key: False
    on left padding): ``positions`` and ``segments`` ``(B, seq_len)`` (segment 1 on the prompt's real tokens and
    every generated one, 0 on the pads), so its layers see the rollout as runtime.generate decoded it; empty
    otherwise."""
    task = next(t for t in job.tasks if t.name == op.task)
    u = next(i for i, use in enumerate(task.components) if use.use_name == op.use)
    modes = {use.use_name: use.mode for use in task.components}
    rollout = [name for name in task.upstream_names(u) if modes.get(name) == "generate"]
    if not rollout:
        return {}
    from runtime.generate import masked_positions  # local: this module imports no runtime module but kinds
    from runtime.tokenizer import prompt_mask_key

    mask = batch().targets.get(prompt_mask_key(rollout[0]))
    if mask is None:
        return {}
    keys = torch.ones(mask.shape[0], use_shape_of(job, op).seq_len, dtype=torch.bool, device=mask.device)
    keys[:, :mask.shape[1]] = mask.bool()
    return {"positions": masked_positions(keys), "segments": keys.long()}


def layer_kwargs(job: JobSpec, op: MetaOp) -> dict[str, int]:
    """Keyword arguments of MetaOp ``op``'s layers beyond the activation: ``stream_len`` for decoder layers, the
    image ``side`` and ``context_len`` (0 without a context) for unet2d layers."""
    return runtime_kind(job.components[op.component], op.component).layer_kwargs(job, op)


def _upstream_widths(job: JobSpec, component: str) -> dict[str, int | None]:
    """For every use of ``component`` (by spec path): the hidden size of the output feeding it, None for a root use."""
    return {f"tasks[{t}].components[{u}]": upstream_width(job, t, u)
            for t, task in enumerate(job.tasks) for u, use in enumerate(task.components) if use.component == component}


def memory_width(job: JobSpec, component: str) -> int:
    """Hidden size of the outputs feeding every use of decoder ``component``; a SpecError for a root use
    (nothing to attend to) or uses fed by outputs of different widths."""
    widths = _upstream_widths(job, component)
    for path, width in widths.items():
        if width is None:
            raise SpecError(
                f"{path} ('{component}') is a decoder use with no upstream use; the runtime feeds a decoder the output "
                "of another use to attend to. Put it after an encoder or set `after:`."
            )
    return _one_width(component, widths, "the decoder's memory projection has one input width")


def context_width(job: JobSpec, component: str) -> int | None:
    """Width of the context every use of unet2d ``component`` cross-attends to (its upstream output); None when
    every use is a root use (no cross-attention). A SpecError when some uses have a context and some do not."""
    widths = _upstream_widths(job, component)
    if len({w is None for w in widths.values()}) > 1:
        roots = [path for path, w in widths.items() if w is None]
        raise SpecError(
            f"{roots[0]} ('{component}') is a root use of a unet2d whose other uses read a context; its blocks either "
            "cross-attend or not. Feed every use from an upstream use (e.g. a text encoder) or none."
        )
    return _one_width(component, widths, "its cross-attention has one context width")


def _one_width(component: str, widths: dict[str, int | None], why: str) -> int | None:
    if len(set(widths.values())) > 1:
        raise SpecError(
            f"components.{component}: its uses read upstream outputs of different widths {widths}; {why}. "
            "Feed every use from components of the same hidden_size."
        )
    return next(iter(widths.values()))
