"""Component input modules built from a job spec: what the first layer of a use reads.

Owns the input module of every component kind (:func:`build_embed`: token, patch and feature embeddings,
a decoder's :class:`DecoderBridge`, a unet2d's ``runtime.unet.UNetInput``), which MetaOps start with one
(:func:`planner.usegraph.reads_embed`) and what is fed to it (:func:`use_input`). One input module per component, shared
by every task using it, built and seeded like the layers (runtime.modules:
``layer_seed(seed, component + ":embed", 0)``) and frozen with its component.

Data flow inside a task (the executor's contract, :func:`first_input`): a *root* use (no upstream use)
starts with its component's input module applied to the raw input; a use fed by other uses receives their
outputs ``(B, S, H)`` directly when the shapes agree, through a connector otherwise (runtime.connect:
projection, pooling, its own text tokens), except a use of a bridge kind (``KindSpec.bridge``), whose input
module also reads the upstream output; the task's *leaf* uses (read by no other use) feed the task's loss
head (:func:`runtime.heads.build_head`). Imports runtime.modules, never the reverse.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from planner.components import resolve_shape
from planner.spec import JobSpec
from planner.usegraph import op_connection, reads_embed
from runtime.connect import build_adapter, connect
from runtime.init_from import load_initial
from runtime.kinds import runtime_kind
from runtime.modules import build_initialised, freeze_if, layer_seed

if TYPE_CHECKING:  # planner MetaOps and the plan's alike; a worker never loads the MetaGraph builder
    from planner.metagraph import MetaGraph, MetaOp


POSITION_BASE = 100.0  # longest wavelength scale of the ViT's 2-D sin-cos position grid (grids are <= ~64 wide)


class TokenEmbedding(nn.Module):
    """Token ids ``(B, S)`` long -> ``tokens(ids) + positions[:S]`` ``(B, S, H)`` (or a packed row's positions)."""

    def __init__(self, vocab_size: int, hidden_size: int, max_seq_len: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, hidden_size)
        self.positions = nn.Parameter(torch.empty(max_seq_len, hidden_size))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``positions`` ``(B, S)``: a packed row's per-document position ids (default ``0..S-1``)."""
        return self.tokens(ids) + (self.positions[positions] if positions is not None else self.positions[: ids.shape[1]])


class PatchEmbedding(nn.Module):
    """Images ``(B, C, I, I)`` -> ``[cls, patches] + positions`` ``(B, (I/p)^2 + 1, H)``.

    The position table holds the [cls] position and a G x G grid for the largest use; a use with a
    smaller g x g grid reads that grid bilinearly resized to g x g, so a position means the same place
    in the image at every resolution (as ViTs fine-tuned at a new resolution interpolate theirs). The
    grid starts as a 2-D sin-cos code (:meth:`init_structure`) and is trained from there.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int, max_tokens: int):
        super().__init__()
        self.patch = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)
        self.cls_token = nn.Parameter(torch.empty(1, 1, hidden_size))
        self.positions = nn.Parameter(torch.empty(max_tokens, hidden_size))

    def init_structure(self) -> None:
        """Grid positions = 2-D sin-cos code: a quarter of the channels sin(w_k x), cos(w_k x), sin(w_k y),
        cos(w_k y) each, w_k = POSITION_BASE^(-k / (H/4)). Nearby patches get similar codes and position is
        linearly readable; with random positions a token decoder learned to output box coordinates only
        after many thousands of samples (held-out box IoU 0.06 vs 0.53 after 1000 steps of 32 scans)."""
        table = self.positions[1:]
        side, width = math.isqrt(table.shape[0]), table.shape[1]
        quarter = width // 4
        omega = POSITION_BASE ** (-torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
        axis = torch.arange(side, dtype=torch.float32)
        ys, xs = (t.reshape(-1, 1) * omega for t in torch.meshgrid(axis, axis, indexing="ij"))
        code = torch.cat([xs.sin(), xs.cos(), ys.sin(), ys.cos()], dim=1)
        table.zero_()
        table[:, :code.shape[1]] = code

    def grid_positions(self, side: int) -> torch.Tensor:
        """Positions ``(side^2, H)`` of a side x side patch grid, row-major."""
        table = self.positions[1:]
        full = math.isqrt(table.shape[0])
        if side == full:
            return table
        grid = table.reshape(1, full, full, -1).permute(0, 3, 1, 2)  # (1, H, G, G)
        resized = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(side * side, -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch(images)  # (B, H, g, g)
        positions = self.grid_positions(patches.shape[-1])
        patches = patches.flatten(2).transpose(1, 2) + positions  # (B, g^2, H)
        cls = (self.cls_token + self.positions[0]).expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1)


class FeatureEmbedding(nn.Module):
    """Features ``(B, S, H)`` -> ``Linear(H, H)`` per token (the mlp kind's input adapter)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


class DecoderBridge(nn.Module):
    """The input of a decoder use: memory ``(B, C, H_in)`` from its upstream use (and, for a token decoder, ids
    ``(B, S)``) -> ``(B, S + C, H)``: the stream (token + position embeddings of the ids, or the first S learned
    queries) followed by ``Linear(H_in, H)(memory)``."""

    def __init__(self, memory_size: int, hidden_size: int, max_stream_len: int, vocab_size: int | None):
        super().__init__()
        self.memory = nn.Linear(memory_size, hidden_size)
        if vocab_size is None:
            self.queries = nn.Parameter(torch.empty(max_stream_len, hidden_size))
        else:
            self.tokens = TokenEmbedding(vocab_size, hidden_size, max_stream_len)

    def forward(self, memory: torch.Tensor, ids: torch.Tensor | None, stream_len: int) -> torch.Tensor:
        if hasattr(self, "tokens"):
            assert ids is not None and ids.shape[1] == stream_len, "a token decoder needs ids (B, stream_len)"
            stream = self.tokens(ids)
        else:
            stream = self.queries[:stream_len].expand(memory.shape[0], -1, -1)
        return torch.cat([stream, self.memory(memory)], dim=1)


def build_input_module(job: JobSpec, name: str) -> nn.Module:
    """The module :func:`input_modules` names ``name``."""
    kind, component = name.split(":", 1)
    return build_adapter(job, component) if kind == "adapt" else build_embed(job, component)


def first_input(job: JobSpec, graph: MetaGraph, op: MetaOp, inputs: list[torch.Tensor], module, batch
                ) -> torch.Tensor:
    """What the first layer of MetaOp ``op`` reads, given the outputs feeding it in ``after:`` order (``[]`` for a
    root): ``module(name)`` is the module :func:`input_modules` names, ``batch()`` the rows' runtime.data.TaskBatch."""
    c = op_connection(job, graph, op)
    if c is not None:
        adapter = module("adapt:" + op.component) if c.projected else None
        text = module("embed:" + op.component)(batch().inputs[op.use]) if c.text_len else None
        return connect(c, inputs, adapter, text)
    x = (torch.cat(inputs, dim=1) if len(inputs) > 1 else inputs[0]) if inputs else None
    if reads_embed(job, graph, op):
        x = use_input(job, op, module("embed:" + op.component), x, batch())
    return x


def use_input(job: JobSpec, op: MetaOp, embed: nn.Module, upstream: torch.Tensor | None, batch) -> torch.Tensor:
    """What ``op``'s first layer reads when :func:`reads_embed`: ``embed`` applied to the batch's input of the use
    (``batch``: a runtime.data.TaskBatch) and, for a bridge kind, the upstream output (None for a root use)."""
    return runtime_kind(job.components[op.component], op.component).use_input(job, op, embed, upstream, batch)


def component_seq_lens(job: JobSpec, component: str) -> list[int]:
    """The planner's sequence length of every use of ``component`` across the job's tasks, in task order."""
    comp = job.components[component]
    lens = []
    for t, task in enumerate(job.tasks):
        for u, use in enumerate(task.components):
            if use.component == component:
                lens.append(resolve_shape(comp, component, use, f"tasks[{t}].components[{u}]").seq_len)
    return lens


def build_embed(job: JobSpec, component: str) -> nn.Module:
    """The input adapter of ``component``, run on a root use's raw input before its first layer, built by its kind's
    ``embed`` (runtime.kinds).

    Token kinds (transformer, llama): ids ``(B, S)`` -> token + learned positions (vocab =
    vocab_size or 256, positions for the longest use). vit: images ``(B, C, I, I)`` -> patch
    embedding + cls token + positions, ``S = (I/patch)^2 + 1``. mlp: features ``(B, S, H)`` ->
    ``Linear(H, H)``. decoder: a :class:`DecoderBridge`, applied to the upstream output at the use's
    first layer. unet2d: a :class:`runtime.unet.UNetInput` (noisy latents, timesteps, context -> state). Shared by every task using the component; seeded by
    ``layer_seed(seed, component + ":embed", 0)``; frozen with its component.
    """
    comp = job.components[component]
    if comp.pretrained:  # the model's own token embedding and weights (runtime.pretrained)
        from runtime import pretrained

        return freeze_if(pretrained.build_embed(comp), comp)
    # a generate use reads positions up to its prompt (seq_len) + new_tokens (runtime.generate)
    uses = [use for task in job.tasks for use in task.components if use.component == component]
    max_len = max((n + (use.new_tokens or 0 if use.mode == "generate" else 0)
                   for n, use in zip(component_seq_lens(job, component), uses)), default=comp.seq_len or 1)
    factory = runtime_kind(comp, component).embed(job, component, max_len)
    module = build_initialised(factory, layer_seed(job.training.seed, component + ":embed", 0))
    return freeze_if(load_initial(module, component, comp.init_from, "embed:" + component, 0), comp)
