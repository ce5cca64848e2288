"""Property-based fuzzing of Loom's inputs (issue 12): job specs, plan files and cost files, mutated from valid ones
(keys dropped, wrong types, huge/negative/NaN numbers, unicode, deep nesting, lines duplicated or cut, lists
shuffled, plans sealed again so that the hash check passes). Each input's library entry point either succeeds or
raises Loom's user error type (planner.errors.LoomError: one `error:` line and exit code 2 at the CLI), never any
other exception, within a time bound. A handful of real CLI subprocesses check the exit code and the one line.

Deterministic in CI: ``derandomize=True`` (examples from a fixed seed per test), no example database, no deadline
(a loaded 2-core machine is slow); each call is timed against its own generous bound instead.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orchestrator.recipes import load_job
from planner.api import plan_job, plan_schedule
from planner.costmodel import Layout, ProfiledCostModel, profile_key
from planner.devices import resolve_hardware
from planner.errors import LoomError
from planner.metagraph import build_metagraph
from planner.plan import Plan, plan_from_json
from planner.schedule import Schedule, Slice, Wave
from planner.spec import parse_job
from runtime.checks import check_plan_matches_job

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
SMALL = ("quickstart-cpu", "vlm-cpu", "diffusion-cpu", "chat-sft-cpu")  # planned within the fuzz test's time
LOAD_BOUND_S = 10.0  # reading and checking one input (ms when the machine is quiet)
PLAN_BOUND_S = 30.0  # planning one small job with a 0.1 s solver limit (about 0.3 s when quiet)
CLI_BOUND_S = 120.0  # one `loom` subprocess (interpreter start and imports included)


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])


def outcome(call: Callable[[], Any], bound_s: float, what: str = "") -> Any:
    """``call()``'s result, or None when it raised a LoomError; any other exception propagates (a bug: the CLI would
    print a traceback), and so does a call slower than ``bound_s``. With ``what``, a hypothesis event says which
    (and, for a refusal, whether planner.validate or planner.costfile refused it: the semantic checks)."""
    start = time.perf_counter()
    try:
        result = call()
        kind = "passed"
    except LoomError as exc:
        assert str(exc).strip(), "a LoomError without a message"
        result = None
        kind = "refused by " + ("planner.validate" if "not a file to edit" in str(exc) else
                                "planner.costfile" if "loom profile JOB.yaml" in str(exc) else "other checks")
    elapsed = time.perf_counter() - start
    assert elapsed < bound_s, f"took {elapsed:.1f} s (bound {bound_s} s)"
    if what:
        event(f"{what}: {kind}")
    return result


# --------------------------------------------------------------------------- mutations of JSON-like trees

def deep(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


NASTY = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 7, 10**9, 2**63, -(2**63), 10**30]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0.0, -0.0, -1.5, 1e-300, 1e300, math.nan, math.inf, -math.inf]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "..", "../../x", "/etc/passwd", "é\u202e\U0001f600", "\x00\x07", "cpu", "h100", "yes"]),
    st.booleans(),
    st.none(),
    st.lists(st.integers(min_value=-3, max_value=9), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.integers(min_value=1, max_value=120).map(deep),
)


def node_path(draw: st.DrawFn, tree: Any) -> tuple:
    """A path (keys and indices) to a node of ``tree`` below its root, drawn by walking down from the root: a child
    at each level, stopping at a leaf or, one time in four, earlier (every level gets edits, not only the first
    keys that hypothesis's simplest choices favour). ``()`` only for a tree without children."""
    path: tuple = ()
    node = tree
    while isinstance(node, (dict, list)) and node:
        if path and draw(st.integers(0, 3)) == 0:
            break
        key = draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        path, node = path + (key,), node[key]
    return path


def at(tree: Any, path: tuple) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def changed_number(value: int | float) -> st.SearchStrategy:
    """Another number of the same type (so the schema accepts it and the semantic checks see it): off by one,
    negated, zero, scaled, huge; a float may also become NaN or infinite."""
    if isinstance(value, int):
        return st.sampled_from([value + 1, value - 1, -value, 0, 2 * value, 1000 * value + 1, 2**40, -(2**31)])
    return st.sampled_from([-value, 0.0, 2 * value, value / 3, value * 1e6 + 1, 1e300, math.nan, math.inf, -math.inf])


@st.composite
def mutated(draw: st.DrawFn, base: Any, max_edits: int = 3) -> Any:
    """``base`` after 1..max_edits edits, each at a node drawn from all of its nodes: delete it, replace it with a
    nasty value, change a number (negate, zero, scale, +-1), shuffle or duplicate a list, add an unknown key."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_edits))):
        path = node_path(draw, data)
        node = at(data, path)
        edit = draw(st.sampled_from(["delete", "replace", "number", "number", "number", "shuffle", "duplicate",
                                     "extra_key"]))  # numbers 3 times as often: most fields of a plan are numbers
        if edit == "delete" and path:
            parent = at(data, path[:-1])
            del parent[path[-1]]
        elif edit == "number" and isinstance(node, (int, float)) and not isinstance(node, bool) and path:
            at(data, path[:-1])[path[-1]] = draw(changed_number(node))
        elif edit == "shuffle" and isinstance(node, list) and len(node) > 1:
            order = draw(st.permutations(range(len(node))))
            node[:] = [node[i] for i in order]
        elif edit == "duplicate" and isinstance(node, list) and node:
            node.insert(draw(st.integers(0, len(node))), copy.deepcopy(node[draw(st.integers(0, len(node) - 1))]))
        elif edit == "extra_key" and isinstance(node, dict):
            node[draw(st.text(min_size=1, max_size=8))] = draw(NASTY)
        elif path:
            at(data, path[:-1])[path[-1]] = draw(NASTY)
        else:
            data = draw(NASTY)
    return data


@st.composite
def mutated_text(draw: st.DrawFn, text: str) -> bytes:
    """YAML or JSON text after one textual edit: a line duplicated (a key given twice) or dropped, characters
    inserted (unicode, control, brackets), the text cut, nested deep, or replaced by binary bytes."""
    lines = text.splitlines(keepends=True)
    edit = draw(st.sampled_from(["dup_line", "drop_line", "insert", "cut", "nest", "binary", "tab"]))
    i = draw(st.integers(0, max(0, len(lines) - 1)))
    if edit == "dup_line" and lines:
        lines.insert(i, lines[i])
    elif edit == "drop_line" and lines:
        del lines[i]
    elif edit == "insert":
        pos = draw(st.integers(0, len(text)))
        junk = draw(st.one_of(st.text(max_size=6),
                              st.sampled_from(["[", "{", ": ", "- ", "&a", "*a", "!!python/name:os.system"])))
        return (text[:pos] + junk + text[pos:]).encode("utf-8", "surrogatepass")
    elif edit == "cut":
        return text[:draw(st.integers(0, len(text)))].encode()
    elif edit == "nest":
        n = draw(st.integers(30, 20000))
        return ("[" * n + "1" + "]" * n).encode()
    elif edit == "binary":
        return draw(st.binary(min_size=1, max_size=64))
    elif edit == "tab" and lines:
        lines[i] = "\t" + lines[i]
    return "".join(lines).encode()


# --------------------------------------------------------------------------- job specs

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder for the fuzzed files, with the examples' data folder beside them (their relative paths resolve)."""
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "data").symlink_to(ROOT / "examples" / "data")
    return folder


