"""kernels' reference twins against the naive torch expressions (forward and gradients, ragged chunks), their custom
op registrations (torch.library.opcheck: schema, fake tensors, autograd), tracing by torch.compile, and the backend
switch. The Triton twins are checked against these in test_kernel_triton.py."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import backend_for, infonce_rows, linear_cross_entropy, linear_logprobs, rms_norm, swiglu, topk_kl
from kernels.backend import resolve, triton_installed
from kernels.contrastive import infonce_call
from kernels.grad_buffers import grad_buffer, has_grad_buffer, keep_grad_buffer, zero_grads
from kernels.linear_ce import linear_ce_call
from kernels.norms import rms_norm_call, swiglu_call
from kernels.rows import CHUNK_BYTES, chunk_rows_for, spans

IGNORE = -100


def grads(value: torch.Tensor, inputs) -> list[torch.Tensor]:
    weight = torch.linspace(-1.0, 2.0, value.numel()).reshape(value.shape)  # not a plain sum: per-row gradients differ
    return list(torch.autograd.grad((value * weight).sum(), inputs, retain_graph=True))


def assert_all_close(got, want, **tol) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


def assert_all_equal(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def lm_inputs(n: int, h: int, v: int, seed: int = 0, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).requires_grad_()
    b = torch.randn(v, generator=gen).requires_grad_() if bias else None
    return hidden, weight, b, gen


@pytest.mark.parametrize("n,h,v,chunk,bias", [(13, 8, 37, 4, True), (1, 5, 3, None, False), (20, 16, 129, 7, True)])
def test_linear_cross_entropy_equals_the_full_logits_expression(n, h, v, chunk, bias) -> None:
    hidden, weight, b, gen = lm_inputs(n, h, v, bias=bias)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::3] = IGNORE  # ignored positions: loss 0, no gradient
    params = [p for p in (hidden, weight, b) if p is not None]
    got = linear_cross_entropy(hidden, weight, b, targets, IGNORE, backend="reference", chunk_rows=chunk)
    want = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="none", ignore_index=IGNORE)
    torch.testing.assert_close(got, want)
    assert torch.all(got[::3] == 0)
    assert_all_close(grads(got, params), grads(want, params))


def test_linear_logprobs_gather_the_log_softmax_over_leading_dimensions() -> None:
    hidden, weight, b, gen = lm_inputs(2 * 9, 6, 23)
    hidden3 = hidden.reshape(2, 9, 6)
    tokens = torch.randint(0, 23, (2, 9), generator=gen)
    got = linear_logprobs(hidden3, weight, b, tokens, backend="reference", chunk_rows=5)
    want = torch.log_softmax(F.linear(hidden3, weight, b), -1).gather(-1, tokens[..., None])[..., 0]
    assert got.shape == (2, 9)
    torch.testing.assert_close(got, want)
    assert_all_close(grads(got, (hidden, weight, b)), grads(want, (hidden, weight, b)))


def test_topk_kl_is_the_reference_top_k_distribution_against_the_policy() -> None:
    hidden, weight, b, gen = lm_inputs(11, 8, 40)
    ref_logits = torch.randn(11, 5, generator=gen)
    ref_index = torch.stack([torch.randperm(40, generator=gen)[:5] for _ in range(11)])
    got = topk_kl(hidden, weight, b, ref_logits, ref_index, backend="reference", chunk_rows=4)
    q = torch.softmax(ref_logits, -1)
    logp = torch.log_softmax(F.linear(hidden, weight, b), -1).gather(-1, ref_index)
    want = (q * (q.log() - logp)).sum(-1)
    torch.testing.assert_close(got, want)
    assert torch.all(got > 0)
    assert_all_close(grads(got, (hidden, weight, b)), grads(want, (hidden, weight, b)))


def test_topk_kl_is_zero_when_the_policy_puts_the_reference_probabilities_on_its_tokens() -> None:
    v, k = 6, 6  # every token in the top k: a policy with the reference's logits matches it exactly
    ref_logits = torch.randn(3, v)
    weight = torch.eye(v)
    kl = topk_kl(ref_logits, weight, None, ref_logits, torch.arange(k).expand(3, k), backend="reference")
    torch.testing.assert_close(kl, torch.zeros(3), atol=1e-6, rtol=0)


def test_linear_cross_entropy_under_autocast_follows_f_linear() -> None:
    hidden, weight, b, gen = lm_inputs(10, 16, 30)
    targets = torch.randint(0, 30, (10,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, b, targets, backend="reference")
        want = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), atol=2e-2, rtol=2e-2)
    g_got, g_want = grads(got, (hidden, weight)), grads(want, (hidden, weight))
    assert g_got[1].dtype == torch.float32  # the fp32 master weight gets an fp32 gradient
    assert_all_close(g_got, g_want, atol=2e-2, rtol=5e-2)


# --------------------------------------------------------------------------- weight-gradient buffers


def _loss_fns(gen: torch.Generator, n: int, v: int):
    """(fused, naive) pairs ``fn(hidden, weight, bias, backend) -> per-position loss`` of the three losses on
    loom::linear_ce (cross-entropy, log-probs, top-k KL), the naive one autograd's over the full logits."""
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::4] = IGNORE
    tokens = torch.randint(0, v, (n,), generator=gen)
    ref_logits, ref_index = torch.randn(n, 3, generator=gen), torch.randint(0, v, (n, 3), generator=gen)
    q = torch.softmax(ref_logits, -1)
    return [
        (lambda h, w, b, backend: linear_cross_entropy(h, w, b, targets, IGNORE, backend=backend, chunk_rows=4),
         lambda h, w, b, backend: F.cross_entropy(F.linear(h, w, b), targets, reduction="none", ignore_index=IGNORE)),
        (lambda h, w, b, backend: linear_logprobs(h, w, b, tokens, backend=backend, chunk_rows=5),
         lambda h, w, b, backend: torch.log_softmax(F.linear(h, w, b), -1).gather(-1, tokens[:, None])[:, 0]),
        (lambda h, w, b, backend: topk_kl(h, w, b, ref_logits, ref_index, backend=backend, chunk_rows=3),
         lambda h, w, b, backend: (q * (q.log() - torch.log_softmax(F.linear(h, w, b), -1).gather(-1, ref_index))
                                   ).sum(-1)),
    ]


