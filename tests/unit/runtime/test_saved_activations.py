"""The planner's saved-activation bytes per layer (planner.memory, through each kind's layer segment) against what
autograd really keeps when the runtime's layers run forward: Loom's llama and vit kinds, a pretrained transformers
Llama layer and a pretrained CLIP vision layer, at fp32 and bf16 (autocast), with training.kernels off and on.
Counted as bench.kernels.saved counts them (each storage once, parameters and autocast's weight copies excluded)."""

from __future__ import annotations

import pytest
import torch

from bench.kernels.saved import build, components, planner_bytes, save_models, saved_bytes, seq_len

TOLERANCE = 0.05  # the model is exact up to per-batch constants (rotary tables): about 2% at these sizes
SHAPE = {"hidden": 64, "ffn": 176, "heads": 4, "kv_heads": 2, "seq": 32, "batch": 2, "image": 16, "patch": 4}


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    return components(save_models(tmp_path_factory.mktemp("saved"), SHAPE), SHAPE)


def measured_and_predicted(comp, precision: str, kernels: str) -> tuple[int, float]:
    seq = seq_len(comp, SHAPE["seq"])
    x = torch.randn(SHAPE["batch"], seq, comp.hidden_size, generator=torch.Generator().manual_seed(0))
    measured = saved_bytes(build("", comp, kernels), x, precision)
    return measured, SHAPE["batch"] * planner_bytes(comp, seq, precision, kernels)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_planner_predicts_what_each_layer_saves(layers, precision):
    for name, comp in layers.items():
        by_mode = {k: measured_and_predicted(comp, precision, k) for k in ("off", "reference")}
        for kernels, (measured, predicted) in by_mode.items():
            assert abs(predicted / measured - 1) <= TOLERANCE, (name, precision, kernels, measured, predicted)
        (off, off_pred), (ref, ref_pred) = by_mode["off"], by_mode["reference"]
        if "llama" in name.lower():  # the fused norms and SwiGLU save less, and the planner knows by how much
            assert ref < 0.85 * off and abs((off_pred - ref_pred) / (off - ref) - 1) <= 0.1, (name, by_mode)
        else:  # no kernels in these layers
            assert (ref, ref_pred) == (off, off_pred), (name, by_mode)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_planner_predicts_what_decoder_and_mlp_layers_save(precision):
    from planner.kinds import UseShape, kind_of
    from planner.memory import saved_mode
    from planner.spec import ComponentSpec
    from runtime.modules import DecoderBlock, MlpBlock

    h, s, c, batch = 64, 24, 40, 2
    decoder = ComponentSpec(kind="decoder", num_layers=1, hidden_size=h, num_heads=4, ffn_hidden_size=4 * h)
    mlp = ComponentSpec(kind="mlp", num_layers=1, hidden_size=h)
    cases = [(decoder, DecoderBlock(h, 4, 4 * h, causal=True), UseShape(s, None, cross_len=c), s + c, {"stream_len": s}),
             (mlp, MlpBlock(h), UseShape(s, None), s, {})]
    for comp, layer, shape, rows, kwargs in cases:
        x = torch.randn(batch, rows, h, generator=torch.Generator().manual_seed(0))
        measured = saved_bytes(layer, x, precision, **kwargs)
        (segment,) = kind_of(comp).segments(comp, "c", shape, saved_mode(precision, "auto"))
        assert abs(batch * segment.act_bytes / measured - 1) <= TOLERANCE, (comp.kind, measured, segment.act_bytes)
