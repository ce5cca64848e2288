"""Placement: device ids per slice (no double booking, node locality, continuity, sharing) and memory errors."""

from __future__ import annotations

import random

import pytest

from planner.components import LayerSegment
from planner.costmodel import AnalyticCostModel, CostModel, Layout
from planner.devices import DEVICES, GIB, Hardware, resolve_hardware
from planner.errors import PlanningError
from planner.metagraph import MetaOp, build_metagraph, finalize_graph
from planner.placement import (
    STRATEGIES, MemoryLedger, PlacedSlice, build_ledger, layer_equivalents, place_schedule,
)
from planner.program import forward_moves
from planner.schedule import Problem, Schedule, Slice, Wave
from planner.simulator import simulate_transfers
from planner.spec import parse_job

from conftest import random_schedule


class LinearCost(CostModel):
    """Perfect data-parallel scaling: one layer takes ``flops_fwd * local_batch / 1e12`` seconds."""

    def layout_time(self, op: MetaOp, layout: Layout) -> float:
        return op.layer.flops_fwd * self.local_batch(op, layout) / 1e12


def hardware(num_nodes: int = 2, devices_per_node: int = 4, memory_gib: float = 80.0) -> Hardware:
    return Hardware(DEVICES["a800"], num_nodes, devices_per_node, memory_gib * GIB, 200e9, 50e9)


def op(m: int, group: str, *, layers: int = 4, deps: tuple[int, ...] = (), batch: int = 8, task: str | None = None,
       params: float = 1e6, act: float = 1e5, out: float = 1e4, frozen: bool = False, tp: tuple[int, ...] = (1,)) -> MetaOp:
    seg = LayerSegment(f"layer{m}", layers, 1e9 * (m + 1), params, act, out, 1e4, 4)
    return MetaOp(m, f"{task or f't{m}'}.{group}", task or f"t{m}", group, seg, layers, batch, deps, group, frozen,
                  0.0 if frozen else 2.0, allowed_tp=tp)


def problem_of(ops: list[MetaOp], cm: CostModel) -> Problem:
    return Problem.build(finalize_graph(ops), cm)


def schedule(*waves: list[tuple[int, int, int]]) -> Schedule:
    """Waves given as lists of (metaop, layers, devices)."""
    return Schedule(tuple(Wave(tuple(Slice(*s) for s in w)) for w in waves))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_placement_is_deterministic(strategy):
    cm = LinearCost(hardware())
    rng = random.Random(3)
    ops = [op(m, f"g{m % 2}", layers=5, deps=(m - 1,) if m % 3 else ()) for m in range(6)]
    problem = problem_of(ops, cm)
    sched = random_schedule(problem, rng)
    assert place_schedule(problem, sched, cm, strategy=strategy) == place_schedule(problem, sched, cm, strategy=strategy)


def _cross_node_bytes(problem: Problem, placed, cm: CostModel) -> float:
    infos, _ = simulate_transfers(problem, placed, cm)
    dpn = cm.hw.devices_per_node
    total = 0.0
    for t in infos:
        src = [s for w in placed.waves[: t.after_wave + 1] for s in w.slices if s.metaop == t.src_metaop][-1]
        dst = next(s for s in placed.waves[t.after_wave + 1].slices if s.metaop == t.dst_metaop)
        producer = problem.graph.metaops[t.src_metaop]
        moves = forward_moves(src.devices, src.layout, dst.devices, dst.layout, producer.batch_size)
        cross = moves.senders // dpn != moves.receivers // dpn
        total += float(moves.rows[cross].sum()) * producer.layer.out_bytes
    return total


