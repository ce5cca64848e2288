"""runtime.steps' stopwatch: the spans it records (what ran when in a step) and how they cross processes."""

from __future__ import annotations

import json
import time

import pytest

from runtime.steps import SPAN_PARTS, Lap, Span, StepTiming


def test_lap_records_labelled_intervals_in_order_without_gaps_or_overlap() -> None:
    lap = Lap()
    time.sleep(0.002)
    first = lap("transfer_forward", 0)
    time.sleep(0.003)
    second = lap("forward", 0)
    lap()  # unlabelled: timed, not recorded (a hole in the spans)
    time.sleep(0.001)
    lap("optimizer")
    spans = lap.spans
    assert [(s.part, s.wave) for s in spans] == [("transfer_forward", 0), ("forward", 0), ("optimizer", None)]
    assert spans[0].start_s == 0.0
    assert spans[0].end_s == pytest.approx(first) and first >= 0.002
    assert spans[1].start_s == spans[0].end_s and spans[1].end_s - spans[1].start_s == pytest.approx(second)
    assert spans[2].start_s > spans[1].end_s  # the unlabelled lap lies between them
    assert all(s.end_s >= s.start_s for s in spans)


def test_lap_rejects_an_unknown_part() -> None:
    with pytest.raises(AssertionError):
        Lap()("fwd")


def test_step_timing_finish_and_to_dict_carry_the_spans_as_json() -> None:
    lap = Lap()
    before = time.time()
    lap("loss")
    lap("reduce_losses")
    timing = StepTiming([0.0], [0.0])
    timing.finish(lap)
    assert [s.part for s in timing.spans] == ["loss", "reduce_losses"]
    assert timing.total_s >= timing.spans[-1].end_s
    assert before - 1 <= timing.start_unix <= before
    data = json.loads(json.dumps(timing.to_dict()))
    assert data["spans"] == [["loss", None, 0.0, timing.spans[0].end_s],
                             ["reduce_losses", None, timing.spans[1].start_s, timing.spans[1].end_s]]
    assert data["start_unix"] == timing.start_unix
    assert Span(*data["spans"][0]) == timing.spans[0]


def test_span_parts_name_every_part_of_a_step() -> None:
    assert {"forward", "backward", "transfer_forward", "transfer_backward", "loss", "sync", "optimizer"} \
        <= set(SPAN_PARTS)
