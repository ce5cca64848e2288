"""What `loom profile` measures of a step outside the layers, and the simulator's use of it: the links' fitted latency
and bandwidth (a larger per-message latency raises the prediction by exactly the exposed all-reduces), the optimizer's
fitted ``a + b params + c tensors`` per device, and input modules and heads sized into the gradient buckets."""

from __future__ import annotations

import json
import re

import pytest

from planner.components import LayerSegment
from planner.costfit import alpha_beta, fit_step, nonneg_lstsq
from planner.costmodel import Layout, MeasuredCosts, ProfiledCostModel, profile_key
from planner.devices import DEVICES, GIB, Hardware
from planner.errors import SpecError
from planner.metagraph import MetaOp, finalize_graph
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave
from planner.schedule import Problem
from planner.simulator import simulate

HW = Hardware(DEVICES["cpu"], 1, 2, 8 * GIB, 5e9, 5e9)
LAYER_PARAMS = 1e5


def test_alpha_beta_recovers_latency_and_bandwidth():
    points = [(n, 4e-4 + n / 2e9) for n in (400.0, 4e4, 1e6, 8e6)]
    alpha, beta = alpha_beta(points)
    assert alpha == pytest.approx(4e-4) and beta == pytest.approx(1 / 2e9)
    assert alpha_beta([(1e6, 2e-3)]) == (0.0, pytest.approx(2e-9))  # one point: a line through the origin
    # a time that falls with size would need a negative bandwidth term: held at 0, the latency lies between the times
    alpha, beta = alpha_beta([(1e3, 2e-3), (1e6, 1e-3)])
    assert 1e-3 < alpha < 2e-3 and beta == 0.0
    # relative errors: a noisy large message does not push the latency of small ones to 0
    alpha, _ = alpha_beta([(400.0, 6e-4), (4e3, 6e-4), (4e4, 6.2e-4), (4e6, 1.6e-3), (8e6, 5e-3)])
    assert alpha == pytest.approx(6e-4, rel=0.05)


def test_fit_step_recovers_the_terms_of_the_profilers_points():
    a, b, c = 2e-4, 5e-9, 3e-5
    shape = [(25_000, 10), (25_000, 1), (50_000, 20), (50_000, 1), (100_000, 40), (100_000, 1)]  # optimizer_points
    fitted = fit_step([(p, t, a + b * p + c * t) for p, t in shape])
    assert fitted == pytest.approx((a, b, c), rel=1e-6)
    # no per-step cost in the data: the fit does not invent a negative one
    assert fit_step([(p, t, b * p + c * t) for p, t in shape])[0] == pytest.approx(0.0, abs=1e-12)
    w = nonneg_lstsq([[1.0, 1.0], [1.0, 2.0]], [2.0, 1.0])  # unconstrained: slope -1
    assert (w >= 0).all() and w[1] == 0 and w[0] == pytest.approx(1.5)


def one_task() -> tuple[list[MetaOp], PlacedSchedule]:
    """One trainable MetaOp of 2 layers on both devices (data parallel): its bucket is ready when the backward ends,
    so its all-reduce, the optimizer and the all-gather all follow the compute."""
    seg = LayerSegment("layer", 2, 1e9, LAYER_PARAMS, 1e5, 1e4, 0.0, 4)
    op = MetaOp(0, "a.enc", "a", "enc", seg, 2, 8, (), "enc", False, 2.0, input_modules=("embed:enc",))
    return [op], PlacedSchedule((PlacedWave((PlacedSlice(0, 0, 2, (0, 1), Layout(2, 1)),)),))


def predict(measured: MeasuredCosts, shard: bool = False):
    ops, placed = one_task()
    cm = ProfiledCostModel(HW, {profile_key(ops[0], Layout(1, 1)): [(4, 0.006), (8, 0.01)]}, shard_optimizer=shard,
                           grad_bytes=4, weight_bytes=4, measured=measured)
    return simulate(Problem.build(finalize_graph(ops), cm), placed, cm), cm


def links(latency: float) -> dict:
    return {"p2p": [(1e3, latency + 1e-6), (1e6, latency + 1e-3)],
            "allreduce": [(1e3, latency + 2e-6), (1e6, latency + 2e-3)]}


def test_a_larger_message_latency_raises_the_prediction_by_the_exposed_all_reduce():
    quick, _ = predict(MeasuredCosts(optimizer_s_per_param=1e-8, **links(1e-4)))
    slow, cm = predict(MeasuredCosts(optimizer_s_per_param=1e-8, **links(5e-3)))
    # the layers' one bucket over both devices: one all-reduce of 2 layers' fp32 gradients, wholly exposed
    assert [g.bytes for g in slow.sync_groups] == [4 * 2 * LAYER_PARAMS]
    assert cm.allreduce_time(8e5, 2, cross_node=False) == pytest.approx(5e-3 + 2e-6 + (8e5 - 1e3) * (2e-3 - 2e-6) / (1e6 - 1e3))
    assert slow.iteration_time_s - quick.iteration_time_s == pytest.approx(5e-3 - 1e-4)
    assert slow.sync_s - quick.sync_s == pytest.approx(5e-3 - 1e-4)


