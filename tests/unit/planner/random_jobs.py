"""Seeded random multi-task jobs for planner tests, at MetaOp level with the analytic cost model on a real device:
chains of 1-3 MetaOps per task, frozen encoders, parameter groups shared between tasks, tensor-parallel degrees up
to a node, and layers from 1M to 1.5B parameters (the large ones need several data-parallel ranks to fit).

``from random_jobs import random_job`` (this folder is on the test path, like conftest).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from planner.costmodel import AnalyticCostModel
from planner.devices import DEVICES, GIB, Hardware
from planner.errors import PlanningError
from planner.kinds import LayerSegment
from planner.metagraph import MetaOp, finalize_graph
from planner.schedule import Problem


def _segment(rng: np.random.Generator, name: str) -> LayerSegment:
    params = float(np.exp(rng.uniform(math.log(1e6), math.log(1.5e9))))
    hidden = math.sqrt(params / 12)
    seq = int(rng.choice([128, 512, 2048]))
    return LayerSegment(name, int(rng.integers(2, 13)), 2 * params * seq, params, 24 * seq * hidden, 2 * seq * hidden,
                        4 * seq * hidden, 12)


def random_job(seed: int, max_nodes: int = 4) -> tuple[Problem, AnalyticCostModel]:
    """A Problem and its cost model: 1-4 tasks on 1-``max_nodes`` nodes of 4 or 8 A800s (80 GiB, 25 GB/s between
    nodes). May raise PlanningError when a drawn layer fits no device count."""
    rng = np.random.default_rng(seed)
    dpn = int(rng.choice([4, 8]))
    hw = Hardware(DEVICES["a800"], int(rng.integers(1, max_nodes + 1)), dpn, 80 * GIB, 200e9, 25e9)
    shared = {f"shared{k}": _segment(rng, f"shared{k}") for k in range(2)}
    ops: list[MetaOp] = []
    for t in range(int(rng.integers(1, 5))):
        batch = int(rng.choice([8, 16, 32, 64]))
        deps: tuple[int, ...] = ()
        trainable_upstream = False
        for u in range(int(rng.integers(1, 4))):
            group = str(rng.choice(list(shared))) if rng.random() < 0.3 else f"t{t}u{u}"
            seg = shared.get(group) or _segment(rng, group)
            frozen = u == 0 and rng.random() < 0.3
            backward = (1.0 if trainable_upstream else 0.0) if frozen else 2.0
            tp = tuple(sorted({1} | {int(d) for d in rng.choice([2, 4, 8], size=2) if d <= dpn}))
            ops.append(MetaOp(len(ops), f"t{t}.u{u}", f"t{t}", group, seg, seg.count, batch, deps, group, frozen,
                              backward, allowed_tp=tp))
            deps = (ops[-1].id,)
            trainable_upstream = trainable_upstream or not frozen
    cost_model = AnalyticCostModel(hw)
    return Problem.build(finalize_graph(ops), cost_model), cost_model


def diamond_job(seed: int) -> tuple[Problem, AnalyticCostModel]:
    """1-3 diamond-shaped tasks on 1-8 nodes of 8 A800s: an encoder feeding two branches of 1-3 MetaOps each, joined
    by a fusion MetaOp (batches 4-64, so some MetaOps scale to few devices). May raise PlanningError."""
    rng = np.random.default_rng(seed)
    hw = Hardware(DEVICES["a800"], int(rng.choice([1, 2, 4, 8])), 8, 80 * GIB, 200e9, 25e9)
    ops: list[MetaOp] = []
    for t in range(int(rng.integers(1, 4))):
        batch = int(rng.choice([4, 8, 16, 32, 64]))

        def add(name: str, deps: tuple[int, ...]) -> int:
            seg = _segment(rng, f"t{t}{name}")
            ops.append(MetaOp(len(ops), f"t{t}.{name}", f"t{t}", name, seg, seg.count, batch, deps, f"t{t}{name}",
                              False, 2.0))
            return len(ops) - 1

        encoder = add("enc", ())
        ends = []
        for branch in range(2):
            last = encoder
            for k in range(int(rng.integers(1, 4))):
                last = add(f"b{branch}{k}", (last,))
            ends.append(last)
        add("fuse", tuple(ends))
    cost_model = AnalyticCostModel(hw)
    return Problem.build(finalize_graph(ops), cost_model), cost_model


def diamond_problems(count: int) -> Iterator[tuple[int, Problem]]:
    """(seed, Problem) of :func:`diamond_job` for seeds 0..count-1, leaving out those whose layers fit no count."""
    for seed in range(count):
        try:
            yield seed, diamond_job(seed)[0]
        except PlanningError:
            continue
