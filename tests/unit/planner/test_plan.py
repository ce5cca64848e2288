"""plan_job end to end on small jobs, and the Plan JSON: sealed hash, round trip, determinism, tamper checks,
schedule invariants (every layer once, no device twice per wave), baselines, and profiled cost files."""

from __future__ import annotations

import copy
import json

import pytest

from planner.api import make_cost_model, plan_job, predict_plan, spec_hash
from planner.costmodel import AnalyticCostModel, Layout, ProfiledCostModel, profile_key
from planner.errors import PlanningError, SpecError
from planner.metagraph import build_metagraph
from planner.plan import PLAN_VERSION, Plan, load_plan, plan_from_json
from planner.spec import parse_job

BASELINES = {"sequential", "uniform", "optimus", "distmm_mt", "spindle"}


def job_dict(num_nodes: int = 1) -> dict:
    """Three tasks on 8 devices per node; `text` is shared by all three, `vision` by two, `head` is frozen."""
    return {
        "name": "small",
        "cluster": {"num_nodes": num_nodes, "devices_per_node": 8, "device": "a800"},
        "components": {
            "vision": {"kind": "vit", "num_layers": 8, "hidden_size": 768, "num_heads": 12, "patch_size": 16,
                       "image_size": 224},
            "text": {"kind": "transformer", "num_layers": 6, "hidden_size": 512, "num_heads": 8, "seq_len": 64},
            "audio": {"kind": "transformer", "num_layers": 4, "hidden_size": 256, "num_heads": 4, "seq_len": 256},
            "head": {"kind": "mlp", "num_layers": 2, "hidden_size": 512, "frozen": True},
        },
        "tasks": [
            {"name": "img_text", "batch_size": 64,
             "components": [{"component": "vision"}, {"component": "text", "after": []}]},
            {"name": "aud_text", "batch_size": 32,
             "components": [{"component": "audio"}, {"component": "text", "after": []}]},
            {"name": "caption", "batch_size": 16,
             "components": [{"component": "vision"}, {"component": "text"}, {"component": "head"}]},
        ],
        "planner": {"time_limit_s": 1.0},
    }


@pytest.fixture(scope="module", params=[1, 2], ids=["8dev", "16dev"])
def planned(request):
    data = job_dict(request.param)
    # a cap the search does not reach (its work budgets end it in 0.7 and 1.0 CPU s on an idle host): at the file's
    # 1 s the planning thread's CPU clock cut it under the full suite's load, and a different plan came out
    data["planner"]["time_limit_s"] = 30
    job = parse_job(data)
    return job, plan_job(job)


@pytest.fixture(scope="module")
def plan8():
    return plan_job(parse_job(job_dict(1))).plan


# --------------------------------------------------------------------------- the Plan as data


def test_plan_is_sealed(planned):
    job, outcome = planned
    plan = outcome.plan
    assert isinstance(plan, Plan)
    assert plan.version == PLAN_VERSION
    assert len(plan.hash) == 16 and plan.hash == plan.content_hash()
    assert plan.job == "small" and plan.spec_hash == spec_hash(job)
    assert plan.cost_model == "analytic"
    assert plan.cluster.num_nodes * plan.cluster.devices_per_node == job.cluster.num_devices
    assert plan.cluster.device == "a800"


def test_plan_metaops_mirror_the_metagraph(planned):
    job, outcome = planned
    graph = build_metagraph(job)
    assert [(m.id, m.name, m.num_layers, tuple(m.deps), m.param_group, m.frozen) for m in outcome.plan.metaops] == [
        (op.id, op.name, op.num_layers, op.deps, op.param_group, op.frozen) for op in graph.metaops
    ]


def test_json_round_trip(planned, tmp_path):
    plan = planned[1].plan
    text = plan.to_json()
    assert text.endswith("\n")
    again = plan_from_json(text)
    assert again == plan
    assert again.to_json() == text
    path = tmp_path / "plan.json"
    plan.save(path)
    assert load_plan(path) == plan


