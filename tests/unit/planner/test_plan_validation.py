"""Semantic checks of a plan file (planner.validate): a plan edited and sealed again, so that its hash matches, is
refused when it loads with one line naming the file, the field path and what is wrong, and against its job when its
program (pieces, holdings, buckets, process groups) is not the one its waves give."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest

from planner.api import plan_job, plan_schedule
from planner.errors import SpecError
from planner.metagraph import build_metagraph
from planner.plan import Plan, plan_from_json
from planner.schedule import Schedule, Slice, Wave
from planner.spec import parse_job
from planner.validate import check_plan, check_program
from runtime.checks import WORKERS_PER_CORE, check_local_workers, check_plan_matches_job

# Two tasks sharing a transformer on 4 CPU devices, planned for the schedule SCHEDULE (placed and simulated as the
# planner's own, no solver): wave 0: a.enc layers 0-1 on [2], b.img on [0, 1]; wave 1: a.enc 2-3 on [2], b.enc 0-2
# on [0, 1]; wave 2: a.head on [2], b.enc 3 on [0, 1]. Device 3 is idle.
JOB = {
    "name": "checked",
    "cluster": {"num_nodes": 1, "devices_per_node": 4, "device": "cpu"},
    "components": {
        "enc": {"kind": "transformer", "num_layers": 4, "hidden_size": 32, "num_heads": 4, "seq_len": 8},
        "img": {"kind": "vit", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "patch_size": 4, "image_size": 16},
        "head": {"kind": "mlp", "num_layers": 2, "hidden_size": 32},
    },
    "tasks": [{"name": "a", "batch_size": 8, "components": [{"component": "enc"}, {"component": "head"}]},
              {"name": "b", "batch_size": 4, "components": [{"component": "img"}, {"component": "enc"}]}],
    "training": {"precision": "fp32"},
    "planner": {"time_limit_s": 1},
}


SCHEDULE = Schedule((Wave((Slice(0, 2, 1), Slice(2, 2, 2))), Wave((Slice(0, 2, 1), Slice(3, 3, 2))),
                     Wave((Slice(1, 2, 1), Slice(3, 1, 2)))))


@pytest.fixture(scope="module")
def plan() -> Plan:
    return plan_schedule(parse_job(JOB), SCHEDULE, method="hand-made")


@pytest.fixture(scope="module")
def graph():
    return build_metagraph(parse_job(JOB))


def edited(plan: Plan, edit: Callable[[dict], None]) -> str:
    """The plan's JSON after ``edit`` of its dict, sealed again (as someone editing it would), so the hash matches."""
    data = json.loads(plan.to_json())
    edit(data)
    return Plan.model_validate(data).sealed().to_json()


def refusal(text: str) -> str:
    with pytest.raises(SpecError) as err:
        plan_from_json(text, "p.json")
    message = str(err.value)
    assert "\n" not in message and message.startswith("p.json: ") and "loom plan" in message
    return message


def test_the_planners_plans_pass(plan, graph) -> None:
    check_plan(plan)
    check_program(plan, graph.metaops)
    assert plan_from_json(plan.to_json()) == plan
    assert [(w.index, [(s.metaop, s.first_layer, s.devices) for s in w.slices]) for w in plan.waves] == [
        (0, [(0, 0, [2]), (2, 0, [0, 1])]), (1, [(0, 2, [2]), (3, 0, [0, 1])]), (2, [(1, 0, [2]), (3, 3, [0, 1])])]
    solved = plan_job(parse_job(JOB), with_baselines=False).plan  # whatever the solver finds in its time limit
    check_plan(solved)
    check_program(solved, graph.metaops)


def test_every_workers_assignment_passes(plan, graph) -> None:
    from planner.program import assignment

    for rank in range(4):
        part = plan_from_json(assignment(plan, rank).to_json())
        check_program(part, graph.metaops)


def _slice(k: int, i: int) -> Callable[[dict], dict]:
    return lambda data: data["waves"][k]["slices"][i]


