"""bench.examples' measured parts that the plan does not price: the driver's wait beyond its slowest worker."""

from __future__ import annotations

import json

import pytest

from bench.examples.__main__ import WARMUP_STEPS, driver_round_trip, measured_parts_of, report


def test_the_driver_round_trip_is_the_step_beyond_the_slowest_worker_after_warm_up():
    warm = [{"step_seconds": 9.0, "worker_seconds": [1.0, 2.0]}] * WARMUP_STEPS  # left out
    timed = [{"step_seconds": s, "worker_seconds": [w, w - 0.001]} for s, w in ((0.030, 0.027), (0.020, 0.019),
                                                                                 (0.050, 0.040))]
    assert driver_round_trip(warm + timed) == pytest.approx(0.003)  # median of 3, 1 and 10 ms


def test_the_report_shows_the_unpriced_round_trip_beside_the_priced_parts(tmp_path):
    trace = {"traceEvents": [{"ph": "X", "tid": r, "dur": 2000.0, "args": {"part": "sync", "step": 5}}
                             for r in range(2)]}
    (tmp_path / "trace.json").write_text(json.dumps(trace))
    parts = measured_parts_of(tmp_path / "trace.json") | {"driver round trip": 0.0025}
    record = {"job": "x", "workers": 2, "waves": 1, "method": "m", "measured_step_s": 0.01, "predicted_step_s": 0.01,
              "ratio": 1.0, "load_average": 0.5, "measured_parts_s": parts,
              "predicted_parts_s": {p: 0.001 for p in ("compute", "transfer", "sync", "optimizer", "all-gather",
                                                       "step all-reduce")}}
    text = report([record])
    assert "| driver round trip |" in text and "| 2.0 / 1.0 |" in text and "| 2.5 / - |" in text
