"""Saved activations: the bytes one layer's forward keeps for its backward, as the runtime's layers keep them.

The runtime's modules are float32; bf16/fp16 run their forward under autocast (runtime.optim.autocast). What autograd
then saves per position of a transformer-family layer (counted with ``torch.autograd.graph.saved_tensors_hooks``,
each storage once, parameters and autocast's weight copies left out: those are parameter state,
planner.costmodel.BYTES_COMPUTE_COPY; tests/unit/runtime/test_saved_activations.py holds this model to it):

- the residual stream stays float32 (the layer's input is float32 and ``x + f(x)`` promotes), so each norm keeps
  its float32 input: a LayerNorm that and its mean and 1/std (4 h + 8), an unfused RMSNorm also its normalised
  input (8 h + 4), the fused ``loom::rms_norm`` (+ residual) only its input (the sum) and 1/rms (4 h + 4);
- a linear keeps its input in the compute dtype; under autocast every linear casts the float32 norm output itself,
  so q, k and v projected apart keep three copies (float32: one tensor, kept once);
- attention goes through ``F.scaled_dot_product_attention``: its flash kernel (CPU, and CUDA in bf16/fp16; CUDA's
  memory-efficient kernel in fp32) keeps q, k, v, the output (which is the output projection's input) and one
  float32 log-sum-exp per head, never the ``s x s`` score matrix (Korthikanti et al.'s ``5 a s / h`` term, which
  the planner counted before and which made it overestimate a layer 1.7-2.5x); keys and values at the width the
  layer hands it (Loom's llama kind widens them to every query head first; transformers' models do not);
- the MLP keeps, in the compute dtype and per ``f`` wide position: GELU its input and output (2), QuickGELU also
  the sigmoid (3), the gated SiLU ``silu(gate) * up`` gate, up, silu(gate) and the product (4), ``loom::swiglu``
  gate and up and the product (3).

Per-batch constants (a rotary table, a packed batch's document mask) are left out; at the test's tiny sizes they
are under 2% of a layer. Pure Python: read by planner.kinds when it prices a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

ACT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes of an activation element in each training.precision
STREAM_BYTES = 4  # the residual stream and the norms' statistics: float32 whatever the precision
# Compute-dtype tensors the MLP activation keeps per MLP position, its output (the down projection's input) included.
ACTIVATION_SAVES = {"gelu": 2, "gelu_pytorch_tanh": 2, "relu": 2, "quick_gelu": 3, "gated": 4, "swiglu": 3}


@dataclass(frozen=True)
class SavedMode:
    """What decides the saved bytes besides the layer: the compute dtype's bytes (training.precision) and whether the
    fused kernels run (training.kernels not ``off``)."""

    compute_bytes: int = 2
    fused: bool = True

    @property
    def autocast(self) -> bool:
        return self.compute_bytes < STREAM_BYTES


def saved_mode(precision: str, kernels: str) -> SavedMode:
    """The mode of a job's ``training.precision`` and ``training.kernels``."""
    return SavedMode(ACT_BYTES[precision], kernels != "off")


@dataclass(frozen=True)
class Block:
    """How the runtime builds one transformer-family layer, as far as what it saves goes."""

    norm: str  # "layer" (LayerNorm) or "rms" (RMSNorm)
    qkv_linears: int  # linears reading the attention's input: 1 (Loom's fused qkv) or 3 (q, k, v apart)
    expand_kv: bool  # keys and values widened to every query head before attention (Loom's llama kind)
    activation: str  # a key of ACTIVATION_SAVES: "gelu", "quick_gelu", "gated", ...
    fusable: bool = False  # its norms and gated MLP run as loom::rms_norm and loom::swiglu unless kernels are off
    qk_norm: bool = False  # RMSNorms on q and k per head (Qwen3)


LOOM_TRANSFORMER = Block("layer", 1, False, "gelu")  # runtime.modules.TransformerBlock (transformer, vit kinds)
LOOM_LLAMA = Block("rms", 3, True, "gated", fusable=True)  # runtime.modules.LlamaBlock