def _set(path: str, value) -> Callable[[dict], None]:
    """An edit setting ``path`` (dots; list indices as numbers) to ``value``."""
    def edit(data: dict) -> None:
        *parents, last = path.split(".")
        target = data
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[int(last) if isinstance(target, list) else last] = value
    return edit


def _drop_last_slice(data: dict) -> None:
    data["waves"][2]["slices"].pop()  # b.enc's last layer


def _drop_middle_slice(data: dict) -> None:
    data["waves"][1]["slices"].pop()  # b.enc's layers 0-2: its next slice starts at 3


def _head_before_encoder(data: dict) -> None:
    head = data["waves"][2]["slices"].pop(0)  # a.head, before a.enc's layers 2-3 have run
    data["waves"][1]["slices"].append(head | {"devices": [3], "dp_degree": 1})


def _two_nodes_tp(data: dict) -> None:
    data["cluster"] |= {"num_nodes": 2, "devices_per_node": 2}
    data["peak_memory_bytes"] = data["peak_memory_bytes"][:4]
    data["waves"][0]["slices"][1] |= {"devices": [1, 2], "dp_degree": 1, "tp_degree": 2, "rows": [4]}
    data["waves"][0]["slices"][0] |= {"devices": [0]}


CASES = [
    ("layer missing at the end", _drop_last_slice, "metaops[3] ('b.enc') runs 3 of its 4 layers"),
    ("layers missing in between", _drop_middle_slice, "waves[2].slices[1].first_layer (3) is not where MetaOp b.enc "
     "continues; expected 0"),
    ("a layer twice", _set("waves.2.slices.1.first_layer", 2), "waves[2].slices[1].first_layer (2) is not where"),
    ("more layers than the MetaOp", _set("waves.2.slices.1.num_layers", 2), "waves[2].slices[1] ('layers 3..4') are "
     "not layers of MetaOp b.enc"),
    ("predecessor not finished", _head_before_encoder, "waves[1].slices[2].metaop ('1: a.head') runs in wave 1 before "
     "its predecessor a.enc has finished"),
    ("device outside the cluster", _set("waves.0.slices.0.devices", [7]), "waves[0].slices[0].devices[0] (7) is not a "
     "device of the plan's cluster; expected 0..3"),
    ("device twice in a wave", _set("waves.0.slices.0.devices", [1]), "waves[0].slices[1].devices ([0, 1]) shares "
     "device 1 with slice 0"),
    ("devices out of order", _set("waves.0.slices.1.devices", [1, 0]), "waves[0].slices[1].devices ([1, 0]) is not "
     "strictly ascending"),
    ("dp x tp is not the device count", _set("waves.0.slices.1.dp_degree", 1), "waves[0].slices[1] ('dp 1 x tp 1') "
     "does not match its 2 devices"),
    ("rows not the shares", _set("waves.0.slices.1", {
        "metaop": 2, "first_layer": 0, "num_layers": 2, "devices": [0, 1, 3], "dp_degree": 3, "tp_degree": 1,
        "time_s": 0.1, "forward_s": 0.03, "memory_bytes": 1.0, "rows": [1, 1, 2]}), "waves[0].slices[1].rows "
     "([1, 1, 2]) are not the shares of MetaOp b.img's batch the program moves; expected [2, 1, 1]"),
    ("tensor parallel across nodes", _two_nodes_tp, "waves[0].slices[1].devices ([1, 2]) form a tensor-parallel group "
     "across nodes"),
    ("NaN time", _set("waves.1.slices.0.time_s", math.nan), "waves[1].slices[0].time_s (nan) is not a finite positive"),
    ("infinite wave", _set("waves.1.duration_s", math.inf), "waves[1].duration_s (inf) is not a finite positive"),
    ("zero time", _set("waves.1.slices.0.time_s", 0.0), "waves[1].slices[0].time_s (0.0) is not a finite positive"),
    ("negative transfer", _set("waves.1.transfer_in_s", -1.0), "waves[1].transfer_in_s (-1.0) is not a finite "
     "non-negative"),
    ("negative prediction", _set("predicted.iteration_time_s", -0.5), "predicted.iteration_time_s (-0.5) is not"),
    ("empty wave", _set("waves.1.slices", []), "waves[1].slices ([]) is empty"),
    ("wave index", _set("waves.1.index", 5), "waves[1].index (5) is not the wave's position; expected 1"),
    ("no waves", _set("waves", []), "waves ([]) is empty"),
    ("phases past the waves", _set("phases", [0, 3]), "phases ([0, 3]) names a wave past the last one (2)"),
    ("phases not from wave 0", _set("phases", [1]), "phases ([1]) does not start with wave 0"),
    ("phases out of order", _set("phases", [0, 2, 1]), "phases ([0, 2, 1]) is not strictly ascending"),
    ("an edge across phases", _set("phases", [0, 1]), "crosses from phase 0 to phase 1; expected every edge inside "
     "one phase"),
    ("dependency on a later MetaOp", _set("metaops.0.deps", [3]), "metaops[0].deps ([3]) are not distinct earlier"),
    ("zero batch", _set("metaops.2.batch_size", 0), "metaops[2].batch_size (0) is not positive"),
    ("no nodes", _set("cluster.num_nodes", 0), "cluster.num_nodes (0) is not a node count"),
    ("rank outside", _set("rank", 9), "rank (9) is not a device of the plan's cluster"),
    ("piece of a missing slice", _set("pieces.0.producer", [0, 5]), "pieces[0].producer ([0, 5]) is not a slice"),
    ("piece rows beyond the batch", _set("pieces.0.stop", 99), "pieces[0] ('rows 0..99') are not rows of the "
     "producer's batch"),
    ("piece to a device outside", _set("pieces.0.dst", 12), "pieces[0].dst (12) is not a device of the plan's cluster"),
    ("piece from a device of no slice", _set("pieces.0.src", 3), "is not a move between the two slices' devices"),
    ("piece of another task", _set("pieces.0.task", "c"), "pieces[0].task ('c') is not a task of the plan's MetaOps"),
    ("piece shape", _set("pieces.0.shape", [8, 0]), "pieces[0].shape ([8, 0]) has a dimension below 1"),
    ("holding of no module", _set("holdings.0.name", "embed:nothing"), "holdings[0].name ('embed:nothing') is not a "
     "module of the plan"),
    ("holding beyond the layers", _set("holdings.3.layer", 4), "holdings[3].layer (4) is not a layer of parameter "
     "group enc; expected 0..3"),
    ("holding on a device outside", _set("holdings.0.devices", [0, 4]), "holdings[0].devices[1] (4) is not a device"),
    ("holding ready after no wave", _set("holdings.0.ready_wave", 4), "holdings[0].ready_wave (4) is not a wave"),
    ("bucket of no holding", _set("grad_buckets.0.members", [["head:z", 0, 0]]), "grad_buckets[0].members[0] "
     "(['head:z', 0, 0]) is not a trainable holding"),
    ("trainable holding in no bucket", _set("grad_buckets", []), "is trainable but in no gradient bucket"),
    ("optimizer shards not one per holder", _set("grad_buckets.0.shards", [0, 0]), "grad_buckets[0].shards ([0, 0]) "
     "is not one optimizer share per device of the bucket"),
    ("process group of one", _set("process_groups", [[0]]), "process_groups[0] ([0]) has fewer than 2 device(s)"),
    ("process group outside", _set("process_groups", [[0, 8]]), "process_groups[0][1] (8) is not a device"),
    ("sync group of no MetaOp", _set("sync_groups.0.metaops", [9]), "sync_groups[0].metaops ([9]) are not MetaOps"),
    ("peak memory per device", _set("peak_memory_bytes", [1.0]), "peak_memory_bytes ('1 values') is not one per "
     "device; expected 4"),
]


