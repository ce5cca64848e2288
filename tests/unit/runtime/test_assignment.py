"""The runtime's view of a plan's program (a fusion: a use with several inputs): what it reads from the pieces, and
the order the inputs are concatenated in (no processes). The rules themselves: tests/unit/planner/test_program.py."""

from __future__ import annotations

from planner.api import plan_schedule
from planner.metagraph import build_metagraph
from planner.plan import plan_from_json
from planner.schedule import Schedule, Slice, Wave
from planner.spec import parse_job
from runtime.assignment import LOSS_WAVE, CommSchedule, input_order


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


def test_the_schedule_reads_inputs_loss_hosts_and_boundaries_from_the_plans_pieces():
    """The runtime derives nothing: a slice's inputs, the loss hosts and each boundary's pieces (in the plan's order)
    are read from Plan.pieces, which planner.program wrote."""
    job = fusion_job(["img", "txt"])
    plan = plan_of(job, [[("vqa.img", 1, 2), ("vqa.txt", 1, 1)], [("vqa.fuse", 1, 4)], [("vqa.fuse", 1, 2)]])
    comm = CommSchedule(plan)
    first, second = comm.by_metaop[2]
    assert comm.num_inputs(first) == 2 and comm.num_inputs(second) == 1  # the rest of a MetaOp reads its first part
    assert comm.num_inputs(comm.by_metaop[0][0]) == 0  # a root reads raw data
    assert [(h.task, h.host, h.leaves) for h in comm.loss_hosts] == [("vqa", second, (second,))]
    for wave in (1, 2, LOSS_WAVE):
        for backward in (False, True):
            want = [p for p in plan.pieces if p.wave == wave and p.backward == backward]
            assert want and comm.pieces_at(wave, backward) == want


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
    assert a.forward_pieces == b.forward_pieces and a.backward_pieces == b.backward_pieces
    assert a.loss_hosts == b.loss_hosts and {p.input for p in a.forward_pieces[1]} == {0, 1}
