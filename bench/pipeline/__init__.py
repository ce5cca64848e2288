"""Pipelined micro-batches (``python -m bench.pipeline``): what ``training.pipeline_micro_batches`` buys.

Two parts. **Planned** (analytic cost model, H100 table): ``sft-70b-64.yaml``, a 70B LLM on 64 H100s that no
data-parallel layout holds, and ``vlm-70b-64.yaml``, the same LLM shared by a captioning task (behind a ViT-H image
encoder) and a text task, each planned with its micro-batches in order, pipelined, and left to the planner
(``auto``): each plan's predicted iteration, its pipeline stages and peak memory, and the baselines (every one over
memory).
**Measured** (this machine, a local gloo world of worker processes: runtime.local_world, the logic Ray actors run):
``chain-cpu.yaml`` (8 layers, 8 micro-batches) profiled first, then the planner's plans for it with those costs
(micro-batches in order, and auto) and the 8 layers cut by hand into two stages of 4 on the two workers, in order,
pipelined (GPipe's fill and drain) and pipelined 1F1B (one forward, one backward: planner.phases), trained in
alternating runs; per plan the median step after warm-up, its prediction and its losses (the
two stage runs must give the same losses: the same gradients accumulate in the same order). Then ``grpo-cpu.yaml``, a
GRPO step (rollouts, a frozen reward model and reference, the policy's update as two stages of 4 layers, one a
worker) the same way: its update in one micro-batch (the only way before the rollouts were decoded once per step),
and in 4 micro-batches in order and pipelined, the rollouts decoded once (planner.generation.decode_batches).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import REPO_ROOT
from planner.api import make_cost_model, plan_job, plan_placed
from planner.metagraph import build_metagraph
from planner.costmodel import CostModel, Layout
from planner.placement import PlacedSchedule, PlacedSlice, PlacedWave
from planner.plan import Plan, micro_batches_pipelined
from planner.spec import JobSpec, load_job
from runtime.local_world import run_world
from runtime.profiler import profile_job

HERE = Path(__file__).resolve().parent
PLANNED = (HERE / "sft-70b-64.yaml", HERE / "vlm-70b-64.yaml")
MEASURED = HERE / "chain-cpu.yaml"
MEASURED_RL = HERE / "grpo-cpu.yaml"
GIB = 2 ** 30
PROFILE_REPEATS = 9  # timed runs per profile point, as bench.runtime (single runs of a layer vary by 10% and more)


def with_order(job: JobSpec, order: bool | str) -> JobSpec:
    return job.model_copy(update={"training": job.training.model_copy(update={"pipeline_micro_batches": order})})


def planned_records() -> list[dict]:
    """Every planned job in order, pipelined and with auto."""
    out = []
    for path in PLANNED:
        job = load_job(path)
        for order in (False, True, "auto"):
            ordered = with_order(job, order)
            outcome = plan_job(ordered)
            plan = outcome.plan
            out.append({
                "part": "planned", "job": job.name, "pipeline_micro_batches": order,
                "pipelined": micro_batches_pipelined(plan, ordered.training), "one_f_one_b": plan.one_f_one_b is True,
                "iteration_s": plan.predicted.iteration_time_s, "compute_s": plan.predicted.compute_s,
                "method": plan.solver.method, "num_waves": len(plan.waves),
                "stage_devices": sorted({len(s.devices) for w in plan.waves for s in w.slices}),
                "peak_gib": max(plan.peak_memory_bytes) / GIB, "memory_gib": plan.cluster.memory_bytes / GIB,
                "baselines_s": plan.baselines,
                "baselines_fit": {b: b not in plan.baseline_notes for b in plan.baselines},
                "planning_s": outcome.planning_time_s, "micro_batches": job.training.grad_accum_steps,
            })
    return out


def stage_plan(job: JobSpec, cost_model: CostModel | None = None) -> Plan:
    """``job``'s layers in two stages, the first half on device 0, the rest on device 1 (one wave each)."""
    layers = job.components["enc"].num_layers
    half = layers // 2
    waves = (PlacedWave((PlacedSlice(0, 0, half, (0,), Layout(1, 1)),)),
             PlacedWave((PlacedSlice(0, half, layers - half, (1,), Layout(1, 1)),)))
    return plan_placed(job, PlacedSchedule(waves), cost_model, method="two stages")


