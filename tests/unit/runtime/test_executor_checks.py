"""Checks the runtime makes before it runs a job."""

from __future__ import annotations

import pytest

from planner.errors import SpecError
from planner.metagraph import build_metagraph
from planner.spec import parse_job
from planner.usegraph import input_modules, op_connection
from runtime.checks import check_runnable, feature_shape


def image_to(consumer: dict):
    """A ViT (17 tokens x 32: 4 x 4 patches and the class token) feeding ``consumer`` (use 'dec')."""
    return parse_job({
        "name": "chain",
        "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {
            "img": {"kind": "vit", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "patch_size": 8,
                    "image_size": 32},
            "dec": {"num_layers": 1, "num_heads": 4, **consumer},
        },
        "tasks": [{"name": "t", "batch_size": 4, "components": [{"component": "img"}, {"component": "dec"}]}],
    })


def connected(job, use: str):
    graph = build_metagraph(job)
    check_runnable(job, graph)
    op = next(op for op in graph.metaops if op.use == use)
    return op_connection(job, graph, op), input_modules(job, graph, op)


def test_a_use_reads_inputs_of_another_shape_through_a_connector():
    assert connected(image_to({"kind": "transformer", "hidden_size": 32, "seq_len": 17}), "dec") == (None, [])
    c, modules = connected(image_to({"kind": "transformer", "hidden_size": 32, "seq_len": 16}), "dec")
    assert (c.positions, c.text_len, c.projected, modules) == (17, 0, False, [])  # pooled to 16
    c, modules = connected(image_to({"kind": "llama", "hidden_size": 48, "seq_len": 20}), "dec")
    assert (c.text_len, c.projected, modules) == (3, True, ["adapt:dec", "embed:dec"])  # projected, 3 text tokens
    bad = image_to({"kind": "mlp", "hidden_size": 32, "seq_len": 20})
    with pytest.raises(SpecError, match=r"tasks\[0\]\.components\[1\] \('dec'\) reads 'img' \(17 x 32\), 17 positions, "
                                        r"but is declared with 20; only a transformer or llama use adds its own text "
                                        r"tokens after its inputs\. Set its seq_len to 17 or less"):
        check_runnable(bad, build_metagraph(bad))


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


def test_a_fusion_projects_each_input_of_another_width():
    assert connected(two_towers_into({"kind": "transformer", "hidden_size": 32, "seq_len": 23}), "fuse") == (None, [])
    c, modules = connected(two_towers_into({"kind": "transformer", "hidden_size": 32, "seq_len": 23}, 16), "fuse")
    assert (c.inputs, c.text_len, modules) == (((17, 32), (6, 16)), 0, ["adapt:fuse"])
    bad = two_towers_into({"kind": "mlp", "hidden_size": 32, "seq_len": 24})
    with pytest.raises(SpecError, match=r"reads 'img' \(17 x 32\) \+ 'txt' \(6 x 32\), 23 positions"):
        check_runnable(bad, build_metagraph(bad))


def test_a_decoder_attends_to_several_inputs_of_one_width():
    job = two_towers_into({"kind": "decoder", "hidden_size": 16, "num_heads": 2, "seq_len": 3})
    check_runnable(job, build_metagraph(job))
    fuse = next(op for op in build_metagraph(job).metaops if op.use == "fuse")
    assert feature_shape(job, fuse) == (3 + 17 + 6, 16)  # its stream, then both inputs' tokens as memory
    mixed = two_towers_into({"kind": "decoder", "hidden_size": 16, "num_heads": 2, "seq_len": 3}, txt_width=16)
    with pytest.raises(SpecError, match=r"tasks\[0\]\.components\[2\] \('fuse'\) attends to 'img' \(32 wide\), "
                                        r"'txt' \(16 wide\) concatenated along the sequence; they need one width"):
        check_runnable(mixed, build_metagraph(mixed))
