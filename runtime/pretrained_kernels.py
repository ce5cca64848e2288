"""Loom's fused kernels inside a pretrained Llama-family model (Llama, Qwen2, Qwen3, Mistral).

With ``training.kernels`` ``auto`` or ``reference`` (not ``off``), a pretrained causal LM's decoder layers run their
RMSNorms as ``loom::rms_norm`` (the second one fused with the residual add before it) and their MLP activation as
``loom::swiglu`` (kernels.norms), and a next-token head predicts through its final norm as ``loom::rms_norm``: the
same math as transformers' LlamaRMSNorm and LlamaMLP in float32, saving fewer activations for backward (the fused
ops save their inputs and one ``1/rms`` per row). The modules keep the transformers modules' parameters under their
own names (``input_layernorm.weight``, ``mlp.gate_proj.weight``, ``norm.weight``), so loading, export and the
megatron-core mapping see the same model. ``off`` keeps transformers' own modules.

Applies to a layer whose two norms are RMSNorms (a ``weight`` and a ``variance_epsilon``, scaled by ``weight``
as Llama's) and whose MLP is gate/up/down projections with ``silu`` (``hidden_act``); other layers are left alone.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import backend_for, rms_norm, swiglu

RMS_NORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")


class KernelRMSNorm(nn.Module):
    """transformers' RMSNorm ``norm`` (its ``weight``, shared) as ``loom::rms_norm``. ``forward(x)`` -> the normalised
    ``x``; :meth:`add_norm` also adds a residual first (one fused op)."""

    def __init__(self, norm: nn.Module, kernels: str):
        super().__init__()
        self.weight, self.variance_epsilon, self.kernels = norm.weight, norm.variance_epsilon, kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_norm(x)[0]

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)`` (``(norm(x), x)`` without a residual)."""
        backend = backend_for(self.kernels, x.device)
        assert backend is not None, "KernelRMSNorm is built only when training.kernels is not off"
        return rms_norm(x, self.weight, self.variance_epsilon, residual, backend=backend)


class KernelSwiGLU(nn.Module):
    """transformers' Llama MLP ``mlp`` (its gate, up and down projections, shared): ``down(swiglu(gate x, up x))``."""

    def __init__(self, mlp: nn.Module, kernels: str):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.kernels = mlp.gate_proj, mlp.up_proj, mlp.down_proj, kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = backend_for(self.kernels, x.device)
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=backend))


def is_rms_norm(module: nn.Module | None) -> bool:
    return type(module).__name__ in RMS_NORM_CLASSES and hasattr(module, "variance_epsilon")


def fusable(layer: nn.Module, hidden_act: str | None) -> bool:
    """Whether decoder ``layer`` is a Llama-family one the kernels can run (see the module docstring)."""
    mlp = getattr(layer, "mlp", None)
    return (is_rms_norm(getattr(layer, "input_layernorm", None))
            and is_rms_norm(getattr(layer, "post_attention_layernorm", None))
            and all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")) and hidden_act == "silu")


def use_kernels(layer: nn.Module, kernels: str, hidden_act: str | None) -> bool:
    """Swap ``layer``'s norms and MLP for the kernel modules in place when ``kernels`` is not ``off`` and the layer is
    :func:`fusable`; whether it did."""
    if kernels == "off" or not fusable(layer, hidden_act):
        return False
    layer.input_layernorm = KernelRMSNorm(layer.input_layernorm, kernels)
    layer.post_attention_layernorm = KernelRMSNorm(layer.post_attention_layernorm, kernels)
    layer.mlp = KernelSwiGLU(layer.mlp, kernels)
    return True


def fused_forward(layer: nn.Module, x: torch.Tensor, **attention) -> torch.Tensor:
    """transformers' decoder-layer forward (pre-norm attention, then pre-norm MLP, each with a residual add) on a
    layer :func:`use_kernels` swapped, with the residual add before the MLP's norm fused into it. ``attention``: the
    self-attention's keyword arguments (mask, position ids, rotary embeddings)."""
    attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **attention)
    y, x = layer.post_attention_layernorm.add_norm(attn, x)
    return x + layer.mlp(y)