def test_same_job_gives_byte_identical_plan():
    """Two plans of one job are byte-identical when the search ends on its own (1.5 s here; the 30 s cap is not
    reached). At the file's 1 s cap the search is cut by the planning thread's CPU clock (1.2 s of planning), and
    where that clock stops moves with the machine's load: two plans differed once in the full suite."""
    data = job_dict(1)
    data["planner"]["time_limit_s"] = 30.0
    first, again = (plan_job(parse_job(data)).plan.to_json() for _ in range(2))
    assert again == first


def test_different_job_gives_different_hash(plan8):
    data = job_dict(1)
    data["tasks"][0]["batch_size"] = 128
    other = plan_job(parse_job(data), with_baselines=False).plan
    assert other.spec_hash != plan8.spec_hash and other.hash != plan8.hash
    assert other.baselines == {}


def test_edited_number_is_detected_by_the_hash(plan8):
    data = json.loads(plan8.to_json())
    data["predicted"]["iteration_time_s"] *= 0.5
    with pytest.raises(SpecError, match="content hash .* does not match") as info:
        plan_from_json(json.dumps(data), source="p.json")
    assert str(info.value).startswith("p.json: ")
    data = json.loads(plan8.to_json())
    data["waves"][0]["slices"][0]["devices"][0] += 1
    with pytest.raises(SpecError, match="hash"):
        plan_from_json(json.dumps(data))


def test_plan_without_hash_is_rejected(plan8):
    data = json.loads(plan8.to_json())
    data["hash"] = ""
    with pytest.raises(SpecError, match="no content hash"):
        plan_from_json(json.dumps(data))


@pytest.mark.parametrize("version", [PLAN_VERSION + 1, 0, None, "1"])
def test_wrong_version_is_rejected(plan8, version):
    data = json.loads(plan8.to_json())
    data["version"] = version
    with pytest.raises(SpecError, match=f"plan version {version!r} is not supported; expected {PLAN_VERSION}"):
        plan_from_json(json.dumps(data))


def test_malformed_plans_are_rejected(plan8, tmp_path):
    with pytest.raises(SpecError, match="not JSON"):
        plan_from_json("{oops")
    data = json.loads(plan8.to_json())
    data["surprise"] = 1
    with pytest.raises(SpecError, match="surprise"):
        plan_from_json(json.dumps(data))
    data = json.loads(plan8.to_json())
    del data["waves"]
    with pytest.raises(SpecError, match="waves"):
        plan_from_json(json.dumps(data))
    with pytest.raises(SpecError, match="no such plan file"):
        load_plan(tmp_path / "absent.json")


# --------------------------------------------------------------------------- schedule invariants


def test_every_layer_runs_exactly_once_in_order(planned):
    plan = planned[1].plan
    for op in plan.metaops:
        ranges = [(s.first_layer, s.num_layers) for w in plan.waves for s in w.slices if s.metaop == op.id]
        assert ranges, f"{op.name} never runs"
        next_layer = 0
        for first, count in ranges:
            assert count >= 1
            assert first == next_layer, f"{op.name}: slices {ranges} do not tile 0..{op.num_layers - 1}"
            next_layer += count
        assert next_layer == op.num_layers


def test_no_device_twice_in_a_wave(planned):
    job, outcome = planned
    num_devices = job.cluster.num_devices
    for wave in outcome.plan.waves:
        used = [d for s in wave.slices for d in s.devices]
        assert len(used) == len(set(used)), f"wave {wave.index} double-books {used}"
        assert all(0 <= d < num_devices for d in used)
        assert len({s.metaop for s in wave.slices}) == len(wave.slices)
        for s in wave.slices:
            assert len(s.devices) == s.dp_degree * s.tp_degree


