"""runtime.profile_step: the modules' real sizes, the optimizer's measured points and the job's message sizes that
`loom profile` times the links at."""

from __future__ import annotations

import math

from planner.costfit import fit_step
from planner.metagraph import build_metagraph
from planner.spec import parse_job
from runtime.profile_step import FLAT_PARAMS_MIN, message_sizes, module_sizes, optimizer_points


def job(precision: str = "fp32"):
    return parse_job({
        "name": "sizes",
        "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {
            "img": {"kind": "vit", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "patch_size": 4,
                    "image_size": 8, "in_channels": 1},
            "lm": {"kind": "llama", "num_layers": 1, "hidden_size": 24, "num_heads": 2, "seq_len": 9,
                   "vocab_size": 30},
        },
        "tasks": [{"name": "caption", "batch_size": 4, "loss": "lm",
                   "components": [{"component": "img"}, {"component": "lm"}]},
                  {"name": "classify", "batch_size": 2, "components": [{"component": "img"}]}],
        "training": {"precision": precision},
    })


def test_module_sizes_count_what_the_planner_does_not_size():
    j = job()
    sizes = module_sizes(j)
    graph = build_metagraph(j)
    inputs = {name for op in graph.metaops for name in op.input_modules}
    assert set(sizes) == {op.param_group for op in graph.metaops} | inputs | {"head:caption", "head:classify"}
    for op in graph.metaops:  # a layer with its norms and biases: a little more than the modelled parameters
        params, tensors, matrices = sizes[op.param_group]
        assert op.layer.params <= params <= 1.1 * op.layer.params and tensors > 2
        assert matrices == op.layer.params  # its linear layers' weights: what the kinds model
    assert sizes["head:caption"][0] >= 24 * 30  # the LM head's Linear(24, vocab 30)
    assert sizes["head:caption"][2] == 24 * 30  # ... its one matrix (its norm and bias are vectors)


def test_message_sizes_span_the_jobs_pieces_and_buckets():
    j = job()
    sizes = message_sizes(j, module_sizes(j))
    graph = build_metagraph(j)
    pieces = {math.prod(op.out_shapes[-1]) * 4 * b for op in graph.metaops for b in (op.batch_size, op.batch_size // 2)}
    layers = {op.layer.params * 4 * n for op in graph.metaops for n in (1, op.num_layers)}
    assert 2 <= len(sizes) <= 6 and list(sizes) == sorted(set(sizes))
    assert set(sizes) <= pieces | layers | {4 * p for p, *_ in module_sizes(j).values()}  # real sizes only
    assert sizes[0] == min(pieces | layers) and sizes[-1] == max(pieces | layers | {4 * p for p, *_ in module_sizes(j).values()})


def test_optimizer_points_separate_tensors_from_parameters():
    points = optimizer_points(job(), repeats=3, warmup=1)
    own, extra = points[:6], points[6:]
    assert all(s > 0 for _, _, s in points)
    whole = max(own, key=lambda p: (p[0], p[1]))
    assert [p for p in own if p[0] == whole[0]] == [whole, [whole[0], 1, own[-1][2]]]  # its flat twin
    # a job this small is also timed over FLAT_PARAMS_MIN parameters in one tensor: the per-parameter term is measured
    assert whole[0] < FLAT_PARAMS_MIN and [p[:2] for p in extra] == [[FLAT_PARAMS_MIN, 1]]
    a, b, c = fit_step([tuple(p) for p in points])
    assert min(a, b, c) >= 0 and a + b * whole[0] + c * whole[1] > 0