def measured_plans(costs: dict) -> dict[str, tuple[JobSpec, Plan]]:
    """The measured job's plans, each planned (or predicted) with ``costs`` (a profile of this machine): the planner's
    with its micro-batches in order and with auto, and the two hand-made stages in order and pipelined."""
    job = load_job(MEASURED)
    in_order, piped = with_order(job, False), with_order(job, True)
    return {"planner, in order": (in_order, plan_job(in_order, make_cost_model(in_order, costs),
                                                     with_baselines=False).plan),
            "planner, auto": (job, plan_job(job, make_cost_model(job, costs), with_baselines=False).plan),
            "two stages, in order": (in_order, stage_plan(in_order, make_cost_model(in_order, costs))),
            "two stages, pipelined": (piped, stage_plan(piped, make_cost_model(piped, costs))),
            "two stages, pipelined 1F1B": (piped, stage_plan(piped,
                                                             make_cost_model(piped, costs).with_one_f_one_b(True)))}


def with_micro_batches(job: JobSpec, k: int, order: bool) -> JobSpec:
    return job.model_copy(update={"training": job.training.model_copy(update={"grad_accum_steps": k,
                                                                             "pipeline_micro_batches": order})})


def grpo_stage_plan(job: JobSpec, cost_model: CostModel | None = None) -> Plan:
    """``job``'s GRPO step by hand on the two workers: the rollouts data parallel over both, the reward model on
    device 0 beside the reference on device 1, then the policy's update in two stages (its first half of the layers
    on device 0, the rest on device 1)."""
    ops = {op.use: op for op in build_metagraph(job).metaops}
    policy, half = ops["policy"], ops["policy"].num_layers // 2
    whole = lambda use, devices: PlacedSlice(ops[use].id, 0, ops[use].num_layers, devices,  # noqa: E731
                                             Layout(len(devices), 1))
    waves = (PlacedWave((whole("rollout", (0, 1)),)), PlacedWave((whole("reward", (0,)), whole("reference", (1,)))),
             PlacedWave((PlacedSlice(policy.id, 0, half, (0,), Layout(1, 1)),)),
             PlacedWave((PlacedSlice(policy.id, half, policy.num_layers - half, (1,), Layout(1, 1)),)))
    return plan_placed(job, PlacedSchedule(waves), cost_model, method="two stages")


def grpo_plans(costs: dict) -> dict[str, tuple[JobSpec, Plan]]:
    """The GRPO job's hand-made plan with its update in one micro-batch and in the job's k, in order and pipelined,
    each predicted with ``costs`` (a profile of this machine, taken for the job's micro-batch)."""
    job = load_job(MEASURED_RL)
    k = job.training.grad_accum_steps
    jobs = {"one micro-batch": with_micro_batches(job, 1, False),
            f"{k} micro-batches, in order": with_micro_batches(job, k, False),
            f"{k} micro-batches, pipelined": with_micro_batches(job, k, True)}
    return {name: (j, grpo_stage_plan(j, make_cost_model(j, costs))) for name, j in jobs.items()}


def run_plan(job: JobSpec, plan: Plan, steps: int, warmup: int) -> tuple[list[float], list[dict]]:
    """Step seconds after ``warmup`` untimed steps, and every step's losses."""
    with tempfile.TemporaryDirectory() as tmp:
        result = run_world(job, plan, steps + warmup, tmp)
    return result.step_seconds[warmup:], result.losses


def timed(plans: dict[str, tuple[JobSpec, Plan]], rounds: int, steps: int, warmup: int, progress) -> list[dict]:
    """Every plan trained ``rounds`` times in alternation (this host's speed wanders over tens of seconds): per plan
    its median step, its prediction and its losses."""
    times: dict[str, list[float]] = {name: [] for name in plans}
    losses: dict[str, list[dict]] = {}
    for r in range(rounds):
        for name, (ordered, plan) in plans.items():
            seconds, losses[name] = run_plan(ordered, plan, steps, warmup)
            times[name] += seconds
            progress(f"round {r + 1}/{rounds}, {name}: median {statistics.median(seconds) * 1e3:.1f} ms")
    return [{
        "part": "measured", "job": ordered.name, "plan": name, "method": plan.solver.method,
        "pipelined": micro_batches_pipelined(plan, ordered.training), "one_f_one_b": plan.one_f_one_b is True,
        "micro_batches": ordered.training.grad_accum_steps, "peak_bytes": max(plan.peak_memory_bytes),
        "median_step_s": statistics.median(times[name]), "step_s": times[name],
        "predicted_s": plan.predicted.iteration_time_s, "first_losses": losses[name][0],
        "last_losses": losses[name][-1], "losses": losses[name],
    } for name, (ordered, plan) in plans.items()]