def test_dependencies_finish_before_consumers_start(planned):
    plan = planned[1].plan
    last_wave = {op.id: max(w.index for w in plan.waves for s in w.slices if s.metaop == op.id) for op in plan.metaops}
    for op in plan.metaops:
        first_wave = min(w.index for w in plan.waves for s in w.slices if s.metaop == op.id)
        for dep in op.deps:
            assert last_wave[dep] < first_wave, f"{op.name} starts before MetaOp {dep} finished"


def test_predicted_times_add_up(planned):
    job, outcome = planned
    plan, pred = outcome.plan, outcome.plan.predicted
    assert pred.compute_s > 0
    assert pred.iteration_time_s >= pred.compute_s
    assert pred.iteration_time_s == pytest.approx(
        pred.compute_s + pred.transfer_s + pred.sync_s + pred.optimizer_s + pred.gather_s + pred.handoff_s
        + pred.reduce_s)
    assert pred.gather_s == pytest.approx(outcome.simulation.gather_s) and pred.gather_s >= 0
    # the critical path's compute: some of the waves' slices, forward and backward (no barrier between slices)
    slowest = sum(max(s.forward_s for s in w.slices) + max(s.time_s - s.forward_s for s in w.slices)
                  for w in plan.waves)
    assert pred.compute_s <= (slowest + pred.loss_s) * (1 + 1e-9)
    start = 0.0
    for k, wave in enumerate(plan.waves):
        assert wave.index == k and wave.start_s == pytest.approx(start)
        # A wave lasts as long as its slowest slice.
        assert wave.duration_s == pytest.approx(max(s.time_s for s in wave.slices))
        start += wave.duration_s
    assert len(plan.peak_memory_bytes) == job.cluster.num_devices
    assert max(plan.peak_memory_bytes) <= plan.cluster.memory_bytes


def test_slice_times_come_from_the_cost_model(planned):
    job, outcome = planned
    cm = make_cost_model(job)
    graph = build_metagraph(job)
    for wave in outcome.plan.waves:
        for s in wave.slices:
            op = graph.metaops[s.metaop]
            curve = cm.curve(op)
            assert s.time_s == pytest.approx(curve.time(len(s.devices)) * s.num_layers)
            assert curve.layout(len(s.devices)) == Layout(s.dp_degree, s.tp_degree)


def test_sync_groups_cover_shared_trainable_params_only(planned):
    plan = planned[1].plan
    groups = {name for g in plan.sync_groups for name in g.param_group.split("+")}
    assert "head" not in groups  # frozen: no gradients to reduce
    # besides layers, buckets hold the tasks' loss heads and the components' input modules (trained where they run)
    layers = {name for name in groups if not name.startswith(("head:", "embed:", "adapt:"))}
    assert layers <= {"vision", "text", "audio"}
    for g in plan.sync_groups:
        names = set(g.param_group.split("+"))
        assert set(g.metaops) == {m.id for m in plan.metaops if m.param_group in names}
        # the planner sizes layers; a bucket of loss heads alone is all-reduced but not priced (heads are not modelled)
        assert len(g.devices) >= 2 and (g.bytes > 0) == bool(names & layers)


def test_solver_report_and_bounds_are_consistent(planned):
    plan = planned[1].plan
    assert plan.solver.status in {"optimal", "feasible", "heuristic"}
    assert plan.solver.objective_s == pytest.approx(sum(w.duration_s for w in plan.waves))  # the waves' compute
    assert plan.bounds.dag_s <= plan.solver.objective_s * (1 + 1e-9)
    assert plan.solver.bound_s <= plan.solver.objective_s * (1 + 1e-9)
    assert 0 <= plan.solver.gap < 1


def test_baselines_and_loom_is_never_slower_than_spindle(planned):
    plan = planned[1].plan
    assert set(plan.baselines) == BASELINES
    assert list(plan.baselines) == sorted(plan.baselines)  # deterministic JSON
    assert all(t > 0 for t in plan.baselines.values())
    assert plan.predicted.iteration_time_s <= plan.baselines["spindle"] * (1 + 1e-9)


