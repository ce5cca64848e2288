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


def test_a_decode_copy_receives_its_matrices_in_the_compute_dtype():
    """A hand-off to a copy only to decode with (runtime.tp_decode.pack_wire): a TP rank's shard of a llama layer as
    bytes, the projections in bf16 and the norms in float32, in the shard's order; unpacked into a copy whose matrices
    are bf16 (runtime.rollout.lower_matrices) it equals the trainer's layer rounded, at the bytes the planner prices
    (matrices x 2 + the rest x 4)."""
    from runtime.modules import LlamaBlock
    from runtime.rollout import lower_matrices
    from runtime.tp_decode import _cut, flat_shard, pack_wire, packed_bytes, shard_of, unpack_wire

    torch.manual_seed(0)
    trainer = LlamaBlock(16, 4, 2, 32)
    shard = (2, 1)
    params = {name: p.detach() for name, p in trainer.named_parameters()}
    wanted = shard_of(params, *_cut(trainer), *shard)
    sent = flat_shard(trainer, shard, matrices=torch.bfloat16)
    matrices = sum(t.numel() for t in wanted if t.dim() == 2)
    assert sent.dtype == torch.uint8 and sent.numel() == 2 * matrices + 4 * (sum(t.numel() for t in wanted) - matrices)
    assert {t.dim() for t in wanted} == {1, 2}  # the shard holds both kinds
    received = [torch.empty_like(t) for t in wanted]  # the receiving copy's tensors, its matrices lowered
    holder = torch.nn.ParameterList([torch.nn.Parameter(t) for t in received])
    lower_matrices(holder, torch.bfloat16)
    assert packed_bytes(list(holder), torch.bfloat16) == sent.numel()
    with torch.no_grad():
        unpack_wire(sent, list(holder), torch.bfloat16)
    for got, want in zip(holder, wanted):
        assert got.dtype == (torch.bfloat16 if want.dim() == 2 else torch.float32)
        assert torch.equal(got, want.to(got.dtype))
    # round trip of any order of matrices and vectors
    tensors = [torch.randn(3, 5), torch.randn(7), torch.randn(2, 2), torch.randn(1)]
    out = [torch.empty_like(t) for t in tensors]
    unpack_wire(pack_wire(tensors, torch.bfloat16), out, torch.bfloat16)
    assert all(torch.equal(o, t.to(torch.bfloat16).float()) if t.dim() == 2 else torch.equal(o, t)
               for o, t in zip(out, tensors))
