"""Chrome traces of a run (orchestrator.trace): the predicted one from a plan, the measured one from the workers'
spans, their schema, and the bounded recorder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.trace import (
    CATEGORIES, MEASURED_PID, PREDICTED_PID, TRACE_STEPS, RecordedStep, TraceError, TraceRecorder, check_trace,
    load_trace, measured_trace, predicted_trace, transfer_ranks, write_run_traces, write_trace,
)
from planner.errors import SpecError
from planner.plan import Plan, PlanPiece, PlanTransfer, SyncGroup
from runtime.steps import SPAN_PARTS


def with_transfers(plan: Plan) -> Plan:
    """``plan`` with a transfer into every wave after the first (from a slice of the wave before), its boundary's
    predicted seconds (activations in, gradients back) and a sync group."""
    transfers, waves = [], [plan.waves[0]]
    for k in range(1, len(plan.waves)):
        src, dst = plan.waves[k - 1].slices[0], plan.waves[k].slices[0]
        transfers.append(PlanTransfer(after_wave=k - 1, src_metaop=src.metaop, dst_metaop=dst.metaop,
                                      src_devices=src.devices, dst_devices=dst.devices, bytes=1e6, time_s=0.002 * k))
        waves.append(plan.waves[k].model_copy(update={"transfer_in_s": 0.0015 * k, "transfer_back_s": 0.0005 * k}))
    moved = sum(w.transfer_in_s + w.transfer_back_s for w in waves)
    sync = [SyncGroup(param_group="image_encoder", metaops=[0], devices=[0, 1], bytes=1e6, time_s=0.01)]
    predicted = plan.predicted.model_copy(update={"transfer_s": moved,
                                                  "iteration_time_s": plan.predicted.iteration_time_s + moved})
    return plan.model_copy(update={"transfers": transfers, "sync_groups": sync, "waves": waves,
                                   "predicted": predicted}).sealed()


def complete(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def assert_schema(trace: dict, ranks: int, pid: int) -> None:
    """Valid Chrome trace JSON, one named and sorted track per rank, nothing outside them."""
    events = check_trace(json.loads(json.dumps(trace)), ranks)
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert names == {r: f"rank {r}" for r in range(ranks)}
    order = {e["tid"]: e["args"]["sort_index"] for e in trace["traceEvents"] if e["name"] == "thread_sort_index"}
    assert order == {r: r for r in range(ranks)}
    processes = [e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"]
    assert processes == [trace["otherData"]["kind"]]
    for e in events:
        assert e["pid"] == pid and 0 <= e["tid"] < ranks
        assert isinstance(e["ts"], float) and isinstance(e["dur"], float) and e["dur"] >= 0
        assert e["cat"] in CATEGORIES and e["args"]["part"] in SPAN_PARTS + ("gather",)
        if e["cat"] == "compute":
            assert e["args"]["task"] and e["args"]["metaop"] in e["name"]


@pytest.mark.parametrize("seed, num_nodes, num_waves", [(0, 1, 3), (1, 2, 6)])
def test_predicted_trace_schema_and_tracks(make_plan, seed: int, num_nodes: int, num_waves: int) -> None:
    plan = with_transfers(make_plan(num_nodes=num_nodes, num_waves=num_waves, seed=seed))
    trace = predicted_trace(plan)
    ranks = num_nodes * 8
    assert_schema(trace, ranks, PREDICTED_PID)
    events = complete(trace)
    by_rank: dict[int, list[dict]] = {}
    for e in events:
        by_rank.setdefault(e["tid"], []).append(e)
    for spans in by_rank.values():  # one track per rank: its spans never overlap
        spans.sort(key=lambda e: e["ts"])
        for a, b in zip(spans, spans[1:]):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-3
    for wave in plan.waves:  # every device of a slice computes it forward and backward, named after its MetaOp
        for s in wave.slices:
            name = plan.metaops[s.metaop].name
            for d in s.devices:
                parts = sorted(e["args"]["part"] for e in by_rank[d]
                               if e["cat"] == "compute" and e["args"]["wave"] == wave.index)
                assert parts == ["backward", "forward"]
                assert any(name in e["name"] for e in by_rank[d] if e["args"]["wave"] == wave.index)
                compute = sum(e["dur"] for e in by_rank[d]
                              if e["cat"] == "compute" and e["args"]["wave"] == wave.index)
                assert compute == pytest.approx(min(s.time_s, wave.duration_s) * 1e6, rel=1e-6)
    end = max(e["ts"] + e["dur"] for e in events) / 1e6
    pred = plan.predicted
    assert end == pytest.approx(pred.compute_s + pred.transfer_s + pred.sync_s + pred.optimizer_s, rel=1e-6)
    moved = sum(e["dur"] for e in events if e["cat"] == "transfer" and e["tid"] == plan.waves[1].slices[0].devices[0])
    assert moved > 0


def test_pieces_name_the_ranks_that_move_and_split_the_boundary(make_plan) -> None:
    plan = with_transfers(make_plan(num_waves=3, seed=1))
    src, dst = plan.waves[0].slices[0], plan.waves[1].slices[0]

    def piece(backward: bool, a: int, b: int, nbytes: float) -> PlanPiece:
        return PlanPiece(wave=1, backward=backward, src=a, dst=b, producer=(0, 0), consumer=(1, 0), target=(1, 0),
                         task="task0", input=0, start=0, stop=4, shape=(8,), bytes=nbytes)

    a, b = src.devices[0], dst.devices[-1]
    pieces = [piece(False, a, b, 3e6), piece(True, b, a, 1e6), piece(False, b, b, 0.0)]  # the last stays local
    plan = plan.model_copy(update={"pieces": pieces}).sealed()
    assert transfer_ranks(plan)[1] == {a, b}
    events = [e for e in complete(predicted_trace(plan)) if e["cat"] == "transfer" and e["args"]["wave"] == 1]
    assert {e["tid"] for e in events} == {a, b}
    into = next(e["dur"] for e in events if e["args"]["part"] == "transfer_forward")
    back = next(e["dur"] for e in events if e["args"]["part"] == "transfer_backward")
    assert (into, back) == (pytest.approx(plan.waves[1].transfer_in_s * 1e6),
                            pytest.approx(plan.waves[1].transfer_back_s * 1e6))


def test_the_predicted_split_is_the_plans(make_plan) -> None:
    """Each slice computes forward for its planned forward_s and backward for the rest of its time_s."""
    plan = make_plan(num_tasks=1)
    events = complete(predicted_trace(plan))
    for wave in plan.waves:
        for s in wave.slices:
            for part, want in (("forward", s.forward_s), ("backward", s.time_s - s.forward_s)):
                got = [e["dur"] for e in events if e["tid"] == s.devices[0] and e["args"]["wave"] == wave.index
                       and e["args"]["part"] == part]
                assert got == [pytest.approx(min(want, wave.forward_s if part == "forward"
                                                 else wave.duration_s - wave.forward_s) * 1e6)]


def fake_timing(plan: Plan, rank: int, start_unix: float) -> dict:
    """What a worker reports: its spans in the order a step runs them, 1 ms each, on this rank's slices."""
    spans, t = [], 0.0

    def add(part: str, wave: int | None) -> None:
        nonlocal t
        spans.append([part, wave, t, t + 0.001])
        t += 0.001

    mine = {w.index for w in plan.waves for s in w.slices if rank in s.devices}
    for k in range(len(plan.waves)):
        add("transfer_forward", k)
        if k in mine:
            add("forward", k)
    add("loss", None)
    for k in reversed(range(len(plan.waves))):
        if k in mine:
            add("backward", k)
        add("sync", k)
        add("transfer_backward", k)
    for part in ("sync", "optimizer", "reduce_losses"):
        add(part, None)
    return {"spans": spans, "start_unix": start_unix, "total_s": t + 0.0005}


