"""Fixtures for the orchestrator tests: synthetic Plans (no solver needed) and small job specs."""

from __future__ import annotations

import random
import textwrap
import pytest

from planner.plan import (
    Bounds, Plan, PlanCluster, PlanMetaOp, PlanSlice, PlanWave, Prediction, SolverReport,
)

GIB = 1024**3


def synthetic_plan(num_nodes: int = 1, devices_per_node: int = 8, num_waves: int = 3, num_tasks: int = 3,
                   seed: int = 0) -> Plan:
    """A sealed Plan with random but well-formed waves: disjoint device sets per wave of power-of-two sizes,
    consecutive layers, no dependencies; pieces, holdings and buckets are empty.

    Each MetaOp runs one layer in each wave that picks it and has as many layers (planner.validate.check_plan passes
    the plan when every MetaOp is picked, as with 16 devices and 5 waves).
    """
    rng = random.Random(seed)
    num_devices = num_nodes * devices_per_node
    metaops: list[PlanMetaOp] = []
    for t in range(num_tasks):
        for u, use in enumerate(("image_encoder", "text_decoder")):
            metaops.append(PlanMetaOp(
                id=len(metaops), name=f"task{t}.{use}", task=f"task{t}", component=use, layer_key=f"{use}[s={t}]",
                num_layers=num_waves, batch_size=64, deps=[], level=u,
                param_group=use, frozen=False, params_per_layer=1e7, out_bytes_per_sample=1e5,
            ))
    next_layer = [0] * len(metaops)
    waves, start = [], 0.0
    for k in range(num_waves):
        # Contiguous groups of power-of-two sizes, like placement produces; the last may be left idle.
        free = list(range(num_devices))
        slices = []
        ops = rng.sample(range(len(metaops)), k=min(len(metaops), max(1, num_devices // 4)))
        for m in ops:
            if not free:
                break
            wanted = min(len(free), rng.choice([1, 2, 4, 8, 16]))
            size = max(n for n in (1, 2, 4, 8, 16) if n <= wanted)  # a power of two: it divides the batch
            chosen, free = free[:size], free[size:]
            layers = 1
            seconds = round(rng.uniform(0.01, 0.2), 4)
            slices.append(PlanSlice(
                metaop=m, first_layer=next_layer[m], num_layers=layers, devices=chosen, dp_degree=size, tp_degree=1,
                time_s=seconds, forward_s=seconds / 3, memory_bytes=rng.uniform(1, 30) * GIB,
            ))
            next_layer[m] += layers
        duration = max(s.time_s for s in slices)
        waves.append(PlanWave(index=k, start_s=round(start, 6), duration_s=duration, forward_s=duration / 3,
                              transfer_in_s=0.0, transfer_back_s=0.0, slices=slices))
        start += duration
    # A MetaOp has the layers its slices run (planner.validate.check_plan: every layer once, so a plan whose waves
    # pick every MetaOp loads from a file; one no wave picks keeps num_waves layers and makes the plan refused there).
    metaops = [op.model_copy(update={"num_layers": next_layer[op.id] or op.num_layers}) for op in metaops]
    compute = start
    plan = Plan(
        job="synthetic",
        spec_hash="0" * 16,
        cost_model="analytic",
        cluster=PlanCluster(num_nodes=num_nodes, devices_per_node=devices_per_node, device="h100",
                            memory_bytes=80 * GIB),
        metaops=metaops,
        waves=waves,
        transfers=[],
        pieces=[],
        holdings=[],
        grad_buckets=[],
        sync_groups=[],
        predicted=Prediction(iteration_time_s=compute * 1.1, compute_s=compute, transfer_s=0.0,
                             sync_s=compute * 0.09, optimizer_s=compute * 0.01),
        peak_memory_bytes=[rng.uniform(10, 60) * GIB for _ in range(num_devices)],
        solver=SolverReport(name="highs", status="optimal", objective_s=compute, bound_s=compute * 0.99, gap=0.01,
                            method="spindle"),
        bounds=Bounds(per_level_s=compute * 0.95, dag_s=compute * 0.9, iteration_s=compute * 0.92),
        baselines={"sequential": compute * 1.8, "spindle": compute * 1.05},
    )
    return plan.sealed()


@pytest.fixture
def small_plan() -> Plan:
    return synthetic_plan()


@pytest.fixture(scope="session")
def make_plan():
    """The :func:`synthetic_plan` builder (test modules cannot import conftest by name)."""
    return synthetic_plan


SMALL_JOB = textwrap.dedent("""\
    name: small-two-task
    cluster: {num_nodes: 1, devices_per_node: 8, device: h100}
    components:
      image_encoder: {kind: vit, num_layers: 6, hidden_size: 384, num_heads: 6, patch_size: 16, image_size: 224}
      text_encoder: {kind: transformer, num_layers: 4, hidden_size: 256, num_heads: 4, seq_len: 64}
      head: {kind: mlp, num_layers: 2, hidden_size: 384}
    tasks:
      - name: classify
        batch_size: 64
        components: [{component: image_encoder}, {component: head}]
      - name: caption
        batch_size: 32
        components:
          - {component: image_encoder, image_size: 160}
          - {component: text_encoder, after: []}
    planner: {time_limit_s: 3}  # finishes its whole search well within it: the plan never depends on the load
    """)


@pytest.fixture(scope="session")
def small_job_text() -> str:
    """A valid two-task job spec (YAML) on 8 devices, small enough to plan in about a second."""
    return SMALL_JOB
