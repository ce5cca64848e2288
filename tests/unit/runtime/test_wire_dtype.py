"""What dtype each piece crosses devices in (runtime.executor): activations and their gradients in the compute
precision, as the plan prices them; a generate use's packed rollout rows in float32 whatever the precision, since
bf16 holds integers exactly only up to 256 and the rows carry token ids (and the behaviour log-probabilities)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from planner.api import plan_placed
from planner.costmodel import Layout
from planner.metagraph import build_metagraph
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave
from planner.spec import parse_job
from runtime.executor import WaveWorker
from runtime.prepare import build_payload

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))
from _jobs import rollout_job  # noqa: E402  (tests/integration/_jobs.py: the tiny GRPO job the byte contract runs)


def test_rollout_rows_cross_in_float32_and_activations_in_bf16():
    job = parse_job(rollout_job(vocab_size=300, precision="bf16"))
    ops = {op.use: op for op in build_metagraph(job).metaops}
    placed = PlacedSchedule((PlacedWave((PlacedSlice(ops["rollout"].id, 0, 1, (0,), Layout(1, 1)),)),
                             PlacedWave((PlacedSlice(ops["reward"].id, 0, 1, (1,), Layout(1, 1)),
                                         PlacedSlice(ops["policy"].id, 0, 1, (0,), Layout(1, 1))))))
    plan = plan_placed(job, placed, method="hand-made")
    worker = WaveWorker(build_payload(job, plan, 0))
    rollout = [p for p in plan.pieces if plan.waves[p.producer[0]].slices[p.producer[1]].metaop == ops["rollout"].id]
    crossing = [p for p in rollout if p.src != p.dst]
    assert crossing, "the rollout should cross to the reward's device"
    assert {worker._wire_dtype_of(p) for p in rollout} == {torch.float32}
    assert worker.wire_dtype == torch.bfloat16
    assert torch.tensor(299.0).bfloat16().float() != 299.0  # what a bf16 wire did to token 299
