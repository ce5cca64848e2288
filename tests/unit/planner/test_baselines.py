"""Baselines under Loom's cost model: the shape of each system's placed schedule (devices, waves, phases), and
hand-computed times for small jobs priced by the one simulator (gradient sync overlapped with what follows, ZeRO-1
optimizer and its all-gather)."""

from __future__ import annotations

import math

import pytest

from planner.baselines import (
    BASELINES, distmm_mt_schedule, optimus_schedule, optimus_sizes, run_baselines, sequential_schedule, spindle_placed,
    split_level, uniform_schedule, uniform_sizes,
)
from planner.components import LayerSegment
from planner.costmodel import AnalyticCostModel, CostModel, Layout
from planner.devices import DEVICES, GIB, Hardware, resolve_hardware
from planner.metagraph import MetaOp, build_metagraph, finalize_graph
from planner.placement import place_schedule
from planner.schedule import Problem, Schedule, Slice, Wave
from planner.simulator import simulate
from planner.spec import parse_job


class LinearCost(CostModel):
    """Perfect data-parallel scaling: one layer takes ``flops_fwd * local_batch / 1e12`` seconds."""

    def layout_time(self, op: MetaOp, layout: Layout) -> float:
        return op.layer.flops_fwd * self.local_batch(op, layout) / 1e12


def cost_model(num_nodes: int = 1, devices_per_node: int = 8) -> LinearCost:
    return LinearCost(Hardware(DEVICES["a800"], num_nodes, devices_per_node, 80 * GIB, 200e9, 50e9))


def op(m: int, task: str, group: str, *, flops: float = 1e9, layers: int = 4, deps: tuple[int, ...] = (),
       batch: int = 8, params: float = 1e6, out: float = 1e4) -> MetaOp:
    seg = LayerSegment(f"layer{m}", layers, flops, params, 1e5, out, 0.0, 4)
    return MetaOp(m, f"{task}.{group}", task, group, seg, layers, batch, deps, group, False, 2.0)


def problem_of(cm: CostModel, *ops: MetaOp) -> Problem:
    return Problem.build(finalize_graph(list(ops)), cm)


def gather(cm: CostModel, params: float, n: int, cross_node: bool = False) -> float:
    """ZeRO-1's all-gather of ``params`` updated parameters over ``n`` holders (shares padded to ceil(params / n))."""
    return cm.allgather_time(cm.param_bytes_moved * math.ceil(params / n) * n, n, cross_node)


def time_of(build, problem: Problem, cm: CostModel) -> float:
    return simulate(problem, build(problem), cm).iteration_time_s


def shape(placed) -> list[list[tuple[int, tuple[int, ...]]]]:
    return [[(s.metaop, s.devices) for s in w.slices] for w in placed.waves]


def test_single_metaop_job_every_baseline_matches_hand_math():
    job = parse_job({
        "name": "one",
        "cluster": {"num_nodes": 1, "devices_per_node": 8, "device": "a800"},
        "components": {"enc": {"kind": "transformer", "num_layers": 6, "hidden_size": 1024, "num_heads": 16,
                               "seq_len": 256}},
        "tasks": [{"name": "caption", "batch_size": 16, "components": [{"component": "enc"}]}],
    })
    cm = AnalyticCostModel(resolve_hardware(job.cluster))
    problem = Problem.build(build_metagraph(job), cm)
    (o,) = problem.graph.metaops
    curve = problem.curves[0]
    assert curve.counts[-1] == 8  # the fastest count is the whole node, so every system runs it the same way
    params = o.layer.params * o.num_layers
    # one MetaOp: its gradients are final only when backward ends, so the whole sync is exposed;
    # ZeRO-1 shards the optimizer step over the 8 replicas, which then all-gather the updated parameters
    expected = (curve.times[-1] * o.num_layers + cm.allreduce_time(2 * params, 8, cross_node=False)
                + cm.optimizer_time(params / 8) + gather(cm, params, 8))
    assert time_of(sequential_schedule, problem, cm) == pytest.approx(expected)
    spindle = Schedule((Wave((Slice(0, o.num_layers, 8),)),))
    times = run_baselines(problem, cm, spindle=spindle)
    assert tuple(times) == BASELINES
    for name, seconds in times.items():
        assert seconds == pytest.approx(expected), name


def test_sequential_runs_a_metaop_on_its_fastest_count_and_syncs_over_those_devices():
    cm = cost_model(num_nodes=2, devices_per_node=4)
    problem = problem_of(cm, op(0, "t", "enc", batch=4, params=1e6, layers=2))  # batch 4: at most 4 devices
    curve = problem.curves[0]
    assert curve.counts[-1] == 4
    placed = sequential_schedule(problem)
    assert shape(placed) == [[(0, (0, 1, 2, 3))]] and placed.phases == (0,)
    expected = (curve.times[-1] * 2 + cm.allreduce_time(2 * 2e6, 4, cross_node=False) + cm.optimizer_time(2e6 / 4)
                + gather(cm, 2e6, 4))
    assert simulate(problem, placed, cm).iteration_time_s == pytest.approx(expected)


