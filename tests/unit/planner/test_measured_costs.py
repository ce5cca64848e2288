"""Measured work outside the layers (MeasuredCosts): root embeddings in their wave, the loss stage between the
last forward and the first backward, the measured AdamW rate and links (ZeRO-1's all-gather measured or derived
from the all-reduce), against hand math; none of it without a profile (the analytic model's predictions stay as
they were)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from planner.components import LayerSegment
from planner.costmodel import AnalyticCostModel, Layout, ProfiledCostModel, MeasuredCosts, profile_key
from planner.devices import DEVICES, GIB, Hardware
from planner.errors import SpecError
from planner.metagraph import MetaOp, finalize_graph
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave
from planner.schedule import Problem
from planner.simulator import loss_stage_seconds, simulate, split_passes

HW = Hardware(DEVICES["cpu"], 1, 2, 8 * GIB, 5e9, 5e9)
LAYER_S = {1: 0.010, 2: 0.006}  # seconds per layer at local batch 8 (one device) and 4 (two devices)


def op(m: int, task: str, deps: tuple[int, ...] = ()) -> MetaOp:
    seg = LayerSegment(f"layer{m}", 2, 1e9, 1e5, 1e5, 1e4, 0.0, 4)
    return MetaOp(m, f"{task}.enc{m}", task, f"enc{m}", seg, 2, 8, deps, f"enc{m}", False, 2.0)


def cost_model(ops: list[MetaOp], overheads: MeasuredCosts | None) -> ProfiledCostModel:
    points = {profile_key(o, Layout(1, 1)): [(4, LAYER_S[2]), (8, LAYER_S[1])] for o in ops}
    return ProfiledCostModel(HW, points, shard_optimizer=False, grad_bytes=4, measured=overheads)


OVERHEADS = MeasuredCosts(
    embed={"a.enc0": [(4.0, 0.002), (8.0, 0.003)]},
    head={"a": [(4.0, 0.001), (8.0, 0.0015)], "b": [(8.0, 0.004)]},
    optimizer_s_per_param=1e-8,
)


def two_tasks() -> tuple[list[MetaOp], PlacedSchedule]:
    """Task a: a chain enc0 -> enc1 (wave 0 on both devices, then wave 1 on device 0); task b: enc2 on device 1."""
    ops = [op(0, "a"), op(1, "a", (0,)), op(2, "b")]
    waves = [
        [PlacedSlice(0, 0, 2, (0, 1), Layout(2, 1))],
        [PlacedSlice(1, 0, 2, (0,), Layout(1, 1)), PlacedSlice(2, 0, 2, (1,), Layout(1, 1))],
    ]
    return ops, PlacedSchedule(tuple(PlacedWave(tuple(w)) for w in waves))


def test_embedding_joins_its_root_slice_and_heads_form_the_loss_stage():
    ops, placed = two_tasks()
    problem = Problem.build(finalize_graph(ops), cost_model(ops, OVERHEADS))
    sim = simulate(problem, placed, cost_model(ops, OVERHEADS))
    # wave 0: enc0 on 2 devices (local batch 4) plus its data and embedding at batch 4
    assert sim.wave_durations[0] == pytest.approx(2 * LAYER_S[2] + 0.002)
    # wave 1: enc1 has an upstream MetaOp (no embedding); enc2 is a root without a measured embedding
    assert sim.wave_durations[1] == pytest.approx(2 * LAYER_S[1])
    # loss hosts: a on device 0 (local batch 8), b on device 1: the busiest device sets the stage
    assert sim.loss_s == pytest.approx(max(0.0015, 0.004))
    assert sim.compute_s == pytest.approx(sum(sim.wave_durations) + sim.loss_s)
    assert sim.iteration_time_s == pytest.approx(
        sim.compute_s + sim.transfer_s + sim.sync_s + sim.optimizer_s + sim.gather_s)


def test_loss_stage_runs_between_the_last_forward_and_the_first_backward():
    """Adding the loss stage delays the end of every backward by exactly its length: the whole iteration (with
    nothing to sync and nothing hidden behind backward) grows by the stage."""
    ops, placed = two_tasks()
    without = MeasuredCosts(embed=OVERHEADS.embed, optimizer_s_per_param=OVERHEADS.optimizer_s_per_param)
    base = simulate(Problem.build(finalize_graph(ops), cost_model(ops, without)), placed, cost_model(ops, without))
    full = simulate(Problem.build(finalize_graph(ops), cost_model(ops, OVERHEADS)), placed, cost_model(ops, OVERHEADS))
    assert base.loss_s == 0
    assert full.iteration_time_s - base.iteration_time_s == pytest.approx(full.loss_s)
    assert split_passes(ops[0], 0.03) == pytest.approx((0.01, 0.02))  # forward is a third of a trained layer


def test_a_profiled_forward_share_splits_slices_and_curves():
    """The forward's measured share of a layer's time (the cost file's ``forward``) splits each slice between its
    passes, in the simulator and in the curves the searches read; beyond the measured batches the nearest one's; by
    passes (a third of a trained layer) under recompute and without a share."""
    ops, placed = two_tasks()
    shares = {profile_key(ops[0], Layout(1, 1)): [(8.0, 0.45)]}  # measured at local batch 8 only
    model = ProfiledCostModel(HW, cost_model(ops, None).points, shard_optimizer=False, grad_bytes=4, forward=shares)
    assert model.forward_fraction(ops[0], Layout(1, 1)) == pytest.approx(0.45)
    assert model.forward_fraction(ops[0], Layout(2, 1)) == pytest.approx(0.45)  # local batch 4: the nearest share
    assert model.forward_fraction(ops[1], Layout(1, 1)) == pytest.approx(1 / 3)  # another workload: no share
    assert model.forward_fraction(replace(ops[0], recompute=True), Layout(1, 1)) == pytest.approx(1 / 4)
    assert cost_model(ops, None).forward_fraction(ops[0], Layout(1, 1)) == pytest.approx(1 / 3)
    two = ProfiledCostModel(HW, model.points, forward={profile_key(ops[0], Layout(1, 1)): [(4.0, 0.5), (12.0, 0.3)]})
    assert two.forward_fraction(ops[0], Layout(1, 1)) == pytest.approx(0.4)  # between two batches: linear
    problem = Problem.build(finalize_graph(ops), model)
    assert problem.curves[0].forward == (0.45, 0.45)  # counts 1 and 2
    sim = simulate(problem, placed, model)
    assert sim.slice_passes[0][0] == pytest.approx((0.45 * 2 * LAYER_S[2], 0.55 * 2 * LAYER_S[2]))
    assert sim.slice_passes[1][0] == pytest.approx((2 * LAYER_S[1] / 3, 4 * LAYER_S[1] / 3))
    assert split_passes(ops[0], 1.0, model, Layout(1, 1)) == pytest.approx((0.45, 0.55))


def test_a_calibrated_profile_scales_each_part_by_its_ratio():
    """A cost file's ``calibration`` (orchestrator.calibrate: the runtime's measured over the profile's predicted)
    multiplies the layers, embeddings and data draws by ``compute``, the loss heads by ``loss`` and the optimizer step
    by ``optimizer``; the analytic fallback's times stay as they are."""
    ops, _ = two_tasks()
    plain = cost_model(ops, replace(OVERHEADS, data={"a": [(8.0, 0.001)]}, optimizer=(1e-4, 1e-9, 1e-6)))
    fallback = AnalyticCostModel(HW)
    layout = Layout(1, 1)
    first = {profile_key(ops[0], layout): plain.points[profile_key(ops[0], layout)]}  # ops[1]: no points
    calibrated = ProfiledCostModel(HW, first, fallback, measured=plain.measured,
                                   calibration={"compute": 1.25, "loss": 2.0, "optimizer": 0.5})
    assert calibrated.layout_time(ops[0], layout) == pytest.approx(1.25 * plain.layout_time(ops[0], layout))
    assert calibrated.embed_time(ops[0], 8) == pytest.approx(1.25 * plain.embed_time(ops[0], 8))
    assert calibrated.data_time("a", 8) == pytest.approx(1.25 * plain.data_time("a", 8)) and plain.data_time("a", 8)
    assert calibrated.head_time("a", 8) == pytest.approx(2.0 * plain.head_time("a", 8))
    assert calibrated.optimizer_time(1e6, 10) == pytest.approx(0.5 * plain.optimizer_time(1e6, 10))
    assert calibrated.layout_time(ops[1], layout) == pytest.approx(fallback.layout_time(ops[1], layout))


def test_loss_host_is_the_last_slice_of_the_leaves_on_its_first_tp_devices():
    ops = [op(0, "a"), op(1, "a", (0,))]
    cm = cost_model(ops, MeasuredCosts(head={"a": [(2.0, 0.001), (4.0, 0.002)]}))
    problem = Problem.build(finalize_graph(ops), cm)
    # enc1 split over waves 0 and 1: the loss follows its last slice, data parallel over both devices (batch 4 each)
    placed = PlacedSchedule((
        PlacedWave((PlacedSlice(0, 0, 2, (0,), Layout(1, 1)),)),
        PlacedWave((PlacedSlice(1, 0, 1, (1,), Layout(1, 1)),)),
        PlacedWave((PlacedSlice(1, 1, 1, (0, 1), Layout(2, 1)),)),
    ))
    assert loss_stage_seconds(problem, placed, cm) == pytest.approx(0.002)


def test_each_device_draws_a_tasks_rows_once_at_their_first_reader():
    """Data drawn (MeasuredCosts.data) at a device's first event that reads the task's rows: a root with input
    modules, else the loss head; a head on a device that drew the same rows (same data-parallel degree and rank)
    draws nothing more."""
    ops, placed = two_tasks()
    ops = [replace(ops[0], input_modules=("embed:enc0",)), ops[1], replace(ops[2], input_modules=("embed:enc2",))]
    drawing = MeasuredCosts(head={"a": [(8.0, 0.0005)], "b": [(8.0, 0.004)]},
                            data={"a": [(4.0, 0.001), (8.0, 0.002)], "b": [(8.0, 0.003)]})
    cm = cost_model(ops, drawing)
    sim = simulate(Problem.build(finalize_graph(ops), cm), placed, cm)
    # wave 0: enc0 on both devices draws a's 4 rows each; wave 1: enc1 reads enc0's output (no input modules, no
    # draw), enc2 on device 1 draws b's 8 rows
    assert sim.wave_durations == pytest.approx((2 * LAYER_S[2] + 0.001, 2 * LAYER_S[1] + 0.003))
    # a's head on device 0 reads all 8 rows (data parallel 1), not the 4 drawn in wave 0: it draws them; b's head
    # on device 1 reads the rows enc2 drew there
    assert sim.loss_s == pytest.approx(max(0.0005 + 0.002, 0.004))
    assert sim.iteration_time_s == pytest.approx(
        sim.compute_s + sim.transfer_s + sim.sync_s + sim.optimizer_s + sim.gather_s)
    none = cost_model(ops, replace(drawing, data={}))
    assert simulate(Problem.build(finalize_graph(ops), none), placed, none).iteration_time_s < sim.iteration_time_s


def test_measured_adamw_rate_replaces_the_device_table():
    ops, placed = two_tasks()
    cm = cost_model(ops, OVERHEADS)
    assert cm.optimizer_time(1e6) == pytest.approx(0.01)
    assert cost_model(ops, None).optimizer_time(1e6) == pytest.approx(1e6 * 32 / DEVICES["cpu"].mem_bandwidth)
    sim = simulate(Problem.build(finalize_graph(ops), cm), placed, cm)
    # device 0 holds enc0 and enc1, device 1 enc0 and enc2: 2 layers of 1e5 parameters each, per MetaOp
    assert sim.optimizer_s == pytest.approx(2 * 2 * 1e5 * 1e-8)


def test_a_root_slice_draws_its_data_before_its_forward():
    """The data a root slice draws runs before its forward, on the timeline and in the plan's split of the slice
    (PlanSlice.forward_s, which the predicted trace draws), not in proportion to the slice's passes."""
    ops, placed = two_tasks()
    ops[0] = replace(ops[0], input_modules=("embed:enc0",))
    draw = 0.004
    cm = cost_model(ops, replace(OVERHEADS, data={"a": [(4.0, draw), (8.0, 2 * draw)]}))
    sim = simulate(Problem.build(finalize_graph(ops), cm), placed, cm)
    fwd, bwd = split_passes(ops[0], 2 * LAYER_S[2] + 0.002)  # its layers and its embedding, split by passes
    assert sim.slice_passes[0] == ((pytest.approx(fwd + draw), pytest.approx(bwd)),)
    assert sim.slice_seconds[0] == (pytest.approx(fwd + bwd + draw),)
    assert (sim.phases[0].forward_s, sim.phases[0].backward_s) == (pytest.approx(fwd + draw), pytest.approx(bwd))
    # wave 1: no slice draws (enc1 reads enc0's output, enc2 has no input modules)
    assert all(f + b == pytest.approx(t) for (f, b), t in zip(sim.slice_passes[1], sim.slice_seconds[1]))


def test_without_measured_overheads_nothing_changes():
    ops, placed = two_tasks()
    sim = simulate(Problem.build(finalize_graph(ops), cost_model(ops, None)), placed, cost_model(ops, None))
    assert sim.loss_s == 0
    assert sim.wave_durations == pytest.approx((2 * LAYER_S[2], 2 * LAYER_S[1]))


def test_cost_file_carries_the_overheads_and_rejects_bad_ones(tmp_path):
    ops, _ = two_tasks()
    data = {"version": 1, "device": "cpu", "points": {profile_key(ops[0], Layout(1, 1)): [[8, 0.01]]},
            "embed": {"a.enc0": [[8, 0.003], [4, 0.002]]}, "head": {"a": [[8, 0.0015]]}, "data": {"b": [[8, 0.004]]},
            "optimizer_s_per_param": 2e-9}
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(data))
    cm = ProfiledCostModel.load(path, HW)
    assert cm.measured.embed["a.enc0"] == [(4.0, 0.002), (8.0, 0.003)]
    assert cm.embed_time(ops[0], 8) == pytest.approx(0.003) and cm.embed_time(ops[1], 8) == 0
    assert cm.head_time("a", 8) == pytest.approx(0.0015) and cm.head_time("b", 8) == 0
    assert cm.data_time("b", 8) == pytest.approx(0.004) and cm.data_time("a", 8) == 0
    assert cm.optimizer_time(1e6) == pytest.approx(2e-3)
    data["embed"] = {"a.enc0": [[8]]}
    path.write_text(json.dumps(data))
    with pytest.raises(SpecError, match="not a profiled cost file"):
        ProfiledCostModel.load(path, HW)