def accumulated_over_micro_batches(fn, hidden, weight, b, backend: str, buffered: bool, steps: int = 2):
    """``.grad`` of (weight, bias, hidden) after ``steps`` backward passes of ``fn`` on different rows of ``hidden``
    (micro-batches), with the weight's gradient buffer kept (kernels.grad_buffers) or not; and how many full-size
    weight gradients autograd handed on to be added into ``.grad`` (a tensor hook sees each, or None)."""
    hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    accumulated = []
    weight.register_hook(lambda g: accumulated.append(g is not None))
    if buffered:
        buffer = keep_grad_buffer(weight)
        buffer.fill_(0.5)  # a buffer holding an earlier gradient: the kernel adds to it
        zero_grads([weight, b, hidden])  # ... until the step's zero_grad zeroes it in place
        assert weight.grad is buffer and float(buffer.abs().sum()) == 0 and b.grad is None
    rows = hidden.shape[0] // steps
    for step in range(steps):
        loss = fn(hidden[step * rows:(step + 1) * rows], weight, b, backend)
        (loss * torch.linspace(-1.0, 2.0, loss.numel())).sum().backward()
    if buffered:
        assert weight.grad is buffer
    return (weight.grad, b.grad, hidden.grad), sum(accumulated)


@pytest.mark.parametrize("case", range(3), ids=["linear_ce", "logprobs", "topk_kl"])
def test_weight_gradient_added_into_its_buffer_equals_the_returned_one(case: int) -> None:
    """Over two micro-batches (gradient accumulation), the weight gradient the kernel adds into the parameter's
    persistent buffer equals the one it returns for autograd to add (fp32, 1e-5 relative), and so does every other
    gradient; both equal autograd's over the full logits; no full-size weight gradient reaches autograd from the
    kernel when the buffer is kept."""
    hidden, weight, b, gen = lm_inputs(24, 8, 37)
    fused, naive = _loss_fns(gen, 12, 37)[case]
    returned, calls_returned = accumulated_over_micro_batches(fused, hidden, weight, b, "reference", buffered=False)
    added, calls_added = accumulated_over_micro_batches(fused, hidden, weight, b, "reference", buffered=True)
    want, calls_naive = accumulated_over_micro_batches(naive, hidden, weight, b, "reference", buffered=True)
    assert (calls_returned, calls_added, calls_naive) == (2, 0, 2)
    assert_all_close(added, returned, rtol=1e-5, atol=0)
    assert_all_close(added, want, rtol=1e-5, atol=1e-6)


