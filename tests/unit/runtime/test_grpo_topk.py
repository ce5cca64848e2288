"""GRPO's top-k KL option (runtime.grpo, ``loss_args: {kl: topk, topk: K}``) against a plain-torch expression, its
argument checks, and the recipes' log-probabilities (GRPO's per token, DPO's per sequence) through the chunked
kernels equal to the plain path of ``training.kernels: off``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from planner.spec import parse_job
from recipes.alignment.losses import sequence_logprobs
from runtime.checks import check_head
from runtime.grpo import GRPOHead, grpo_losses, grpo_options
from runtime.tokenizer import IGNORE_INDEX

P, N, H, V = 3, 4, 8, 13
ROLES = {"rollout": "rollout", "policy": "policy", "reward": "reward", "reference": "reference"}


def _head(kernels: str, topk: int) -> GRPOHead:
    torch.manual_seed(0)
    head = GRPOHead("g", ROLES, P, N, 2, {"policy": H, "reference": H, "reward": H}, V, kernels, 0.1, "topk", topk)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn_like(p))
    return head


def _plain_topk_kl(head: GRPOHead, hidden: torch.Tensor, ref_hidden: torch.Tensor, k: int) -> torch.Tensor:
    """sum over the reference's top-k tokens of q (log q - log pi), q renormalised over them, pi the whole softmax."""
    ref = head.reference.out(head.reference.norm(ref_hidden[:, P - 1:-1]))
    policy = head.policy.out(head.policy.norm(hidden[:, P - 1:-1]))
    top, index = ref.topk(k, dim=-1)
    q = top.softmax(-1)
    return (q * (q.log() - policy.log_softmax(-1).gather(-1, index))).sum(-1)


@pytest.mark.parametrize("kernels", ["reference", "off"])
@pytest.mark.parametrize("k", [5, V])
def test_topk_kl_equals_the_plain_expression_and_the_full_kl_at_k_vocab(kernels, k):
    head = _head(kernels, k)
    hidden = torch.randn(2, P + N, H, requires_grad=True)
    ref_hidden = torch.randn(2, P + N, H)
    ours = head.topk_kl(hidden, ref_hidden)
    want = _plain_topk_kl(head, hidden, ref_hidden, k)
    torch.testing.assert_close(ours, want.detach(), rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours.sum(), hidden)
    (g_want,) = torch.autograd.grad(want.sum(), hidden)
    torch.testing.assert_close(g_ours, g_want, rtol=1e-4, atol=1e-6)
    if k == V:  # the full KL(reference || policy)
        ref = head.reference.out(head.reference.norm(ref_hidden[:, P - 1:-1]))
        policy = head.policy.out(head.policy.norm(hidden[:, P - 1:-1]))
        full = F.kl_div(policy.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        torch.testing.assert_close(ours, full.detach(), rtol=1e-5, atol=1e-6)
    assert (ours > 0).all()


def test_the_loss_adds_beta_times_the_topk_kl_in_place_of_k3():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    kl = torch.tensor([[0.5, 0.25, 2.0]])
    generated = torch.tensor([[True, True, False]])
    loss = grpo_losses(logp, torch.zeros(1, 3), torch.tensor([0.5]), generated, 0.1, kl)
    torch.testing.assert_close(loss, torch.tensor([-0.5 + 0.1 * 0.375]))


def _job(loss_args: dict, loss: str = "grpo"):
    llama = {"kind": "llama", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "vocab_size": 32, "seq_len": 8}
    uses = [{"component": "policy", "name": "rollout", "mode": "generate", "seq_len": 4, "new_tokens": 4,
             "samples": 2},
            {"component": "other", "mode": "forward", "seq_len": 8, "after": ["rollout"]},
            {"component": "policy", "seq_len": 8, "after": ["rollout"]}]
    if loss != "grpo":
        uses = [{"component": "policy"}]
    return parse_job({"name": "g", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
                      "components": {"policy": llama, "other": {**llama, "frozen": True}},
                      "tasks": [{"name": "g", "batch_size": 4, "loss": loss, "loss_args": loss_args,
                                 "components": uses}]})


@pytest.mark.parametrize("args, needle", [
    ({"kl": "k2"}, "loss_args.kl ('k2') is not a KL estimator"),
    ({"beta": -1}, "loss_args.beta (-1)"),
    ({"topk": 0, "kl": "topk"}, "loss_args.topk (0)"),
    ({"topk": 50}, "read only with kl: topk"),
    ({"temperature": 1}, "loss_args.temperature: not an option of loss 'grpo'"),
])
def test_bad_loss_args_are_refused_in_one_line(args, needle):
    with pytest.raises(ValueError, match="tasks\\[0\\] \\('g'\\)") as err:
        check_head(_job(args), 0)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_loss_args_are_read_and_refused_on_a_loss_without_options():
    assert grpo_options(_job({"kl": "topk", "topk": 7, "beta": 0.2}), 0) == {"beta": 0.2, "kl": "topk", "topk": 7}
    assert grpo_options(_job({}), 0) == {"beta": 0.04, "kl": "k3", "topk": 500}
    with pytest.raises(ValueError, match="loss 'lm' takes no options"):
        check_head(_job({"beta": 0.1}, loss="lm"), 0)


def test_grpo_logprobs_through_the_kernel_equal_the_plain_path():
    generator = torch.Generator().manual_seed(0)  # its own draws: the global stream's state depends on the tests before
    hidden = torch.randn(2, P + N, H, generator=generator).requires_grad_(True)
    tokens = torch.randint(0, V, (2, P + N), generator=generator)
    got = {}
    for kernels in ("reference", "off"):
        head = _head(kernels, 5)
        logp = head.logprobs(head.policy, hidden, tokens)
        got[kernels] = (logp, *torch.autograd.grad(logp.sum(), [hidden, head.policy.out.weight]))
    for a, b in zip(got["reference"], got["off"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dpo_sequence_logprobs_through_the_kernel_equal_the_plain_path():
    torch.manual_seed(4)
    hidden = torch.randn(2, 6, H, requires_grad=True)
    weight, bias = torch.randn(V, H, requires_grad=True), torch.randn(V)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1, 7, IGNORE_INDEX], [IGNORE_INDEX, 6, 0, 2, 5, 12]])
    got = {}
    for kernels in ("reference", "off"):
        logp = sequence_logprobs(hidden, weight, bias, labels, kernels)
        got[kernels] = (logp, *torch.autograd.grad(logp.sum(), [hidden, weight]))
    for a, b in zip(got["reference"], got["off"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
