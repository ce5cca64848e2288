"""Pretrained components, runtime side: a Hugging Face model's own modules as Loom layers, loaded per worker.

A component with ``pretrained: PATH`` (planner.pretrained has read its config and checked its tensors) runs the
model's own ``transformers`` modules, found through its architecture's :class:`Layout`: layer ``i`` is the model's
layer ``i`` (:class:`PretrainedLayer`, ``(B, S, H) -> (B, S, H)``; a causal LM's with its rotary position embedding
for positions ``0..S-1``), the input module runs its embedding modules (:class:`PretrainedInput`) and a next-token
task on a causal LM predicts through its final norm and LM head (:func:`load_lm_head`). Each module is built on the
meta device from the model's class and filled from safetensors with only its own tensors (:func:`read_tensors`): a
worker holding 2 of 8 layers reads those 2 layers' tensors, never the whole model. Weights are float32 master weights
whatever the file's dtype.

:func:`export_name` maps Loom's parameter names (``<group>/<layer>/<param>``, runtime.executor) back to the
checkpoint's, which :mod:`runtime.export` writes as a folder ``from_pretrained`` loads. Tied embeddings are untied
on load (the embedding and the LM head train as two tensors) and exported untied.

A diffusers UNet2DConditionModel (the unet2d kind) runs its own blocks through runtime.unet_pretrained, which the
functions here dispatch to.

Imports transformers (seconds) only when a pretrained module is built.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from planner import unet_config
from planner.pretrained import resolve_pretrained, tensor_files
from planner.spec import ComponentSpec, JobSpec
from runtime.pretrained_kernels import KernelRMSNorm, fused_forward, is_rms_norm, use_kernels
from runtime.tokenizer import document_mask

if TYPE_CHECKING:  # planner MetaOps and the plan's alike; a worker never loads the MetaGraph builder
    from planner.metagraph import MetaOp


@dataclass(frozen=True)
class Layout:
    """Where a model keeps its parts, as attribute paths from the module its auto class builds; the same paths are
    the checkpoint's tensor-name prefixes. ``embed`` lists the modules the input module runs, in order."""

    auto_class: str  # the transformers class (an auto class, or the model's own) that builds it from its config
    layers: str
    embed: tuple[str, ...]
    rotary: str | None = None  # a causal LM's rotary embedding: its layers take (cos, sin) for positions 0..S-1
    causal: bool = False  # its layers attend causally without a rotary embedding (CLIP's text tower)
    final: str | None = None  # the norm its last layer's output goes through (the tower's last hidden state)
    norm: str | None = None  # the final norm and LM head a next-token task predicts through
    head: str | None = None


CAUSAL_LM = Layout("AutoModelForCausalLM", "model.layers", ("model.embed_tokens",), rotary="model.rotary_emb",
                   norm="model.norm", head="lm_head")
LAYOUTS: dict[str, Layout] = {  # by model_type; planner.pretrained.ARCHITECTURES names the same
    **{name: CAUSAL_LM for name in ("llama", "qwen2", "qwen3", "mistral")},
    # the tower's sequence is [class, patches] after pre_layrnorm; post_layernorm only normalises CLIP's pooled
    # class token: a pooled loss's head reads it (runtime.pretrained_pooling)
    "clip_vision_model": Layout("AutoModel", "encoder.layers", ("embeddings", "pre_layrnorm")),
    # [patches] (no class token); post_layernorm normalises the whole last hidden state; the attention-pooling head
    # is a pooled loss's (runtime.pretrained_pooling)
    "siglip_vision_model": Layout("AutoModel", "encoder.layers", ("embeddings",), final="post_layernorm"),
    # token + learned position embeddings, causal layers (CLIP) or bidirectional (SigLIP), final_layer_norm
    "clip_text_model": Layout("AutoModel", "encoder.layers", ("embeddings",), causal=True, final="final_layer_norm"),
    "siglip_text_model": Layout("SiglipTextModel", "encoder.layers", ("embeddings",), final="final_layer_norm"),
    # word + learned position + token type 0 embeddings and their LayerNorm; the pooler is a pooled loss's
    "bert": Layout("AutoModel", "encoder.layer", ("embeddings",)),
}


