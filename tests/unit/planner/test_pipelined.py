"""training.pipeline_micro_batches: the micro-batches' forwards (then backwards) walked as a pipeline
(planner.phases.step_walk), priced by the timeline with every micro-batch's saved activations held, chosen by the
planner under auto, recorded in the plan and followed by its re-prediction."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rich.console import Console

from bench.common import REPO_ROOT
from orchestrator.render import plan_header
from planner.api import make_cost_model, plan_job, predict_plan
from planner.costmodel import Layout
from planner.errors import SpecError
from planner.groupsplit import Unit
from planner.metagraph import build_metagraph
from planner.phases import BACKWARD, FORWARD, LOSS, phase_of_waves, pipelined_in_flight, step_walk
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave, placed_ledger
from planner.plan import micro_batch_walk, micro_batches_pipelined
from planner.schedule import Problem
from planner.simulator import one_f_one_b_if_no_slower, simulate
from planner.spec import load_job, parse_job

STAGES = 4


def chain_job(grad_accum_steps: int = 8, pipelined: bool | str = "auto") -> dict:
    """One transformer of 4 layers on 4 devices: cut into 4 stages it is a pipeline."""
    return {
        "name": "chain",
        "cluster": {"devices_per_node": STAGES, "device": "h100"},
        "components": {"enc": {"kind": "transformer", "num_layers": STAGES, "hidden_size": 1024, "num_heads": 16,
                               "seq_len": 512}},
        "tasks": [{"name": "t", "batch_size": 64, "components": [{"component": "enc"}]}],
        "training": {"grad_accum_steps": grad_accum_steps, "pipeline_micro_batches": pipelined},
    }


def stages(job) -> PlacedSchedule:
    """Layer ``s`` on device ``s``: one wave per stage."""
    return PlacedSchedule(tuple(PlacedWave((PlacedSlice(0, s, 1, (s,), Layout(1, 1)),)) for s in range(STAGES)))


def priced(job, in_flight: int):
    model = make_cost_model(job).with_in_flight(in_flight)
    problem = Problem.build(build_metagraph(job), model)
    return problem, model, simulate(problem, stages(job), model)


@pytest.mark.parametrize("phases", [(0,), (0, 2)])
def test_the_pipelined_walk_keeps_each_micro_batchs_order_and_overlaps_them(phases):
    k = 3
    in_order, piped = step_walk(phases, 4, k, False), step_walk(phases, 4, k, True)
    assert sorted(in_order) == sorted(piped) and len(set(piped)) == len(piped)  # the same events, once each
    for j in range(k):  # each micro-batch meets its events in the same order
        assert [e for e in piped if e[1] == j] == [e for e in in_order if e[1] == j]
    for kind in (FORWARD, BACKWARD):  # a wave runs its micro-batches in turn
        for wave in range(4):
            assert [e[1] for e in piped if e[0] == kind and e[2] == wave] == list(range(k))
    assert piped.index((FORWARD, 1, 0)) < piped.index((LOSS, 0, 0))  # micro-batch 1 starts while 0 is in flight
    phase_of = phase_of_waves(phases, 4)
    ends = []  # per phase: (first and last position of its forward events, of its backward events)
    for p in range(len(phases)):
        fwd = [i for i, (kind, _, at) in enumerate(piped) if kind == LOSS and at == p
               or kind == FORWARD and phase_of[at] == p]
        bwd = [i for i, (kind, _, at) in enumerate(piped) if kind == BACKWARD and phase_of[at] == p]
        assert max(fwd) < min(bwd)  # a phase's backward after all its forward (fill, then drain)
        ends.append((min(fwd), max(bwd)))
    assert all(a[1] < b[0] for a, b in zip(ends, ends[1:]))  # phase after phase
    assert step_walk(phases, 4, 1, True) == step_walk(phases, 4, 1, False)


@pytest.mark.parametrize("phases", [(0,), (0, 2)])
@pytest.mark.parametrize("k", [3, 8])
def test_the_1f1b_walk_keeps_each_micro_batchs_order_and_holds_fewer(phases, k):
    """1F1B (planner.phases.one_forward_one_backward): the same events once each, every micro-batch in its in-order
    order, each wave's forwards and backwards in micro-batch order, phase after phase; a wave of a phase's n holds at
    most pipelined_in_flight = min(k, n - i) micro-batches, and holds that many."""
    in_order, one = step_walk(phases, 4, k, False), step_walk(phases, 4, k, True, True)
    assert sorted(in_order) == sorted(one) and len(set(one)) == len(one)
    for j in range(k):
        assert [e for e in one if e[1] == j] == [e for e in in_order if e[1] == j]
    for kind in (FORWARD, BACKWARD):
        for wave in range(4):
            assert [e[1] for e in one if e[0] == kind and e[2] == wave] == list(range(k))
    phase_of = phase_of_waves(phases, 4)
    mine = [[i for i, (kind, _, at) in enumerate(one) if (at == p if kind == LOSS else phase_of[at] == p)]
            for p in range(len(phases))]
    ends = [(min(m), max(m)) for m in mine]
    assert all(a[1] < b[0] for a, b in zip(ends, ends[1:]))  # phase after phase
    for wave in range(4):
        held, most = 0, 0
        for kind, _, at in one:
            if at == wave and kind != LOSS:
                held += 1 if kind == FORWARD else -1
                most = max(most, held)
        assert most == pipelined_in_flight(phases, 4, k, wave) <= k
    assert step_walk(phases, 4, 1, True, True) == step_walk(phases, 4, 1, False)


def test_pipelined_stages_overlap_and_hold_every_micro_batchs_activations():
    k = 8
    job = parse_job(chain_job(k, True))
    problem, model, piped = priced(job, k)
    _, plain, in_order = priced(job, 1)
    # each stage's slice on one micro-batch, forward + backward: in order the stages take turns (k x 4 slots), pipelined
    # they fill and drain (k + 3 slots each way)
    stage = sum(in_order.slice_seconds[0][0:1])
    assert in_order.compute_s == pytest.approx(k * STAGES * stage, rel=0.02)
    assert piped.compute_s == pytest.approx((k + STAGES - 1) * stage, rel=0.05)
    assert piped.iteration_time_s < 0.5 * in_order.iteration_time_s
    # the same parameters, every micro-batch's saved activations
    for model_, sim in ((plain, in_order), (model, piped)):
        peak = float(placed_ledger(problem, stages(job), model_).peak().max())
        assert max(sim.peak_memory_bytes) == pytest.approx(peak)
    ledger, ledger_one = placed_ledger(problem, stages(job), model), placed_ledger(problem, stages(job), plain)
    assert ledger.act_bytes == pytest.approx(k * ledger_one.act_bytes) and ledger.act_bytes.min() > 0
    assert ledger.param_bytes == pytest.approx(ledger_one.param_bytes)


def test_1f1b_stages_overlap_as_much_and_hold_fewer_micro_batches():
    """The 4 stages walked 1F1B: the same fill and drain (k + 3 slots), stage s holding min(k, 4 - s) micro-batches'
    activations instead of k; the planner walks its pipelined plan so (it is no slower), and says so in the plan."""
    k = 8
    job = parse_job(chain_job(k, True))
    problem, model, piped = priced(job, k)
    one = model.with_one_f_one_b(True)
    walked = simulate(problem, stages(job), one)
    assert walked.compute_s == pytest.approx(piped.compute_s, rel=0.02)
    assert walked.iteration_time_s <= piped.iteration_time_s * (1 + 1e-9)
    ledger = placed_ledger(problem, stages(job), one)
    ledger_one = placed_ledger(problem, stages(job), priced(job, 1)[1])
    assert ledger.act_bytes == pytest.approx([min(k, STAGES - s) * ledger_one.act_bytes[s] for s in range(STAGES)])
    assert max(walked.peak_memory_bytes) < max(piped.peak_memory_bytes)
    planned = plan_job(job)
    assert planned.plan.one_f_one_b is True and micro_batch_walk(planned.plan, job.training) == (True, True)
    assert predict_plan(job, planned.plan, make_cost_model(job)).iteration_time_s == pytest.approx(
        planned.plan.predicted.iteration_time_s)
    in_order = parse_job(chain_job(k, False))  # in order: nothing to walk 1F1B
    assert plan_job(in_order).plan.one_f_one_b is None
    assert micro_batch_walk(plan_job(in_order).plan, in_order.training) == (False, False)


def test_1f1b_is_walked_where_gpipe_does_not_fit():
    """Between the two walks' peaks of device memory, only 1F1B fits: one_f_one_b_if_no_slower takes it whatever
    their times; with memory for both it keeps GPipe's unless 1F1B is no slower."""
    k = 8
    job = parse_job(chain_job(k, True))
    problem, model, piped = priced(job, k)
    walked = simulate(problem, stages(job), model.with_one_f_one_b(True))
    between = (max(walked.peak_memory_bytes) + max(piped.peak_memory_bytes)) / 2
    data = chain_job(k, True)
    data["cluster"]["memory_gib"] = between / 2**30
    tight = parse_job(data)
    problem, model, piped = priced(tight, k)
    assert max(piped.peak_memory_bytes) > model.hw.memory_bytes  # GPipe's walk does not fit
    chosen, sim = one_f_one_b_if_no_slower(problem, model, stages(tight), piped)
    assert chosen.one_f_one_b and max(sim.peak_memory_bytes) <= model.hw.memory_bytes
    # a placement whose 1F1B walk is slower keeps GPipe's where both fit (the sim given back as it came)
    slower = replace(piped, iteration_time_s=0.5 * walked.iteration_time_s, peak_memory_bytes=walked.peak_memory_bytes)
    assert one_f_one_b_if_no_slower(problem, model, stages(tight), slower) == (model, slower)


