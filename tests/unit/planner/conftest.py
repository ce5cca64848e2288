"""Shared builders for planner unit tests: hand-made curves and Problems, and seeded random Problems.

Import the helpers with ``from conftest import random_problem, make_problem, make_curve, random_schedule`` (and
``HeadCost``, ``big_and_small``: a cost model and a two-task Problem that the simulator prices).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from planner.components import LayerSegment
from planner.costmodel import CostModel, Curve, Layout
from planner.devices import DEVICES, GIB, Hardware
from planner.metagraph import MetaOp, finalize_graph
from planner.schedule import Problem, Schedule, Slice, Wave, check_schedule


def make_curve(counts: Sequence[int], times: Sequence[float], forward: float | None = None) -> Curve:
    """A Curve on ``counts`` (ascending) with per-layer ``times`` (strictly decreasing), pure data parallel;
    ``forward``: the share of each time that runs in forward (None: by the MetaOp's passes)."""
    counts = tuple(int(c) for c in counts)
    times = tuple(float(t) for t in times)
    assert all(a < b for a, b in zip(counts, counts[1:])), counts
    assert all(a > b for a, b in zip(times, times[1:])), times
    return Curve(counts, times, tuple(Layout(c, 1) for c in counts), tuple(0.0 for _ in counts),
                 (float(forward),) * len(counts) if forward is not None else ())


def make_problem(
    num_layers: Sequence[int], deps: Sequence[Sequence[int]], curves: Sequence[Curve], num_devices: int
) -> Problem:
    """A Problem of MetaOps ``0..len(num_layers)-1``; ``deps[m]`` must name earlier ids only."""
    ops = []
    for m, (layers, ds) in enumerate(zip(num_layers, deps)):
        seg = LayerSegment(f"layer{m}", layers, 1e9, 1e6, 1e6, 1e5, 0.0, 10)
        ops.append(MetaOp(
            id=m, name=f"op{m}", task=f"task{m}", component=f"comp{m}", layer=seg, num_layers=layers,
            batch_size=64, deps=tuple(sorted(ds)), param_group=f"comp{m}", frozen=False, backward_factor=2.0,
        ))
    return Problem(finalize_graph(ops), tuple(curves), num_devices)


def random_curve(rng: np.random.Generator, num_devices: int, concave: bool = True) -> Curve:
    """Random valid counts in 1..N (sometimes not starting at 1) with strictly decreasing times.

    ``concave``: Amdahl-like times t(n) = t1 (f + (1 - f) / n), whose interpolated speed-up is concave;
    otherwise strictly decreasing times with random (possibly super-linear) steps.
    """
    pool = np.arange(1, num_devices + 1)
    size = int(rng.integers(1, min(num_devices, 6) + 1))
    counts = np.sort(rng.choice(pool, size=size, replace=False))
    t1 = float(rng.uniform(0.5, 5.0))
    if concave:
        serial = float(rng.uniform(0.0, 0.6))
        times = t1 * (serial + (1.0 - serial) / counts)
    else:
        times = t1 * np.cumprod(rng.uniform(0.2, 0.95, size=size))
    return make_curve(counts.tolist(), times.tolist())


def random_problem(seed: int, num_ops: int, num_devices: int, num_levels: int, concave: bool = True) -> Problem:
    """A seeded random Problem: ``num_ops`` MetaOps spread over exactly ``num_levels`` BFS levels.

    Every MetaOp of level k > 0 depends on one MetaOp of level k - 1 and maybe on earlier ones;
    layers in 1..16; curves from :func:`random_curve`.
    """
    assert 1 <= num_levels <= num_ops
    rng = np.random.default_rng(seed)
    level_of = list(range(num_levels)) + sorted(rng.integers(0, num_levels, size=num_ops - num_levels).tolist())
    level_of.sort()
    deps: list[list[int]] = []
    for m, lv in enumerate(level_of):
        if lv == 0:
            deps.append([])
            continue
        prev = [i for i in range(m) if level_of[i] == lv - 1]
        earlier = [i for i in range(m) if level_of[i] < lv - 1]
        ds = {int(rng.choice(prev))}
        ds |= {i for i in earlier if rng.random() < 0.2}
        ds |= {i for i in prev if rng.random() < 0.2}
        deps.append(sorted(ds))
    layers = rng.integers(1, 17, size=num_ops).tolist()
    curves = [random_curve(rng, num_devices, concave) for _ in range(num_ops)]
    problem = make_problem(layers, deps, curves, num_devices)
    assert len(problem.graph.levels) == num_levels
    return problem


def random_schedule(problem: Problem, rng: random.Random) -> Schedule:
    """A valid random wave schedule: ready MetaOps get random slices while devices last."""
    remaining = [problem.layers(m) for m in range(len(problem.graph))]
    waves = []
    while any(remaining):
        ready = [o.id for o in problem.graph.metaops if remaining[o.id] and not any(remaining[d] for d in o.deps)]
        rng.shuffle(ready)
        left, slices = problem.num_devices, []
        for m in ready:
            counts = [c for c in problem.curves[m].counts if c <= left]
            if counts:
                slices.append(Slice(m, rng.randint(1, remaining[m]), rng.choice(counts)))
                left -= slices[-1].num_devices
        for s in slices:
            remaining[s.metaop] -= s.num_layers
        waves.append(Wave(tuple(slices)))
    schedule = Schedule(tuple(waves))
    check_schedule(problem, schedule)
    return schedule


class HeadCost(CostModel):
    """Data-parallel scaling for every MetaOp except ``head`` MetaOps, whose layer takes 1 ms on any count:
    so only transfers can tell a head's counts apart."""

    def layout_time(self, op: MetaOp, layout: Layout) -> float:
        if op.component == "head":
            return 1e-3 / (1 + 1e-3 * layout.num_devices)  # strictly decreasing, by a hair
        return op.layer.flops_fwd * self.local_batch(op, layout) / 1e12


def big_and_small() -> tuple[Problem, CostModel, Schedule]:
    """Two independent tasks on one node, each a wave of its own on all 8 devices (10 ms a layer): one MetaOp with
    1 GB of parameters per layer, one with a few; the big one runs first, so its backward runs last and its gradient
    sync has nothing after it to hide behind."""
    cm = HeadCost(Hardware(DEVICES["a800"], 1, 8, 80 * GIB, 200e9, 25e9))
    seg = lambda name, params: LayerSegment(name, 4, 1e10, params, 1e5, 1e3, 1e4, 4)  # noqa: E731
    ops = [
        MetaOp(0, "t0.big", "t0", "big", seg("big", 2.5e8), 4, 8, (), "big", False, 2.0),
        MetaOp(1, "t1.small", "t1", "small", seg("small", 1e3), 4, 8, (), "small", False, 2.0),
    ]
    problem = Problem.build(finalize_graph(ops), cm)
    return problem, cm, Schedule((Wave((Slice(0, 4, 8),)), Wave((Slice(1, 4, 8),))))
