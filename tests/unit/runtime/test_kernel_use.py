"""The runtime's use of kernels/ (training.kernels): Loom's llama layer, the next-token head and the InfoNCE head give
the same losses and gradients with the fused kernels (``auto``, the chunked reference on CPU) as with the plain torch
expressions (``off``), and ``off`` really takes the plain path."""

from __future__ import annotations

import copy

import pytest
import torch

from kernels import linear_ce
from planner.spec import parse_job
from runtime.data import synthetic_batch
from runtime.heads import build_head
from runtime.modules import LlamaBlock, build_initialised

H, SEQ, BATCH, VOCAB = 16, 6, 4, 40


def job_with(kernels: str):
    return parse_job({
        "name": "kernels",
        "components": {
            "lm": {"kind": "llama", "num_layers": 1, "hidden_size": H, "num_heads": 4, "num_kv_heads": 2,
                   "seq_len": SEQ, "vocab_size": VOCAB},
            "image": {"kind": "vit", "num_layers": 1, "hidden_size": H, "num_heads": 4, "patch_size": 4,
                      "image_size": 8},
        },
        "tasks": [
            {"name": "gen", "batch_size": BATCH, "loss": "next_token", "components": [{"component": "lm"}]},
            {"name": "clip", "batch_size": BATCH, "loss": "infonce",
             "components": [{"component": "image"}, {"component": "lm", "after": []}]},
        ],
        "training": {"kernels": kernels, "precision": "fp32"},
    })


def losses_and_grads(module, call, inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = call(module, *leaves)
    weight = torch.linspace(-1, 2, out.numel()).reshape(out.shape)
    params = [p for p in module.parameters() if p.requires_grad]
    return out, torch.autograd.grad((out * weight).sum(), [*leaves, *params])


def assert_same(fused, plain, call, inputs, **tol) -> None:
    out_f, grads_f = losses_and_grads(fused, call, inputs)
    out_p, grads_p = losses_and_grads(plain, call, inputs)
    torch.testing.assert_close(out_f, out_p, **tol)
    for g_f, g_p in zip(grads_f, grads_p, strict=True):
        torch.testing.assert_close(g_f, g_p, **tol)


def test_llama_layer_with_fused_rmsnorm_and_swiglu_equals_its_own_modules() -> None:
    plain = build_initialised(lambda: LlamaBlock(H, 4, 2, 40, "off"), 7)
    with torch.no_grad():  # norm weights away from 1, so that a wrong weight gradient shows
        for p in plain.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    fused = copy.deepcopy(plain)
    fused.kernels = "auto"
    x = torch.randn(3, SEQ, H, generator=torch.Generator().manual_seed(1))
    assert_same(fused, plain, lambda m, x: m(x), [x], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task", [0, 1], ids=["next_token", "infonce"])
def test_heads_with_kernels_equal_the_plain_expressions(task: int, monkeypatch) -> None:
    fused, plain = build_head(job_with("auto"), task), build_head(job_with("off"), task)
    assert fused.kernels == "auto" and plain.kernels == "off"
    batch = synthetic_batch(job_with("auto"), task, 0, 0, BATCH)
    gen = torch.Generator().manual_seed(task)
    leaves = fused.leaves
    inputs = [torch.randn(BATCH, SEQ, H, generator=gen) for _ in leaves]

    def call(head, *xs):
        return head(dict(zip(leaves, xs)), batch)

    assert_same(fused, plain, call, inputs)
    # off never reaches the chunked op; auto does
    calls = []
    real = linear_ce.linear_ce_call
    monkeypatch.setattr(linear_ce, "linear_ce_call", lambda *a: calls.append(1) or real(*a))
    if task == 0:
        call(plain, *inputs)
        assert not calls
        call(fused, *inputs)
        assert calls
