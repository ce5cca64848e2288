"""The communication schedule of a use with several inputs (a fusion): which rows of which input move where,
forward and backward, and the order the inputs are concatenated in (no processes)."""

from __future__ import annotations

from planner.api import plan_schedule
from planner.metagraph import build_metagraph
from planner.plan import plan_from_json
from planner.schedule import Schedule, Slice, Wave
from planner.spec import parse_job
from runtime.assignment import CommSchedule, input_order


def fusion_job(after: list[str]):
    return parse_job({
        "name": "fusion",
        "cluster": {"num_nodes": 1, "devices_per_node": 4, "device": "cpu"},
        "components": {
            "img": {"kind": "vit", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "patch_size": 4,
                    "image_size": 8},
            "txt": {"kind": "transformer", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "seq_len": 6},
            "fuse": {"kind": "transformer", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "seq_len": 11},
        },
        "tasks": [{"name": "vqa", "batch_size": 8, "components": [
            {"component": "img"}, {"component": "txt", "after": []}, {"component": "fuse", "after": after}]}],
    })


def plan_of(job, waves):
    ids = {op.name: op.id for op in build_metagraph(job).metaops}
    return plan_schedule(job, Schedule(tuple(Wave(tuple(Slice(ids[n], k, d) for n, k, d in w)) for w in waves)),
                         method="hand-made")


def test_a_fusion_receives_every_row_of_every_input_from_its_owner():
    job = fusion_job(["img", "txt"])
    plan = plan_of(job, [[("vqa.img", 1, 2), ("vqa.txt", 1, 1)], [("vqa.fuse", 1, 4)], [("vqa.fuse", 1, 2)]])
    comm = CommSchedule(plan)
    fuse = comm.by_metaop[2][0]
    img, txt = comm.last_slice(0), comm.last_slice(1)
    assert comm.producers(fuse) == [img, txt] and comm.producer(fuse) == img
    assert comm.producers(comm.by_metaop[2][1]) == [fuse]  # the second layer reads the first: one input
    pieces = comm.forward_pieces[1]
    assert {(p.input, p.producer) for p in pieces} == {(0, img), (1, txt)}
    for i, producer in enumerate([img, txt]):
        for device in comm.slices[fuse].devices:  # dp 4: device d needs samples [2r, 2r + 2)
            rows = sorted((p.start, p.stop, p.src) for p in pieces if p.input == i and p.dst == device)
            r = comm.slices[fuse].devices.index(device)
            assert [(a, b) for a, b, _ in rows] == [(2 * r, 2 * r + 2)]
            owner = comm.slices[producer].devices[(2 * r) // (8 // comm.slices[producer].dp_degree)]
            assert rows[0][2] == owner
    # backward: the same pieces, gradients from the consumer back to each input's producer
    for device in plan.waves[0].slices[0].devices + plan.waves[0].slices[1].devices:
        sends, receives = comm.backward_pieces_for(1, device)
        assert receives == [p for p in pieces if device in p.src_group]
        assert {p.input for p in receives} == ({0} if device in comm.slices[img].devices else {1})


def test_inputs_are_concatenated_in_the_order_of_after():
    for after, want in ((["img", "txt"], [0, 1]), (["txt", "img"], [1, 0])):
        job = fusion_job(after)
        graph = build_metagraph(job)
        fuse = graph.metaops[2]
        assert fuse.deps == (0, 1)  # the plan lists dependencies by id, whatever the after: order
        assert input_order(job, graph, fuse.id) == want
        assert input_order(job, graph, 0) == [] and input_order(job, graph, 1) == []


def test_a_plan_read_back_from_json_gives_the_same_pieces():
    """Every worker derives its schedule from the plan file: the pieces (inputs included) survive the round trip."""
    job = fusion_job(["txt", "img"])
    plan = plan_of(job, [[("vqa.img", 1, 2), ("vqa.txt", 1, 2)], [("vqa.fuse", 2, 4)]])
    a, b = CommSchedule(plan), CommSchedule(plan_from_json(plan.to_json()))
    assert a.forward_pieces == b.forward_pieces
    assert {p.input for p in a.forward_pieces[1]} == {0, 1}