def test_the_buffer_is_left_alone_when_the_kernel_reads_a_cast_copy_or_it_is_not_the_grad() -> None:
    """Under autocast the kernel reads a bf16 copy of the weight: its gradient is returned (through the cast) and
    autograd adds it into the buffer; a buffer that is no longer ``.grad`` is not written either."""
    hidden, weight, b, gen = lm_inputs(10, 16, 30)
    targets = torch.randint(0, 30, (10,), generator=gen)
    buffer = keep_grad_buffer(weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy(hidden, weight, b, targets, backend="reference").sum().backward()
    assert weight.grad is buffer and float(buffer.abs().sum()) > 0
    zero_grads([weight])
    weight.grad = None  # replaced (set to None): the kernel must return its gradient
    linear_cross_entropy(hidden, weight, b, targets, backend="reference").sum().backward()
    assert float(buffer.abs().sum()) == 0 and weight.grad is not None and weight.grad is not buffer
    assert grad_buffer(weight) is None and has_grad_buffer(weight)


def test_autograd_grad_of_other_inputs_leaves_the_buffer_alone() -> None:
    """``torch.autograd.grad`` with respect to the hidden states does not reach the weight: its buffer stays as it
    was (autograd leaves ``.grad`` alone there too), and the hidden gradient is the naive one."""
    hidden, weight, b, gen = lm_inputs(9, 8, 21)
    targets = torch.randint(0, 21, (9,), generator=gen)
    buffer = keep_grad_buffer(weight)
    (got,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, b, targets, backend="reference").sum(), hidden)
    (want,) = torch.autograd.grad(F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="none").sum(), hidden)
    assert weight.grad is buffer and float(buffer.abs().sum()) == 0
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("residual", [True, False])
def test_rms_norm_equals_nn_rmsnorm_after_the_residual_add(residual: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    x, r = (torch.randn(3, 5, 19, generator=gen).requires_grad_() for _ in range(2))
    norm = torch.nn.RMSNorm(19, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(19, generator=gen))
    inputs = [x, r, norm.weight] if residual else [x, norm.weight]
    y, s = rms_norm(x, norm.weight, 1e-6, r if residual else None, backend="reference")
    s_want = x + r if residual else x
    y_want = norm(s_want)
    torch.testing.assert_close(y, y_want)
    torch.testing.assert_close(s, s_want)
    # both outputs carry gradient (the normalised branch and the residual stream)
    assert_all_close(grads(y, inputs) if not residual else grads(y + 0.5 * s, inputs),
                     grads(y_want, inputs) if not residual else grads(y_want + 0.5 * s_want, inputs))


def test_swiglu_equals_silu_times_up() -> None:
    gen = torch.Generator().manual_seed(2)
    gate, up = (torch.randn(4, 3, 7, generator=gen).requires_grad_() for _ in range(2))
    got = swiglu(gate, up, backend="reference")
    want = F.silu(gate) * up
    torch.testing.assert_close(got, want)
    assert_all_close(grads(got, (gate, up)), grads(want, (gate, up)))


def infonce_full(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * a @ b.T
    rows = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(logits, rows, reduction="none") + F.cross_entropy(logits.T, rows, reduction="none"))


def test_infonce_shards_sum_to_the_full_batch_loss_and_gradient() -> None:
    gen = torch.Generator().manual_seed(3)
    a_raw, b_raw = (torch.randn(10, 6, generator=gen).requires_grad_() for _ in range(2))
    log_scale = torch.tensor(1.5, requires_grad=True)
    params = (a_raw, b_raw, log_scale)
    a, b = F.normalize(a_raw, dim=-1), F.normalize(b_raw, dim=-1)
    want = infonce_full(a, b, log_scale.exp())
    # three data-parallel shards of rows (ragged), each scoring its rows against the gathered batch
    shards = [infonce_rows(a, b, log_scale.exp(), first, num, backend="reference", chunk_rows=2)
              for first, num in ((0, 4), (4, 3), (7, 3))]
    got = torch.cat(shards)
    torch.testing.assert_close(got, want)
    assert_all_close(grads(got, params), grads(want, params))
    with pytest.raises(ValueError, match=r"rows \[8, 11\) are not within the batch's 10 rows"):
        infonce_rows(a, b, log_scale.exp(), 8, 3)


def test_chunking_covers_every_row_once_and_bounds_the_block() -> None:
    assert spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_rows_for(4096, 131072) * 131072 * 4 <= CHUNK_BYTES
    assert chunk_rows_for(3, 10) == 3 and chunk_rows_for(5, 2**40) == 1


def test_planner_prices_the_block_the_kernels_hold() -> None:
    from planner.costmodel import LOGITS_CHUNK_BYTES, logits_bytes

    assert LOGITS_CHUNK_BYTES == CHUNK_BYTES
    for positions, vocab in ((4096, 131072), (7, 50), (100, 2**27)):
        assert logits_bytes(positions, vocab, "auto", 2) == chunk_rows_for(positions, vocab) * vocab * 4


def test_backend_switch() -> None:
    cpu = torch.device("cpu")
    assert backend_for("off", cpu) is None
    assert backend_for("auto", cpu) == "reference" and backend_for("reference", cpu) == "reference"
    assert resolve(None, cpu) == "reference"
    with pytest.raises(ValueError, match="not one of"):
        resolve("cuda", cpu)
    if not triton_installed():
        with pytest.raises(ValueError, match="triton is not installed"):
            resolve("triton", cpu)


# --------------------------------------------------------------------------- registration and tracing


def op_samples():
    """(op, args) of every loom:: op, forward and backward, with small inputs."""
    hidden, weight, b, gen = lm_inputs(6, 4, 9)
    index = torch.randint(0, 9, (6, 2), generator=gen)
    tw = torch.rand(6, 2, generator=gen)
    lse = torch.logsumexp(F.linear(hidden, weight, b), -1).detach()
    x, r, w = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7, requires_grad=True), torch.randn(7)
    rstd = torch.rand(5) + 0.5
    a, c = torch.randn(6, 3, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)
    ops = torch.ops.loom
    return [
        (ops.linear_ce, (hidden, weight, b, index, tw, 4, "reference")),
        (ops.linear_ce, (hidden, weight, None, index, tw, 6, "reference")),
        (ops.linear_ce_backward, (torch.randn(6), hidden, weight, b, index, tw, lse, 4, "reference")),
        (ops.linear_ce_backward_into, (torch.randn(6), hidden, weight, b, index, tw, lse, 4, "reference",
                                       torch.randn(9, 4))),
        (ops.rms_norm, (x, r, w, 1e-6, "reference")),
        (ops.rms_norm, (x, None, w, 1e-6, "reference")),
        (ops.rms_norm_backward, (torch.randn(5, 7), torch.randn(5, 7), x, w, rstd, "reference")),
        (ops.swiglu, (x, r, "reference")),
        (ops.swiglu_backward, (torch.randn(5, 7), x, r, "reference")),
        (ops.infonce, (a, c, scale, 1, 4, 3, "reference")),
        (ops.infonce_backward, (torch.randn(4), a, c, scale, torch.rand(4), torch.rand(4), 1, 3, "reference")),
    ]


