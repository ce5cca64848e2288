"""A pretrained tower's own pooling: the vector its transformers model returns as ``pooler_output``.

The pooled losses (cross_entropy, mse, contrastive, infonce: runtime.heads) turn each leaf's ``(B, S, H)`` output
into one vector per sample. For a leaf on a pretrained tower whose model pools (``tasks[].pooling`` unset or
``model``), the head pools as the model does, with the model's own pooling modules loaded from its checkpoint:

- CLIP vision (CLIPVisionModel): the class token through ``post_layernorm``;
- CLIP text (CLIPTextModel): the last hidden state at the end-of-text token (the first ``eos_token_id`` of the row,
  or the largest id when the config's ``eos_token_id`` is 2, as transformers keeps for old checkpoints);
- SigLIP vision (SiglipVisionModel with ``vision_use_head``): the attention-pooling ``head``
  (SiglipMultiheadAttentionPoolingHead) over every token;
- SigLIP text (SiglipTextModel): the last position through its ``head`` (Linear to ``projection_size``);
- BERT (BertModel with its pooler tensors): ``tanh(pooler.dense(first token))``.

Causal LMs and Loom's own kinds have no such vector: their leaves are mean-pooled through the head's LayerNorm, as is
every leaf with ``pooling: mean``. The pooling modules are part of the head (they train with the task unless the
component is frozen) and are exported as the tower's own tensors (runtime.export). Imports transformers only when a
pooler is built.
"""

from __future__ import annotations

import torch
from torch import nn

from planner.pretrained import resolve_pretrained
from planner.spec import ComponentSpec, JobSpec
from runtime.pooling import POOLER_MODULES, model_pooled_leaves, model_pooler


class PretrainedPooler(nn.Module):
    """``pooler_output`` of a ``model_type`` tower from its last hidden state ``(B, S, H)`` -> ``(B, H')``; CLIP text
    also reads the row's token ids ``(B, S)``. ``parts`` are the model's own modules under their checkpoint names."""

    def __init__(self, model_type: str, parts: dict[str, nn.Module], eos_token_id: int | None = None):
        super().__init__()
        self.model_type, self.eos_token_id = model_type, eos_token_id
        self.parts = nn.ModuleDict(parts)

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        kind = self.model_type
        if kind == "clip_vision_model":
            return self.parts["post_layernorm"](hidden[:, 0])
        if kind == "clip_text_model":
            assert ids is not None and ids.shape == hidden.shape[:2], "CLIP text pooling reads the row's own ids"
            ids = ids.to(torch.int)
            at = ids.argmax(dim=-1) if self.eos_token_id == 2 else (ids == self.eos_token_id).int().argmax(dim=-1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), at]
        if kind == "siglip_vision_model":
            return self.parts["head"](hidden)
        if kind == "siglip_text_model":
            return self.parts["head"](hidden[:, -1])
        assert kind == "bert", kind
        return self.parts["pooler"](hidden)


def build_pooler(comp: ComponentSpec) -> PretrainedPooler:
    """Pretrained ``comp``'s pooling modules, loaded from its checkpoint (only their tensors are read); frozen with
    the component."""
    from runtime.pretrained import _loaded

    kind = model_pooler(comp)
    assert kind is not None, comp.pretrained
    parts = {attr: _loaded(comp.pretrained, attr) for attr in POOLER_MODULES[kind]}
    eos = resolve_pretrained(comp.pretrained).config.get("eos_token_id") if kind == "clip_text_model" else None
    pooler = PretrainedPooler(kind, parts, eos)
    return pooler.requires_grad_(not comp.frozen)


def attach_poolers(job: JobSpec, t: int, head: nn.Module) -> nn.Module:
    """``head`` (a pooling runtime.heads.TaskHead of task ``t``) holding the model pooler of each leaf it pools so."""
    for i, name in model_pooled_leaves(job, t).items():
        head.poolers[str(i)] = build_pooler(job.components[name])
    return head
