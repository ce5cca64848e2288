"""Component kinds -> LayerSegments: FLOPs and parameters against hand formulas, shapes, and check_components errors."""

from __future__ import annotations

import pytest

from planner.components import BYTES_PER_ACT, check_components, expand_use
from planner.errors import SpecError
from planner.spec import parse_job
from planner.unet import unet_blocks


def job_of(components: dict, uses: list[dict] | None = None, batch_size: int = 8):
    """A one-task job whose task uses ``uses`` (default: each component once, as independent branches)."""
    uses = uses if uses is not None else [{"component": name, "after": []} for name in components]
    return parse_job({
        "name": "j", "components": components,
        "tasks": [{"name": "t", "batch_size": batch_size, "components": uses}],
    })


def segments(comp: dict, **use):
    job = job_of({"c": comp}, [{"component": "c", **use}])
    return expand_use(job, 0, 0)


def check_error(components: dict, uses: list[dict] | None = None) -> str:
    job = job_of(components, uses)
    with pytest.raises(SpecError) as info:
        check_components(job)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- costs against hand formulas


@pytest.mark.parametrize("h, s, heads", [(64, 16, 4), (1024, 77, 16), (768, 197, 12)])
def test_transformer_layer_flops_and_params_match_hand_formula(h, s, heads):
    (seg,) = segments({"kind": "transformer", "num_layers": 5, "hidden_size": h, "num_heads": heads, "seq_len": s})
    # With ffn = 4h: QKV+O projections 8sh^2, attention core 4s^2h, MLP 16sh^2 (2 FLOPs per MAC).
    assert seg.flops_fwd == pytest.approx(24 * s * h**2 + 4 * s**2 * h)
    assert seg.params == pytest.approx(12 * h**2)
    assert seg.count == 5
    assert seg.out_bytes == pytest.approx(2 * s * h)  # bf16 hidden states
    assert seg.act_bytes > seg.out_bytes


def test_explicit_ffn_size_changes_only_the_mlp_terms():
    h, s, f = 128, 32, 300
    (seg,) = segments({"kind": "transformer", "num_layers": 1, "hidden_size": h, "num_heads": 4, "seq_len": s,
                       "ffn_hidden_size": f})
    assert seg.flops_fwd == pytest.approx(8 * s * h**2 + 4 * s**2 * h + 4 * s * h * f)
    assert seg.params == pytest.approx(4 * h**2 + 2 * h * f)


def test_use_seq_len_overrides_component_default():
    comp = {"kind": "transformer", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "seq_len": 16}
    (default,) = segments(comp)
    (longer,) = segments(comp, seq_len=32)
    assert "s=16" in default.key and "s=32" in longer.key
    assert longer.flops_fwd > 2 * default.flops_fwd  # linear terms double, the s^2 term quadruples


def test_llama_gated_mlp_counts_three_matrices():
    h, s, f, heads = 256, 64, 688, 8
    (seg,) = segments({"kind": "llama", "num_layers": 2, "hidden_size": h, "num_heads": heads, "seq_len": s,
                       "ffn_hidden_size": f})
    assert seg.params == pytest.approx(4 * h**2 + 3 * h * f)
    assert seg.flops_fwd == pytest.approx(8 * s * h**2 + 4 * s**2 * h + 6 * s * h * f)


def test_llama_default_ffn_is_8h_over_3_rounded_up_to_256():
    h = 4096  # LLaMA-7B: ffn 11008
    (seg,) = segments({"kind": "llama", "num_layers": 1, "hidden_size": h, "num_heads": 32, "seq_len": 8})
    assert "f=11008" in seg.key
    assert seg.params == pytest.approx(4 * h**2 + 3 * h * 11008)


def test_llama_grouped_query_attention_shrinks_kv_projections():
    h, heads, kv_heads, f, s = 512, 8, 2, 1024, 16
    (seg,) = segments({"kind": "llama", "num_layers": 1, "hidden_size": h, "num_heads": heads,
                       "num_kv_heads": kv_heads, "seq_len": s, "ffn_hidden_size": f})
    kv = h * kv_heads // heads
    assert seg.params == pytest.approx(2 * h * h + 2 * h * kv + 3 * h * f)
    assert seg.flops_fwd == pytest.approx(2 * s * h * (h + 2 * kv) + 2 * s * h * h + 4 * s * s * h + 6 * s * h * f)