JOB_TEXTS = {path.stem: path.read_text() for path in EXAMPLES}


@fuzz_settings(700)
@given(data=st.data())
def test_job_specs_load_and_plan_or_give_one_user_error(work: Path, data: st.DataObject) -> None:
    """A mutated example job (its YAML text or its structure): load_job (the CLI's, `loom validate`'s) gives a JobSpec
    or a LoomError; a small CPU example that loads is planned (solver limit 0.1 s) to a Plan or a LoomError."""
    name = data.draw(st.sampled_from(sorted(JOB_TEXTS)), label="example")
    text = JOB_TEXTS[name]
    if data.draw(st.booleans(), label="edit the text"):
        raw = data.draw(mutated_text(text))
    else:
        doc = data.draw(mutated(yaml.safe_load(text)))
        raw = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False).encode()
    path = work / "job.yaml"
    path.write_bytes(raw)
    job = outcome(lambda: load_job(path), LOAD_BOUND_S, "load")
    if job is not None and name in SMALL:
        quick = job.model_copy(update={"planner": job.planner.model_copy(update={"time_limit_s": 0.1})})
        plan = outcome(lambda: plan_job(quick, with_baselines=False, progress=lambda _: None).plan, PLAN_BOUND_S,
                       "plan")
        if plan is not None:  # what the planner writes, the plan checks accept
            check_plan_matches_job(plan_from_json(plan.to_json(), "plan.json"), build_metagraph(quick), "plan.json")


