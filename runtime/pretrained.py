"""Pretrained components, runtime side: a Hugging Face model's own modules as Loom layers, loaded per worker.

A component with ``pretrained: PATH`` (planner.pretrained has read its config and checked its tensors) runs the
model's own ``transformers`` modules: layer ``i`` is the model's decoder layer ``i`` (:class:`PretrainedLayer`, a
``(B, S, H) -> (B, S, H)`` causal layer with the model's rotary position embedding for positions ``0..S-1``), the
input module is its token embedding (:class:`PretrainedEmbedding`) and a next-token task on it predicts through its
final norm and LM head (:func:`load_lm_head`). Each module is built on the meta device from the model's class and
filled from safetensors with only its own tensors (:func:`read_tensors`): a worker holding 2 of 8 layers reads those
2 layers' tensors, never the whole model. Weights are float32 master weights whatever the file's dtype.

:func:`export_names` maps Loom's parameter names (``<group>/<layer>/<param>``, runtime.executor) back to the
checkpoint's, which :mod:`runtime.export` writes as a folder ``from_pretrained`` loads. Tied embeddings are untied
on load (the embedding and the LM head train as two tensors) and exported untied.

Imports transformers (seconds) only when a pretrained module is built.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from planner.pretrained import resolve_pretrained, tensor_files
from planner.spec import ComponentSpec


@dataclass(frozen=True)
class Layout:
    """Where a causal LM keeps its parts, as attribute paths from the ``*ForCausalLM`` module; the same paths are the
    checkpoint's tensor-name prefixes."""

    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    norm: str = "model.norm"
    head: str = "lm_head"
    rotary: str = "model.rotary_emb"


CAUSAL_LM = Layout()  # llama, qwen2, qwen3, mistral


@lru_cache(maxsize=8)
def _skeleton(path: str) -> nn.Module:
    """The model ``path`` holds, built on the meta device from its config (no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _part(path: str, attr: str) -> nn.Module:
    module = _skeleton(path)
    for name in attr.split("."):
        module = module[int(name)] if name.isdigit() else getattr(module, name)
    return module


def read_tensors(folder: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` from ``folder``'s safetensors files, as float32 copies; only these are read."""
    from safetensors import safe_open

    files = tensor_files(Path(folder))
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for file, wanted in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in wanted:
                out[name] = f.get_tensor(name).to(torch.float32, copy=True)
    return out


def _checkpoint_name(path: str, name: str) -> str:
    """The tensor holding parameter ``name``: a tied LM head reads the embedding's."""
    config = resolve_pretrained(path).config
    if name == f"{CAUSAL_LM.head}.weight" and config.get("tie_word_embeddings", False):
        return f"{CAUSAL_LM.embed}.weight"
    return name


def _loaded(path: str, attr: str) -> nn.Module:
    """A copy of the model's module at ``attr`` holding its tensors from ``path`` (float32)."""
    module = copy.deepcopy(_part(path, attr))
    names = {n: _checkpoint_name(path, f"{attr}.{n}") for n in module.state_dict()}
    tensors = read_tensors(path, sorted(set(names.values())))
    module.load_state_dict({n: tensors[src] for n, src in names.items()}, assign=True, strict=True)
    return module


class PretrainedLayer(nn.Module):
    """Decoder layer ``index`` of a causal LM: ``(B, S, H) -> (B, S, H)``, causal, positions ``0..S-1`` encoded by the
    model's rotary embedding (recomputed per call: it holds no parameters)."""

    def __init__(self, layer: nn.Module, rotary: nn.Module):
        super().__init__()
        self.layer, self.rotary = layer, rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        return self.layer(x, attention_mask=None, position_ids=positions,
                          position_embeddings=self.rotary(x, positions))


class PretrainedEmbedding(nn.Module):
    """Token ids ``(B, S)`` -> the model's token embedding ``(B, S, H)`` (positions are the layers' rotary)."""

    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)


def build_layer(comp: ComponentSpec, index: int) -> nn.Module:
    """Layer ``index`` of pretrained ``comp``, holding its tensors only."""
    path = comp.pretrained
    rotary_class = type(_part(path, CAUSAL_LM.rotary))
    return PretrainedLayer(_loaded(path, f"{CAUSAL_LM.layers}.{index}"), rotary_class(config=_skeleton(path).config))


def build_embed(comp: ComponentSpec) -> nn.Module:
    """The token embedding of pretrained ``comp``."""
    return PretrainedEmbedding(_loaded(comp.pretrained, CAUSAL_LM.embed))


def load_lm_head(comp: ComponentSpec, head: nn.Module) -> nn.Module:
    """``head`` (a runtime.heads.NextTokenHead) predicting through pretrained ``comp``'s final norm and LM head."""
    head.norm = _loaded(comp.pretrained, CAUSAL_LM.norm)
    head.out = _loaded(comp.pretrained, CAUSAL_LM.head)
    return head


def export_names(group: str, layer: int, param: str, component: str) -> str | None:
    """The checkpoint tensor name of Loom parameter ``<group>/<layer>/<param>`` of pretrained ``component`` (None
    for a parameter that is not part of the model: another component's, a task's own head)."""
    if group == component:
        return f"{CAUSAL_LM.layers}.{layer}.{param.removeprefix('layer.')}"
    if group == f"embed:{component}":
        return f"{CAUSAL_LM.embed}.{param.removeprefix('embed_tokens.')}"
    return None


def head_export_name(param: str) -> str | None:
    """The checkpoint name of a pretrained LM head's parameter (``norm.*``, ``out.*``); None for others."""
    if param.startswith("norm."):
        return f"{CAUSAL_LM.norm}.{param.removeprefix('norm.')}"
    if param.startswith("out."):
        return f"{CAUSAL_LM.head}.{param.removeprefix('out.')}"
    return None
