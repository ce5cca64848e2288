"""Training basics and precision (runtime.optim, the reference trainer, the spec and planner sides; issue 11).

The distributed-vs-single-process comparisons are tests/integration/test_training_basics.py; here: the schedule's
values and exact resume, parameter groups (also ZeRO-1's runs), clipping against torch's, accumulation against the
whole batch, the micro-batch the planner plans, and bf16 autocast on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from planner.components import expand_use
from planner.errors import SpecError
from planner.metagraph import build_metagraph
from planner.spec import TrainingSpec, parse_job
from runtime import modules
from runtime.optim import (
    LossScaler, PrecisionError, autocast, clip_coefficient, compute_dtype, lr_factor, param_groups, scale_gradients,
)
from runtime.reference import ReferenceTrainer
from runtime.zero import _runs


def job_dict(**training) -> dict:
    """A tiny two-component chain (mlp embedding -> transformer), per-sample cross entropy, fp32 unless told."""
    return {
        "name": "basics",
        "cluster": {"devices_per_node": 2, "device": "cpu"},
        "components": {
            "enc": {"kind": "transformer", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "seq_len": 4},
            "top": {"kind": "mlp", "num_layers": 1, "hidden_size": 16},
        },
        "tasks": [{"name": "cls", "batch_size": 4, "components": [{"component": "enc"}, {"component": "top"}]}],
        "training": {"steps": 4, "lr": 1e-2, "seed": 1, "precision": "fp32", **training},
    }


def train(data: dict, steps: int) -> tuple[list[dict], ReferenceTrainer]:
    trainer = ReferenceTrainer(parse_job(data))
    return [trainer.train_step(step) for step in range(steps)], trainer


# --------------------------------------------------------------------------- schedule


def test_lr_factor_warms_up_then_decays_to_the_floor():
    constant = TrainingSpec(steps=10, warmup_steps=4)
    assert [lr_factor(constant, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    linear = TrainingSpec(steps=10, warmup_steps=2, lr_schedule="linear", min_lr_ratio=0.2)
    assert lr_factor(linear, 2) == 1.0  # decay starts after warmup
    assert lr_factor(linear, 6) == pytest.approx(0.2 + 0.8 * 0.5)  # half way through the 8 decay steps
    assert lr_factor(linear, 10) == pytest.approx(0.2) and lr_factor(linear, 50) == pytest.approx(0.2)
    cosine = TrainingSpec(steps=10, lr_schedule="cosine")
    assert lr_factor(cosine, 0) == 1.0
    assert lr_factor(cosine, 5) == pytest.approx(0.5)
    assert lr_factor(cosine, 3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_every_schedule_sets_each_groups_rate_and_resumes_exactly(schedule):
    data = job_dict(lr_schedule=schedule, warmup_steps=1, min_lr_ratio=0.1)
    data["components"]["top"]["lr"] = 5e-3
    whole, trainer = train(data, 4)
    rates = sorted({g["base_lr"] for g in trainer.optimizer.param_groups})
    assert rates == [5e-3, 1e-2]
    for group in trainer.optimizer.param_groups:  # the last step (3) ran at base_lr * factor(3)
        assert group["lr"] == pytest.approx(group["base_lr"] * lr_factor(parse_job(data).training, 3))
    # a run stopped after 2 steps and resumed from its state (modules and optimizer) continues identically
    first, stopped = train(data, 2)
    resumed = ReferenceTrainer(parse_job(data))
    resumed.load_parameters(stopped.named_parameters())
    resumed.optimizer.load_state_dict(stopped.optimizer.state_dict())
    assert first + [resumed.train_step(step) for step in (2, 3)] == whole
    if schedule != "constant":  # the schedule changes training (the lr is not ignored)
        constant, _ = train(job_dict(warmup_steps=1), 4)
        assert constant[3] != whole[3]


# --------------------------------------------------------------------------- parameter groups


def test_param_groups_spare_norms_and_biases_from_decay_and_use_component_rates():
    data = job_dict(weight_decay=0.1)
    data["components"]["top"]["lr"] = 3e-3
    job = parse_job(data)
    ln, proj, frozen = nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(4, 4)
    frozen.requires_grad_(False)
    owned = [("enc", p) for p in [*ln.parameters(), *proj.parameters(), *frozen.parameters()]]
    owned.append(("top", nn.Parameter(torch.ones(4, 4))))
    owned.append((None, nn.Parameter(torch.ones(3, 4))))  # a loss head's: training.lr
    groups = {(g["lr"], g["weight_decay"]): g["params"] for g in param_groups(job, owned)}
    assert {k: len(v) for k, v in groups.items()} == {(1e-2, 0.0): 3, (1e-2, 0.1): 2, (3e-3, 0.1): 1}
    assert groups[(1e-2, 0.0)][0] is ln.weight and groups[(1e-2, 0.1)][0] is proj.weight


def test_zero_shares_are_cut_into_runs_of_one_group():
    job = parse_job(job_dict(weight_decay=0.1))
    weight, bias, other = nn.Parameter(torch.ones(2, 3)), nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, 2))
    # elements: weight [0, 6), bias [6, 9), other [9, 13); a holder's share [4, 11) crosses all three
    runs = _runs(job, [weight, bias, other], 4, 11, {id(other): "top"})
    assert [(r.lo, r.hi, r.key) for r in runs] == [(4, 6, (1e-2, 0.1)), (6, 9, (1e-2, 0.0)), (9, 11, (1e-2, 0.1))]
    merged = _runs(job, [weight, other], 0, 10, {})  # same group, consecutive: one run
    assert [(r.lo, r.hi) for r in merged] == [(0, 10)] and merged[0].master.shape == (10,)


def test_frozen_components_get_no_optimizer_state_under_the_basics():
    data = job_dict(grad_clip=0.1, grad_accum_steps=2, lr_schedule="cosine")
    data["components"]["enc"]["frozen"] = True
    losses, trainer = train(data, 2)
    enc = {id(p) for (name, _), m in trainer.modules.items() if name == "enc" for p in m.parameters()}
    stepped = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert enc and not enc & stepped
    assert losses[1]["cls"] != losses[0]["cls"]  # the rest trains


# --------------------------------------------------------------------------- clipping and accumulation


def test_sgd_trains_as_torch_sgd_and_unlike_adamw():
    """``optimizer: sgd`` is honoured: the reference steps as torch.optim.SGD over the same parameters (weight decay
    on matrices only, the schedule's warmup applied), and differently from AdamW."""
    data = job_dict(optimizer="sgd", weight_decay=0.1, warmup_steps=2)
    losses, trainer = train(data, 3)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    by_hand = ReferenceTrainer(parse_job(data))
    params = [p for m in by_hand.modules.values() for p in m.parameters() if p.requires_grad]
    sgd = torch.optim.SGD([{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.1},
                           {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}], lr=1e-2)
    want = []
    for step in range(3):
        task = by_hand.task_loss(0, step)
        want.append({"cls": float(task.detach())})
        task.backward()
        for group in sgd.param_groups:
            group["lr"] = 1e-2 * lr_factor(parse_job(data).training, step)
        sgd.step()
        sgd.zero_grad()
    assert losses == want
    ours, theirs = trainer.named_parameters(), by_hand.named_parameters()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    adamw, _ = train(job_dict(weight_decay=0.1, warmup_steps=2), 3)
    assert adamw[0] == losses[0] and adamw[2] != losses[2]


def test_clip_coefficient_matches_torch_clip_grad_norm():
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    total = sum(float(p.grad.double().pow(2).sum()) for p in ours)
    scale_gradients(ours, clip_coefficient(total, 0.5))
    torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    assert clip_coefficient(0.04, 1.0) == 1.0  # under the limit: unchanged


def test_clipping_caps_the_norm_and_changes_training():
    clipped, trainer = train(job_dict(grad_clip=1e-3), 2)
    trainer.train_step(2, keep_gradients=True)  # the gradients the optimizer stepped with
    norm = float(torch.cat([g.reshape(-1) for g in trainer.last_gradients.values()]).norm())
    assert norm == pytest.approx(1e-3, rel=1e-3)
    unclipped, _ = train(job_dict(), 2)
    assert clipped[0] == unclipped[0] and clipped[1] != unclipped[1]  # the first step's update differs


def test_accumulated_micro_batches_equal_the_whole_batch():
    whole, one = train(job_dict(weight_decay=0.1), 3)
    accumulated, two = train(job_dict(weight_decay=0.1, grad_accum_steps=2), 3)
    for a, b in zip(whole, accumulated):
        assert a["cls"] == pytest.approx(b["cls"], rel=1e-6)
    for name, p in one.named_parameters().items():
        torch.testing.assert_close(two.named_parameters()[name], p, rtol=1e-5, atol=1e-7)


def test_the_planner_plans_the_micro_batch_and_checks_divisibility():
    assert [op.batch_size for op in build_metagraph(parse_job(job_dict())).metaops] == [4, 4]
    assert [op.batch_size for op in build_metagraph(parse_job(job_dict(grad_accum_steps=2))).metaops] == [2, 2]
    with pytest.raises(SpecError) as err:
        parse_job(job_dict(grad_accum_steps=3))
    message = str(err.value)
    assert "\n" not in message
    assert "tasks[0].batch_size (4) is not divisible by training.grad_accum_steps (3)" in message


# --------------------------------------------------------------------------- precision


def test_bf16_on_cpu_computes_in_bf16_over_fp32_weights():
    job = parse_job(job_dict(precision="bf16"))
    assert compute_dtype(job, torch.device("cpu")) == torch.bfloat16
    layer = nn.Linear(4, 4)
    with autocast(job, torch.device("cpu")):
        assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
    fp32, _ = train(job_dict(), 3)
    bf16, trainer = train(job_dict(precision="bf16"), 3)
    assert all(p.dtype == torch.float32 for p in trainer.named_parameters().values())  # master weights
    for a, b in zip(fp32, bf16):  # bf16 rounding shows, but it is the same training
        assert a["cls"] != b["cls"] and a["cls"] == pytest.approx(b["cls"], rel=2e-2)


def test_fp16_needs_a_gpu():
    with pytest.raises(SpecError) as err:  # a CPU cluster: refused when the spec is read
        parse_job(job_dict(precision="fp16"))
    assert "training.precision ('fp16') is not supported on cluster.device cpu" in str(err.value)
    gpu_job = parse_job({**job_dict(precision="fp16"), "cluster": {"devices_per_node": 2, "device": "h100"}})
    with pytest.raises(PrecisionError, match="cannot run on cpu"):  # a GPU job on a host without GPUs
        compute_dtype(gpu_job, torch.device("cpu"))
    assert compute_dtype(gpu_job, torch.device("cuda")) == torch.float16


def test_loss_scaler_skips_overflowing_steps_and_grows_back():
    scaler = LossScaler(enabled=True, init_scale=8.0, growth_interval=2)
    assert scaler.update(found_inf=True) is False and scaler.scale == 4.0
    assert scaler.update(found_inf=False) and scaler.scale == 4.0
    assert scaler.update(found_inf=False) and scaler.scale == 8.0
    off = LossScaler(enabled=False)
    assert off.scale == 1.0 and off.update(found_inf=True)


def test_the_planner_prices_activations_in_the_training_precision():
    bf16 = expand_use(parse_job(job_dict(precision="bf16")), 0, 0)[0]
    fp32 = expand_use(parse_job(job_dict(precision="fp32")), 0, 0)[0]
    # the norms keep the float32 residual stream in both (planner.memory), so saved bytes grow by less than 2x
    assert bf16.act_bytes < fp32.act_bytes < 2 * bf16.act_bytes and fp32.out_bytes == 2 * bf16.out_bytes
    assert (fp32.flops_fwd, fp32.params, fp32.key) == (bf16.flops_fwd, bf16.params, bf16.key)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_goes_through_sdpa_with_the_same_math(monkeypatch, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 8) for _ in range(3))
    b, s, h, heads = 2, 5, 8, 2
    split = [t.reshape(b, s, heads, h // heads).transpose(1, 2) for t in (q, k, v)]
    scores = split[0] @ split[1].transpose(-2, -1) / math.sqrt(h // heads)
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    want = (scores.softmax(-1) @ split[2]).transpose(1, 2).reshape(b, s, h)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(modules.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(kw) or sdpa(*a, **kw))
    torch.testing.assert_close(modules.attend(q, k, v, heads, causal=causal), want, rtol=1e-5, atol=1e-6)
    assert [call["is_causal"] for call in calls] == [causal]  # one SDPA call, causal by its own flag


def test_the_prediction_runs_the_waves_once_per_micro_batch():
    from planner.api import plan_job

    one = plan_job(parse_job(job_dict()), with_baselines=False)
    # in order (planner.phases.step_walk): every device walks the waves once per micro-batch, one after the other
    two = plan_job(parse_job(job_dict(grad_accum_steps=2, pipeline_micro_batches=False)), with_baselines=False)
    for result, k in ((one, 1), (two, 2)):
        sim = result.simulation
        assert sim.compute_s == pytest.approx(k * (sum(sim.wave_durations) + sim.loss_s))
        parts = sim.compute_s + sim.transfer_s + sim.sync_s + sim.optimizer_s + sim.gather_s + sim.reduce_s
        assert sim.iteration_time_s == pytest.approx(parts) and sim.reduce_s > 0  # the step's loss all-reduce
    assert two.simulation.iteration_time_s > two.simulation.compute_s / 2 + two.simulation.transfer_s / 2
