"""`loom profile`'s calibration against the runtime (orchestrator.calibrate): the ratios of measured to predicted
parts over a run's steps, and how many steps a plan is run for."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator.calibrate import MAX_STEPS, MIN_STEPS, calibration_steps, ratios
from orchestrator.metrics import StepRecord


def record(waves: list[float], loss: float, optimizer: float) -> StepRecord:
    return StepRecord(step=0, loss={}, step_seconds=sum(waves) + loss + optimizer, samples_per_s={}, tokens_per_s={},
                      predicted_iteration_s=0.0, worker_seconds=[], wave_seconds=waves,
                      predicted_wave_seconds=[0.010, 0.030], part_seconds={"loss": loss, "optimizer": optimizer})


def plan(loss_s: float = 0.002, optimizer_s: float = 0.004, gather_s: float = 0.0):
    predicted = SimpleNamespace(loss_s=loss_s, loss_transfer_in_s=0.0005, loss_transfer_back_s=0.0005,
                                optimizer_s=optimizer_s, gather_s=gather_s)
    return SimpleNamespace(predicted=predicted)


def test_each_part_is_its_measured_time_over_its_predicted_time_over_all_steps():
    records = [record([0.012, 0.036], 0.0045, 0.004), record([0.012, 0.040], 0.0015, 0.006)]
    found = ratios(records, plan())
    assert found["compute"] == pytest.approx((0.048 + 0.052) / (2 * 0.040))
    assert found["loss"] == pytest.approx(0.006 / (2 * 0.003))  # the stage with the leaves' moves in and back
    assert found["optimizer"] == pytest.approx(0.010 / (2 * 0.004))
    assert ratios(records, plan(optimizer_s=0.002, gather_s=0.003))["optimizer"] == pytest.approx(0.010 / 0.010)


def test_a_part_priced_at_nothing_or_not_timed_is_left_out():
    records = [record([0.012, 0.036], 0.0, 0.004)]
    # the optimizer priced at nothing (its ratio would be noise over zero), the loss stage measured at nothing
    assert set(ratios(records, plan(optimizer_s=0.0))) == {"compute"}
    assert set(ratios(records, plan())) == {"compute", "optimizer"}


def test_a_plan_runs_about_three_seconds_of_steps():
    assert calibration_steps(0.3) == MIN_STEPS  # 10 steps would be 3 s: at least MIN_STEPS
    assert calibration_steps(0.016) == 188
    assert calibration_steps(0.0001) == MAX_STEPS


def tiny_job():
    from planner.spec import parse_job

    return parse_job({"name": "tiny", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
                      "components": {"enc": {"kind": "transformer", "num_layers": 2, "hidden_size": 32, "num_heads": 4,
                                             "seq_len": 8}},
                      "tasks": [{"name": "a", "batch_size": 8, "components": [{"component": "enc"}]}]})


def test_a_run_that_fails_leaves_the_profile_uncalibrated(monkeypatch):
    import orchestrator.run
    from orchestrator.calibrate import calibrate_costs
    from orchestrator.remote import RunFailed

    def fail(*args, **kwargs):
        raise RunFailed("worker 1 (rank 1) failed at step 0: out of memory")

    monkeypatch.setattr(orchestrator.run, "run_job", fail)
    said = []
    assert calibrate_costs(tiny_job(), {"points": {}}, said.append) == {}
    assert said[-1] == ("calibration skipped: the sequential plan did not run (worker 1 (rank 1) failed at step 0: out "
                        "of memory)")


def test_a_ratio_outside_the_bounds_is_left_out_and_said(monkeypatch):
    import orchestrator.run
    from orchestrator.calibrate import calibrate_costs

    def run(job, plan, options, reporter):  # every step's waves 20x the plan's, the rest as predicted
        p = plan.predicted
        waves = [20 * t for t in plan_waves(plan)]
        records = [StepRecord(step=i, loss={}, step_seconds=1.0, samples_per_s={}, tokens_per_s={},
                              predicted_iteration_s=p.iteration_time_s, worker_seconds=[], wave_seconds=waves,
                              predicted_wave_seconds=plan_waves(plan),
                              part_seconds={"optimizer": p.optimizer_s + p.gather_s}) for i in range(options.steps)]
        return SimpleNamespace(records=records)

    monkeypatch.setattr(orchestrator.run, "run_job", run)
    said = []
    assert calibrate_costs(tiny_job(), {"points": {}}, said.append) == {"optimizer": pytest.approx(1.0)}
    assert any(line.startswith("calibration: compute measured 20.00x its prediction, outside [0.1, 10]")
               for line in said)


def plan_waves(plan) -> list[float]:
    from orchestrator.metrics import predicted_wave_seconds

    return predicted_wave_seconds(plan)
