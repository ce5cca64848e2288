"""Checks the runtime makes before it runs a job."""

from __future__ import annotations

import pytest

from planner.errors import SpecError
from planner.metagraph import build_metagraph
from planner.spec import parse_job
from runtime.executor import check_runnable


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