# --------------------------------------------------------------------------- cost models


def test_make_cost_model_analytic_follows_training_settings():
    data = job_dict(1)
    data["training"] = {"shard_optimizer": False}
    cm = make_cost_model(parse_job(data))
    assert isinstance(cm, AnalyticCostModel) and cm.shard_optimizer is False
    assert cm.hw.num_devices == 8 and cm.hw.device.name == "a800"


def test_make_cost_model_with_profiled_file(tmp_path):
    job = parse_job(job_dict(1))
    graph = build_metagraph(job)
    audio = next(op for op in graph.metaops if op.name == "aud_text.audio")
    # Make audio layers 1000x slower than the analytic model says (linear in the local batch).
    analytic = make_cost_model(job)
    scale = 1000 * analytic.layout_time(audio, Layout(1, 1)) / audio.batch_size
    points = {profile_key(audio, Layout(1, 1)): [[1, scale], [audio.batch_size, scale * audio.batch_size]]}
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"version": 1, "device": "a800", "points": points}))

    cm = make_cost_model(job, path)
    assert isinstance(cm, ProfiledCostModel) and isinstance(cm.fallback, AnalyticCostModel)
    curve = cm.curve(audio)
    assert curve.time(1) == pytest.approx(1000 * analytic.curve(audio).time(1))
    assert curve.times == pytest.approx(tuple(scale * audio.batch_size / n for n in curve.counts))
    other = next(op for op in graph.metaops if op.name == "img_text.text")
    assert cm.curve(other).times == pytest.approx(analytic.curve(other).times)  # analytic fallback

    outcome = plan_job(job, cm, with_baselines=False)
    assert outcome.plan.cost_model == "profiled"
    # Audio alone now takes at least its fastest profiled time per layer, far above the analytic plan.
    assert outcome.plan.predicted.compute_s >= curve.times[-1] * audio.num_layers * (1 - 1e-9)
    assert outcome.plan.predicted.compute_s > 10 * plan_job(job, analytic, with_baselines=False).plan.predicted.compute_s
    with pytest.raises(SpecError, match="no such cost file"):
        make_cost_model(job, tmp_path / "missing.json")


def test_plan_job_does_not_mutate_the_job():
    data = job_dict(1)
    job = parse_job(copy.deepcopy(data))
    plan_job(job, with_baselines=False)
    assert job == parse_job(data)


def test_plan_job_reports_a_metaop_that_cannot_fit():
    data = job_dict(1)
    data["cluster"]["memory_gib"] = 0.01  # 10 MiB: one vision layer's weights alone need more
    with pytest.raises(PlanningError, match=r"^MetaOp img_text\.vision: no valid device count"):
        plan_job(parse_job(data))


def test_predict_plan_reproduces_the_plan_and_follows_new_costs(planned):
    job, result = planned
    plan, cost_model = result.plan, make_cost_model(job)
    assert predict_plan(job, plan, cost_model).iteration_time_s == pytest.approx(plan.predicted.iteration_time_s)
    # the same placement under a model whose every layer takes twice as long: every wave's compute doubles, its
    # transfers stay (the critical path may pass through another device: where a device's sync began the exposed
    # part, doubling compute can move it, so the path's compute is not simply twice the plan's)
    slower = AnalyticCostModel(cost_model.hw, cost_model.shard_optimizer, cost_model.grad_bytes, cost_model.weight_bytes)
    slower.layout_time = lambda op, layout: 2 * AnalyticCostModel.layout_time(cost_model, op, layout)
    base, doubled = predict_plan(job, plan, cost_model), predict_plan(job, plan, slower)
    assert doubled.wave_durations == pytest.approx([2 * t for t in base.wave_durations])
    assert [t.bytes for t in doubled.transfers] == [t.bytes for t in base.transfers]
    assert doubled.iteration_time_s > base.iteration_time_s
