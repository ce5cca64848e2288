"""bench.sendahead's measures read from a run's trace and its report's per-round ratio."""

from __future__ import annotations

import json

import pytest

from bench.sendahead.__main__ import period_s, report, start_skew_s


def test_start_skew_is_the_mean_spread_of_the_ranks_first_spans(tmp_path):
    # step 1: rank 1 starts 3 ms after rank 0; step 2: 1 ms before it (its later spans do not count)
    events = [{"ph": "X", "tid": r, "ts": ts, "dur": 10.0, "args": {"step": s, "part": "forward"}}
              for s, r, ts in ((1, 0, 1000.0), (1, 1, 4000.0), (1, 0, 9000.0), (2, 0, 20000.0), (2, 1, 19000.0),
                               (2, 1, 30000.0))]
    (tmp_path / "trace.json").write_text(json.dumps({"traceEvents": events}))
    assert start_skew_s(tmp_path / "trace.json") == pytest.approx(0.002)


def test_the_report_compares_the_arms_of_each_round():
    def run(ahead: bool, period: float, i: int) -> dict:
        return {"send_ahead": ahead, "round": i, "period_s": period, "step_s": period - 0.002,
                "round_trip_s": 0.003 if not ahead else 0.0005, "start_skew_s": 0.001,
                "sync_s": 0.002, "reduce_s": 0.001, "load_average": 1.5}

    runs = [run(False, 0.020, 0), run(True, 0.016, 0), run(False, 0.040, 1), run(True, 0.028, 1)]  # 0.80, 0.70
    text = report([{"job": "x", "predicted_step_s": 0.015, "runs": runs, "same_losses": True}], "")
    row = next(line for line in text.splitlines() if line.startswith("| x |"))
    assert "| 0.75 |" in row  # the median of the rounds' ratios, not the ratio of the medians (0.73)
    assert "| 3.00 / 0.50 ms |" in row and "| True |" in row


def test_the_period_is_the_median_gap_between_step_ends_after_the_warm_up():
    times = [0.0, 5.0, 5.5, 5.51, 5.53, 5.56, 5.58]  # the first two gaps (warm-up) are left out
    assert period_s(times, warmup=2) == pytest.approx(0.02)
