"""A pretrained Llama-family layer with `training.kernels: reference|auto` runs its RMSNorms (the second fused with the
residual add) and SwiGLU as Loom's kernels and equals transformers' own decoder layer within 1e-6 (output, input
gradient, every parameter's gradient); `off` is transformers' own modules. The final norm of a next-token head
likewise. The parameters keep their names, so loading and export are unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from planner.metagraph import build_metagraph
from planner.spec import load_job
from runtime.pretrained import PretrainedLayer, build_op_layer
from runtime.pretrained_kernels import KernelRMSNorm, KernelSwiGLU

sys.path.insert(0, str(Path(__file__).parents[3] / "examples"))
from make_models import save_llama  # noqa: E402  (examples/make_models.py)

TOL = 1e-6
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kernel_models")
    for i, family in enumerate(FAMILIES):
        save_llama(root / family, model_type=family, seed=i, num_hidden_layers=1)
    return root


def _job(folders: Path, family: str, kernels: str):
    doc = {"name": "k", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
           "components": {"lm": {"pretrained": str(folders / family), "seq_len": 12}},
           "tasks": [{"name": "chat", "batch_size": 2, "loss": "lm", "components": [{"component": "lm"}]}],
           "training": {"steps": 1, "precision": "fp32", "kernels": kernels}}
    path = folders / f"{family}-{kernels}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_job(path)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _cotangent(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(7))


def _run(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * _cotangent(y.shape)).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_kernel_layer_equals_the_transformers_layer(folders, family):
    off = build_op_layer(job := _job(folders, family, "off"), build_metagraph(job).metaops[0], 0)
    ref = build_op_layer(job := _job(folders, family, "reference"), build_metagraph(job).metaops[0], 0)
    assert isinstance(off, PretrainedLayer) and not off.fused
    assert type(off.layer.input_layernorm).__name__.endswith("RMSNorm") and not isinstance(
        off.layer.mlp, KernelSwiGLU)  # off: transformers' own modules
    assert ref.fused and isinstance(ref.layer.post_attention_layernorm, KernelRMSNorm)
    assert isinstance(ref.layer.mlp, KernelSwiGLU)
    assert [n for n, _ in off.named_parameters()] == [n for n, _ in ref.named_parameters()]  # the same names
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(0))
    y_off, dx_off, grads_off = _run(off, x)
    y_ref, dx_ref, grads_ref = _run(ref, x)
    assert _rel(y_ref, y_off) <= TOL and _rel(dx_ref, dx_off) <= TOL
    for name, g in grads_off.items():
        assert _rel(grads_ref[name], g) <= TOL, name


def test_the_heads_final_norm_runs_as_the_kernel_unless_off(folders):
    from runtime.heads import build_head

    heads = {k: build_head(_job(folders, "llama", k), 0) for k in ("off", "auto")}
    assert isinstance(heads["auto"].norm, KernelRMSNorm) and not isinstance(heads["off"].norm, KernelRMSNorm)
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(1))
    ys = {}
    for k, head in heads.items():
        xk = x.clone().requires_grad_(True)
        ys[k] = head.norm(xk)
        (ys[k] * _cotangent(x.shape)).sum().backward()
        ys[k] = (ys[k].detach(), xk.grad, head.norm.weight.grad)
    for got, want in zip(ys["auto"], ys["off"]):
        assert _rel(got, want) <= TOL