def test_auto_plans_both_orders_keeps_the_faster_and_the_plan_says_so():
    job = parse_job(chain_job(8, "auto"))
    piped, in_order = plan_job(parse_job(chain_job(8, True))), plan_job(parse_job(chain_job(8, False)))
    auto = plan_job(job)
    best = min(piped.simulation.iteration_time_s, in_order.simulation.iteration_time_s)
    assert auto.simulation.iteration_time_s == pytest.approx(best)
    assert auto.plan.pipelined is (piped.simulation.iteration_time_s < in_order.simulation.iteration_time_s)
    assert micro_batches_pipelined(auto.plan, job.training) is auto.plan.pipelined  # what the workers follow
    # re-predicting the plan prices it as it runs; so does a plan of a job that fixes the order
    assert predict_plan(job, auto.plan, make_cost_model(job)).iteration_time_s == pytest.approx(
        auto.plan.predicted.iteration_time_s)
    for fixed in (piped, in_order):
        assert fixed.plan.pipelined is None
    fixed_job = parse_job(chain_job(8, True))
    assert predict_plan(fixed_job, piped.plan, make_cost_model(fixed_job)).iteration_time_s == pytest.approx(
        piped.plan.predicted.iteration_time_s)
    # never slower than a baseline priced in the same order
    assert all(auto.plan.predicted.iteration_time_s <= t * (1 + 1e-9) for t in auto.plan.baselines.values())


