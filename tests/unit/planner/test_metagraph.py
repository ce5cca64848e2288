"""MetaGraph: one MetaOp per use (per segment), deps and levels, parameter sharing, contraction, frozen/recompute."""

from __future__ import annotations

import pytest

from planner.components import LayerSegment
from planner.metagraph import MetaOp, build_metagraph, contract_segments, finalize_graph
from planner.spec import parse_job


def tf(num_layers: int = 2, **extra) -> dict:
    return {"kind": "transformer", "num_layers": num_layers, "hidden_size": 64, "num_heads": 4, "seq_len": 16, **extra}


def graph_of(components: dict, tasks: list[dict]):
    return build_metagraph(parse_job({"name": "j", "components": components, "tasks": tasks}))


def by_name(graph):
    return {op.name: op for op in graph.metaops}


COMPONENTS = {
    "vision": {"kind": "vit", "num_layers": 4, "hidden_size": 64, "num_heads": 4, "patch_size": 16, "image_size": 64},
    "text": tf(3),
    "head": {"kind": "mlp", "num_layers": 1, "hidden_size": 64},
}
TASKS = [
    {"name": "cap", "batch_size": 16, "components": [{"component": "vision"}, {"component": "text"}, {"component": "head"}]},
    {"name": "ret", "batch_size": 8, "components": [{"component": "vision", "after": []},
                                                   {"component": "text", "after": []}]},
]


def test_one_metaop_per_use_in_task_order():
    graph = graph_of(COMPONENTS, TASKS)
    assert len(graph) == 5
    assert [op.name for op in graph.metaops] == ["cap.vision", "cap.text", "cap.head", "ret.vision", "ret.text"]
    assert [op.id for op in graph.metaops] == list(range(5))
    assert [op.num_layers for op in graph.metaops] == [4, 3, 1, 4, 3]
    assert [op.batch_size for op in graph.metaops] == [16, 16, 16, 8, 8]
    assert [op.task for op in graph.metaops] == ["cap"] * 3 + ["ret"] * 2
    assert [op.component for op in graph.metaops] == ["vision", "text", "head", "vision", "text"]
    assert [o.name for o in graph.ops_of_task("ret")] == ["ret.vision", "ret.text"]


def test_chain_and_branch_deps_and_levels():
    graph = graph_of(COMPONENTS, TASKS)
    assert [op.deps for op in graph.metaops] == [(), (0,), (1,), (), ()]
    assert [op.level for op in graph.metaops] == [0, 1, 2, 0, 0]
    assert graph.levels == ((0, 3, 4), (1,), (2,))
    assert graph.successors() == [[1], [2], [], [], []]


def test_join_of_two_branches_depends_on_both():
    tasks = [{"name": "t", "batch_size": 4, "components": [
        {"component": "text", "name": "query"},
        {"component": "vision", "after": []},
        {"component": "text", "name": "doc", "after": []},
        {"component": "head", "after": ["doc", "query"]},
    ]}]
    graph = graph_of(COMPONENTS, tasks)
    ops = by_name(graph)
    assert ops["t.head"].deps == (ops["t.query"].id, ops["t.doc"].id)  # sorted ids
    assert ops["t.head"].level == 1
    assert graph.levels == ((0, 1, 2), (3,))
    # Two uses of one component inside a task share parameters too.
    assert graph.param_groups["text"] == (ops["t.query"].id, ops["t.doc"].id)


def test_level_is_longest_path_depth():
    tasks = [{"name": "t", "batch_size": 4, "components": [
        {"component": "vision"},
        {"component": "text"},
        {"component": "head", "after": ["vision", "text"]},
    ]}]
    graph = graph_of(COMPONENTS, tasks)
    assert [op.level for op in graph.metaops] == [0, 1, 2]  # head waits for text, which waits for vision


def test_param_groups_share_across_tasks():
    graph = graph_of(COMPONENTS, TASKS)
    assert graph.param_groups == {"head": (2,), "text": (1, 4), "vision": (0, 3)}
    assert list(graph.param_groups) == sorted(graph.param_groups)  # deterministic order
    for group, ids in graph.param_groups.items():
        assert all(graph.metaops[m].param_group == group for m in ids)


def test_same_component_with_different_shapes_shares_params_not_keys():
    tasks = [
        {"name": "short", "batch_size": 4, "components": [{"component": "text", "seq_len": 8}]},
        {"name": "long", "batch_size": 4, "components": [{"component": "text", "seq_len": 32}]},
    ]
    graph = graph_of({"text": tf(2)}, tasks)
    a, b = graph.metaops
    assert a.key != b.key  # different workloads (different cost curves)
    assert a.param_group == b.param_group == "text"
    assert a.layer.params == b.layer.params