def recorded(plan: Plan, steps: range, ranks: int) -> list[RecordedStep]:
    return [RecordedStep(step, tuple(fake_timing(plan, r, 1000.0 + step * 0.1 + r * 0.0003) for r in range(ranks)))
            for step in steps]


def test_measured_trace_puts_each_rank_on_its_track_inside_its_steps(make_plan) -> None:
    plan = make_plan(num_waves=3)
    steps = recorded(plan, range(2, 5), 8)
    trace = measured_trace(plan, steps)
    assert_schema(trace, 8, MEASURED_PID)
    assert trace["otherData"]["steps"] == [2, 3, 4]
    events = complete(trace)
    origin = min(t["start_unix"] for r in steps for t in r.timings)
    for r in steps:
        for rank, timing in enumerate(r.timings):
            mine = [e for e in events if e["tid"] == rank and e["args"]["step"] == r.step]
            assert len(mine) == len(timing["spans"])
            start = (timing["start_unix"] - origin) * 1e6
            for e in mine:  # inside the step, as the rank measured it
                assert start - 1e-3 <= e["ts"] and e["ts"] + e["dur"] <= start + timing["total_s"] * 1e6 + 1e-3
    compute = [e for e in events if e["cat"] == "compute"]
    assert {e["args"]["task"] for e in compute} == {op.task for w in plan.waves for s in w.slices
                                                     for op in [plan.metaops[s.metaop]]}


