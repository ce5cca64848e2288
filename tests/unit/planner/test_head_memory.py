"""The memory model's LM heads (planner.costmodel.lm_heads, logits_bytes; placement.MemoryLedger.head_bytes): the
logits a next-token task's loss holds, priced by training.kernels, on the devices that host the loss."""

from __future__ import annotations

import numpy as np
import pytest

from planner.api import make_cost_model, plan_job
from planner.costmodel import LOGITS_CHUNK_BYTES, LogitsShape, lm_heads, logits_bytes
from planner.errors import PlanningError
from planner.placement import all_slices, build_ledger, check_memory
from planner.spec import parse_job

VOCAB, SEQ, BATCH = 128_000, 512, 8


def job_with(kernels: str, vocab: int | None = VOCAB, memory_gib: float | None = None):
    lm = {"kind": "llama", "num_layers": 2, "hidden_size": 256, "num_heads": 4, "seq_len": SEQ}
    if vocab:
        lm["vocab_size"] = vocab
    cluster = {"num_nodes": 1, "devices_per_node": 2, "device": "h100"}
    if memory_gib:
        cluster["memory_gib"] = memory_gib
    return parse_job({
        "name": "heads", "cluster": cluster,
        "components": {"lm": lm, "enc": {"kind": "transformer", "num_layers": 1, "hidden_size": 256, "num_heads": 4,
                                         "seq_len": SEQ, "vocab_size": VOCAB}},
        "tasks": [{"name": "gen", "batch_size": BATCH, "loss": "next_token", "components": [{"component": "lm"}]},
                  {"name": "cls", "batch_size": BATCH, "loss": "cross_entropy", "components": [{"component": "enc"}]}],
        "training": {"kernels": kernels},
        "planner": {"time_limit_s": 2},
    })


def test_only_next_token_tasks_with_a_vocabulary_have_an_lm_head() -> None:
    assert lm_heads(job_with("auto")) == {"gen": LogitsShape(SEQ, VOCAB)}
    assert lm_heads(job_with("auto", vocab=None)) == {}


def test_logits_bytes_with_and_without_the_kernels() -> None:
    positions = 4 * SEQ
    assert logits_bytes(positions, VOCAB, "off", 2) == positions * VOCAB * (2 + 4 + 4)
    rows = LOGITS_CHUNK_BYTES // (4 * VOCAB)
    assert logits_bytes(positions, VOCAB, "auto", 2) == logits_bytes(positions, VOCAB, "reference", 2) == \
        rows * VOCAB * 4 <= LOGITS_CHUNK_BYTES
    assert logits_bytes(3, 10, "auto", 4) == 3 * 10 * 4  # fewer positions than a block holds


def test_ledger_adds_the_head_on_each_loss_rank_and_the_kernels_shrink_it() -> None:
    job = job_with("auto")
    outcome = plan_job(job, with_baselines=False)
    slices = all_slices(outcome.placed)
    peaks = {}
    for kernels in ("off", "auto"):
        model = make_cost_model(job_with(kernels))
        ledger = build_ledger(outcome.problem, slices, model)
        peaks[kernels] = (ledger.peak(), ledger.head_bytes())
    ops = outcome.problem.graph.metaops
    host = [s for s in slices if ops[s.metaop].task == "gen"][-1]
    hosts = list(host.devices[::host.layout.tp_degree])
    local = BATCH // host.layout.dp_degree * SEQ
    for kernels, (peak, head) in peaks.items():
        assert np.count_nonzero(head) == len(hosts)
        assert head[hosts] == pytest.approx(logits_bytes(local, VOCAB, kernels, 2))
    np.testing.assert_allclose(peaks["off"][0] - peaks["auto"][0], peaks["off"][1] - peaks["auto"][1])
    # the plan's predicted peaks include the head
    np.testing.assert_allclose(outcome.plan.peak_memory_bytes, peaks["auto"][0])


def test_a_device_over_its_memory_names_the_logits_and_the_switch() -> None:
    job = job_with("off")
    outcome = plan_job(job_with("auto"), with_baselines=False)
    ledger = build_ledger(outcome.problem, all_slices(outcome.placed), make_cost_model(job))
    need = ledger.peak().max()
    with pytest.raises(PlanningError, match=r"GiB LM-head logits \(training.kernels: off\)"):
        check_memory(ledger, need - 1, 2)
    check_memory(build_ledger(outcome.problem, all_slices(outcome.placed), make_cost_model(job_with("auto"))),
                 need - 1, 2)


def test_a_device_over_its_memory_names_the_levers_of_its_larger_part() -> None:
    """Where saved activations are the larger part of the worst device's need, the message names what shrinks them
    and keeps the batch (recompute, more micro-batches); where parameter state is, it does not."""
    outcome = plan_job(job_with("auto"), with_baselines=False)
    ledger = build_ledger(outcome.problem, all_slices(outcome.placed), make_cost_model(job_with("auto")))
    params = ledger.param_bytes.copy()
    messages = []
    for acts in (2 * params, 0 * params):
        ledger.act_bytes[:] = acts
        with pytest.raises(PlanningError) as info:
            check_memory(ledger, ledger.peak().max() - 1, 2)
        messages.append(str(info.value))
    assert "set recompute: true on component" in messages[0]
    assert "more micro-batches (training.grad_accum_steps, now 1)" in messages[0]
    assert "recompute" not in messages[1] and "grad_accum_steps" not in messages[1]
    assert all(", or lower the batch size of task '" in m for m in messages)
