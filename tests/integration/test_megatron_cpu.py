"""megatron-core on CPU through runtime.megatron_compat: the TP backend equals the plain-torch block.

Two gloo processes each apply the compatibility layer, build MegatronTransformerBlock at TP=2 on
the whole world and at TP=1 on their own single-rank group, load the same reference weights and
run forward and backward on the same input. Outputs, input gradients and the gathered weight
gradients must equal the single-process plain block's within 1e-5 relative (float32).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # pytest's default import mode already adds it; the spawned workers need it
    sys.path.insert(0, HERE)
import _megatron_workers as workers  # noqa: E402
from _worlds import start_world  # noqa: E402  (tests/integration/_worlds.py; its ranks run OMP_NUM_THREADS=1)

from runtime import megatron_compat  # noqa: E402

WORLD_SIZE = 2
RTOL = 1e-5


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Max abs error relative to the reference's largest magnitude."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().clamp_min(1e-12)
    err = float((got - want).abs().max() / scale)
    assert err <= RTOL, f"{what}: relative error {err:.2e} > {RTOL:.0e}"


@pytest.fixture(scope="module")
def reference_result() -> dict:
    """The single-process plain-torch block's output, input gradient and weight gradients."""
    block = workers.make_reference()
    x, upstream = workers.make_inputs()
    x.requires_grad_(True)
    out = block(x)
    (out * upstream).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in block.named_parameters()}
    weights = {name: p.detach().clone() for name, p in block.named_parameters()}
    return {"out": out.detach(), "x_grad": x.grad.detach(), "grads": grads, "weights": weights}


@pytest.fixture(scope="module")
def world_results(tmp_path_factory) -> dict[int, dict]:
    out_dir = tmp_path_factory.mktemp("megatron_cpu")
    start_world(workers.tp_worker, args=(WORLD_SIZE, workers.free_port(), str(out_dir)), nprocs=WORLD_SIZE)
    return {rank: torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)}


def check_against_reference(result: dict, reference: dict, what: str) -> None:
    assert_close(result["out"], reference["out"], f"{what} output")
    assert_close(result["x_grad"], reference["x_grad"], f"{what} input gradient")
    assert sorted(result["grads"]) == sorted(reference["grads"]), f"{what}: gradient names differ"
    for name, want in reference["grads"].items():
        assert_close(result["grads"][name], want, f"{what} grad {name}")
    # load_reference then gather_reference_weights is an exact round trip.
    assert sorted(result["weights"]) == sorted(reference["weights"]), f"{what}: weight names differ"
    for name, want in reference["weights"].items():
        assert torch.equal(result["weights"][name], want), f"{what}: weight {name} does not round-trip"


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_tp2_block_equals_plain_block(world_results, reference_result, rank) -> None:
    result = world_results[rank]
    assert result["applied"]
    # Really sharded: each rank holds its share of the fused qkv rows.
    assert result["local_qkv_rows"] == 3 * workers.HIDDEN_SIZE // WORLD_SIZE
    check_against_reference(result["tp"], reference_result, f"TP=2 rank {rank}")
    # The key part of the qkv bias has zero true gradient; the backend makes it exactly zero.
    h = workers.HIDDEN_SIZE
    qkv_bias_grad = result["tp"]["grads"]["qkv.bias"]
    assert torch.all(qkv_bias_grad[h:2 * h] == 0) and qkv_bias_grad[:h].abs().max() > 0


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_tp1_block_on_own_group_equals_plain_block(world_results, reference_result, rank) -> None:
    """TP=1 in one process, on a single-rank group, alongside the TP=2 block of the same process."""
    check_against_reference(world_results[rank]["tp1"], reference_result, f"TP=1 rank {rank}")


def test_reference_weights_are_not_trivial(reference_result) -> None:
    """The comparison is only meaningful if biases and LayerNorms carry non-default values."""
    block = workers.make_reference()
    for name, param in block.named_parameters():
        assert param.std() > 0.1, f"{name} is nearly constant; a wrong mapping could go unnoticed"
    assert reference_result["grads"]["qkv.bias"].abs().max() > 0


def test_apply_cpu_compat_refuses_other_version(monkeypatch) -> None:
    monkeypatch.setattr(megatron_compat, "installed_version", lambda: "0.17.0")
    current_device = torch.cuda.current_device
    with pytest.raises(RuntimeError, match=r"megatron-core \(0\.17\.0\).*expected 0\.16\.1"):
        megatron_compat.apply_cpu_compat()
    # Refused before patching anything.
    assert not megatron_compat.is_applied()
    assert torch.cuda.current_device is current_device


def test_apply_cpu_compat_refuses_missing_megatron(monkeypatch) -> None:
    monkeypatch.setattr(megatron_compat, "installed_version", lambda: None)
    with pytest.raises(RuntimeError, match=r"megatron-core \(None\)"):
        megatron_compat.apply_cpu_compat()
    assert not megatron_compat.is_applied()


def test_seed_needs_the_compat_layer(monkeypatch) -> None:
    monkeypatch.setattr(megatron_compat, "_applied", False)  # as in a process that never applied it
    with pytest.raises(RuntimeError, match="apply_cpu_compat"):
        megatron_compat.seed(1, tp_rank=0)


class _FakeGroup:
    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize(
    ("num_heads", "ffn_hidden_size", "group", "tp_rank", "message"),
    [
        (3, 64, _FakeGroup(2, 0), 0, r"num_heads \(3\) is not divisible by tp_size \(2\)"),
        (4, 63, _FakeGroup(2, 0), 0, r"ffn_hidden_size \(63\) is not divisible by tp_size \(2\)"),
        (4, 64, _FakeGroup(2, 1), 0, r"tp_group \(size 2, this rank 1\) does not match"),
        (4, 64, None, 0, "tp_group is None"),
    ],
)
def test_block_rejects_inconsistent_shapes_and_groups(num_heads, ffn_hidden_size, group, tp_rank, message) -> None:
    from runtime.megatron_backend import MegatronTransformerBlock

    with pytest.raises(ValueError, match=message):
        MegatronTransformerBlock(48, num_heads, ffn_hidden_size, group, tp_rank, 2)