def test_two_identical_tasks_split_the_devices_evenly():
    cm = cost_model()
    problem = problem_of(cm, op(0, "ta", "enc_a", params=1e6), op(1, "tb", "enc_b", params=1e6))
    assert uniform_sizes(2, 8) == [4, 4]
    assert optimus_sizes(problem) == [4, 4]
    expected = (problem.curves[0].time(4) * 4 + cm.allreduce_time(2 * 4e6, 4, False) + cm.optimizer_time(4e6 / 4)
                + gather(cm, 4e6, 4))
    assert shape(uniform_schedule(problem)) == [[(0, (0, 1, 2, 3)), (1, (4, 5, 6, 7))]]
    assert time_of(uniform_schedule, problem, cm) == pytest.approx(expected)
    assert time_of(optimus_schedule, problem, cm) == pytest.approx(expected)
    # sequential runs them one after another (a phase each) on 8 devices each, syncing both groups over all 8.
    # enc_a's gradients are final after task ta, so its all-reduce hides behind task tb; only enc_b's is exposed.
    assert sequential_schedule(problem).phases == (0, 1)
    one_task = problem.curves[0].time(8) * 4
    sync = cm.allreduce_time(2 * 4e6, 8, False)
    assert sync < one_task
    # both gathers on every device, enc_a's first: the next iteration needs it at once, enc_b's once task ta is done
    g = gather(cm, 4e6, 8)
    seq = 2 * one_task + sync + cm.optimizer_time(2 * 4e6 / 8) + max(g, 2 * g - one_task)
    assert time_of(sequential_schedule, problem, cm) == pytest.approx(seq)


def test_sequential_syncs_a_shared_component_after_the_last_task_that_uses_it():
    """Two tasks share 'enc': gradients accumulate over both, so nothing of the sync overlaps compute."""
    cm = cost_model()
    problem = problem_of(cm, op(0, "ta", "enc", params=1e6), op(1, "tb", "enc", params=1e6))
    one_task = problem.curves[0].time(8) * 4
    expected = 2 * one_task + cm.allreduce_time(2 * 4e6, 8, False) + cm.optimizer_time(4e6 / 8) + gather(cm, 4e6, 8)
    assert time_of(sequential_schedule, problem, cm) == pytest.approx(expected)
    assert time_of(distmm_mt_schedule, problem, cm) == pytest.approx(expected)  # one MetaOp per task: the same run


def test_a_tasks_later_metaop_syncs_during_the_backward_of_its_earlier_one():
    """enc -> head on all 8 devices: head's gradients are final after its backward and reduce while enc's
    backward runs; enc's all-reduce follows the end of backward. ZeRO-1 gathers enc's parameters first (the next
    iteration needs them at once), then head's, which may overlap enc's next forward."""
    cm = cost_model()
    enc = op(0, "t", "enc", flops=4e9, params=1e8, layers=2)
    head = op(1, "t", "head", deps=(0,), params=1e8, layers=2)
    problem = problem_of(cm, enc, head)
    # batch 8 on 8 devices: one sample each, 4 ms (enc) and 1 ms (head) a layer; backward is 2/3 of it
    compute = 2 * 4e-3 + 2 * 1e-3
    sync = cm.allreduce_time(2 * 2e8, 8, False)  # each group: 2 layers of 1e8 parameters
    assert sync < 2 / 3 * 2 * 4e-3  # head's all-reduce fits in enc's backward
    g, forward_enc = gather(cm, 2e8, 8), 2 * 4e-3 / 3
    expected = compute + sync + cm.optimizer_time(2 * 2e8 / 8) + max(g, 2 * g - forward_enc)
    for system in (sequential_schedule, uniform_schedule, optimus_schedule, distmm_mt_schedule):
        assert time_of(system, problem, cm) == pytest.approx(expected), system.__name__


def test_uniform_trims_to_exactly_n():
    assert uniform_sizes(3, 8) == [3, 3, 2]
    assert uniform_sizes(3, 16) == [6, 5, 5]
    assert uniform_sizes(5, 3) == [1, 1, 1, 1, 1]


