"""The grpo loss's parts (runtime.grpo): group-normalised advantages, the k3 KL estimate, the per-sample loss and its
gradient (-A times the gradient of the log-probabilities, on-policy), and the one-line errors for a task it cannot
read."""

from __future__ import annotations

import math

import pytest
import torch

from planner.spec import parse_job
from runtime.grpo import grpo_losses, grpo_roles, group_advantages, k3


def test_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, 4)
    first = torch.tensor([1.0, 2.0, 3.0, 6.0])
    want = (first - first.mean()) / (first.std() + 1e-4)  # unbiased std, as TRL's GRPOTrainer
    assert torch.allclose(adv[:4], want) and torch.equal(adv[4:], torch.zeros(4))  # equal rewards: no signal
    assert torch.equal(group_advantages(rewards, 1), torch.zeros(8))


def test_k3_is_the_kl_estimate_at_sampled_tokens():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -3.0])
    d = ref - logp
    assert torch.allclose(k3(logp, ref), torch.exp(d) - d - 1)
    assert k3(logp, ref)[0] == 0 and (k3(logp, ref) >= 0).all()
    # unbiased: E_{x ~ p}[k3] = KL(p || q) for two distributions over 3 tokens
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    expected = float((p * k3(p.log(), q.log())).sum())
    assert math.isclose(expected, float((p * (p / q).log()).sum()), rel_tol=1e-6)


def test_loss_is_the_mean_over_generated_tokens_and_its_gradient_is_the_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-0.5, -1.0, -1.0]])
    generated = torch.tensor([[True, True, True], [True, True, False]])  # row 1 stopped after 2 tokens
    adv = torch.tensor([0.7, -1.2])
    beta = 0.1
    loss = grpo_losses(logp, ref, adv, generated, beta)
    kl = k3(logp.detach(), ref)
    want = torch.stack([(-adv[0] + beta * kl[0]).mean(), (-adv[1] + beta * kl[1, :2]).mean()])
    assert torch.allclose(loss, want)
    loss.sum().backward()
    # d/d logp of -A * ratio is -A (ratio 1 on-policy); of beta * k3 it is beta * (1 - exp(ref - logp))
    dk3 = 1 - torch.exp(ref - logp.detach())
    grad = (-adv[:, None] + beta * dk3) * generated / generated.sum(1, keepdim=True)
    assert torch.allclose(logp.grad, grad)


def _job(uses):
    llama = {"kind": "llama", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "vocab_size": 32, "seq_len": 8}
    return parse_job({"name": "g", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
                      "components": {"policy": llama, "other": {**llama, "frozen": True}},
                      "tasks": [{"name": "g", "batch_size": 4, "loss": "grpo", "components": uses}]})


ROLLOUT = {"component": "policy", "name": "rollout", "mode": "generate", "seq_len": 4, "new_tokens": 4, "samples": 2}


def test_roles_are_read_from_the_task():
    job = _job([ROLLOUT, {"component": "other", "name": "rm", "mode": "forward", "after": ["rollout"]},
                {"component": "policy", "after": ["rollout"]}])
    assert grpo_roles(job, 0) == {"rollout": "rollout", "policy": "policy", "reward": "rm", "reference": None}


@pytest.mark.parametrize("uses, needle", [
    ([{"component": "policy"}], "needs one generate use"),
    ([ROLLOUT, {"component": "other", "mode": "forward", "after": ["rollout"]},
      {"component": "other", "name": "o2", "after": ["rollout"]}], "GRPO trains the policy that generates"),
])
def test_a_task_the_loss_cannot_read_is_refused_in_one_line(uses, needle):
    with pytest.raises(ValueError) as info:
        grpo_roles(_job(uses), 0)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_use_reading_rollouts_at_another_length_is_refused_in_one_line():
    from planner.errors import SpecError
    from runtime.checks import check_trainable

    ok = [ROLLOUT, {"component": "other", "name": "rm", "mode": "forward", "after": ["rollout"]},
          {"component": "policy", "after": ["rollout"]}]
    check_trainable(_job(ok))  # the readers' seq_len 8 = prompt 4 + new_tokens 4
    short = [*ok[:2], {"component": "policy", "after": ["rollout"], "seq_len": 6}]
    with pytest.raises(SpecError) as info:
        check_trainable(_job(short))
    assert "at seq_len 8 (prompt 4 + new_tokens 4)" in str(info.value) and "\n" not in str(info.value)


def test_grpo_on_a_pretrained_llama_decodes_and_trains_with_the_models_own_lm_head(tmp_path):
    """Policy and reference from one transformers LlamaForCausalLM folder: the loss head's LM heads are the model's
    (the reference's frozen), the rollouts share each group's prompt, and at the first step the loss is 0 (policy =
    reference, and a group's advantages sum to 0) while the policy's gradient is not."""
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from runtime.reference import ReferenceTrainer

    sys.path.insert(0, str(Path(__file__).parents[3] / "examples"))
    from make_models import save_llama  # examples/make_models.py

    folder = save_llama(tmp_path / "llama", vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    lm = {"pretrained": str(folder), "seq_len": 10}
    job = parse_job({
        "name": "g", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
        "components": {"policy": lm, "reference": {**lm, "frozen": True},
                       "reward": {"kind": "llama", "num_layers": 1, "hidden_size": 16, "num_heads": 2,
                                  "vocab_size": 48, "seq_len": 10}},
        "tasks": [{"name": "g", "batch_size": 4, "loss": "grpo", "components": [
            {"component": "policy", "name": "rollout", "mode": "generate", "seq_len": 5, "new_tokens": 5,
             "samples": 2},
            {"component": "reward", "mode": "forward", "after": ["rollout"]},
            {"component": "reference", "mode": "forward", "after": ["rollout"]},
            {"component": "policy", "after": ["rollout"]}]}],
        "training": {"precision": "fp32"},
    })
    trainer = ReferenceTrainer(job)
    head = trainer.head(0)
    lm_head = load_file(str(folder / "model.safetensors"))["lm_head.weight"]
    assert torch.equal(head.reference.out.weight, lm_head) and torch.equal(head.policy.out.weight, lm_head)
    assert not head.reference.out.weight.requires_grad and head.policy.out.weight.requires_grad
    loss = trainer.train_step(0, keep_gradients=True)["g"]
    assert abs(loss) < 1e-6
    grads = trainer.last_gradients
    assert float(grads["head:g/0/policy.out.weight"].norm()) > 0
    assert float(grads["policy/0/layer.mlp.up_proj.weight"].norm()) > 0
    assert not any(n.startswith(("reference/", "reward/", "head:g/0/reference.", "head:g/0/reward")) for n in grads)
    rows = next(iter(trainer.last_rollouts.values()))
    assert torch.equal(rows[0, :5], rows[1, :5]) and torch.equal(rows[2, :5], rows[3, :5])