# --------------------------------------------------------------------------- plan files

# Two tasks sharing a transformer, as the plan checks' unit tests use; planned for hand-made schedules (no solver):
# on 1 node of 4 devices (data parallel), and on 2 nodes of 2 with the transformer tensor parallel (TP 2).
PLAN_JOB = {
    "name": "fuzzed",
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
TP_JOB = copy.deepcopy(PLAN_JOB)
TP_JOB["cluster"] |= {"num_nodes": 2, "devices_per_node": 2}
TP_JOB["components"]["enc"]["tensor_parallel"] = [2]
SCHEDULES = {  # MetaOps: 0 a.enc, 1 a.head, 2 b.img, 3 b.enc
    "dp": (PLAN_JOB, Schedule((Wave((Slice(0, 2, 1), Slice(2, 2, 2))), Wave((Slice(0, 2, 1), Slice(3, 3, 2))),
                               Wave((Slice(1, 2, 1), Slice(3, 1, 2)))))),
    "tp": (TP_JOB, Schedule((Wave((Slice(0, 4, 2), Slice(2, 2, 2))), Wave((Slice(1, 2, 1), Slice(3, 4, 2)))))),
}


@pytest.fixture(scope="module")
def plans() -> dict[str, tuple]:
    """Per schedule: (job, its MetaGraph, the plan's JSON as a dict)."""
    out = {}
    for name, (doc, schedule) in SCHEDULES.items():
        job = parse_job(doc)
        out[name] = (job, build_metagraph(job), json.loads(plan_schedule(job, schedule, method="hand-made").to_json()))
    return out


def sealed_again(doc: Any) -> Any:
    """``doc`` with its hash recomputed, as someone editing a plan would (unchanged when it is no Plan at all)."""
    try:
        return json.loads(Plan.model_validate(doc).sealed().to_json())
    except ValueError:  # pydantic's ValidationError: plan_from_json names the field
        return doc


@fuzz_settings(800)
@given(data=st.data())
def test_plan_files_load_or_give_one_user_error(plans: dict, data: st.DataObject) -> None:
    """A mutated plan (sealed again 4 times in 5): plan_from_json (load_plan's parser) and the check against its job
    give a Plan or a LoomError. A plan that passes is one the runtime's readers and the simulator take: every
    worker's Assignment round-trips, its schedule indexes, and the predicted waves are finite and non-negative."""
    job, graph, base = plans[data.draw(st.sampled_from(sorted(plans)), label="plan")]
    doc = data.draw(mutated(base))
    if data.draw(st.integers(0, 4), label="reseal") > 0:
        doc = sealed_again(doc)
    text = json.dumps(doc)
    plan = outcome(lambda: plan_from_json(text, "plan.json"), LOAD_BOUND_S, "load")
    if plan is None:
        return
    if outcome(lambda: check_plan_matches_job(plan, graph, "plan.json", job.name) or "ok", LOAD_BOUND_S, "job check"):
        check_accepted_plan(job, plan)


def check_accepted_plan(job, plan: Plan) -> None:
    """What runs a plan after the checks: the Assignments, the runtime's indexes of them, the simulator."""
    from orchestrator.metrics import predicted_wave_seconds
    from planner.api import make_cost_model, predict_plan
    from planner.program import assignment
    from runtime.assignment import CommSchedule, layer_tp_degrees, loss_groups

    world = plan.cluster.num_nodes * plan.cluster.devices_per_node
    for rank in range(world):
        part = plan_from_json(assignment(plan, rank).to_json(), f"rank {rank}")
        schedule = CommSchedule(part)
        layer_tp_degrees(part, schedule)
        loss_groups(schedule)
        assert all(rank in schedule.slices[ref].devices for ref in schedule.my_slices(rank))
    simulation = predict_plan(job, plan, make_cost_model(job))
    assert all(math.isfinite(s) and s >= 0 for s in simulation.wave_durations)
    assert math.isfinite(simulation.iteration_time_s) and simulation.iteration_time_s > 0
    assert all(math.isfinite(s) and s >= 0 for s in predicted_wave_seconds(plan))


# --------------------------------------------------------------------------- cost files

@pytest.fixture(scope="module")
def costed(plans: dict) -> tuple:
    """(job, MetaGraph, a cost file as `loom profile` writes it for the job, monotone and positive)."""
    job, graph, _ = plans["dp"]
    points = {profile_key(op, Layout(1, 1)): [[b, 1e-3 * (1 + b)] for b in (1, 2, 4, 8) if b <= op.batch_size]
              for op in graph.metaops}
    roots = {op.name: [[b, 2e-4 * (1 + b)] for b in (1, 2, 4)] for op in graph.metaops if not op.deps}
    doc = {"version": 1, "device": "cpu", "points": points, "embed": roots,
           "head": {task.name: [[2, 1e-4], [8, 3e-4]] for task in job.tasks}, "optimizer_s_per_param": 3e-9,
           "links": {kind: [[16384, 1e-4], [1048576, 8e-4], [4194304, 3e-3]] for kind in ("p2p", "allreduce")}}
    return job, graph, doc


@fuzz_settings(600)
@given(data=st.data())
def test_cost_files_load_or_give_one_user_error(costed: tuple, work: Path, data: st.DataObject) -> None:
    """A mutated cost file (its structure, or 1 in 4 its text): ProfiledCostModel.load (`--costs`) gives a cost
    model or a LoomError. One that loads prices every MetaOp, link and step finite and positive (no negative or NaN
    wave times), alone and under a plan of its job."""
    job, graph, base = costed
    if data.draw(st.integers(0, 3), label="edit the text") == 0:
        raw = data.draw(mutated_text(json.dumps(base, indent=1)))
    else:
        raw = json.dumps(data.draw(mutated(base))).encode()
    path = work / "costs.json"
    path.write_bytes(raw)
    hardware = resolve_hardware(job.cluster)
    model = outcome(lambda: ProfiledCostModel.load(path, hardware), LOAD_BOUND_S, "load")
    if model is None:
        return
    for op in graph.metaops:
        curve = outcome(lambda: model.curve(op), LOAD_BOUND_S)  # a key left out: PlanningError (a LoomError)
        if curve is not None:
            assert all(math.isfinite(t) and t > 0 for t in curve.times), (op.name, curve.times)
        for b in (1, 3, 8, 1000):
            assert math.isfinite(model.embed_time(op, b)) and model.embed_time(op, b) >= 0
    for nbytes in (1.0, 5e5, 1e9):
        for seconds in (model.p2p_time(nbytes, False), model.allreduce_time(nbytes, 4, False),
                        model.allgather_time(nbytes, 4, False), model.optimizer_time(nbytes)):
            assert math.isfinite(seconds) and seconds > 0


# --------------------------------------------------------------------------- the command line, for real

def loom(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=CLI_BOUND_S)


def assert_one_error_line(result: subprocess.CompletedProcess, fragment: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("case", ["binary job", "deep yaml", "nan costs", "edited plan"])
def test_the_cli_gives_exit_2_and_one_error_line(case: str, plans: dict, costed: tuple, tmp_path: Path) -> None:
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(PLAN_JOB))
    if case == "binary job":
        job_file.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
        assert_one_error_line(loom("validate", str(job_file), cwd=tmp_path), str(job_file))
    elif case == "deep yaml":
        job_file.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
        assert_one_error_line(loom("validate", str(job_file), cwd=tmp_path), "deeper than")
    elif case == "nan costs":
        doc = copy.deepcopy(costed[2])
        key = next(iter(doc["points"]))
        doc["points"][key][0][1] = math.nan
        costs = tmp_path / "costs.json"
        costs.write_text(json.dumps(doc))
        assert_one_error_line(loom("plan", str(job_file), "--costs", str(costs), cwd=tmp_path),
                              f"points['{key}'][0] ([1, nan]) has nan seconds")
    else:
        doc = copy.deepcopy(plans["dp"][2])
        doc["waves"][2]["slices"].pop()  # b.enc's last layer: the run would train without it
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps(sealed_again(doc)))
        out = tmp_path / "out"
        result = loom("run", str(job_file), "--plan", str(plan), "--out", str(out), cwd=tmp_path)
        assert_one_error_line(result, "metaops[3] ('b.enc') runs 3 of its 4 layers")
        assert not out.exists()