@pytest.mark.parametrize("index", range(11))
def test_every_op_passes_opcheck(index: int) -> None:
    op, args = op_samples()[index]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_fake_tensors_trace_shapes_without_running() -> None:
    with FakeTensorMode():
        hidden, weight = torch.empty(4096, 64), torch.empty(131072, 64)
        targets = torch.zeros(4096, dtype=torch.long)
        loss = linear_cross_entropy(hidden, weight, None, targets, backend="reference")
        y, s = rms_norm(torch.empty(2, 8, 64), torch.empty(64), 1e-6, torch.empty(2, 8, 64), backend="reference")
        out = swiglu(torch.empty(2, 8, 96), torch.empty(2, 8, 96), backend="reference")
        nce = infonce_rows(torch.empty(32, 16), torch.empty(32, 16), torch.empty(()), 8, 8, backend="reference")
    assert loss.shape == (4096,) and y.shape == s.shape == (2, 8, 64) and out.shape == (2, 8, 96)
    assert nce.shape == (8,)


def test_torch_compile_traces_each_op_forward_and_backward() -> None:
    hidden, weight, b, gen = lm_inputs(7, 8, 21)
    targets = torch.randint(0, 21, (7,), generator=gen)
    x = torch.randn(7, 8, requires_grad=True)

    def step(hidden, weight, b, x):
        y, s = rms_norm(hidden, x[0], 1e-6, x, backend="reference")
        h = swiglu(y, s, backend="reference")
        loss = linear_cross_entropy(h, weight, b, targets, backend="reference", chunk_rows=3)
        a = F.normalize(h, dim=-1)
        return loss.sum() + infonce_rows(a, a.flip(0), b[0].exp(), 2, 4, backend="reference").sum()

    eager = step(hidden, weight, b, x)
    eager_grads = torch.autograd.grad(eager, (hidden, weight, b, x))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(hidden, weight, b, x)
    torch.testing.assert_close(compiled, eager)
    assert_all_close(torch.autograd.grad(compiled, (hidden, weight, b, x)), eager_grads)


class _OpsSeen(TorchDispatchMode):
    """The names of the ops the dispatcher runs inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("index", [0, 1, 4, 5, 7, 9])
def test_an_eager_call_runs_the_ops_functions_with_the_librarys_results_past_its_dispatch(index: int) -> None:
    """Each forward op with autograd through its entry point (kernels.op's twin) and through torch.ops.loom: the
    same outputs and gradients bit for bit; the twin's forward and backward reach the dispatcher as aten ops only."""
    op, args = op_samples()[index]
    name = str(op).removeprefix("loom.")
    call = {"linear_ce": linear_ce_call, "rms_norm": rms_norm_call, "swiglu": swiglu_call,
            "infonce": infonce_call}[name]
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def run(fn, mode=None):
        with mode or contextlib.nullcontext():
            out = fn(*args)
            first = out[0] if isinstance(out, tuple) else out
            return [first.detach(), *grads(first, inputs)]

    seen = _OpsSeen()
    twin = run(call, seen)
    assert not [name for name in seen.names if name.startswith("loom::")]
    assert len(seen.names) > 2
    library = _OpsSeen()
    assert_all_equal(twin, run(op, library))
    assert f"loom::{name}" in library.names