@pytest.mark.parametrize("image, patch, tokens", [(224, 16, 197), (224, 14, 257), (64, 16, 17)])
def test_vit_sequence_is_patches_plus_cls(image, patch, tokens):
    h = 64
    (seg,) = segments({"kind": "vit", "num_layers": 3, "hidden_size": h, "num_heads": 4, "patch_size": patch,
                       "image_size": image})
    assert f"s={tokens}" in seg.key and seg.key.startswith("vit[")
    assert seg.flops_fwd == pytest.approx(24 * tokens * h**2 + 4 * tokens**2 * h)


def test_vit_use_image_size_overrides_component():
    comp = {"kind": "vit", "num_layers": 1, "hidden_size": 64, "num_heads": 4, "patch_size": 16, "image_size": 224}
    (seg,) = segments(comp, image_size=128)
    assert "s=65" in seg.key  # (128/16)^2 + 1


def test_decoder_adds_cross_attention_cost():
    h, s, c, heads = 128, 20, 50, 4
    base = {"num_layers": 2, "hidden_size": h, "num_heads": heads, "seq_len": s}
    (plain,) = segments({"kind": "transformer", **base})
    (dec,) = segments({"kind": "decoder", "cross_seq_len": c, **base})
    # Cross-attention: Q and O projections on s tokens, K and V on c tokens, scores and weighted sum s x c.
    cross = 4 * s * h**2 + 4 * c * h**2 + 4 * s * c * h
    assert dec.flops_fwd == pytest.approx(plain.flops_fwd + cross)
    assert dec.params == pytest.approx(plain.params + 4 * h**2)
    assert dec.act_bytes > plain.act_bytes
    assert dec.num_kernels > plain.num_kernels
    assert f"c={c}" in dec.key and dec.key != plain.key


def test_decoder_fed_by_a_vit_attends_to_its_tokens():
    job = parse_job({
        "name": "j",
        "components": {
            "enc": {"kind": "vit", "num_layers": 1, "hidden_size": 64, "num_heads": 4, "patch_size": 8, "image_size": 32},
            "dec": {"kind": "decoder", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "seq_len": 6},
        },
        "tasks": [{"name": "t", "batch_size": 4, "components": [{"component": "enc"}, {"component": "dec"}]}],
    })
    (dec,) = expand_use(job, 0, 1)
    assert "s=6" in dec.key and "c=17" in dec.key  # (32/8)^2 + 1 encoder tokens
    assert dec.out_bytes == (6 + 17) * 32 * BYTES_PER_ACT  # the memory travels with the stream


def test_mlp_without_seq_len_is_one_token():
    h = 32
    (seg,) = segments({"kind": "mlp", "num_layers": 3, "hidden_size": h})
    assert seg.flops_fwd == pytest.approx(2 * h * h)
    assert seg.params == pytest.approx(h * h)
    assert seg.count == 3


