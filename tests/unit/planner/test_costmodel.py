"""Cost models: curves (valid counts, decreasing times, layouts, memory), ZeRO-1 bytes, collectives, profiled fits."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from planner.components import LayerSegment
from planner.costmodel import (
    AnalyticCostModel, Curve, Layout, ProfiledCostModel, fit_piecewise, profile_key,
)
from planner.devices import DEVICES, GIB, Hardware
from planner.errors import PlanningError, SpecError
from planner.metagraph import MetaOp

A800 = DEVICES["a800"]


def hardware(num_nodes: int = 1, devices_per_node: int = 8, memory_gib: float = 80.0) -> Hardware:
    return Hardware(A800, num_nodes, devices_per_node, memory_gib * GIB, 200e9, 50e9)


def make_op(*, flops: float = 1e11, params: float = 1e6, act: float = 1e6, out: float = 1e5, tp_comm: float = 2e5,
            kernels: int = 10, layers: int = 4, batch: int = 16, frozen: bool = False, backward: float | None = None,
            recompute: bool = False, tp: tuple[int, ...] = (1,), key: str = "layer", name: str = "t.enc") -> MetaOp:
    seg = LayerSegment(key, layers, flops, params, act, out, tp_comm, kernels)
    bwd = backward if backward is not None else (0.0 if frozen else 2.0)
    return MetaOp(0, name, "t", "enc", seg, layers, batch, (), "enc", frozen, bwd, allowed_tp=tp, recompute=recompute)


def compute_bound_time(op: MetaOp, local_batch: int, passes: float, tp: int = 1) -> float:
    """The analytic time of a compute-bound layer by hand: launches plus FLOPs at peak x efficiency."""
    return (op.layer.num_kernels * passes * A800.launch_s
            + op.layer.flops_fwd * local_batch * passes / tp / (A800.peak_flops * A800.efficiency))


# --------------------------------------------------------------------------- Curve


def test_curve_lookup_and_speedup():
    curve = Curve((2, 4), (1.0, 0.6), (Layout(2, 1), Layout(4, 1)), (10.0, 5.0))
    assert curve.time(4) == 0.6 and curve.layout(2) == Layout(2, 1)
    with pytest.raises(KeyError, match="not a valid device count"):
        curve.time(3)
    # speed-up relative to "1 device" = counts[0] * times[0] = 2; linear between (0, 0), (2, 2), (4, 3.33).
    assert curve.speedup(0) == 0.0
    assert curve.speedup(1) == pytest.approx(1.0)
    assert curve.speedup(2) == pytest.approx(2.0)
    assert curve.speedup(3) == pytest.approx((2.0 + 2 / 0.6) / 2)
    assert curve.speedup(100) == pytest.approx(2 / 0.6)


def test_layout_num_devices():
    assert Layout(3, 4).num_devices == 12


# --------------------------------------------------------------------------- analytic curves


@pytest.mark.parametrize("batch, expected", [(16, (1, 2, 4, 8)), (12, (1, 2, 3, 4, 6)), (7, (1, 7)), (5, (1, 5))])
def test_valid_counts_are_those_whose_dp_divides_the_batch(batch, expected):
    cm = AnalyticCostModel(hardware())
    curve = cm.curve(make_op(batch=batch))
    assert curve.counts == expected
    assert all(lay == Layout(n, 1) for n, lay in zip(curve.counts, curve.layouts))


def test_curve_times_strictly_decrease_and_match_hand_formula():
    cm = AnalyticCostModel(hardware())
    op = make_op(batch=16)
    curve = cm.curve(op)
    assert list(curve.counts) == sorted(curve.counts)
    assert all(a > b for a, b in zip(curve.times, curve.times[1:]))
    for n, t in zip(curve.counts, curve.times):
        assert t == pytest.approx(compute_bound_time(op, 16 // n, passes=3.0))


def test_counts_that_are_no_faster_are_dropped():
    # Batch 1: more devices need tensor parallelism; with heavy all-reduces, tp 2 is slower than one device.
    cm = AnalyticCostModel(hardware())
    op = make_op(batch=1, flops=1e11, tp_comm=1e10, tp=(1, 2), key="heavy_comm")
    assert cm.layout_time(op, Layout(1, 2)) > cm.layout_time(op, Layout(1, 1))
    assert cm.curve(op).counts == (1,)
    cheap_comm = make_op(batch=1, flops=1e11, tp_comm=1.0, tp=(1, 2), key="light_comm")
    assert cm.curve(cheap_comm).counts == (1, 2)


def test_curves_are_cached_per_workload():
    cm = AnalyticCostModel(hardware())
    op = make_op()
    assert cm.curve(op) is cm.curve(replace(op, id=5, name="other.enc", task="other"))
    assert cm.curve(op) is not cm.curve(replace(op, batch_size=8))


def test_frozen_forward_only_is_cheaper_than_trainable_twin():
    cm = AnalyticCostModel(hardware())
    trainable = make_op()
    frozen = make_op(frozen=True)
    input_grads_only = make_op(frozen=True, backward=1.0)
    t_train, t_frozen, t_inputs = (cm.curve(o) for o in (trainable, frozen, input_grads_only))
    assert t_frozen.counts == t_train.counts == t_inputs.counts
    for n in t_train.counts:
        assert t_frozen.time(n) < t_inputs.time(n) < t_train.time(n)
        assert t_frozen.time(n) == pytest.approx(compute_bound_time(frozen, 16 // n, passes=1.0))
        assert t_inputs.time(n) == pytest.approx(compute_bound_time(frozen, 16 // n, passes=2.0))
        # Forward-only layers hold no gradients or optimizer state and keep only their outputs.
        assert t_frozen.memory[t_frozen.index(n)] < t_train.memory[t_train.index(n)]


def test_recompute_costs_one_more_forward_and_saves_only_inputs():
    cm = AnalyticCostModel(hardware())
    plain, ckpt = make_op(act=5e6, out=1e5), make_op(act=5e6, out=1e5, recompute=True)
    assert cm.passes(plain) == 3.0 and cm.passes(ckpt) == 4.0
    lay = Layout(4, 1)
    assert cm.layout_time(ckpt, lay) == pytest.approx(compute_bound_time(ckpt, 4, passes=4.0))
    assert cm.layout_time(ckpt, lay) / cm.layout_time(plain, lay) == pytest.approx(4 / 3)
    assert cm.activation_bytes(plain, lay) == pytest.approx(5e6 * 4)
    # the checkpoint keeps the layer's input: the float32 stream, twice its bf16 bytes across devices (out_bytes)
    assert cm.activation_bytes(ckpt, lay) == pytest.approx(1e5 * 2 * 4)
    # The curve of a recomputed twin differs (time and memory), even though the layer key is the same.
    assert cm.curve(ckpt).time(4) > cm.curve(plain).time(4)
    assert cm.curve(ckpt).memory[cm.curve(ckpt).index(4)] < cm.curve(plain).memory[cm.curve(plain).index(4)]


def test_activation_and_param_bytes_split_over_tensor_parallel():
    cm = AnalyticCostModel(hardware())
    op = make_op(params=1e6, act=3e6, batch=16)
    assert cm.local_batch(op, Layout(3, 1)) == 6  # ceil(16/3)
    assert cm.activation_bytes(op, Layout(2, 4)) == pytest.approx(3e6 * 8 / 4)
    # bf16 (the default): fp32 weight, its bf16 copy and fp32 gradient, and 1/dp of the ZeRO-1 master and AdamW state
    assert cm.param_bytes(op, Layout(2, 4)) == pytest.approx(1e6 * (4 + 2 + 4 + (4 + 8) / 2) / 4)
    assert cm.layer_memory(op, Layout(2, 4)) == pytest.approx(1e6 * 16 / 4 + 3e6 * 2)


# --------------------------------------------------------------------------- tensor parallelism


def test_tensor_parallel_layouts_only_for_allowed_degrees_within_a_node():
    op = make_op(batch=2, tp=(1, 2, 4))
    one_node = AnalyticCostModel(hardware(1, 8))
    assert one_node.layouts(op, 8) == [Layout(2, 4)]
    assert set(one_node.layouts(op, 4)) == {Layout(2, 2), Layout(1, 4)}
    assert one_node.layouts(op, 2) == [Layout(2, 1), Layout(1, 2)]
    assert one_node.layouts(op, 3) == []  # dp 3 does not divide 2, tp 3 is not allowed
    two_small_nodes = AnalyticCostModel(hardware(2, 2))
    assert two_small_nodes.layouts(op, 8) == []  # would need tp 4 > 2 devices per node
    assert two_small_nodes.layouts(op, 4) == [Layout(2, 2)]
    dp_only = AnalyticCostModel(hardware(1, 8))
    assert dp_only.layouts(make_op(batch=2), 4) == []


def test_tensor_parallel_extends_a_curve_beyond_the_batch():
    op = make_op(batch=2, tp=(1, 2, 4), tp_comm=1e3)
    curve = AnalyticCostModel(hardware(1, 8)).curve(op)
    assert curve.counts == (1, 2, 4, 8)
    for n, lay in zip(curve.counts, curve.layouts):
        assert lay.num_devices == n and lay.tp_degree in (1, 2, 4) and 2 % lay.dp_degree == 0
    assert curve.layout(8) == Layout(2, 4)
    # Two nodes of four: 8 devices as dp 2 x tp 4, each tp group inside a node.
    assert AnalyticCostModel(hardware(2, 4)).curve(op).layout(8) == Layout(2, 4)
    # Four nodes of two: 8 devices would need tp 4 > 2 per node or dp 4 > batch: no valid layout.
    assert AnalyticCostModel(hardware(4, 2)).curve(op).counts == (1, 2, 4)


def test_tensor_parallel_adds_all_reduce_time():
    cm = AnalyticCostModel(hardware())
    b, tp = 4, 2
    with_comm, without = make_op(tp=(1, 2), tp_comm=8e6), make_op(tp=(1, 2), tp_comm=0.0)
    lay = Layout(b, tp)
    # Two all-reduces in forward and two in backward, each of half the per-sample bytes times the local batch.
    extra = 4 * cm.allreduce_time(8e6 / 2 * b, tp, cross_node=False)
    assert extra > 0
    assert cm.layout_time(with_comm, lay) == pytest.approx(cm.layout_time(without, lay) + extra)
    assert cm.layout_time(without, lay) == pytest.approx(compute_bound_time(without, b, 3.0, tp=tp))
    frozen_comm, frozen = make_op(tp=(1, 2), tp_comm=8e6, frozen=True), make_op(tp=(1, 2), tp_comm=0.0, frozen=True)
    assert cm.layout_time(frozen_comm, lay) == pytest.approx(
        cm.layout_time(frozen, lay) + 2 * cm.allreduce_time(8e6 / 2 * b, tp, cross_node=False))


# --------------------------------------------------------------------------- memory


def test_layer_that_cannot_fit_raises_planning_error_naming_metaop():
    cm = AnalyticCostModel(hardware(memory_gib=1.0))
    op = make_op(params=1e9, frozen=True, name="vqa.giant")  # 4 GB of fp32 frozen weights per layer, no TP
    with pytest.raises(PlanningError) as info:
        cm.curve(op)
    msg = str(info.value)
    assert msg.startswith("MetaOp vqa.giant: no valid device count")
    assert "3.7 GiB" in msg and "1.0 GiB" in msg  # needs 4e9 B = 3.73 GiB, has 1 GiB
    assert "tensor_parallel" in msg and "\n" not in msg


def test_tensor_parallel_makes_a_large_layer_fit():
    cm = AnalyticCostModel(hardware(memory_gib=1.0))
    op = make_op(params=1e9, frozen=True, tp=(1, 4), batch=4)
    curve = cm.curve(op)
    assert curve.counts and all(lay.tp_degree == 4 for lay in curve.layouts)
    assert all(m <= 1.0 * GIB for m in curve.memory)


def test_whole_metaop_memory_preference():
    # 20M trainable params per layer (bf16, AdamW): 18 B/param at dp 1 (360 MB), 16 at dp 2 (320 MB), 13 at dp 4
    # (260 MB), 11.5 at dp 8 (230 MB).
    cm = AnalyticCostModel(hardware(memory_gib=1.0))
    common = dict(params=20e6, act=1.0, out=1.0, batch=8)
    # One layer: the whole MetaOp fits in 1 GiB at every count.
    assert cm.curve(make_op(layers=1, **common)).counts == (1, 2, 4, 8)
    # Four layers must fit in 1 GiB together (268 MB each): only dp >= 4 can hold all of them on a device.
    four = cm.curve(make_op(layers=4, **common))
    assert four.counts == (4, 8)
    assert all(4 * m <= GIB for m in four.memory)
    # Forty layers fit nowhere as a whole: fall back to counts where one layer fits, placement judges the rest.
    assert cm.curve(make_op(layers=40, **common)).counts == (1, 2, 4, 8)


def test_zero1_param_bytes():
    """What the runtime holds per parameter element: fp32 weight (+ a bf16 copy under bf16), fp32 gradient, AdamW's
    m and v; ZeRO-1 over dp > 1 holders keeps 1/dp of the state beside an fp32 master of that share."""
    cm = AnalyticCostModel(hardware())  # bf16, AdamW, shard_optimizer
    trainable, frozen = make_op(params=1e6), make_op(params=1e6, frozen=True)
    assert cm.bytes_per_param(trainable, Layout(1, 1)) == 4 + 2 + 4 + 8  # alone: the weight is the master
    for dp in (2, 4, 8):
        assert cm.bytes_per_param(trainable, Layout(dp, 1)) == pytest.approx(10 + 12 / dp)
        assert cm.param_bytes(trainable, Layout(dp, 1)) == pytest.approx(1e6 * (10 + 12 / dp))
    for dp in (1, 2, 4, 8):  # fp32 weights; the bf16 copy only where backward passes through (saved for it)
        assert cm.bytes_per_param(frozen, Layout(dp, 1)) == 4
    assert cm.bytes_per_param(make_op(params=1e6, frozen=True, backward=1.0), Layout(2, 1)) == 6
    unsharded = AnalyticCostModel(hardware(), shard_optimizer=False)
    for dp in (1, 4):
        assert unsharded.bytes_per_param(trainable, Layout(dp, 1)) == 18
        assert unsharded.bytes_per_param(frozen, Layout(dp, 1)) == 4
    assert unsharded.param_bytes(trainable, Layout(2, 2)) == pytest.approx(1e6 * 18 / 2)


@pytest.mark.parametrize("precision, optimizer, alone, sharded_by_4", [
    ("fp32", "adamw", 4 + 4 + 8, 8 + (4 + 8) / 4),
    ("fp32", "sgd", 4 + 4, 8 + 4 / 4),
    ("bf16", "sgd", 4 + 2 + 4, 10 + 4 / 4),
])
def test_param_bytes_follow_the_precision_and_the_optimizer(precision, optimizer, alone, sharded_by_4):
    cm = AnalyticCostModel(hardware(), precision=precision, optimizer=optimizer)
    trainable, frozen = make_op(params=1e6), make_op(params=1e6, frozen=True)
    assert cm.bytes_per_param(trainable, Layout(1, 1)) == alone
    assert cm.bytes_per_param(trainable, Layout(4, 1)) == pytest.approx(sharded_by_4)
    assert cm.bytes_per_param(frozen, Layout(4, 1)) == 4


def test_the_jobs_cost_model_takes_its_precision_and_optimizer(tmp_path):
    from planner.api import make_cost_model
    from planner.spec import parse_job

    job = parse_job({"name": "m", "cluster": {"device": "cpu", "devices_per_node": 2},
                     "components": {"a": {"kind": "mlp", "num_layers": 1, "hidden_size": 8}},
                     "tasks": [{"name": "t", "batch_size": 2, "components": [{"component": "a"}]}],
                     "training": {"precision": "fp32", "optimizer": "sgd"}})
    cm = make_cost_model(job)
    assert (cm.precision, cm.optimizer) == ("fp32", "sgd")
    assert cm.bytes_per_param(make_op(params=1.0), Layout(1, 1)) == 8


# --------------------------------------------------------------------------- communication


def test_allreduce_time_is_the_ring_formula():
    hw = hardware(2, 4)
    cm = AnalyticCostModel(hw)
    nbytes, n = 1e9, 4
    intra = 2 * (n - 1) * A800.intra_latency_s + 2 * (n - 1) / n * nbytes / 200e9
    inter = 2 * (n - 1) * A800.inter_latency_s + 2 * (n - 1) / n * nbytes / 50e9
    assert cm.allreduce_time(nbytes, n, cross_node=False) == pytest.approx(intra)
    assert cm.allreduce_time(nbytes, n, cross_node=True) == pytest.approx(inter)
    assert cm.allreduce_time(nbytes, n, cross_node=True) > cm.allreduce_time(nbytes, n, cross_node=False)
    assert cm.allreduce_time(nbytes, 1, cross_node=False) == 0.0
    assert cm.allreduce_time(0.0, 8, cross_node=True) == 0.0
    # 2(n-1)/n of the data crosses each link: 8 devices move more than 2 (1.75x vs 1x of the bytes).
    assert cm.allreduce_time(1e9, 8, False) > cm.allreduce_time(1e9, 2, False)


def test_allgather_time_is_the_ring_formula_half_an_allreduce():
    cm = AnalyticCostModel(hardware(2, 4))
    nbytes, n = 1e9, 4
    intra = (n - 1) * A800.intra_latency_s + (n - 1) / n * nbytes / 200e9
    inter = (n - 1) * A800.inter_latency_s + (n - 1) / n * nbytes / 50e9
    assert cm.allgather_time(nbytes, n, cross_node=False) == pytest.approx(intra)
    assert cm.allgather_time(nbytes, n, cross_node=True) == pytest.approx(inter)
    # a ring all-reduce is a reduce-scatter plus an all-gather of the same tensor
    assert cm.allgather_time(nbytes, n, cross_node=True) == pytest.approx(cm.allreduce_time(nbytes, n, True) / 2)
    assert cm.allgather_time(nbytes, 1, cross_node=False) == 0.0
    assert cm.allgather_time(0.0, 8, cross_node=True) == 0.0


def test_p2p_and_optimizer_time():
    cm = AnalyticCostModel(hardware())
    assert cm.p2p_time(2e9, cross_node=False) == pytest.approx(A800.intra_latency_s + 2e9 / 200e9)
    assert cm.p2p_time(2e9, cross_node=True) == pytest.approx(A800.inter_latency_s + 2e9 / 50e9)
    assert cm.p2p_time(0, cross_node=True) == 0.0
    assert cm.optimizer_time(1e9) == pytest.approx(1e9 * 32 / A800.mem_bandwidth)


# --------------------------------------------------------------------------- piecewise fit and profiled costs


def test_fit_piecewise_interpolates_and_extrapolates_linearly():
    pts = [(1.0, 1.0), (2.0, 1.5), (4.0, 2.5), (8.0, 6.5)]
    assert fit_piecewise(pts, 1) == pytest.approx(1.0)
    assert fit_piecewise(pts, 4) == pytest.approx(2.5)
    assert fit_piecewise(pts, 3) == pytest.approx(2.0)
    assert fit_piecewise(pts, 6) == pytest.approx(4.5)
    assert fit_piecewise(pts, 16) == pytest.approx(6.5 + 8 * 1.0)  # last segment's slope, 1 s per sample
    assert fit_piecewise(pts, 0.5) == pytest.approx(0.75)  # first segment's slope, 0.5 s per sample
    assert fit_piecewise([(1.0, 1.0), (2.0, 3.0)], -10) == pytest.approx(1e-9)  # never zero or negative


def test_fit_piecewise_single_point_is_proportional():
    assert fit_piecewise([(4.0, 2.0)], 8) == pytest.approx(4.0)
    assert fit_piecewise([(4.0, 2.0)], 1) == pytest.approx(0.5)


def test_profile_key_names_workload_backward_and_tp():
    op = make_op(key="vit[h=64]", frozen=True, backward=1.0)
    assert profile_key(op, Layout(2, 4)) == "vit[h=64]|bwd=1|tp=4"
    assert profile_key(make_op(key="x"), Layout(1, 1)) == "x|bwd=2|tp=1"


def write_costs(tmp_path, points: dict, device: str | None = None) -> str:
    """A cost file of ``points`` profiled on ``device`` (default: the device of :func:`hardware`)."""
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"version": 1, "device": device or hardware().device.name, "points": points}))
    return str(path)


def test_a_cost_file_of_another_device_kind_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"device \('cpu'\) is not the job's cluster.device \('a800'\)"):
        ProfiledCostModel.load(write_costs(tmp_path, {}, device="cpu"), hardware())


def test_profiled_curve_uses_points_per_key(tmp_path):
    op = make_op(batch=16)
    # Local batch 16, 8, 4, 2 on 1, 2, 4, 8 devices; 0.1 s fixed plus 0.05 s per sample, given out of order.
    pts = [[16, 0.9], [2, 0.2], [8, 0.5]]
    cm = ProfiledCostModel.load(write_costs(tmp_path, {profile_key(op, Layout(1, 1)): pts}), hardware())
    assert cm.source == "profiled"
    curve = cm.curve(op)
    assert curve.counts == (1, 2, 4, 8)
    assert curve.times == pytest.approx((0.9, 0.5, 0.3, 0.2))


def test_profiled_falls_back_to_analytic(tmp_path):
    hw = hardware()
    analytic = AnalyticCostModel(hw)
    op, other = make_op(key="a"), make_op(key="b")
    cm = ProfiledCostModel.load(write_costs(tmp_path, {profile_key(other, Layout(1, 1)): [[1, 1.0]]}), hw,
                                fallback=analytic)
    assert cm.curve(op).times == pytest.approx(analytic.curve(op).times)
    assert cm.layout_time(other, Layout(2, 1)) == pytest.approx(8.0)  # local batch 8 at 1 s per sample


def test_profiled_without_fallback_names_the_metaop(tmp_path):
    cm = ProfiledCostModel.load(write_costs(tmp_path, {}), hardware())
    with pytest.raises(PlanningError) as info:
        cm.curve(make_op(key="enc[h=8]", name="cap.enc"))
    msg = str(info.value)
    assert msg.startswith("MetaOp cap.enc: the cost file has no points for 'enc[h=8]|bwd=2|tp=1'")
    assert "loom profile" in msg


def test_profiled_load_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such cost file"):
        ProfiledCostModel.load(tmp_path / "absent.json", hardware())


@pytest.mark.parametrize(
    "text",
    ["not json {", json.dumps({"version": 1}), json.dumps({"points": [1, 2]}), json.dumps([1, 2]),
     json.dumps({"points": {"k": [[1]]}}), json.dumps({"points": {"k": [["a", "b"]]}}),
     json.dumps({"points": {"k": 3}})],
)
def test_profiled_load_malformed_file(tmp_path, text):
    path = tmp_path / "costs.json"
    path.write_text(text)
    with pytest.raises(SpecError, match="not a profiled cost file") as info:
        ProfiledCostModel.load(path, hardware())
    assert str(path) in str(info.value)


def test_gradient_bytes_follow_the_training_precision():
    from planner.api import make_cost_model
    from planner.spec import parse_job

    def job(precision):
        return parse_job({"name": "p", "cluster": {"device": "cpu", "devices_per_node": 2},
                          "components": {"c": {"kind": "mlp", "num_layers": 1, "hidden_size": 8}},
                          "tasks": [{"name": "t", "batch_size": 2, "components": [{"component": "c"}]}],
                          "training": {"precision": precision}})

    assert make_cost_model(job("bf16")).grad_bytes == 2
    assert make_cost_model(job("fp32")).grad_bytes == 4


def test_moved_bytes_are_what_the_runtime_sends(tmp_path):
    """Activations cross devices in the job's precision (2 bytes at bf16, 4 at fp32), for the analytic model and for a
    profiled one alike; parameters (ZeRO-1's all-gather, hand-offs) move as the runtime holds them, float32."""
    from planner.api import make_cost_model
    from planner.spec import parse_job

    def job(precision):
        return parse_job({"name": "p", "cluster": {"device": "cpu", "devices_per_node": 2},
                          "components": {"c": {"kind": "mlp", "num_layers": 1, "hidden_size": 8}},
                          "tasks": [{"name": "t", "batch_size": 2, "components": [{"component": "c"}]}],
                          "training": {"precision": precision}})

    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"version": 1, "device": "cpu", "points": {}}))
    assert AnalyticCostModel(hardware()).weight_bytes == 2
    assert make_cost_model(job("bf16")).weight_bytes == 2
    assert make_cost_model(job("fp32")).weight_bytes == 4
    assert make_cost_model(job("fp32"), costs).weight_bytes == 4
    assert make_cost_model(job("bf16"), costs).weight_bytes == 2
    # parameters move as the runtime holds them, float32 in every precision (ZeRO-1 gather, hand-offs)
    assert {make_cost_model(job(p)).param_bytes_moved for p in ("bf16", "fp32")} == {4}