def pretrained_block(model_type: str, config: dict) -> Block:
    """The block of a transformers model (runtime.pretrained): q, k and v projected apart, keys and values at their
    own width; Llama-family models (RMSNorm, gated MLP) fuse when their MLP runs SiLU (runtime.pretrained_kernels)."""
    act = str(config.get("hidden_act") or config.get("hidden_activation") or "gelu")
    if model_type in ("llama", "qwen2", "qwen3", "mistral"):
        return Block("rms", 3, False, "gated", fusable=act == "silu", qk_norm=model_type == "qwen3")
    return Block("layer", 3, False, act if act in ACTIVATION_SAVES else "gelu")


def _norm(block: Block, mode: SavedMode, h: int) -> float:
    if block.norm == "layer":
        return STREAM_BYTES * h + 8.0
    if block.fusable and mode.fused:
        return STREAM_BYTES * h + 4.0
    return 2.0 * STREAM_BYTES * h + 4.0


def _linear_inputs(consumers: int, mode: SavedMode, h: int) -> float:
    """A float32 width-``h`` tensor read by ``consumers`` linears: one autocast copy each, or the tensor once."""
    return consumers * mode.compute_bytes * h if mode.autocast else STREAM_BYTES * h


def attention_bytes(mode: SavedMode, h: int, kv_width: int, heads: int, queries: bool = True) -> float:
    """Per query position, what SDPA keeps: q, the output and the log-sum-exp of each head (``queries``), and per
    key position k and v (``kv_width`` wide). With one sequence for both, the sum of the two."""
    per_key = 2.0 * mode.compute_bytes * kv_width
    return per_key + (2.0 * mode.compute_bytes * h + 4.0 * heads if queries else 0.0)


def transformer_bytes(block: Block, mode: SavedMode, h: int, f: int, kv_width: int, heads: int) -> float:
    """Bytes one pre-norm self-attention layer saves per position: two norms, the attention's input linears,
    attention, the MLP's input linears and its activation."""
    a = mode.compute_bytes
    kv = h if block.expand_kv else kv_width
    gated = block.activation == "gated"
    activation = "swiglu" if gated and block.fusable and mode.fused else block.activation
    total = 2 * _norm(block, mode, h) + _linear_inputs(block.qkv_linears, mode, h) + attention_bytes(mode, h, kv, heads)
    total += _linear_inputs(2 if gated else 1, mode, h) + ACTIVATION_SAVES[activation] * a * f
    if block.qk_norm:  # unfused RMSNorms over q and k (heads of d), in float32
        total += 2.0 * STREAM_BYTES * (h + kv_width) + 4.0 * heads * (1 + kv_width / h)
    return total


def decoder_bytes(mode: SavedMode, h: int, f: int, heads: int, s: int, c: int) -> float:
    """Bytes one runtime.modules.DecoderBlock saves per sample for ``s`` stream and ``c`` memory positions: per stream
    position three LayerNorms, causal self-attention over q, k, v projected apart, the cross-attention's queries, the
    GELU MLP; per memory position its LayerNorm, the key and value projections' input and their keys and values."""
    norm = STREAM_BYTES * h + 8.0
    stream = 3 * norm + _linear_inputs(3, mode, h) + attention_bytes(mode, h, h, heads)
    stream += _linear_inputs(1, mode, h) + 2.0 * mode.compute_bytes * h + 4.0 * heads  # cross queries, output
    stream += _linear_inputs(1, mode, h) + ACTIVATION_SAVES["gelu"] * mode.compute_bytes * f
    memory = norm + _linear_inputs(2, mode, h) + attention_bytes(mode, h, h, heads, queries=False)
    return s * stream + c * memory


def mlp_bytes(mode: SavedMode, h: int) -> float:
    """Bytes one runtime.modules.MlpBlock (``x + gelu(fc(x))``) saves per position: fc's input and GELU's input."""
    return _linear_inputs(1, mode, h) + mode.compute_bytes * h
