"""Checks the runtime makes before it runs a job."""

from __future__ import annotations

import pytest

from planner.errors import SpecError
from planner.metagraph import build_metagraph
from planner.spec import parse_job
from runtime.checks import check_runnable, feature_shape


def image_to_decoder(decoder_seq_len: int):
    return parse_job({
        "name": "chain",
        "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {
            "img": {"kind": "vit", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "patch_size": 8,
                    "image_size": 32},
            "dec": {"kind": "transformer", "num_layers": 1, "hidden_size": 32, "num_heads": 4,
                    "seq_len": decoder_seq_len},
        },
        "tasks": [{"name": "t", "batch_size": 4, "components": [{"component": "img"}, {"component": "dec"}]}],
    })


def test_chained_uses_with_different_shapes_are_refused_before_running():
    bad = image_to_decoder(16)
    with pytest.raises(SpecError, match=r"tasks\[0\]\.components\[1\] \('dec'\) reads the output of 'img', which is "
                                        r"17 tokens x 32, but is declared as 16 tokens"):
        check_runnable(bad, build_metagraph(bad))
    good = image_to_decoder(17)  # 4 x 4 patches + the class token
    check_runnable(good, build_metagraph(good))


def two_towers_into(fuse: dict, txt_width: int = 32):
    """An image tower (17 tokens x 32) and a text tower (6 tokens) feeding ``fuse`` (a use with two inputs)."""
    return parse_job({
        "name": "fusion",
        "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {
            "img": {"kind": "vit", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "patch_size": 8,
                    "image_size": 32},
            "txt": {"kind": "transformer", "num_layers": 1, "hidden_size": txt_width, "num_heads": 4, "seq_len": 6},
            "fuse": {"num_layers": 1, "num_heads": 4, **fuse},
        },
        "tasks": [{"name": "t", "batch_size": 4, "components": [
            {"component": "img"}, {"component": "txt", "after": []}, {"component": "fuse", "after": ["img", "txt"]}]}],
    })


def test_a_fusion_must_read_the_sum_of_its_inputs_tokens_at_its_width():
    good = two_towers_into({"kind": "transformer", "hidden_size": 32, "seq_len": 23})
    check_runnable(good, build_metagraph(good))
    short = two_towers_into({"kind": "transformer", "hidden_size": 32, "seq_len": 22})
    with pytest.raises(SpecError, match=r"tasks\[0\]\.components\[2\] \('fuse'\) reads 'img' \(17 tokens x 32\) \+ "
                                        r"'txt' \(6 tokens x 32\) concatenated along the sequence, but is declared "
                                        r"as 22 tokens x 32; expected .* 23 tokens in all\. Set its seq_len to 23"):
        check_runnable(short, build_metagraph(short))
    narrow = two_towers_into({"kind": "transformer", "hidden_size": 32, "seq_len": 23}, txt_width=16)
    with pytest.raises(SpecError, match=r"'txt' \(6 tokens x 16\) .*expected every input 32 wide"):
        check_runnable(narrow, build_metagraph(narrow))


def test_a_decoder_attends_to_several_inputs_of_one_width():
    job = two_towers_into({"kind": "decoder", "hidden_size": 16, "num_heads": 2, "seq_len": 3})
    check_runnable(job, build_metagraph(job))
    fuse = next(op for op in build_metagraph(job).metaops if op.use == "fuse")
    assert feature_shape(job, fuse) == (3 + 17 + 6, 16)  # its stream, then both inputs' tokens as memory
    mixed = two_towers_into({"kind": "decoder", "hidden_size": 16, "num_heads": 2, "seq_len": 3}, txt_width=16)
    with pytest.raises(SpecError, match=r"tasks\[0\]\.components\[2\] \('fuse'\) attends to 'img' \(32 wide\), "
                                        r"'txt' \(16 wide\) concatenated along the sequence; they need one width"):
        check_runnable(mixed, build_metagraph(mixed))