def test_more_tasks_than_devices_are_list_scheduled():
    """Three identical one-layer tasks on 2 devices: two rounds (phases); device 0 ends up holding two components, and
    holds one task's activations at a time."""
    cm = cost_model(num_nodes=1, devices_per_node=2)
    problem = problem_of(cm, *(op(m, f"t{m}", f"c{m}", params=1e6, layers=1) for m in range(3)))
    one = problem.curves[0].time(1)
    placed = uniform_schedule(problem)
    assert shape(placed) == [[(0, (0,)), (1, (1,))], [(2, (0,))]] and placed.phases == (0, 1)
    sim = simulate(problem, placed, cm)
    assert sim.iteration_time_s == pytest.approx(2 * one + cm.optimizer_time(2e6))
    activations = cm.activation_bytes(problem.graph.metaops[0], Layout(1, 1))
    params = 2 * cm.layer_memory(problem.graph.metaops[0], Layout(1, 1)) - 2 * activations
    assert sim.peak_memory_bytes[0] == pytest.approx(params + activations)  # one phase's activations at a time


def test_optimus_gives_the_heavier_task_more_devices():
    cm = cost_model(num_nodes=1, devices_per_node=6)
    heavy, light = op(0, "heavy", "h", flops=3e9, params=1e6), op(1, "light", "l", flops=1e9, params=1e6)
    problem = problem_of(cm, heavy, light)
    # batch 8 has valid counts 1, 2, 4: the greedy gives heavy 1->2->4 and light 1->2
    assert optimus_sizes(problem) == [4, 2]
    heavy_end, light_end = 3e-3 * 2 * 4, 1e-3 * 4 * 4  # 2 and 4 samples per device, 4 layers
    sync_heavy, sync_light = cm.allreduce_time(8e6, 4, False), cm.allreduce_time(8e6, 2, False)
    assert light_end + sync_light < heavy_end  # the light task's sync hides behind the heavy task
    # each group ends on its own (no barrier): its sync, its ZeRO-1 step and all-gather; heavy's 4 replicas step
    # 1/4 each, light's 2 a half
    expected = max(heavy_end + sync_heavy + cm.optimizer_time(4e6 / 4) + gather(cm, 4e6, 4),
                   light_end + sync_light + cm.optimizer_time(4e6 / 2) + gather(cm, 4e6, 2))
    assert shape(optimus_schedule(problem)) == [[(0, (0, 1, 2, 3)), (1, (4, 5))]]
    assert time_of(optimus_schedule, problem, cm) == pytest.approx(expected)


def test_distmm_splits_a_level_in_proportion_to_work():
    cm = cost_model()
    enc_a = op(0, "t", "a", flops=3e9, batch=12, out=0.0)
    enc_b = op(1, "t", "b", flops=1e9, batch=12, out=0.0)
    fuse = op(2, "t", "f", flops=1e9, batch=12, deps=(0, 1))
    problem = problem_of(cm, enc_a, enc_b, fuse)
    assert split_level(problem, [0, 1], 8) == [[(0, (0, 1, 2, 3, 4, 5)), (1, (6, 7))]]
    placed = distmm_mt_schedule(problem)
    assert shape(placed) == [[(0, (0, 1, 2, 3, 4, 5)), (1, (6, 7))], [(2, (0, 1, 2, 3, 4, 5))]]
    # the encoders send nothing (out=0); the fusion runs on 6 devices (batch 12 on at most 8): with a barrier after
    # every wave and the sync after compute, it could take no longer than this
    encoders = max(problem.curves[0].time(6), problem.curves[1].time(2)) * 4
    compute = encoders + problem.curves[2].time(6) * 4
    t_a, t_b, t_f = (cm.allreduce_time(8e6, n, False) for n in (6, 2, 6))
    end = max(t_a + t_f + cm.optimizer_time(2 * 4e6 / 6) + 2 * gather(cm, 4e6, 6), t_b + cm.optimizer_time(4e6 / 2)
              + gather(cm, 4e6, 2))
    distmm = simulate(problem, placed, cm).iteration_time_s
    assert compute < distmm <= (compute + end) * (1 + 1e-12)
    assert distmm < time_of(sequential_schedule, problem, cm)


def test_spindle_baseline_is_the_placed_simulation():
    cm = cost_model(num_nodes=2, devices_per_node=4)
    problem = problem_of(cm, op(0, "ta", "x", layers=4), op(1, "ta", "y", layers=2, deps=(0,)), op(2, "tb", "x", layers=4))
    sched = Schedule((Wave((Slice(0, 4, 4), Slice(2, 2, 4))), Wave((Slice(1, 2, 4), Slice(2, 2, 4)))))
    expected = simulate(problem, place_schedule(problem, sched, cm), cm).iteration_time_s
    assert simulate(problem, spindle_placed(problem, cm, sched), cm).iteration_time_s == pytest.approx(expected)
    times = run_baselines(problem, cm, spindle=sched)
    assert times["spindle"] == pytest.approx(expected)
    assert all(t > 0 for t in times.values())