def test_measured_trace_skips_ranks_and_steps_without_spans(make_plan) -> None:
    plan = make_plan()
    steps = [RecordedStep(0, (None,) * 8), RecordedStep(1, (fake_timing(plan, 0, 5.0),) + ({},) * 7)]
    trace = measured_trace(plan, steps)
    assert trace["otherData"]["steps"] == [1]
    assert {e["tid"] for e in complete(trace)} == {0}
    assert min(e["ts"] for e in complete(trace)) == 0.0


def test_recorder_keeps_only_the_last_steps() -> None:
    recorder = TraceRecorder()
    for step in range(TRACE_STEPS + 7):
        recorder.record(step, [None])
    assert [r.step for r in recorder.steps] == list(range(7, TRACE_STEPS + 7))


def test_files_round_trip_as_json(make_plan, tmp_path: Path) -> None:
    plan = with_transfers(make_plan(num_waves=4))
    paths = write_run_traces(tmp_path, plan, recorded(plan, range(3), 8))
    assert [p.name for p in paths] == ["trace-predicted.json", "trace.json"]
    for path, kind in zip(paths, ("predicted", "measured")):
        data = json.loads(path.read_text())  # plain JSON, as Perfetto and chrome://tracing read it
        assert data["displayTimeUnit"] == "ms" and data["otherData"]["kind"] == kind
        assert data == load_trace(path, 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_run_traces(empty, plan, [RecordedStep(0, (None,) * 8)]) == [empty / "trace-predicted.json"]
    assert not (empty / "trace.json").exists()  # no step recorded spans: no measured trace


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("traceEvents"), "traceEvents"),
    (lambda d: d["traceEvents"][-1].update(dur=-1.0), "negative"),
    (lambda d: d["traceEvents"][-1].update(ts="0"), "'ts'"),
    (lambda d: d["traceEvents"][-1].update(tid=99), "tid 99"),
    (lambda d: d["traceEvents"][-1].pop("name"), "'name'"),
    (lambda d: d["traceEvents"][-1].update(cat="gpu"), "'cat'"),
    (lambda d: d["traceEvents"][-1].update(ph="B"), '"ph"'),
])
def test_check_trace_names_what_is_wrong(make_plan, mutate, message: str) -> None:
    data = json.loads(json.dumps(predicted_trace(make_plan())))
    check_trace(data, 8)
    mutate(data)
    with pytest.raises(TraceError, match=message):
        check_trace(data, 8)


def test_load_trace_rejects_what_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    path.write_text("{not json")
    with pytest.raises(SpecError, match="not a Chrome trace \\(not JSON\\)"):
        load_trace(path)
    write_trace(path, {"traceEvents": [], "displayTimeUnit": "ms"})
    assert load_trace(path) == {"traceEvents": [], "displayTimeUnit": "ms"}
