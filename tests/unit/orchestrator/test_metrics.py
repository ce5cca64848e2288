"""Per-wave measured vs predicted time in the step log and the Prometheus registry (no processes)."""

from __future__ import annotations

import json

from orchestrator.metrics import STEP_PARTS, RunMetrics, StepLog, StepRecord, read_step_log, step_breakdown


def timing(compute, transfer, loss, sync, optimizer):
    return {"compute_s": compute, "transfer_s": transfer, "loss_s": loss, "sync_s": sync,
            "optimizer_s": optimizer, "total_s": sum(compute) + sum(transfer) + loss + sync + optimizer}


def test_breakdown_takes_the_slowest_rank_per_wave_and_per_part():
    ranks = [timing([0.08, 0.0, 0.04], [0.0, 0.001, 0.003], 0.002, 0.001, 0.004),
             timing([0.06, 0.002, 0.05], [0.0, 0.0, 0.009], 0.0, 0.003, 0.006)]
    waves, parts = step_breakdown(ranks)
    assert waves == [0.08, 0.002, 0.05]  # wave 1 runs on rank 1 only
    assert parts == {"transfer": 0.009, "loss": 0.002, "sync": 0.003, "optimizer": 0.006}
    assert tuple(parts) == STEP_PARTS


def test_breakdown_is_empty_when_a_rank_sent_no_timing():
    assert step_breakdown([timing([0.1], [0.0], 0, 0, 0), None]) == ([], {})
    assert step_breakdown([]) == ([], {})


def record(step: int, waves: list[float]) -> StepRecord:
    return StepRecord(step=step, loss={"a": 1.0}, step_seconds=0.2, samples_per_s={"a": 40.0},
                      tokens_per_s={"a": 320.0}, predicted_iteration_s=0.15, worker_seconds=[0.19, 0.18],
                      wave_seconds=waves, predicted_wave_seconds=[0.1, 0.03],
                      part_seconds={"transfer": 0.01, "loss": 0.0, "sync": 0.002, "optimizer": 0.004})


def test_gauges_hold_the_plans_waves_and_the_last_steps_measurements():
    metrics = RunMetrics(["a"], 0.15, [0.1, 0.03])
    value = metrics.registry.get_sample_value
    assert value("loom_wave_predicted_seconds", {"wave": "0"}) == 0.1
    assert value("loom_wave_predicted_seconds", {"wave": "1"}) == 0.03
    assert value("loom_wave_measured_seconds", {"wave": "0"}) is None  # nothing measured before a step
    metrics.record_step(record(0, [0.12, 0.04]), {"a": 8}, {"a": 8})
    metrics.record_step(record(1, [0.11, 0.035]), {"a": 8}, {"a": 8})
    assert value("loom_wave_measured_seconds", {"wave": "0"}) == 0.11
    assert value("loom_wave_measured_seconds", {"wave": "1"}) == 0.035
    assert value("loom_step_part_seconds", {"part": "optimizer"}) == 0.004


def test_step_log_lines_carry_measured_and_predicted_waves(tmp_path):
    log = StepLog(tmp_path / "metrics.jsonl")
    log.write(record(0, [0.12, 0.04]))
    log.close()
    [line] = read_step_log(tmp_path / "metrics.jsonl")
    assert line["wave_seconds"] == [0.12, 0.04] and line["predicted_wave_seconds"] == [0.1, 0.03]
    assert line["part_seconds"]["sync"] == 0.002
    assert json.loads(record(0, []).to_json())["wave_seconds"] == []  # a worker without timing: empty, not missing
