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


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_under_recompute_the_planner_prices_the_float32_input_the_checkpoint_keeps(precision):
    """A recomputed layer (runtime.modules runs it under torch's non-reentrant checkpoint) keeps only its input, the
    float32 residual stream whatever the precision: what CostModel.activation_bytes prices for a recompute MetaOp
    (under bf16, twice the bytes its output costs on the wire)."""
    from dataclasses import replace

    from planner.api import make_cost_model
    from planner.costmodel import Layout
    from planner.metagraph import build_metagraph
    from planner.spec import parse_job
    from runtime.modules import LlamaBlock

    h, seq, batch = 64, 32, 2
    job = parse_job({"name": "ckpt", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "a800"},
                     "components": {"llm": {"kind": "llama", "num_layers": 2, "hidden_size": h, "num_heads": 4,
                                            "num_kv_heads": 2, "ffn_hidden_size": 176, "seq_len": seq,
                                            "recompute": True}},
                     "training": {"precision": precision},
                     "tasks": [{"name": "t", "batch_size": batch, "components": [{"component": "llm"}]}]})
    (op,) = [o for o in build_metagraph(job).metaops if o.component == "llm"]
    assert op.recompute and op.backward_factor > 0
    cost_model = make_cost_model(job)
    predicted = cost_model.activation_bytes(op, Layout(1, 1))  # the whole batch on one device

    layer = LlamaBlock(h, 4, 2, 176, kernels="auto")
    params = {p.data_ptr() for p in layer.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(batch, seq, h, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    assert sum(kept.values()) == batch * seq * h * 4
    assert predicted == pytest.approx(sum(kept.values()))
    # without recompute the same layer keeps far more (planner.memory's per-layer figure)
    assert cost_model.activation_bytes(replace(op, recompute=False), Layout(1, 1)) > 5 * predicted