def test_multi_segment_use_becomes_a_chain_of_metaops():
    comps = {"unet": {"kind": "unet2d", "num_layers": 1, "hidden_size": 8, "image_size": 16, "channel_mults": [1, 2]},
             "head": COMPONENTS["head"]}
    tasks = [{"name": "gen", "batch_size": 4, "components": [{"component": "unet"}, {"component": "head"}]}]
    graph = graph_of(comps, tasks)
    names = [op.name for op in graph.metaops]
    assert names == ["gen.unet#0", "gen.unet#1", "gen.unet#2", "gen.unet#3", "gen.unet#4", "gen.head"]
    assert [op.deps for op in graph.metaops] == [(), (0,), (1,), (2,), (3,), (4,)]
    assert [op.num_layers for op in graph.metaops] == [1, 1, 1, 2, 2, 1]  # down, down, mid, up, up
    assert [op.param_group for op in graph.metaops] == ["unet#0", "unet#1", "unet#2", "unet#3", "unet#4", "head"]


# --------------------------------------------------------------------------- contraction


def seg(key: str, count: int, flops: float = 1.0) -> LayerSegment:
    return LayerSegment(key, count, flops, 2.0, 3.0, 4.0, 5.0, 6)


def test_contract_segments_merges_equal_consecutive_keys():
    out = contract_segments([seg("a", 2), seg("a", 3), seg("b", 1), seg("a", 4), seg("a", 1), seg("a", 1)])
    assert [(s.key, s.count) for s in out] == [("a", 5), ("b", 1), ("a", 6)]
    # Per-layer costs are kept (equal keys mean identical layers).
    assert out[0].flops_fwd == 1.0 and out[0].params == 2.0 and out[0].num_kernels == 6
    assert out[2].tp_comm_bytes == 5.0 and out[2].out_bytes == 4.0 and out[2].act_bytes == 3.0


def test_contract_segments_edge_cases():
    assert contract_segments([]) == []
    single = [seg("x", 7)]
    assert contract_segments(single) == single
    distinct = [seg("a", 1), seg("b", 1), seg("c", 1)]
    assert contract_segments(distinct) == distinct


# --------------------------------------------------------------------------- frozen components and recompute


def chain_factors(*frozen: bool, recompute: bool = False) -> list[MetaOp]:
    comps = {f"c{i}": tf(1, frozen=fz, recompute=recompute, seq_len=16 + i) for i, fz in enumerate(frozen)}
    tasks = [{"name": "t", "batch_size": 4, "components": [{"component": name} for name in comps]}]
    return list(graph_of(comps, tasks).metaops)


@pytest.mark.parametrize(
    "frozen, factors",
    [
        ((False, False), [2.0, 2.0]),
        ((True, False), [0.0, 2.0]),  # nothing trainable upstream of the frozen encoder: forward only
        ((False, True), [2.0, 1.0]),  # a frozen layer fed by a trainable one passes input gradients back
        ((True, True, False), [0.0, 0.0, 2.0]),
        ((False, True, True), [2.0, 1.0, 1.0]),  # trainable-upstream is transitive through frozen layers
        ((True, False, True), [0.0, 2.0, 1.0]),
    ],
)
def test_backward_factor_of_frozen_components(frozen, factors):
    ops = chain_factors(*frozen)
    assert [op.backward_factor for op in ops] == factors
    assert [op.frozen for op in ops] == list(frozen)


def test_frozen_branch_with_no_upstream_is_forward_only():
    comps = {"enc": tf(1), "frz": tf(1, frozen=True, seq_len=8)}
    tasks = [{"name": "t", "batch_size": 4, "components": [{"component": "enc"}, {"component": "frz", "after": []}]}]
    ops = graph_of(comps, tasks).metaops
    assert [op.backward_factor for op in ops] == [2.0, 0.0]


def test_frozen_join_with_one_trainable_input_needs_input_gradients():
    comps = {"a": tf(1, frozen=True), "b": tf(1, seq_len=8), "c": tf(1, frozen=True, seq_len=12)}
    tasks = [{"name": "t", "batch_size": 4, "components": [
        {"component": "a"}, {"component": "b", "after": []}, {"component": "c", "after": ["a", "b"]}]}]
    ops = graph_of(comps, tasks).metaops
    assert [op.backward_factor for op in ops] == [0.0, 2.0, 1.0]


@pytest.mark.parametrize(
    "frozen, flags",
    [
        ((False, False), [True, True]),
        ((True, False), [False, True]),  # forward-only: nothing to recompute
        ((False, True), [True, True]),  # frozen but with a backward (input gradients): recompute applies
    ],
)
def test_recompute_only_when_there_is_a_backward(frozen, flags):
    ops = chain_factors(*frozen, recompute=True)
    assert [op.recompute for op in ops] == flags


def test_recompute_off_by_default():
    assert [op.recompute for op in chain_factors(False, True)] == [False, False]


def test_allowed_tp_is_sorted_and_unique():
    comps = {"t": tf(1, tensor_parallel=[4, 1, 2, 4])}
    (op,) = graph_of(comps, [{"name": "x", "batch_size": 4, "components": [{"component": "t"}]}]).metaops
    assert op.allowed_tp == (1, 2, 4)


def test_finalize_graph_rejects_forward_references():
    layer = seg("a", 1)
    ops = [MetaOp(0, "t.a", "t", "a", layer, 1, 4, (1,), "a", False, 2.0),
           MetaOp(1, "t.b", "t", "b", layer, 1, 4, (), "b", False, 2.0)]
    with pytest.raises(AssertionError, match="depends on a later MetaOp"):
        finalize_graph(ops)