def test_profiled_module_sizes_put_input_modules_and_heads_into_the_buckets():
    sizes = {"enc": (LAYER_PARAMS + 64, 6.0), "embed:enc": (5000.0, 2.0), "head:a": (300.0, 2.0)}
    bare, _ = predict(MeasuredCosts(optimizer_s_per_param=1e-8, **links(1e-3)))
    sized, cm = predict(MeasuredCosts(optimizer_s_per_param=1e-8, modules=sizes, **links(1e-3)))
    held = {h.key[0]: h.params for h in sized.holdings}
    assert held == {"enc": LAYER_PARAMS + 64, "embed:enc": 5000.0, "head:a": 300.0}
    assert {h.key[0]: h.params for h in bare.holdings} == {"enc": LAYER_PARAMS, "embed:enc": 0.0, "head:a": 0.0}
    # the head is final after the loss stage, the layers and the embedding after the backward: two buckets, both
    # all-reduced, their bytes the real parameters'
    assert sorted(g.bytes for g in sized.sync_groups) == [4 * 300.0, 4 * (2 * (LAYER_PARAMS + 64) + 5000.0)]
    assert [g.bytes for g in bare.sync_groups] == [4 * 2 * LAYER_PARAMS]
    assert sized.iteration_time_s > bare.iteration_time_s


def test_the_fitted_optimizer_step_prices_each_device_with_its_parameters_and_tensors():
    sizes = {"enc": (LAYER_PARAMS, 6.0), "embed:enc": (5000.0, 2.0), "head:a": (300.0, 2.0)}
    fit = (1e-3, 1e-8, 5e-5)
    params = 2 * LAYER_PARAMS + 5000.0 + 300.0  # each device holds it all (data parallel over both)
    tensors = 2 * 6.0 + 2.0 + 2.0
    whole, cm = predict(MeasuredCosts(optimizer=fit, modules=sizes, **links(1e-4)))
    assert whole.optimizer_s == pytest.approx(fit[0] + fit[1] * params + fit[2] * tensors)
    # ZeRO-1: a device steps half of each bucket's parameters, yet touches every tensor of it
    sharded, _ = predict(MeasuredCosts(optimizer=fit, modules=sizes, **links(1e-4)), shard=True)
    assert sharded.optimizer_s == pytest.approx(fit[0] + fit[1] * params / 2 + fit[2] * tensors)
    assert cm.optimizer_time(0.0, 5.0) == 0.0  # nothing to step: no per-step cost either


def test_cost_file_optimizer_and_modules_load_and_are_checked(tmp_path):
    ops, _ = one_task()
    data = {"points": {profile_key(ops[0], Layout(1, 1)): [[8, 0.01]]},
            "optimizer": {"step_s": 1e-3, "s_per_param": 1e-8, "s_per_tensor": 5e-5},
            "modules": {"head:a": [300, 2, 256], "enc": [100064, 6]}}
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(data))
    cm = ProfiledCostModel.load(path, HW)
    assert cm.optimizer_time(1e4, 10) == pytest.approx(1e-3 + 1e-4 + 5e-4)
    assert cm.module_size("head:a") == (300.0, 2.0) and cm.module_size("embed:x") == (0.0, 0.0)
    # the matrices where the file has them (a file written before them has pairs)
    assert (cm.module_matrices("head:a"), cm.module_matrices("enc"), cm.module_matrices("embed:x")) == (256, None, None)
    assert MeasuredCosts.from_json(data).optimizer == (1e-3, 1e-8, 5e-5)
    for bad, message in (({"optimizer": {"step_s": -1.0, "s_per_param": 0, "s_per_tensor": 0}}, "optimizer['step_s']"),
                         ({"optimizer": {"step_s": 0}}, "is not the fitted optimizer step"),
                         ({"optimizer": {"step_s": 0, "s_per_param": 0, "s_per_tensor": 0}}, "optimizer['s_per_param']"),
                         ({"modules": {"head:a": [1.5, 2]}}, "modules['head:a']"),
                         ({"modules": {"head:a": [10]}}, "is not a pair or triple of numbers"),
                         ({"modules": {"head:a": [10, 1, 11]}}, "has more matrix parameters than parameters")):
        path.write_text(json.dumps(data | bad))
        with pytest.raises(SpecError, match=re.escape(message)) as info:
            ProfiledCostModel.load(path, HW)
        assert "\n" not in str(info.value) and "loom profile" in str(info.value)