def test_measured_links_replace_the_device_table_within_a_node():
    p2p = [(1e4, 3e-4), (1e6, 8e-4)]
    allreduce = [(1e4, 5e-4), (1e6, 1.5e-3)]
    cm = ProfiledCostModel(HW, {}, measured=MeasuredCosts(p2p=p2p, allreduce=allreduce))
    assert cm.p2p_time(1e6, cross_node=False) == pytest.approx(8e-4)
    assert cm.p2p_time(5.05e5, cross_node=False) == pytest.approx(5.5e-4)  # linear between the points
    assert cm.allreduce_time(1e6, 2, cross_node=False) == pytest.approx(1.5e-3)
    # a ring over 4: 3 times the two-process time of half the bytes
    assert cm.allreduce_time(2e6, 4, cross_node=False) == pytest.approx(3 * 1.5e-3)
    plain = ProfiledCostModel(HW, {})
    assert cm.p2p_time(1e6, cross_node=True) == plain.p2p_time(1e6, cross_node=True)
    assert cm.allreduce_time(1e6, 4, cross_node=True) == plain.allreduce_time(1e6, 4, cross_node=True)
    assert cm.allreduce_time(1e6, 1, cross_node=False) == 0


def test_cost_file_links_load():
    data = {"links": {"p2p": [[1e6, 8e-4], [1e4, 3e-4]], "allreduce": [[1e4, 5e-4]]}}
    measured = MeasuredCosts.from_json(data)
    assert measured.p2p == [(1e4, 3e-4), (1e6, 8e-4)] and measured.allreduce == [(1e4, 5e-4)]
    assert measured.allgather == []
    data["links"]["allgather"] = [[1e6, 6e-4], [1e4, 2e-4]]
    assert MeasuredCosts.from_json(data).allgather == [(1e4, 2e-4), (1e6, 6e-4)]
    assert MeasuredCosts.from_json({}) == MeasuredCosts()


