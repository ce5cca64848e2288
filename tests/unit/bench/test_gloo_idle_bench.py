"""bench.gloo_idle's cases and report (the measurement itself needs two gloo processes: run the benchmark)."""

from __future__ import annotations

from bench.gloo_idle import GAPS_MS, REMEDIES, REMEDY_GAPS_MS, cases, report


def test_every_gap_is_timed_with_matmuls_and_each_other_work_at_5_ms_for_both_operations():
    got = cases()
    plain = [(op, g) for op in ("all-reduce", "p2p") for g in GAPS_MS]
    assert [(op, g) for op, work, g in got if work == "matmul 128"] == \
        plain + [(op, g) for op in REMEDIES for g in REMEDY_GAPS_MS]
    assert sorted((op, work) for op, work, g in got if work != "matmul 128") == \
        [("all-reduce", "add 16k"), ("all-reduce", "sleep(0)"), ("p2p", "add 16k"), ("p2p", "sleep(0)")]


def test_the_report_has_a_row_per_case_in_milliseconds():
    text = report([{"operation": "all-reduce", "work": "matmul 128", "gap_ms": 5, "seconds": 0.0028}], repeats=25)
    assert "| all-reduce | matmul 128 | 5 ms | 2.800 ms |" in text and "median of 25 samples" in text
