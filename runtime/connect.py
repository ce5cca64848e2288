"""Connectors: how a use reads the outputs feeding it when their shapes differ from its own.

A use fed by other uses reads their outputs ``(B, S_i, H_i)`` as they are when the shapes agree (one input
of the use's shape, or a fusion whose inputs have the use's width and together its length). Otherwise, at
the first layer of a use of a non-bridge kind (transformer, llama, vit, mlp) declared with ``S`` positions
of width ``H``, a connector does what multimodal models put between their towers:

1. every input of another width is projected to ``H`` by a learned ``Linear(H_i, H)`` (a vision-language
   model's projector), one per input width, shared by every use of the component fed at that width
   (module ``adapt:<component>``, :class:`InputAdapter`);
2. the inputs are concatenated along the sequence in ``after:`` order: ``T = sum S_i`` positions;
3. ``T > S``: they are average-pooled to ``S`` positions (adaptive average pooling; ``S = 1`` is the mean,
   e.g. a reward head on a language model's sequence);
   ``T < S``: the use's own ``S - T`` text tokens follow them, embedded by the component's token
   embedding (``embed:<component>``; the data draws their ids as a root's): a multimodal LLM's input,
   image tokens then text. Only token kinds (transformer, llama) have text; for vit and mlp uses this
   is a SpecError (runtime.checks).

Decoders and unet2d uses (bridge kinds: ``planner.kinds.KindSpec.bridge``) are not connected here: their input module takes the
upstream output as what they attend to (runtime.embeddings). The planner prices a use at its declared
shape; a connector's projection is not priced (a ``T x H_i x H`` matmul, small beside the layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from planner.spec import JobSpec
from runtime.init_from import load_initial
from runtime.modules import build_initialised, freeze_if, layer_seed
from planner.usegraph import Connection, connection


def adapter_widths(job: JobSpec, component: str) -> list[int]:
    """Input widths, other than its own, at which some use of ``component`` is fed (ascending)."""
    comp = job.components[component]
    widths = set()
    for t, task in enumerate(job.tasks):
        for u, use in enumerate(task.components):
            if use.component == component and (c := connection(job, t, u)) is not None:
                widths.update(w for _, w in c.inputs if w != comp.hidden_size)
    return sorted(widths)


class InputAdapter(nn.Module):
    """``Linear(H_in, H)`` per input width ``H_in`` of a component's connectors; ``forward`` picks by the last dim."""

    def __init__(self, widths: list[int], hidden_size: int):
        super().__init__()
        self.proj = nn.ModuleDict({str(w): nn.Linear(w, hidden_size) for w in widths})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj[str(x.shape[-1])](x)


def build_adapter(job: JobSpec, component: str) -> InputAdapter:
    """``adapt:<component>``: seeded by ``layer_seed(seed, component + ":adapt", 0)``, frozen with its component."""
    comp = job.components[component]
    module = build_initialised(lambda: InputAdapter(adapter_widths(job, component), comp.hidden_size),
                               layer_seed(job.training.seed, component + ":adapt", 0))
    return freeze_if(load_initial(module, component, comp.init_from, "adapt:" + component, 0), comp)


def connect(c: Connection, inputs: list[torch.Tensor], adapter: nn.Module | None, text: torch.Tensor | None
            ) -> torch.Tensor:
    """The first layer's input ``(B, S, H)`` from ``inputs`` (in ``after:`` order) under connection ``c``: projected,
    concatenated, then pooled to S positions or followed by ``text`` (the embedded ``(B, S - T, H)`` text tokens)."""
    x = torch.cat([x if x.shape[-1] == c.width else adapter(x) for x in inputs], dim=1)
    if c.positions > c.seq_len:
        return F.adaptive_avg_pool1d(x.transpose(1, 2), c.seq_len).transpose(1, 2)
    return torch.cat([x, text], dim=1) if c.text_len else x
