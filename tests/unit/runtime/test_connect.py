"""Connectors between uses of different shapes (runtime.connect): what a use's first layer reads."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from planner.spec import parse_job
from planner.usegraph import Connection, connection
from runtime.connect import InputAdapter, adapter_widths, connect


def test_a_connection_projects_other_widths_then_pools_or_adds_text():
    fused = Connection(((17, 32), (6, 16)), seq_len=20, width=32)
    assert (fused.positions, fused.projected, fused.text_len, fused.plain) == (23, True, 0, False)
    short = Connection(((5, 32),), seq_len=9, width=32)
    assert (short.projected, short.text_len, short.plain) == (False, 4, False)
    assert Connection(((5, 32), (4, 32)), seq_len=9, width=32).plain


def test_connect_pools_longer_inputs_and_appends_text_after_shorter_ones():
    torch.manual_seed(0)
    adapter = InputAdapter([16], 32)
    a, b = torch.randn(2, 17, 32), torch.randn(2, 6, 16)
    pooled = connect(Connection(((17, 32), (6, 16)), 20, 32), [a, b], adapter, None)
    whole = torch.cat([a, adapter(b)], dim=1)  # the narrower input projected, in after: order
    assert pooled.shape == (2, 20, 32)
    assert torch.allclose(pooled, F.adaptive_avg_pool1d(whole.transpose(1, 2), 20).transpose(1, 2))
    assert torch.allclose(connect(Connection(((23, 32),), 1, 32), [whole], None, None), whole.mean(1, keepdim=True))
    text = torch.randn(2, 4, 32)
    out = connect(Connection(((5, 32),), 9, 32), [a[:, :5]], None, text)
    assert torch.equal(out, torch.cat([a[:, :5], text], dim=1))


def test_adapter_widths_are_the_other_widths_a_component_is_fed_at():
    job = parse_job({
        "name": "widths",
        "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
        "components": {
            "img": {"kind": "vit", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "patch_size": 4,
                    "image_size": 8},
            "txt": {"kind": "transformer", "num_layers": 1, "hidden_size": 32, "num_heads": 2, "seq_len": 4},
            "lm": {"kind": "llama", "num_layers": 1, "hidden_size": 32, "num_heads": 2, "seq_len": 9},
        },
        "tasks": [
            {"name": "a", "batch_size": 2, "components": [{"component": "img"}, {"component": "lm"}]},
            {"name": "b", "batch_size": 2, "components": [{"component": "txt"}, {"component": "lm", "seq_len": 4}]},
        ],
    })
    assert adapter_widths(job, "lm") == [16]  # txt is lm's own width: read as it is
    assert connection(job, 1, 1).plain and connection(job, 0, 0) is None
    assert connection(job, 0, 1) == Connection(((5, 16),), 9, 32)