def test_measured_allgather_points_scale_like_a_ring():
    allgather = [(1e4, 2e-4), (1e6, 6e-4)]
    cm = ProfiledCostModel(HW, {}, measured=MeasuredCosts(allreduce=[(1e6, 1.5e-3)], allgather=allgather))
    assert cm.allgather_time(1e6, 2, cross_node=False) == pytest.approx(6e-4)  # the points, not the all-reduce's
    # a ring over 4: 3 steps of a quarter, each like two processes gathering half the bytes
    assert cm.allgather_time(2e6, 4, cross_node=False) == pytest.approx(3 * 6e-4)
    plain = ProfiledCostModel(HW, {})
    assert cm.allgather_time(1e6, 4, cross_node=True) == plain.allgather_time(1e6, 4, cross_node=True)
    assert cm.allgather_time(1e6, 1, cross_node=False) == 0


def test_cost_file_without_allgather_points_derives_it_from_the_allreduce(tmp_path):
    """A `loom profile` cost file measures p2p and all-reduce only: ZeRO-1's all-gather takes half the measured
    all-reduce of the same bytes, in the cost model and in a simulated iteration."""
    ops, _ = two_tasks()
    points = {profile_key(o, Layout(1, 1)): [[4, 0.006], [8, 0.01]] for o in ops}
    data = {"version": 1, "device": "cpu", "points": points,
            "optimizer_s_per_param": 1e-8, "links": {"p2p": [[1e4, 3e-4]], "allreduce": [[1e4, 5e-4], [1e6, 1.5e-3]]}}
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(data))
    cm = ProfiledCostModel.load(path, HW, grad_bytes=4, weight_bytes=4)
    assert cm.measured.allgather == []
    assert cm.allgather_time(1e6, 2, cross_node=False) == pytest.approx(1.5e-3 / 2)
    assert cm.allgather_time(2e6, 4, cross_node=False) == pytest.approx(3 * 1.5e-3 / 2)
    # enc0 (2 layers of 1e5 parameters) on both devices: all-reduced, stepped by halves, then gathered in fp32
    placed = PlacedSchedule((PlacedWave((PlacedSlice(0, 0, 2, (0, 1), Layout(2, 1)),)),))
    sim = simulate(Problem.build(finalize_graph(ops[:1]), cm), placed, cm)
    gathered = cm.allreduce_time(4 * 2e5, 2, cross_node=False) / 2
    assert sim.gather_s == pytest.approx(gathered)
    assert sim.optimizer_s == pytest.approx(1e5 * 1e-8)
    assert sim.iteration_time_s == pytest.approx(sim.compute_s + sim.sync_s + sim.optimizer_s + gathered)
    unsharded = ProfiledCostModel.load(path, HW, shard_optimizer=False, grad_bytes=4, weight_bytes=4)
    assert simulate(Problem.build(finalize_graph(ops[:1]), unsharded), placed, unsharded).gather_s == 0
