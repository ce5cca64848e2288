"""What a worker receives (runtime.payload, built by runtime.prepare): its Assignment and the specs it builds and runs,
never another rank's components; a payload round-trips through JSON and is refused when its Assignment was edited;
a worker is built from it with the MetaGraph builder disabled."""

from __future__ import annotations

import pytest

from planner.api import plan_schedule
from planner.errors import SpecError
from planner.metagraph import build_metagraph
from planner.program import assignment
from planner.schedule import Schedule, Slice, Wave
from planner.spec import parse_job
from runtime.payload import RolesData, WorkerPayload
from runtime.prepare import build_payloads

TOWER = {"kind": "transformer", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "seq_len": 6}
# two tasks on their own components, each on a device of its own; "shared" is read by "both" and by "right"
JOB = parse_job({
    "name": "disjoint",
    "cluster": {"num_nodes": 1, "devices_per_node": 3, "device": "cpu"},
    "components": {"left": TOWER, "right": {**TOWER, "hidden_size": 8, "num_heads": 1}, "mid": TOWER},
    "tasks": [
        {"name": "l", "batch_size": 4, "loss_weight": 0.5, "components": [{"component": "left"}]},
        {"name": "r", "batch_size": 4, "components": [{"component": "right"}]},
        {"name": "m", "batch_size": 4, "loss_weight": 2.0, "components": [{"component": "mid"}]},
    ],
})


@pytest.fixture(scope="module")
def plan():
    ids = {op.name: op.id for op in build_metagraph(JOB).metaops}
    schedule = Schedule((Wave((Slice(ids["l.left"], 2, 1), Slice(ids["r.right"], 2, 1), Slice(ids["m.mid"], 2, 1))),))
    return plan_schedule(JOB, schedule, method="hand-made")


def test_a_rank_receives_only_the_specs_of_what_it_runs(plan):
    device_of = {plan.metaops[s.metaop].component: s.devices for w in plan.waves for s in w.slices}
    assert sorted(map(tuple, device_of.values())) == [(0,), (1,), (2,)]  # disjoint ranks
    payloads = build_payloads(JOB, plan)
    assert [p.rank for p in payloads] == [0, 1, 2]
    for payload in payloads:
        mine = next(c for c, devices in device_of.items() if payload.rank in devices)
        assert set(payload.components) == {mine}
        assert payload.components[mine] == JOB.components[mine]
        assert [t.components[0].component for t in payload.tasks] == [mine]
        assert payload.training == JOB.training and payload.cluster == JOB.cluster
        assert payload.loss_weights == {"l": 0.5, "r": 1.0, "m": 2.0}  # every task, the job's order: one all-reduce
        assert payload.assignment == assignment(plan, payload.rank) and payload.roles is None
        assert {h.name for h in payload.assignment.holdings} == {mine, "embed:" + mine, "head:" + payload.tasks[0].name}


def test_a_payload_is_its_own_type_and_round_trips(plan):
    payload = build_payloads(JOB, plan)[1]
    assert not hasattr(payload, "planner")  # no JobSpec: a job of one component and one task would not be this job
    again = WorkerPayload.from_json(payload.to_json())
    assert again == payload
    other = assignment(plan, 2)
    with pytest.raises(SpecError, match="not rank 1's sealed Assignment"):
        WorkerPayload.from_json(payload.model_copy(update={"assignment": other}).to_json())
    edited = payload.assignment.model_copy(update={"pieces": []})  # the hash no longer matches
    with pytest.raises(SpecError, match="not rank 1's sealed Assignment"):
        WorkerPayload.from_json(payload.model_copy(update={"assignment": edited}).to_json())