@pytest.mark.parametrize("edit, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_an_edited_and_resealed_plan_is_refused_with_the_field(plan, edit, fragment) -> None:
    message = refusal(edited(plan, edit))
    assert fragment in message, message


def test_a_different_tp_degree_on_one_layer_is_refused(plan) -> None:
    def edit(data: dict) -> None:  # b.enc's layers 0-2 on [0, 1] as one TP group; a.enc ran them at TP 1
        data["waves"][1]["slices"][1] |= {"dp_degree": 1, "tp_degree": 2, "rows": [4]}
    assert "waves[1].slices[1].tp_degree (2) differs from another slice's degree 1 on layers of parameter group enc" \
        in refusal(edited(plan, edit))


def test_the_program_must_be_the_one_the_waves_give(plan, graph) -> None:
    """Pieces, holdings, buckets and groups that refer to real slices and ranks but are not what planner.program
    derives (moves swapped, a holder left out) pass check_plan and are refused against the job."""
    def swap(data: dict) -> None:
        data["pieces"][0], data["pieces"][1] = data["pieces"][1], data["pieces"][0]

    def fewer_holders(data: dict) -> None:
        group = next(g for g in data["process_groups"] if len(g) == 3)
        data["process_groups"].remove(group)

    for edit, field in ((swap, "pieces[0]"), (fewer_holders, "process_groups[1]")):
        changed = plan_from_json(edited(plan, edit), "p.json")  # makes sense on its own
        with pytest.raises(SpecError) as err:
            check_plan_matches_job(changed, graph, "p.json", "checked")
        message = str(err.value)
        assert message.startswith(f"p.json: {field} (") and "planner.program derives from the plan's waves" in message


def test_dependencies_are_part_of_the_match(plan, graph) -> None:
    changed = plan_from_json(edited(plan, _set("metaops.3.deps", [])), "p.json")
    with pytest.raises(SpecError, match=r"^p\.json: the plan was made for job 'checked' .*first difference: b\.enc"):
        check_plan_matches_job(changed, graph, "p.json", "checked")


def test_a_local_run_starts_at_most_four_workers_per_core(plan) -> None:
    check_local_workers(plan.cluster, "p.json", cores=1)  # 4 workers on 1 core: slow, but it starts
    wide = plan.cluster.model_copy(update={"devices_per_node": 64})
    with pytest.raises(SpecError) as err:
        check_local_workers(wide, "p.json", cores=2)
    assert str(err.value).startswith(
        "p.json: cluster (1 node(s) x 64 devices) needs 64 worker processes; `loom run` without --address starts "
        f"them on this machine's 2 CPU cores, at most {2 * WORKERS_PER_CORE}")
    check_local_workers(wide, "p.json", cores=16)


def test_loom_run_refuses_a_bad_plan_before_anything_starts(plan, tmp_path) -> None:
    """In-process CLI: exit 2, one `error:` line naming the option, file and field, no output folder created."""
    from typer.testing import CliRunner

    from orchestrator.cli import app

    job = tmp_path / "job.json"
    job.write_text(json.dumps(JOB))
    bad = tmp_path / "bad.json"
    bad.write_text(edited(plan, _drop_last_slice))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(job), "--plan", str(bad), "--out", str(out)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, (result.stderr, result.exception)
    assert lines[0].startswith(f"error: --plan {bad}: metaops[3] ('b.enc') runs 3 of its 4 layers")
    assert not out.exists()



def test_loom_run_refuses_more_local_workers_than_the_machine_starts(tmp_path, monkeypatch) -> None:
    """A valid plan for 64 devices, `loom run` on 2 cores without --address: one line, exit 2, before Ray starts
    (it used to start 64 actors and hang). The line names the plan file (it said `--plan:` alone), or without
    --plan the job (it said `--plan:` although none was given)."""
    from typer.testing import CliRunner

    from orchestrator.cli import app

    doc = json.loads(json.dumps(JOB))
    doc["cluster"]["devices_per_node"] = 64
    job = tmp_path / "job.json"
    job.write_text(json.dumps(doc))
    plan = tmp_path / "plan.json"
    plan_schedule(parse_job(doc), SCHEDULE, method="hand-made").save(plan)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(job), "--plan", str(plan), "--out", str(out)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, (result.stderr, result.exception)
    assert lines[0].startswith(f"error: --plan {plan}: cluster (1 node(s) x 64 devices) needs 64 worker processes")
    result = CliRunner().invoke(app, ["run", str(job), "--out", str(out)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert lines[-1].startswith("error: job 'checked': cluster (1 node(s) x 64 devices) needs 64 worker processes")
    assert not out.exists()


def test_the_plans_metaops_are_the_records_of_the_jobs(plan, graph) -> None:
    """planner.validate.metaop_record is how build_plan writes a MetaOp; a field a worker reads from the plan (the
    use, the parameter group, the input modules, recompute) edited and sealed again is refused against the job."""
    from planner.validate import metaop_record

    assert plan.metaops == [metaop_record(op) for op in graph.metaops]
    for field, value in (("use", "enc2"), ("param_group", "img"), ("input_modules", ["embed:enc", "embed:img"]),
                         ("recompute", True)):
        changed = plan_from_json(edited(plan, _set(f"metaops.0.{field}", value)), "p.json")
        with pytest.raises(SpecError) as err:
            check_plan_matches_job(changed, graph, "p.json", "checked")
        assert str(err.value).startswith(f"p.json: metaops[0].{field} ({value!r}) is not the job's"), str(err.value)


def test_loom_submit_refuses_a_bad_plan_before_sending(plan, tmp_path) -> None:
    """`loom submit --plan` checks the plan here (orchestrator.submit._check_plan) with the same checks and text."""
    from orchestrator.submit import _check_plan

    bad = tmp_path / "bad.json"
    bad.write_text(edited(plan, _set("waves.0.slices.0.devices", [7])))
    with pytest.raises(SpecError, match=r"waves\[0\]\.slices\[0\]\.devices\[0\] \(7\) is not a device of the plan's"):
        _check_plan(bad, parse_job(JOB))


def _swap_shards(data: dict) -> None:
    bucket = next(b for b in data["grad_buckets"] if len(b["devices"]) == 2)
    bucket["shards"] = bucket["shards"][::-1]  # a valid order, but not the one the planner wrote


def test_optimizer_shards_are_the_planners_and_a_hand_edited_range_is_refused(plan, graph, tmp_path) -> None:
    """ZeRO-1's share owners are in the plan (rank order, the split runtime.zero made before they were) and `loom run`
    refuses a plan whose shards were edited, in one `error:` line, before any worker starts."""
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from planner.plan import shard_range

    shared = [b for b in plan.grad_buckets if len(b.devices) > 1]
    assert shared and all(b.shards == b.devices for b in shared)
    for elements in (0, 1, 5, 26, 1000):  # the ranges the runtime steps: the split it made before shards were planned
        for n in (2, 3, 4):
            per = -(-elements // n)
            assert [shard_range(elements, n, i) for i in range(n)] == [
                (min(i * per, elements), min((i + 1) * per, elements)) for i in range(n)]
    changed = plan_from_json(edited(plan, _swap_shards), "p.json")  # makes sense on its own
    with pytest.raises(SpecError, match=r"^p\.json: grad_buckets\[\d+\] \(.*planner\.program derives"):
        check_plan_matches_job(changed, graph, "p.json", "checked")
    job = tmp_path / "job.json"
    job.write_text(json.dumps(JOB))
    out = tmp_path / "out"
    cases = [(_swap_shards, "grad_buckets[0] ((3, (0, 1), (('head:b', 0, 0),), (1, 0))) is not what planner.program "
              "derives"), (_set("grad_buckets.0.shards", [0, 7]), "grad_buckets[0].shards ([0, 7]) is not one optimizer "
              "share per device of the bucket")]
    for i, (edit, fragment) in enumerate(cases):
        bad = tmp_path / f"bad{i}.json"
        bad.write_text(edited(plan, edit))
        result = CliRunner().invoke(app, ["run", str(job), "--plan", str(bad), "--out", str(out)])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, (result.stderr, result.exception)
        assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
        assert not out.exists()