def test_aligned_placement_grows_a_batch_inside_nodes():
    """A runs on 4 devices beside B, then on all 8. Packed, A starts in one node and half its batch crosses the
    network; aligned, A starts with half its ranks in each node and its samples only move over NVLink."""
    cm = LinearCost(hardware(num_nodes=2, devices_per_node=4))
    problem = problem_of([op(0, "a", layers=4, out=1e6), op(1, "b", layers=2, out=1e6)], cm)
    sched = schedule([(0, 2, 4), (1, 2, 4)], [(0, 2, 8)])
    packed = place_schedule(problem, sched, cm)
    aligned = place_schedule(problem, sched, cm, strategy="align")
    assert len({d // 4 for d in packed.waves[0].slices[0].devices}) == 1
    assert [d // 4 for d in aligned.waves[0].slices[0].devices] == [0, 0, 1, 1]
    assert _cross_node_bytes(problem, packed, cm) > 0
    assert _cross_node_bytes(problem, aligned, cm) == 0
    assert simulate_transfers(problem, aligned, cm)[1] < simulate_transfers(problem, packed, cm)[1]


def test_aligned_consumer_on_fewer_devices_keeps_each_nodes_samples():
    """X (8 devices over 2 nodes) feeds Y on 2 devices beside Z on 6: Y takes one device per node, in node order,
    so each node's half of the batch stays in it: under "align" by its node shares, under "pack" too since Y's
    ranks line up with X's (planner.reshard; before that, packed Y sat in one node)."""
    cm = LinearCost(hardware(num_nodes=2, devices_per_node=4))
    ops = [op(0, "x", layers=2, out=1e6), op(1, "y", layers=2, deps=(0,), task="t0"), op(2, "z", layers=2, batch=6)]
    problem = problem_of(ops, cm)
    sched = schedule([(0, 2, 8)], [(1, 2, 2), (2, 2, 6)])
    aligned = place_schedule(problem, sched, cm, strategy="align")
    y = next(s for s in aligned.waves[1].slices if s.metaop == 1)
    assert [d // 4 for d in y.devices] == [0, 1]
    assert _cross_node_bytes(problem, aligned, cm) == 0
    packed = place_schedule(problem, sched, cm)
    assert [d // 4 for d in next(s for s in packed.waves[1].slices if s.metaop == 1).devices] == [0, 1]
    assert _cross_node_bytes(problem, packed, cm) == 0


def test_continuing_metaop_keeps_its_devices_and_grows_in_place():
    cm = LinearCost(hardware())
    problem = problem_of([op(0, "a", layers=6), op(1, "b", layers=6), op(2, "c", layers=2)], cm)
    # a: 2 devices, then 2 again (same count: keep), then 4 (grow around its devices, inside the node)
    sched = schedule([(0, 2, 2), (1, 2, 4)], [(2, 2, 2), (0, 2, 2), (1, 2, 4)], [(0, 2, 4), (1, 2, 4)])
    placed = place_schedule(problem, sched, cm)
    a = [s for w in placed.waves for s in w.slices if s.metaop == 0]
    b = [s for w in placed.waves for s in w.slices if s.metaop == 1]
    assert a[1].devices == a[0].devices
    assert set(a[0].devices) < set(a[2].devices)
    assert len({d // 4 for d in a[2].devices}) == 1
    assert b[0].devices == b[1].devices == b[2].devices


def test_continuation_keeps_its_devices_against_a_larger_slice_that_wants_them():
    """B (4 devices) follows X, which ran beside A in node 0; A continues on 2 devices and keeps them."""
    cm = LinearCost(hardware())
    problem = problem_of([op(0, "a", layers=4), op(1, "x", layers=1), op(2, "b", layers=2, deps=(1,), task="t1")], cm)
    placed = place_schedule(problem, schedule([(0, 2, 2), (1, 1, 2)], [(0, 2, 2), (2, 2, 4)]), cm)
    a0, x = placed.waves[0].slices
    a1, b = placed.waves[1].slices
    assert {d // 4 for d in a0.devices + x.devices} == {0}
    assert a1.devices == a0.devices
    assert {d // 4 for d in b.devices} == {1}


def test_growing_metaop_overlaps_its_devices_over_memory_balance():
    """A grows from 2 to 4 devices; a fresh 4-device MetaOp in the same wave takes the other node."""
    cm = LinearCost(hardware())
    problem = problem_of([op(0, "a", layers=4), op(1, "c", layers=2)], cm)
    placed = place_schedule(problem, schedule([(0, 2, 2)], [(1, 2, 4), (0, 2, 4)]), cm)
    a0 = placed.waves[0].slices[0]
    c, a1 = placed.waves[1].slices
    assert set(a0.devices) < set(a1.devices)
    assert not set(c.devices) & set(a0.devices)


def test_successor_takes_its_predecessors_devices():
    cm = LinearCost(hardware())
    problem = problem_of([op(0, "x", layers=2), op(1, "y", layers=2, deps=(0,), task="t0"), op(2, "z", layers=3)], cm)
    sched = schedule([(0, 2, 2), (2, 1, 4)], [(1, 2, 2), (2, 2, 4)])
    placed = place_schedule(problem, sched, cm)
    assert placed.waves[1].slices[0].devices == placed.waves[0].slices[0].devices


def test_tensor_parallel_groups_stay_inside_nodes():
    cm = LinearCost(hardware(num_nodes=2, devices_per_node=4))
    ops = [op(0, "big", layers=4, tp=(2,), batch=12), op(1, "small", layers=4), op(2, "other", layers=4, tp=(2,), batch=12)]
    problem = problem_of(ops, cm)
    # wave 0 leaves node 0 with 3 free devices; wave 1 needs a 6-device TP=2 slice across both nodes
    sched = schedule([(1, 1, 1), (0, 1, 2)], [(1, 1, 1), (2, 4, 6)], [(0, 3, 8)], [(1, 2, 1)])
    placed = place_schedule(problem, sched, cm)
    for wave in placed.waves:
        for s in wave.slices:
            tp = s.layout.tp_degree
            for i in range(0, len(s.devices), tp):
                assert len({d // 4 for d in s.devices[i:i + tp]}) == 1, f"TP group of {s} spans nodes"


def test_shared_parameters_are_colocated_over_memory_balance():
    """B shares A's parameters; it goes onto A's devices although those hold more memory."""
    cm = LinearCost(hardware(num_nodes=2, devices_per_node=4))
    ops = [op(0, "enc", layers=4, task="ta"), op(1, "enc", layers=4, task="tb"), op(2, "head", layers=4, task="tc")]
    problem = problem_of(ops, cm)
    sched = schedule([(0, 4, 2)], [(2, 4, 2), (1, 4, 2)])
    placed = place_schedule(problem, sched, cm)
    a = placed.waves[0].slices[0]
    b = next(s for s in placed.waves[1].slices if s.metaop == 1)
    assert b.devices == a.devices
    ledger = build_ledger(problem, [s for w in placed.waves for s in w.slices], cm)
    # the shared layers are held once: param bytes of one MetaOp, activations of both
    expected = 4 * (cm.param_bytes(ops[0], a.layout) + 2 * cm.activation_bytes(ops[0], a.layout))
    assert ledger.peak()[a.devices[0]] == pytest.approx(expected)


def test_memory_split_matches_cost_model_layer_memory():
    cm = AnalyticCostModel(hardware())
    for frozen in (False, True):
        o = op(0, "g", frozen=frozen, tp=(1, 2))
        for layout in (Layout(4, 1), Layout(2, 2), Layout(1, 2)):
            split = cm.param_bytes(o, layout) + cm.activation_bytes(o, layout)
            assert split == pytest.approx(cm.layer_memory(o, layout))
            # bf16: fp32 weight (+ its bf16 copy and fp32 gradient when trained); ZeRO-1: master and AdamW over dp
            per_param = 4 if frozen else 10 + 12 / layout.dp_degree if layout.dp_degree > 1 else 18
            assert cm.param_bytes(o, layout) == pytest.approx(o.layer.params * per_param / layout.tp_degree)
    unsharded = AnalyticCostModel(hardware(), shard_optimizer=False)
    o = op(0, "g", tp=(1, 2))
    assert unsharded.param_bytes(o, Layout(4, 1)) == pytest.approx(o.layer.params * 18)


def test_ledger_counts_a_layer_once_at_its_largest_shard():
    cm = LinearCost(hardware())
    o = op(0, "g", layers=4, tp=(1, 2))
    problem = problem_of([o], cm)
    ledger = MemoryLedger(problem, cm)
    ledger.add(PlacedSlice(0, 0, 2, (0, 1), Layout(1, 2)))  # layers 0-1, half of each
    ledger.add(PlacedSlice(0, 1, 3, (0,), Layout(1, 1)))  # layers 1-3, whole
    per_param = 18  # bf16 AdamW alone on its device (dp 1): fp32 weight, bf16 copy, fp32 gradient, m and v
    assert ledger.param_bytes[0] == pytest.approx((0.5 + 3) * o.layer.params * per_param)
    assert ledger.param_bytes[1] == pytest.approx(1.0 * o.layer.params * per_param)
    assert ledger.trainable_params[0] == pytest.approx(3.5 * o.layer.params)


def test_ledger_remembers_its_holdings_layer_equivalents_without_mixing_them_up(monkeypatch):
    """Random slices of shared groups at TP 1 and 2, several per device: every byte and parameter count is what the
    ledger gives when it counts each holding's layer equivalents afresh (the uncached path)."""
    cm = LinearCost(hardware())
    ops = [op(0, "g", layers=6, tp=(1, 2)), op(1, "g", layers=6, tp=(1, 2)), op(2, "h", layers=5, tp=(1, 2))]
    problem = problem_of(ops, cm)
    rng = random.Random(11)
    slices = []
    for _ in range(40):
        m, tp = rng.randrange(3), rng.choice((1, 2))
        first = rng.randrange(ops[m].num_layers)
        devices = tuple(sorted(rng.sample(range(8), 2 * rng.randint(1, 2))))
        slices.append(PlacedSlice(m, first, rng.randint(1, ops[m].num_layers - first), devices,
                                  Layout(len(devices) // tp, tp)))
    remembered = build_ledger(problem, slices, cm)
    monkeypatch.setattr(MemoryLedger, "_equivalents", lambda self, by_tp: layer_equivalents(by_tp))
    fresh = build_ledger(problem, slices, cm)
    assert remembered.param_bytes.tolist() == fresh.param_bytes.tolist()
    assert remembered.trainable_params.tolist() == fresh.trainable_params.tolist()
    assert remembered.peak().tolist() == fresh.peak().tolist()

def test_memory_overflow_names_the_metaop():
    job = parse_job({
        "name": "oom",
        "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "a800", "memory_gib": 1.0},
        "components": {"enc": {"kind": "transformer", "num_layers": 24, "hidden_size": 1024, "num_heads": 16,
                               "seq_len": 128}},
        "tasks": [{"name": "caption", "batch_size": 8, "components": [{"component": "enc"}]}],
    })
    cm = AnalyticCostModel(resolve_hardware(job.cluster))
    problem = Problem.build(build_metagraph(job), cm)
    sched = schedule([(0, 24, 2)])
    with pytest.raises(PlanningError) as info:
        place_schedule(problem, sched, cm)
    msg = str(info.value)
    assert "caption.enc" in msg
    assert "1.00 GiB" in msg and "tensor_parallel" in msg and "batch size" in msg
    # the same plan without the limit places fine (baselines use this)
    assert place_schedule(problem, sched, cm, check_memory_limit=False).waves[0].slices[0].devices == (0, 1)


def test_memory_balance_spreads_independent_slices():
    """Two waves of single-device slices of fresh MetaOps: the second avoids the loaded device."""
    cm = LinearCost(hardware(num_nodes=1, devices_per_node=2))
    problem = problem_of([op(0, "a", layers=1), op(1, "b", layers=1)], cm)
    placed = place_schedule(problem, schedule([(0, 1, 1)], [(1, 1, 1)]), cm)
    assert placed.waves[0].slices[0].devices != placed.waves[1].slices[0].devices