def resident_memory(progress) -> list[dict]:
    """The two stages' workers' largest resident memory walked in order, GPipe and 1F1B (bench.pipeline.rss, one
    process a walk), each beside its plan's predicted peak."""
    out = []
    for walk in ("in_order", "gpipe", "1f1b"):
        done = subprocess.run([sys.executable, "-m", "bench.pipeline.rss", walk], check=True, capture_output=True,
                              text=True, cwd=REPO_ROOT, env=os.environ | {"PYTHONPATH": str(REPO_ROOT)})
        out.append({"part": "memory", "job": "chain-cpu", **json.loads(done.stdout.strip().splitlines()[-1])})
        progress(f"resident memory, {walk}: {out[-1]['max_rss_mib']:.1f} MiB")
    return out


def measured_records(rounds: int, steps: int, warmup: int, progress) -> list[dict]:
    job = load_job(MEASURED)
    analytic = plan_job(job, with_baselines=False).plan  # what the built-in CPU table picks, for the report
    costs = profile_job(job, repeats=PROFILE_REPEATS, warmup=3, progress=progress)
    out = timed(measured_plans(costs), rounds, steps, warmup, progress) + [{
        "part": "analytic choice", "job": job.name, "method": analytic.solver.method,
        "pipelined": micro_batches_pipelined(analytic, job.training),
        "predicted_s": analytic.predicted.iteration_time_s}]
    out += resident_memory(progress)
    rl_costs = profile_job(load_job(MEASURED_RL), repeats=PROFILE_REPEATS, warmup=3, progress=progress)
    return out + [r | {"part": "measured rl"} for r in timed(grpo_plans(rl_costs), rounds, steps, warmup, progress)]