def test_one_micro_batch_is_never_pipelined_and_the_plan_records_nothing():
    job = parse_job(chain_job(1, "auto"))
    plan = plan_job(job).plan
    assert plan.pipelined is None and micro_batches_pipelined(plan, job.training) is False
    assert micro_batches_pipelined(plan.model_copy(update={"pipelined": True}), job.training) is False


@pytest.mark.parametrize("value", ["yes", 2, None])
def test_pipeline_micro_batches_takes_true_false_or_auto(value):
    with pytest.raises(SpecError, match="pipeline_micro_batches: .*expected true, false or auto"):
        parse_job(chain_job(2, value))


def test_a_model_no_layout_holds_whole_plans_as_stages_and_pipelined_micro_batches_overlap_them():
    """bench/pipeline/sft-70b-64.yaml: 70B on 64 H100s fits no data-parallel layout (every baseline is over memory);
    the group split's stages, laid out to fit a stage (planner.groupsplit.STAGE_FILL), plan it, and pipelined
    micro-batches run the stages side by side instead of one after the other."""
    job = load_job(REPO_ROOT / "bench" / "pipeline" / "sft-70b-64.yaml")
    by_order = {}
    for order in (False, True):
        fixed = job.model_copy(update={"training": job.training.model_copy(update={"pipeline_micro_batches": order})})
        by_order[order] = plan_job(fixed).plan
    for plan in by_order.values():
        assert "stages" in plan.solver.method and max(plan.peak_memory_bytes) <= plan.cluster.memory_bytes
        assert plan.baseline_notes and all("does not fit" in note for note in plan.baseline_notes.values())
    in_order, piped = (by_order[o].predicted.iteration_time_s for o in (False, True))
    assert piped < in_order / 1.5
    auto = plan_job(job).plan
    assert auto.pipelined is True and auto.predicted.iteration_time_s == pytest.approx(piped)
    console = Console(width=100, record=True)  # `loom plan` says which order the planner chose
    console.print(plan_header(auto))
    assert auto.one_f_one_b is True  # two stages of their own: walked 1F1B, no slower (and fewer activations held)
    assert "micro-batches  pipelined, 1F1B (auto: the faster that fits)" in console.export_text()


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 0.5), (5.0, 1.0, 1.0, 1.0), (1.0, 1e-6, 1e-6, 1.0)])
def test_weighted_stage_cuts_tile_the_layers_with_at_least_one_layer_each(weights):
    problem = Problem.build(build_metagraph(parse_job(chain_job(2))), make_cost_model(parse_job(chain_job(2))))
    cuts = [Unit("enc", s, 4, (0,), weights).layers(problem, 0) for s in range(4)]
    assert cuts[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    assert sum(c for _, c in cuts) == STAGES and min(c for _, c in cuts) >= 1


def test_a_stage_on_fewer_devices_gets_fewer_layers():
    """bench/pipeline/vlm-70b-64.yaml: the LLM's four stages get 16, 16, 16 and 8 devices (the image encoder takes
    the last node); cut evenly the 8-device stage is twice as slow and the pipeline waits for it, cut in proportion to
    what each range runs (planner.groupsplit.balanced_units) the stages take the same time."""
    job = load_job(REPO_ROOT / "bench" / "pipeline" / "vlm-70b-64.yaml")
    plan = plan_job(job).plan
    assert plan.pipelined is True and plan.solver.method.startswith("sync-aware group split, 4 stages, balanced")
    busy: dict[tuple[int, ...], float] = {}  # per stage range (a slice's devices), its slices' seconds
    for wave in plan.waves:
        for s in wave.slices:
            if plan.metaops[s.metaop].name.endswith(".llm"):
                busy[tuple(s.devices)] = busy.get(tuple(s.devices), 0.0) + s.time_s
    assert len(busy) == 4 and sorted(len(d) for d in busy) == [8, 16, 16, 16]
    assert max(busy.values()) < 1.05 * min(busy.values())