def test_a_rank_holding_a_shared_component_receives_every_task_using_it():
    """A module's shape can depend on every use of its component (an input adapter's widths), so a rank holding a
    component receives every task that uses it, and those tasks' components."""
    from tests.unit.runtime.test_gradient_buckets import JOB as SHARED, plan as shared_plan

    plan = shared_plan()
    for payload in build_payloads(SHARED, plan):
        held = {h.name for h in payload.assignment.holdings}
        tasks = {t.name for t in payload.tasks}
        if "txt" in held or "embed:txt" in held:
            assert tasks == {"caption", "align"} and set(payload.components) == {"img", "txt", "aud"}
        for name in held - {"txt", "embed:txt"}:
            assert name.removeprefix("embed:").removeprefix("head:") in set(payload.components) | tasks


def test_roles_cross_as_json_unchanged():
    from runtime.rollout import Roles

    roles = Roles({3}, {4: 3}, {("head:t", 0): (1, 2)}, {("embed:p", 0): (0, 1)}, [(("head:t", 0), ("head:t", 0), 0, 1)],
                  {"t": (3, 1, [(0, 1, 0, 4)])}, {3: 17}, {5: True})
    data = RolesData.model_validate_json(RolesData.of(roles).model_dump_json())
    assert Roles(**data.fields()) == roles


LLAMA = {"kind": "llama", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "num_kv_heads": 1, "vocab_size": 24,
         "seq_len": 7}
GRPO = parse_job({
    "name": "grpo-payload", "cluster": {"num_nodes": 1, "devices_per_node": 3, "device": "cpu"},
    "components": {"policy": LLAMA, "reference": {**LLAMA, "frozen": True}},
    "tasks": [{"name": "grpo", "batch_size": 4, "loss": "grpo", "components": [
        {"component": "policy", "name": "rollout", "mode": "generate", "seq_len": 4, "new_tokens": 3, "samples": 2},
        {"component": "reference", "mode": "forward", "after": ["rollout"]},
        {"component": "policy", "after": ["rollout"]},
    ]}],
    "training": {"precision": "fp32"},
})


def test_workers_of_a_job_with_modes_are_built_without_a_metagraph(monkeypatch):
    """The generate use's layers (its component's train MetaOps) and the modes' roles come in the payload: every
    rank's worker builds, with the MetaGraph builder disabled, the modules it built from the whole job before."""
    import planner.metagraph
    from planner.costmodel import Layout
    from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave
    from runtime.executor import WaveWorker
    from runtime.rollout import Roles
    from runtime.sampleop import layer_keys
    from planner.api import plan_placed

    ops = {op.use: op for op in build_metagraph(GRPO).metaops}
    waves = [[("rollout", [0])], [("reference", [1]), ("policy", [2])]]
    plan = plan_placed(GRPO, PlacedSchedule(tuple(PlacedWave(tuple(
        PlacedSlice(ops[use].id, 0, ops[use].num_layers, tuple(devs), Layout(len(devs), 1)) for use, devs in wave))
        for wave in waves)), method="hand-made")
    payloads = [WorkerPayload.from_json(p.to_json()) for p in build_payloads(GRPO, plan)]
    rollout = next(op for op in plan.metaops if op.mode == "generate")
    assert Roles(**payloads[0].roles.fields()) == Roles.build(GRPO, plan)
    assert layer_keys(payloads[0], rollout) == layer_keys(GRPO, rollout) == [("policy", 0), ("policy", 1)]

    def refuse(job):
        raise AssertionError("a worker rebuilt the MetaGraph")

    monkeypatch.setattr(planner.metagraph, "build_metagraph", refuse)
    workers = [WaveWorker(p) for p in payloads]
    generator = workers[0].modules
    assert {("policy", 0), ("policy", 1), ("embed:policy", 0), ("head:grpo", 0)} <= set(generator)
    assert sum(x.numel() for x in generator[("policy", 0)].parameters()) > 0  # the real layer, not the stand-in
    # the generator decodes with the trainer's initial weights (same seeds), which the hand-off then keeps equal
    trainer = workers[2].modules
    for key in [("policy", 0), ("policy", 1)]:
        for (name, a), b in zip(generator[key].named_parameters(), trainer[key].parameters()):
            assert a.equal(b), (key, name)