def report(records: list[dict], rounds: int, steps: int) -> str:
    planned = [r for r in records if r["part"] == "planned"]
    measured = {r["plan"]: r for r in records if r["part"] == "measured"}
    rl = [r for r in records if r["part"] == "measured rl"]
    lines = ["# Pipelined micro-batches", "", __doc__.split("\n\n")[1].replace("\n", " ")]
    for name in dict.fromkeys(r["job"] for r in planned):
        rows = [r for r in planned if r["job"] == name]
        lines += ["", f"## Planned: {name} ({rows[0]['micro_batches']} micro-batches, analytic, H100 table)", "",
                  "| pipeline_micro_batches | order | predicted iteration | compute | plan | waves | devices per slice "
                  "| peak memory | planning |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            setting = str(r["pipeline_micro_batches"]).lower()
            order = ("pipelined, 1F1B" if r.get("one_f_one_b") else "pipelined") if r["pipelined"] else "in order"
            lines.append(f"| {setting} | {order} | "
                         f"{r['iteration_s']:.2f} s | {r['compute_s']:.2f} s | {r['method']} | {r['num_waves']} | "
                         f"{r['stage_devices']} | {r['peak_gib']:.1f} of {r['memory_gib']:.0f} GiB | "
                         f"{r['planning_s']:.2f} s |")
        slow, fast, auto = rows[0]["iteration_s"], rows[1]["iteration_s"], rows[-1]
        unfit = ", ".join(f"{b} {t:.2f} s" for b, t in sorted(auto["baselines_s"].items())
                          if not auto["baselines_fit"][b])
        fit = ", ".join(f"{b} {t:.2f} s" for b, t in sorted(auto["baselines_s"].items()) if auto["baselines_fit"][b])
        lines += ["", f"Pipelined over in order: **{slow / fast:.2f}x**. Baselines (same cost model, the auto plan's "
                  f"order): over device memory: {unfit or 'none'}; fitting: {fit or 'none'}."]
    analytic = next(r for r in records if r["part"] == "analytic choice")
    lines += ["",
              f"## Measured: {next(iter(measured.values()))['job']} on this machine ({rounds} alternating rounds x "
              f"{steps} timed steps per plan)", "",
              "Every plan planned or predicted with a profile of this machine taken first (runtime.profiler, as "
              "`loom profile` without its calibration run). With the built-in CPU table instead the planner keeps "
              f"{analytic['method']} ({'pipelined' if analytic['pipelined'] else 'in order'}, predicted "
              f"{analytic['predicted_s'] * 1e3:.1f} ms).", "",
              "| plan | method | median step | predicted (profiled) | last losses |", "|---|---|---|---|---|"]
    for name, r in measured.items():
        last = ", ".join(f"{t} {v:.4f}" for t, v in r["last_losses"].items())
        walk = (", pipelined 1F1B" if r.get("one_f_one_b") else ", pipelined") if r["pipelined"] else ""
        lines.append(f"| {name} | {r['method']}{walk} | "
                     f"{r['median_step_s'] * 1e3:.1f} ms | {r['predicted_s'] * 1e3:.1f} ms | {last} |")
    a, b = measured["two stages, in order"], measured["two stages, pipelined"]
    same = a["losses"] == b["losses"]
    p, q = measured["planner, in order"], measured["planner, auto"]
    lines += ["", f"Two stages pipelined over in order, measured: **{a['median_step_s'] / b['median_step_s']:.2f}x** "
              f"(predicted {a['predicted_s'] / b['predicted_s']:.2f}x); losses of every step "
              f"{'identical' if same else 'DIFFERENT'} between the two orders. The planner's auto plan over its "
              f"in-order plan: measured {p['median_step_s'] / q['median_step_s']:.2f}x, predicted "
              f"{p['predicted_s'] / q['predicted_s']:.2f}x."]
    one = measured.get("two stages, pipelined 1F1B")
    if one is not None:  # session 33's walk; earlier records have none
        lines += ["", "The two stages walked 1F1B (one forward, one backward) against GPipe's fill and drain, "
                  f"measured: **{b['median_step_s'] / one['median_step_s']:.2f}x** (predicted "
                  f"{b['predicted_s'] / one['predicted_s']:.2f}x: the same bubble), losses of every step "
                  f"{'identical' if one['losses'] == b['losses'] else 'DIFFERENT'}; the first stage holds "
                  f"{min(one['micro_batches'], 2)} of the {one['micro_batches']} micro-batches' activations instead "
                  f"of all: predicted peak {one['peak_bytes'] / 2**20:.1f} MiB against {b['peak_bytes'] / 2**20:.1f} "
                  "MiB (parameters and optimizer state included)."]
    memory = {r["walk"]: r for r in records if r["part"] == "memory"}
    if memory:  # measured resident memory of the same stages, one process a walk (bench.pipeline.rss)
        gpipe, one, flat = memory["gpipe"], memory["1f1b"], memory["in_order"]
        lines += ["", "Resident memory of the two workers (largest RSS, one process a walk, 4 steps): in order "
                  f"{flat['max_rss_mib']:.1f} MiB, GPipe {gpipe['max_rss_mib']:.1f} MiB, 1F1B {one['max_rss_mib']:.1f} "
                  f"MiB: GPipe holds {gpipe['max_rss_mib'] - one['max_rss_mib']:.1f} MiB more than 1F1B (predicted "
                  f"{gpipe['predicted_peak_mib'] - one['predicted_peak_mib']:.1f} MiB), 1F1B "
                  f"{one['max_rss_mib'] - flat['max_rss_mib']:.1f} MiB more than in order (predicted "
                  f"{one['predicted_peak_mib'] - flat['predicted_peak_mib']:.1f} MiB); the rest is the processes' "
                  "Python and torch."]
    return "\n".join(lines + rl_section(rl, rounds, steps))


def rl_section(rows: list[dict], rounds: int, steps: int) -> list[str]:
    """The measured GRPO step's table: one micro-batch against the job's k in order and pipelined."""
    if not rows:
        return []
    one, in_order, piped = rows
    lines = ["", f"## Measured: {one['job']} on this machine ({rounds} alternating rounds x {steps} timed steps per "
             "plan)", "", "The rollouts on both workers, the reward model and the reference beside each other, the "
             "policy's update in two stages (one a worker); predicted with a profile of this machine taken first.",
             "", "| update | median step | predicted (profiled) | last loss |", "|---|---|---|---|"]
    for r in rows:
        last = ", ".join(f"{t} {v:.6f}" for t, v in r["last_losses"].items())
        lines.append(f"| {r['plan']} | {r['median_step_s'] * 1e3:.1f} ms | {r['predicted_s'] * 1e3:.1f} ms | "
                     f"{last} |")
    drift = max(abs(a[t] - b[t]) / max(abs(b[t]), 1e-12) for a, b in zip(in_order["losses"], one["losses"])
                for t in b)
    same = in_order["losses"] == piped["losses"]
    lines += ["", f"Pipelined over one micro-batch, measured: **{one['median_step_s'] / piped['median_step_s']:.2f}x** "
              f"(predicted {one['predicted_s'] / piped['predicted_s']:.2f}x); over in order "
              f"{in_order['median_step_s'] / piped['median_step_s']:.2f}x (predicted "
              f"{in_order['predicted_s'] / piped['predicted_s']:.2f}x). Losses of every step "
              f"{'identical' if same else 'DIFFERENT'} between the two orders; against one micro-batch within "
              f"{drift:.1e} relative (the same sums, accumulated in another order)."]
    return lines