def layout(comp: ComponentSpec) -> Layout:
    """The layout of pretrained ``comp``'s architecture."""
    return LAYOUTS[resolve_pretrained(comp.pretrained).model_type]


@lru_cache(maxsize=8)
def _skeleton(path: str) -> nn.Module:
    """The model ``path`` holds, built on the meta device from its config (no memory, no weights read)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    for name, value in vars(config).items():  # Loom's layers run without dropout (exact equivalence, resume)
        if "dropout" in name and isinstance(value, float):
            setattr(config, name, 0.0)
    cls = getattr(transformers, LAYOUTS[resolve_pretrained(path).model_type].auto_class)
    with torch.device("meta"):
        return cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)


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
        return f"{CAUSAL_LM.embed[0]}.weight"
    return name


def load_part(skeleton: nn.Module, path: str, attr: str, init: Callable[[nn.Module], None] | None = None,
              source: Callable[[str], str] = lambda name: name) -> nn.Module:
    """A copy of meta-device ``skeleton``'s module at ``attr`` holding its tensors from ``path`` (float32; only these
    are read). ``init`` (each submodule, off the global RNG) sets the buffers the checkpoint does not hold (position
    ids, rotary frequencies) before every parameter is overwritten from the file; ``source`` names the tensor that
    holds a parameter (by its full name)."""
    module = skeleton
    for name in attr.split("."):
        module = module[int(name)] if name.isdigit() else getattr(module, name)
    module = copy.deepcopy(module).to_empty(device="cpu")
    if init is not None:
        with torch.random.fork_rng(devices=[]):
            for sub in module.modules():
                init(sub)
    names = {n: source(f"{attr}.{n}") for n in module.state_dict()}
    tensors = read_tensors(path, sorted(set(names.values())))
    module.load_state_dict({n: tensors[src] for n, src in names.items()}, assign=True, strict=True)
    return module


def _loaded(path: str, attr: str) -> nn.Module:
    """The transformers model's module at ``attr``, initialised by the model's own ``_init_weights``, then loaded."""
    skeleton = _skeleton(path)
    return load_part(skeleton, path, attr, init=skeleton._init_weights,
                     source=lambda name: _checkpoint_name(path, name))


class PretrainedLayer(nn.Module):
    """Layer ``index`` of a pretrained model: ``(B, S, H) -> (B, S, H)``. A causal LM's layer attends causally with the
    model's rotary embedding of positions ``0..S-1`` (recomputed per call: it holds no parameters); CLIP's text
    tower's attends causally too; an encoder's attends to every position. The last layer of a tower whose model
    normalises its last hidden state (CLIP and SigLIP text, SigLIP vision) also runs that norm (``final``)."""

    def __init__(self, layer: nn.Module, rotary: nn.Module | None, causal: bool = False,
                 final: nn.Module | None = None, fused: bool = False):
        super().__init__()
        self.layer, self.rotary, self.causal = layer, rotary, causal or rotary is not None
        self.fused = fused  # its norms and MLP run as Loom's kernels (runtime.pretrained_kernels)
        if final is not None:
            self.final = final

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """``positions`` ``(B, S)`` and ``segments`` ``(B, S)``: a packed row's per-document position and segment ids
        (runtime.sources): each token then attends within its own document only (runtime.tokenizer.document_mask)."""
        mask = document_mask(segments, causal=self.causal) if segments is not None else None
        if self.rotary is None:  # without a mask, the layer's attention is causal or not as ``is_causal`` says
            x = self.layer(x, attention_mask=mask, **({"is_causal": True} if self.causal and mask is None else {}))
        else:
            if positions is None:
                positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
            attention = dict(attention_mask=mask, position_ids=positions, position_embeddings=self.rotary(x, positions))
            x = fused_forward(self.layer, x, **attention) if self.fused else self.layer(x, **attention)
        return self.final(x) if hasattr(self, "final") else x


class PretrainedInput(nn.Module):
    """A pretrained model's input modules in order: token ids ``(B, S)`` -> its token embedding (a causal LM; positions
    are its layers' rotary; a text tower's adds learned positions), or images ``(B, C, I, I)`` -> patch, class and
    position embeddings and CLIP's pre-layernorm ``(B, (I/p)^2 + 1, H)`` (SigLIP: no class token, ``(I/p)^2``)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``positions``: a packed row's position ids, which a causal LM's layers read (rotary), not its embedding."""
        for part in self.parts:
            x = part(x)
        return x


