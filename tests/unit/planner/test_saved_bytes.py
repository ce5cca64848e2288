"""The planner's saved-activation bytes (planner.memory) reach each layer segment from the job's training.precision and
training.kernels, and grow linearly in the sequence: SDPA keeps no attention-score matrix. (What they predict against
the runtime's layers is tests/unit/runtime/test_saved_activations.py.)"""

from __future__ import annotations

import pytest

from planner.components import expand_use
from planner.spec import parse_job

LLAMA = {"kind": "llama", "num_layers": 2, "hidden_size": 256, "num_heads": 8, "num_kv_heads": 2, "seq_len": 128}
VIT = {"kind": "vit", "num_layers": 2, "hidden_size": 256, "num_heads": 8, "patch_size": 16, "image_size": 64}


def segment(comp: dict, precision: str = "bf16", kernels: str = "auto", **use):
    job = parse_job({"name": "j", "components": {"c": comp},
                     "tasks": [{"name": "t", "batch_size": 8, "components": [{"component": "c", **use}]}],
                     "training": {"precision": precision, "kernels": kernels}})
    return expand_use(job, 0, 0)[0]


def test_the_kernels_mode_reaches_the_saved_bytes_of_a_llama_layer_only():
    on, off = segment(LLAMA, kernels="auto"), segment(LLAMA, kernels="off")
    assert segment(LLAMA, kernels="reference").act_bytes == on.act_bytes
    # per position: an unfused RMSNorm keeps 4h more than the fused one (x2), the gated MLP one more f-wide tensor
    h, f, s = 256, 768, 128
    assert off.act_bytes - on.act_bytes == pytest.approx(s * (2 * 4 * h + 2 * f))
    assert (off.flops_fwd, off.params, off.key) == (on.flops_fwd, on.params, on.key)
    assert segment(VIT, kernels="off").act_bytes == segment(VIT, kernels="auto").act_bytes  # no kernels in a vit


def test_fp32_saves_more_but_not_twice_the_float32_stream():
    for comp in (LLAMA, VIT):
        bf16, fp32 = segment(comp, "bf16"), segment(comp, "fp32")
        assert bf16.act_bytes < fp32.act_bytes < 2 * bf16.act_bytes  # norms keep the float32 stream in both
        assert fp32.out_bytes == 2 * bf16.out_bytes


@pytest.mark.parametrize("comp", [LLAMA, {**LLAMA, "kind": "transformer", "num_kv_heads": None}])
def test_saved_bytes_grow_linearly_in_the_sequence(comp):
    short, long = segment(comp, seq_len=512), segment(comp, seq_len=2048)
    assert long.act_bytes == 4 * short.act_bytes  # no s x s score matrix
    assert long.flops_fwd > 4 * short.flops_fwd  # while attention's FLOPs are quadratic