def test_unet2d_expands_to_down_mid_then_up_segments():
    c0, num_layers, side = 32, 2, 32
    segs = segments({"kind": "unet2d", "num_layers": num_layers, "hidden_size": c0, "image_size": side})
    assert len(segs) == 9  # default channel_mults [1, 2, 4, 4]: 4 levels down, the mid block, 4 up
    down, mid, up = segs[:4], segs[4], segs[5:]
    # the mid block at the deepest level: two ResNets around a transformer block, more than one down block there
    assert (mid.key, mid.count) == (f"unet_mid[c={4 * c0},r={side >> 3}]", 1)
    assert mid.flops_fwd > down[3].flops_fwd and mid.out_bytes == down[3].out_bytes  # no skip pushed or popped
    assert all(s.key.endswith("/down") for s in down) and all(s.key.endswith("/up") for s in up)
    assert [s.count for s in down] == [num_layers] * 4
    assert [s.count for s in up] == [num_layers + 1] * 4
    # Down goes from full resolution to the deepest level; up comes back (deepest first).
    assert [s.key for s in down] == [f"unet_block[c={c0 * m},r={side >> lv}]/down"
                                     for lv, m in enumerate([1, 2, 4, 4])]
    assert [s.key.removesuffix("/up") for s in up] == [s.key.removesuffix("/down") for s in reversed(down)]
    # Level 0 (no attention): each block is two 3x3 convolutions plus the time embedding's projection (4 c0 wide);
    # the last block of a level also downsamples (a stride-2 3x3 convolution on a quarter of the pixels).
    t = side**2
    block = 36 * c0**2 * t + 2 * 4 * c0 * c0
    assert down[0].flops_fwd == pytest.approx((num_layers * block + 18 * c0**2 * t / 4) / num_layers)
    # Deeper levels add a transformer block (self-attention, GEGLU MLP): more than their convolutions.
    c1, t1 = 2 * c0, (side // 2) ** 2
    assert down[1].flops_fwd > 36 * c1**2 * t1 + 4 * t1**2 * c1
    # The boundary carries every skip still on the stack: it grows on the way down, and the last up
    # segment hands on only h (c0 channels at full resolution, bf16).
    assert [s.out_bytes for s in down] == sorted(s.out_bytes for s in down)
    assert up[-1].out_bytes == 2 * c0 * t < down[0].out_bytes


def test_unet2d_skip_stack_is_balanced():
    comp = job_of({"u": {"kind": "unet2d", "num_layers": 2, "hidden_size": 8, "image_size": 16,
                         "channel_mults": [1, 2, 2]}}).components["u"]
    blocks = unet_blocks(comp, 16)
    assert len(blocks) == 3 * 2 + 1 + 3 * 3  # down, mid, up
    assert max(len(b.skips_out) for b in blocks) == 1 + 3 * 2 + 2  # conv_in, every down block, two downsamples
    assert blocks[-1].skips_out == () and blocks[-1].h_out == (8, 16)
    for b in blocks:
        if b.up:  # an up block concatenates a skip of its own resolution
            assert b.skips_in[-1][1] == b.side and b.skip == b.skips_in[-1][0]


def test_unet2d_conditioned_use_prices_cross_attention():
    comps = {"text": {"kind": "transformer", "num_layers": 1, "hidden_size": 24, "num_heads": 2, "seq_len": 7},
             "u": {"kind": "unet2d", "num_layers": 1, "hidden_size": 8, "image_size": 8, "channel_mults": [1, 2]}}
    alone = expand_use(job_of({"u": comps["u"]}), 0, 0)
    conditioned = expand_use(job_of(comps, [{"component": "text"}, {"component": "u"}]), 0, 1)
    assert [s.key for s in conditioned] == [k.key.replace("]", ",ctx=7]") for k in alone]
    assert conditioned[0].flops_fwd == alone[0].flops_fwd  # full resolution has no attention
    assert conditioned[1].flops_fwd > alone[1].flops_fwd
    assert conditioned[0].out_bytes - alone[0].out_bytes == 2 * 7 * 24  # the context travels with the state


def test_unet2d_custom_channel_mults():
    segs = segments({"kind": "unet2d", "num_layers": 1, "hidden_size": 8, "image_size": 16, "channel_mults": [1, 3]})
    assert [s.key for s in segs] == ["unet_block[c=8,r=16]/down", "unet_block[c=24,r=8]/down", "unet_mid[c=24,r=8]",
                                     "unet_block[c=24,r=8]/up", "unet_block[c=8,r=16]/up"]
    assert [s.count for s in segs] == [1, 1, 1, 2, 2]


# --------------------------------------------------------------------------- check_components


def test_valid_components_pass():
    check_components(job_of({
        "a": {"kind": "transformer", "num_layers": 1, "hidden_size": 64, "num_heads": 4, "seq_len": 8,
              "tensor_parallel": [1, 2, 4]},
        "b": {"kind": "unet2d", "num_layers": 1, "hidden_size": 8, "image_size": 16},
    }))


def test_unknown_kind_suggests_closest():
    msg = check_error({"enc": {"kind": "vitt", "num_layers": 1, "hidden_size": 64}})
    assert msg.startswith("components.enc.kind ('vitt') is not a registered component"), msg
    assert "did you mean 'vit'?" in msg


def test_unknown_kind_far_from_any_lists_kinds():
    msg = check_error({"enc": {"kind": "zzzzz", "num_layers": 1, "hidden_size": 64}})
    assert "'transformer'" in msg and "'unet2d'" in msg


@pytest.mark.parametrize("degree", [3, 6, 0])
def test_tensor_parallel_must_be_power_of_two(degree):
    msg = check_error({"enc": {"kind": "transformer", "num_layers": 1, "hidden_size": 96, "num_heads": 12,
                               "seq_len": 8, "tensor_parallel": [1, degree]}})
    assert msg.startswith(f"components.enc.tensor_parallel ({degree}) is not a power of two"), msg


def test_tensor_parallel_must_divide_heads():
    msg = check_error({"enc": {"kind": "transformer", "num_layers": 1, "hidden_size": 96, "num_heads": 12,
                               "seq_len": 8, "tensor_parallel": [1, 8]}})
    assert msg.startswith("components.enc.tensor_parallel (8) does not divide num_heads (12)"), msg


def test_tensor_parallel_must_divide_kv_heads():
    msg = check_error({"lm": {"kind": "llama", "num_layers": 1, "hidden_size": 96, "num_heads": 12, "num_kv_heads": 2,
                              "seq_len": 8, "tensor_parallel": [1, 4]}})
    assert msg.startswith("components.lm.tensor_parallel (4) does not divide num_kv_heads (2)"), msg


def test_tensor_parallel_needs_attention_heads():
    msg = check_error({"head": {"kind": "mlp", "num_layers": 2, "hidden_size": 64, "tensor_parallel": [1, 2]}})
    assert msg.startswith("components.head.tensor_parallel (2) is not supported for kind 'mlp'"), msg


def test_kv_heads_must_divide_heads():
    msg = check_error({"lm": {"kind": "llama", "num_layers": 1, "hidden_size": 96, "num_heads": 12,
                              "num_kv_heads": 5, "seq_len": 8}})
    assert msg.startswith("components.lm.num_kv_heads (5) does not divide num_heads (12)"), msg


def test_vit_image_not_multiple_of_patch():
    msg = check_error(
        {"vis": {"kind": "vit", "num_layers": 1, "hidden_size": 64, "num_heads": 4, "patch_size": 16}},
        [{"component": "vis", "image_size": 230}],
    )
    assert msg.startswith("tasks[0].components[0].image_size (230) is not a multiple of components.vis.patch_size (16)")
    assert "224" in msg  # the nearest multiple below, as a fix


def test_vit_missing_image_size_and_patch_size():
    msg = check_error({"vis": {"kind": "vit", "num_layers": 1, "hidden_size": 64, "num_heads": 4, "patch_size": 16}})
    assert msg.startswith("tasks[0].components[0].image_size: required for a vit use"), msg
    msg = check_error({"vis": {"kind": "vit", "num_layers": 1, "hidden_size": 64, "num_heads": 4, "image_size": 64}})
    assert msg.startswith("components.vis.patch_size: required for kind 'vit'"), msg


def test_missing_seq_len_names_the_use():
    msg = check_error(
        {"txt": {"kind": "transformer", "num_layers": 1, "hidden_size": 64, "num_heads": 4},
         "other": {"kind": "mlp", "num_layers": 1, "hidden_size": 64}},
        [{"component": "other"}, {"component": "txt"}],
    )
    assert msg.startswith("tasks[0].components[1].seq_len: required for a transformer use"), msg
    assert "components.txt" in msg


def test_missing_kind_specific_fields():
    msg = check_error({"txt": {"kind": "transformer", "num_layers": 1, "hidden_size": 64, "seq_len": 8}})
    assert msg.startswith("components.txt.num_heads: required for kind 'transformer'"), msg
    msg = check_error({"dec": {"kind": "decoder", "num_layers": 1, "hidden_size": 64, "num_heads": 4, "seq_len": 8}})
    assert msg.startswith("components.dec.cross_seq_len: required for a decoder use with no upstream use"), msg


def test_unet2d_image_must_halve_cleanly():
    msg = check_error({"u": {"kind": "unet2d", "num_layers": 1, "hidden_size": 8, "image_size": 30}})
    assert msg.startswith("tasks[0].components[0].image_size (30) must be divisible by 2^3"), msg
    msg = check_error({"u": {"kind": "unet2d", "num_layers": 1, "hidden_size": 8}})
    assert msg.startswith("tasks[0].components[0].image_size: required for a unet2d use"), msg