def is_diffusers_unet(comp: ComponentSpec) -> bool:
    """Whether pretrained ``comp`` is a diffusers UNet2DConditionModel (runtime.unet_pretrained builds it)."""
    return resolve_pretrained(comp.pretrained).model_type == unet_config.CLASS_NAME


def build_op_layer(job: JobSpec, op: MetaOp, index: int) -> nn.Module:
    """Layer ``index`` of MetaOp ``op`` on a pretrained component: a diffusers UNet's block (one per planner segment
    and index), else the model's layer ``index`` (such a component has one segment)."""
    comp = job.components[op.component]
    if is_diffusers_unet(comp):
        from runtime import unet_pretrained
        from runtime.modules import context_width, use_shape_of

        return unet_pretrained.build_layer(comp, op.component, op.segment, index, use_shape_of(job, op).image_size,
                                           context_width(job, op.component))
    assert op.segment == 0, f"{op.name}: a pretrained component has one layer segment"
    return build_layer(comp, index, job.training.kernels)


def build_layer(comp: ComponentSpec, index: int, kernels: str = "off") -> nn.Module:
    """Layer ``index`` of pretrained ``comp``, holding its tensors only; a causal LM's runs its norms and MLP as
    Loom's kernels unless ``kernels`` (training.kernels) is ``off`` (runtime.pretrained_kernels)."""
    where = layout(comp)
    rotary = _loaded(comp.pretrained, where.rotary) if where.rotary else None
    final = _loaded(comp.pretrained, where.final) if where.final and index == comp.num_layers - 1 else None
    layer = _loaded(comp.pretrained, f"{where.layers}.{index}")
    hidden_act = resolve_pretrained(comp.pretrained).config.get("hidden_act")
    fused = rotary is not None and use_kernels(layer, kernels, hidden_act)
    return PretrainedLayer(layer, rotary, where.causal, final, fused)


def build_embed(comp: ComponentSpec) -> nn.Module:
    """The input modules of pretrained ``comp``."""
    if is_diffusers_unet(comp):
        from runtime import unet_pretrained

        return unet_pretrained.build_embed(comp)
    return PretrainedInput([_loaded(comp.pretrained, attr) for attr in layout(comp).embed])


def load_lm_head(comp: ComponentSpec, head: nn.Module) -> nn.Module:
    """``head`` (a runtime.heads.NextTokenHead) predicting through pretrained causal LM ``comp``'s final norm and LM
    head; the norm runs as ``loom::rms_norm`` when the head's ``kernels`` (training.kernels) is not ``off``."""
    head.norm = _loaded(comp.pretrained, CAUSAL_LM.norm)
    if getattr(head, "kernels", "off") != "off" and is_rms_norm(head.norm):  # the final norm as loom::rms_norm
        head.norm = KernelRMSNorm(head.norm, head.kernels)
    head.out = _loaded(comp.pretrained, CAUSAL_LM.head)
    return head


def export_name(comp: ComponentSpec, component: str, group: str, layer: int, param: str) -> str | None:
    """The checkpoint tensor name of Loom parameter ``<group>/<layer>/<param>`` as part of pretrained ``comp`` (named
    ``component``); None for a parameter that is not part of the model (another component's, a task's own head)."""
    if is_diffusers_unet(comp):
        from runtime import unet_pretrained

        return unet_pretrained.export_name(comp, component, group, layer, param)
    where = layout(comp)
    if group == component:
        if param.startswith("final."):
            return f"{where.final}.{param.removeprefix('final.')}"
        return f"{where.layers}.{layer}.{param.removeprefix('layer.')}"
    if group == f"embed:{component}":
        index, rest = param.removeprefix("parts.").split(".", 1)
        return f"{where.embed[int(index)]}.{rest}"
    return None


def head_export_name(param: str) -> str | None:
    """The checkpoint name of a pretrained LM head's parameter (``norm.*``, ``out.*``); None for others."""
    if param.startswith("norm."):
        return f"{CAUSAL_LM.norm}.{param.removeprefix('norm.')}"
    if param.startswith("out."):
        return f"{CAUSAL_LM.head}.{param.removeprefix('out.')}"
    return None
