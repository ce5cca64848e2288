"""recipes.alignment.losses on hand-made cases: values, gradient directions, the top-k KL against the full KL."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recipes.alignment.losses import (
    RewardHead, dpo_loss, last_key, reward_bt_loss, sequence_logprobs, sft_kl_penalty,
)
from runtime.data import TaskBatch
from runtime.tokenizer import IGNORE_INDEX

NAN = float("nan")


def softplus(x: float) -> float:
    return math.log1p(math.exp(-x))  # -log sigmoid(x)


def test_reward_bt_value_with_and_without_scores():
    chosen = torch.tensor([1.0, 0.5, 0.5])
    rejected = torch.tensor([0.0, 0.0, 0.0])
    sc, sr = torch.tensor([1.0, 1.0, NAN]), torch.tensor([0.0, 0.0, NAN])
    loss = reward_bt_loss(chosen, rejected, sc, sr, alpha=0.5)
    assert loss[0].item() == pytest.approx(softplus(1.0))  # rewards equal the scores: no squared error
    assert loss[1].item() == pytest.approx(softplus(0.5) + 0.5 * 0.25)  # chosen 0.5 short of its score 1
    assert loss[2].item() == pytest.approx(softplus(0.5))  # no scores: alpha = 0 on this pair


def test_reward_bt_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    reward_bt_loss(chosen, rejected, torch.tensor([NAN, 0.0]), torch.tensor([NAN, 0.0]), alpha=0.5).sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises r_w, lowers r_l
    # with scores the squared error pulls each reward towards its score: chosen score 3 pulls harder upwards
    c, r = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    reward_bt_loss(c, r, torch.tensor([3.0]), torch.tensor([0.0]), alpha=1.0).sum().backward()
    assert c.grad.item() == pytest.approx(-0.5 - 6.0) and r.grad.item() == pytest.approx(0.5)


def test_dpo_value_margin_and_gradient():
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    rc, rr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    loss, margin = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert margin.item() == pytest.approx(0.2)  # 0.1 * ((-1 + 2) - (-3 + 2))
    assert loss.item() == pytest.approx(softplus(0.2))
    loss.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises log pi(y_w), lowers log pi(y_l)
    assert rc.grad is None and rr.grad is None  # the reference is detached


def test_sequence_logprobs_sums_the_learned_next_tokens():
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(2, 5, 4), torch.randn(7, 4), torch.randn(7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1, IGNORE_INDEX], [IGNORE_INDEX, 6, 0, 2, 5]])
    logp = torch.log_softmax(hidden @ weight.T + bias, dim=-1)
    expected = torch.stack([logp[0, 1, 3] + logp[0, 2, 1],
                            logp[1, 0, 6] + logp[1, 1, 0] + logp[1, 2, 2] + logp[1, 3, 5]])
    torch.testing.assert_close(sequence_logprobs(hidden, weight, bias, labels), expected)


def full_kl(ref_logits: torch.Tensor, policy_logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || policy) per position, over the whole vocabulary."""
    return F.kl_div(policy_logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True,
                    reduction="none").sum(-1)


def test_top_k_kl_with_k_equal_vocab_is_the_full_kl():
    torch.manual_seed(1)
    vocab = 11
    hidden, weight, bias = torch.randn(2, 3, 4), torch.randn(vocab, 4), torch.randn(vocab)
    ref_logits = torch.randn(2, 3, vocab)
    learned = torch.tensor([[True, True, False], [True, True, True]])
    penalty = sft_kl_penalty(hidden, weight, bias, ref_logits, learned, k=vocab)
    kl = full_kl(ref_logits, hidden @ weight.T + bias)
    expected = torch.stack([kl[0, :2].mean(), kl[1].mean()])
    torch.testing.assert_close(penalty, expected, rtol=1e-5, atol=1e-6)


def test_top_k_kl_renormalises_the_reference_top_k_and_pulls_the_policy_towards_it():
    torch.manual_seed(2)
    vocab, k = 9, 3
    hidden = torch.randn(1, 2, 4)
    weight = torch.randn(vocab, 4, requires_grad=True)
    ref_logits = torch.randn(1, 2, vocab)
    penalty = sft_kl_penalty(hidden, weight, None, ref_logits, torch.ones(1, 2, dtype=torch.bool), k=k)
    top, index = ref_logits.topk(k, dim=-1)
    q = top.softmax(-1)
    logpi = (hidden @ weight.T).log_softmax(-1).gather(-1, index)
    expected = (q * (q.log() - logpi)).sum(-1).mean(dim=1)
    torch.testing.assert_close(penalty, expected.detach(), rtol=1e-5, atol=1e-6)
    assert penalty.item() > 0
    penalty.sum().backward()  # one small step against the gradient lowers the penalty
    with torch.no_grad():
        stepped = weight - 0.1 * weight.grad
    after = sft_kl_penalty(hidden, stepped, None, ref_logits, torch.ones(1, 2, dtype=torch.bool), k=k)
    assert after.item() < penalty.item()


def test_top_k_kl_is_zero_when_the_policy_is_the_reference():
    torch.manual_seed(3)
    vocab = 6
    hidden, weight = torch.randn(1, 4, 5), torch.randn(vocab, 5)
    penalty = sft_kl_penalty(hidden, weight, None, hidden @ weight.T, torch.ones(1, 4, dtype=torch.bool), k=vocab)
    assert penalty.abs().item() < 1e-5


def test_reward_head_reads_the_last_real_token_of_each_sequence():
    head = RewardHead("reward", ["chosen", "rejected"], hidden_size=4)
    torch.nn.init.ones_(head.out.weight)
    torch.nn.init.zeros_(head.out.bias)
    head.norm = None  # read the hidden state as it is: reward = sum of the state at the last token
    chosen, rejected = torch.zeros(2, 5, 4), torch.zeros(2, 5, 4)
    chosen[0, 2], chosen[1, 4], rejected[0, 1], rejected[1, 3] = 1.0, 2.0, -1.0, 0.5  # the last tokens
    chosen[0, 4] = 100.0  # padding after the last token: never read
    targets = {last_key("chosen"): torch.tensor([2, 4]), last_key("rejected"): torch.tensor([1, 3]),
               "score_chosen": torch.tensor([NAN, NAN]), "score_rejected": torch.tensor([NAN, NAN])}
    batch = TaskBatch({}, torch.zeros(2), 2, targets)
    c, r = head.rewards({"chosen": chosen, "rejected": rejected}, batch)
    torch.testing.assert_close(c, torch.tensor([4.0, 8.0]))
    torch.testing.assert_close(r, torch.tensor([-4.0, 2.0]))
    loss = head({"chosen": chosen, "rejected": rejected}, batch)
    torch.testing.assert_close(loss, torch.tensor([softplus(8.0), softplus(6.0)]))
