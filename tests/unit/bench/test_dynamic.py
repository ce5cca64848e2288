"""bench/planner/dynamic.py: its batch generators follow the stated distributions, and on its workloads (fewer
batches than the benchmark draws) the plan cache is never predicted slower than a static plan."""

from __future__ import annotations

import numpy as np

from bench.planner.dynamic import (
    WORKLOADS, draw_clip_mix, draw_vlm, load_workload, measure, render_report, shapes_document,
)
from planner.shapes import parse_shapes

BY_NAME = {w.name: w for w in WORKLOADS}


def test_vlm_batches_follow_the_stated_model() -> None:
    batches = draw_vlm(np.random.default_rng(0), 400)
    vl = [b["tasks"]["vision_language"] for b in batches]
    text = [b["tasks"]["text_only"] for b in batches]
    audio = [b["tasks"]["audio_language"] for b in batches]
    assert {v["image_size"]["vision"] for v in vl} == {224, 336, 448, 672}
    assert all(v["seq_len"]["llm"] >= 256 + 64 and (v["seq_len"]["llm"] - 256) % 64 == 0 for v in vl)
    assert all(t["batch_size"] * t["seq_len"]["llm"] == 262_144 for t in text)  # one token budget per step
    assert all(a["seq_len"]["audio"] % 250 == 0 and a["seq_len"]["llm"] == a["seq_len"]["audio"] // 2 + 274
               for a in audio)


def test_clip_mix_splits_512_rows_in_multiples_of_32() -> None:
    for batch in draw_clip_mix(np.random.default_rng(0), 200):
        rows = [t["batch_size"] for t in batch["tasks"].values()]
        assert sum(rows) == 512 and min(rows) >= 32 and all(r % 32 == 0 for r in rows)


def test_shapes_documents_are_valid_and_seeded() -> None:
    for workload in WORKLOADS:
        job = load_workload(workload)
        doc = shapes_document(workload, 50, 2)
        assert doc == shapes_document(workload, 50, 2)
        assert len(parse_shapes(doc, job).points) > 1


def test_cache_is_never_predicted_slower_than_a_static_plan() -> None:
    # the VLM workload only: clip-4@32 plans ~4x slower (the benchmark runs both)
    name, steps = "qwen-val-3@32", 40
    record = measure(BY_NAME[name], steps, 2)
    for summary in record["by_run_length"].values():
        cache = summary["cache_s"]
        assert cache <= summary["best_static_s"] * (1 + 1e-9)
        for static in (summary["static_mean_s"], summary["static_max_s"]):
            assert static is None or cache <= static * (1 + 1e-9)
        assert 1 <= summary["plans"] <= 2
    assert f"## {name}" in render_report([record], {"steps": steps, "buckets": 2})
