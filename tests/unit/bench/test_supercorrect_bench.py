"""bench/alignment/supercorrect.py: the per-seed comparison with plain SFT, and the wall time a reused run keeps."""

from __future__ import annotations

import json

from bench.alignment import supercorrect as bench


def _run(seed: int, ours: tuple[float, float], plain: tuple[float, float]) -> dict:
    def metrics(located, fixed):
        return {"metrics": {"first_error_located": located, "first_error_fixed": fixed}}

    return {"seed": seed, "models": {bench.SUPERCORRECT: metrics(*ours), bench.BASELINE: metrics(*plain)}}


def test_seeds_above_baseline_counts_a_seed_only_when_strictly_above():
    runs = [_run(0, (0.9, 0.7), (0.4, 0.2)), _run(1, (0.3, 0.2), (0.3, 0.1)), _run(2, (0.1, 0.3), (0.3, 0.2))]
    assert bench.seeds_above_baseline(runs) == {"first_error_located": [0], "first_error_fixed": [0, 1, 2]}


def test_a_reused_run_reports_the_wall_time_kept_when_it_ran(tmp_path):
    out = tmp_path / "supercorrect-tiny-seed0"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "metrics.json").write_text("{}")
    assert bench.run_pipeline(tmp_path / "unused.yaml", out, reuse=True) is None  # finished, no wall time kept
    (tmp_path / "bench-walls").mkdir()
    (tmp_path / "bench-walls" / "supercorrect-tiny-seed0.json").write_text(json.dumps(812.5))
    assert bench.run_pipeline(tmp_path / "unused.yaml", out, reuse=True) == 812.5
