"""``python -m bench.rl [--cells NAME ...] [--no-write]``: Loom's plan against the colocated and split role placements.

Every cell is a job spec in this folder (sizes and their sources in each file's comment). For each, one cost model
(the analytic H100 model) and one simulator price three placements: Loom's plan (``plan_job``: the solver's
candidates, Loom's role placement and every baseline it may adopt), verl-style ``colocated`` (every role on all
devices in turn) and OpenRLHF-style ``split`` (the best fixed pool per role), both from planner.rlbaselines, with
their peak memory against the device. The speed-up is over the better of colocated and split among those that fit
in memory. A cell with a generate use is planned twice: on-policy (``training.rollout_lag: 0``) and one step
off-policy (``rollout_lag: 1``, planner.rolloutlag), all three placements priced in the same mode (the async
variants of colocated and split: verl's one-step off-policy recipe, OpenRLHF's async training). A cell whose update
runs in micro-batches (``training.grad_accum_steps``; the rollouts are decoded once, planner.generation) leaves their
order to the planner: Loom's plan takes the faster of in order and pipelined, and colocated and split are searched in
both orders, each keeping its faster that fits. With ``grad_accum_steps: auto`` (the GRPO cells) Loom's plan is the
fastest of the counts planner.api plans, and colocated and split are searched at each of those counts likewise.
Writes bench/results/rl.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import time

from bench.common import REPO_ROOT, write_results
from planner.api import make_cost_model, pipelining_left_to_planner, plan_job
from planner.bound import plan_bounds
from planner.errors import PlanningError
from planner.generation import as_run, modes_refused
from planner.metagraph import build_metagraph
from planner.plan import job_for_plan, micro_batches_pipelined
from planner.rlbaselines import (
    RoleBudget, pool_sizes, rl_budget, rl_schedules, split_at,
)
from planner.streamed import STREAM_CHUNKS, streamed_candidate, streamed_job, streamed_problem
from planner.schedule import Problem
from planner.spec import load_job, micro_batch_counts

log = logging.getLogger("bench.rl")
CELLS = ("grpo-7b-16", "grpo-7b-64", "grpo-70b-64", "itercomp-32")
GIB = 2**30


def lags(name: str) -> tuple[int, ...]:
    """The rollout lags cell ``name`` is planned at: 0 and 1 when it has a generate use, else 0."""
    job = load_job(REPO_ROOT / "bench" / "rl" / f"{name}.yaml")
    return (0, 1) if any(u.mode == "generate" for t in job.tasks for u in t.components) else (0,)


def run_cell(name: str, lag: int = 0, runnable: bool = False) -> dict:
    """Plan one cell at ``rollout_lag`` ``lag``: Loom's plan and the two role placements, each with its predicted
    iteration and peak memory. With ``runnable`` every placement (Loom's and the baselines') takes the generate and
    sample layouts the runtime executes (planner.generation.as_run); Loom's row is None when no plan exists then.
    A cell that leaves ``training.shard_optimizer`` to the planner (``auto``, the default) is priced with ZeRO-1 on:
    colocated and split are priced here, outside plan_job, whose choice alone would try both settings
    (planner.candidates.zero_choice), so every placement is priced in the one setting."""
    job = load_job(REPO_ROOT / "bench" / "rl" / f"{name}.yaml")
    zero = job.training.shard_optimizer if job.training.shard_optimizer != "auto" else True
    job = job.model_copy(update={"training": job.training.model_copy(update={"rollout_lag": lag,
                                                                             "shard_optimizer": zero})})
    cost_model = make_cost_model(job)
    with as_run(cost_model) if runnable else contextlib.nullcontext():
        return measure_cell(job, cost_model, name, lag, runnable)


def placement_row(problem: Problem, cost_model, placed, sim) -> dict:
    """One placement's record: predicted iteration, peak memory, hand-off, pools, and why the runtime would refuse
    its generation (None: it runs it)."""
    return {"iteration_s": sim.iteration_time_s, "peak_gib": max(sim.peak_memory_bytes) / GIB,
            "fits": max(sim.peak_memory_bytes) <= cost_model.hw.memory_bytes, "handoff_s": sim.handoff_s,
            "pools": pool_sizes(problem, placed), "waves": len(placed.waves), "lag_hidden_s": sim.lag_hidden_s,
            "pipelined": problem.graph.num_micro_batches > 1 and cost_model.in_flight > 1,
            "refused": modes_refused(problem.graph.metaops, placed)}


def better(a: dict | None, b: dict) -> dict:
    """The better of two records of one placement: the one that fits, then the faster."""
    return b if a is None or (b["fits"], -b["iteration_s"]) > (a["fits"], -a["iteration_s"]) else a


def measure_cell(job, cost_model, name: str, lag: int, runnable: bool) -> dict:
    """:func:`run_cell`'s measurements under ``cost_model`` as it is set."""
    started = time.perf_counter()
    try:
        outcome = plan_job(job, cost_model)
    except PlanningError as exc:
        if not runnable:
            raise
        outcome, why = None, str(exc).split(". ")[0]
    planning_s = time.perf_counter() - started
    rows, asked = {}, job
    budget = RoleBudget(rl_budget(job.planner.time_limit_s))  # the baselines' searches without a deadline: in full
    if outcome is not None:
        job = job_for_plan(job, outcome.plan)  # grad_accum_steps: auto at the plan's count
        k = job.training.grad_accum_steps
        # the plan's micro-batch order (auto: the faster), and both orders for the baselines where the planner decides
        piped = cost_model.with_in_flight(k if micro_batches_pipelined(outcome.plan, job.training) else 1)
        problem = Problem.build(build_metagraph(job), piped)
        rows["loom"] = placement_row(problem, piped, outcome.placed, outcome.simulation) | {
            "method": outcome.plan.solver.method, "one_f_one_b": outcome.plan.one_f_one_b is True,
            "micro_batches": k}
        for at in counts_of(asked):  # with grad_accum_steps: auto, every count the planner may plan
            n = at.training.grad_accum_steps
            for model in (cost_model, cost_model.with_in_flight(n)) if pipelining_left_to_planner(at) else (
                    cost_model,):
                ordered = Problem.build(build_metagraph(at), model)
                for placement, (placed, psim) in rl_schedules(ordered, model, budget).items():
                    row = placement_row(ordered, model, placed, psim) | {"micro_batches": n}
                    rows[placement] = better(rows.get(placement), row)
    record = {"cell": name, "lag": lag, "devices": job.cluster.num_devices, "device": job.cluster.device,
              "time_limit_s": job.planner.time_limit_s,
              "memory_gib": cost_model.hw.memory_bytes / GIB, "planning_s": planning_s, "placements": rows,
              "bound_s": None if outcome is None else outcome.plan.bounds.iteration_s if not asked.micro_batches_auto
              else min(plan_bounds(Problem.build(build_metagraph(at), cost_model), cost_model).iteration_s
                       for at in counts_of(asked)),  # auto: the least over the counts, a bound on each
              "micro_batches": job.training.micro_batches, "auto_micro_batches": asked.micro_batches_auto,
              "runnable": runnable, "streamed": None, "speedup": None}
    if outcome is None:
        return record | {"none_possible": why}
    sim = outcome.simulation
    # Loom's pools as a split (a vector the search may not have simulated), in the plan's micro-batch order
    same = split_at(problem, piped, rows["loom"]["pools"], budget)
    if same is not None and "split" in rows:
        at_pools = placement_row(problem, piped, *same) | {"at_loom_pools": True}
        rows["split"] = better(rows["split"], at_pools)
    streamed = []
    # the rollouts streamed in chunks (evaluated; Loom does not adopt it: runtime work)
    for chunks in STREAM_CHUNKS if not lag and not runnable else ():
        chunked = streamed_job(job, chunks)
        if chunked is not None:
            chunked_model = make_cost_model(chunked)
            chunked_problem = streamed_problem(job, chunks, chunked_model)
            found = streamed_candidate(chunked_problem, chunked_model)
            if found is not None:
                streamed.append({"chunks": chunks, "iteration_s": found[1].iteration_time_s,
                                 "peak_gib": max(found[1].peak_memory_bytes) / GIB, "fits": True,
                                 "handoff_s": found[1].handoff_s, "pools": pool_sizes(chunked_problem, found[0])})
    fitting = [rows[p]["iteration_s"] for p in ("colocated", "split") if p in rows and rows[p]["fits"]]
    best = min(fitting) if fitting else math.inf
    return record | {"streamed": min(streamed, key=lambda r: r["iteration_s"]) if streamed else None,
                     "speedup": best / sim.iteration_time_s if fitting else None}


def counts_of(job) -> list:
    """``job`` at each count of micro-batches its plan may take: with ``grad_accum_steps: auto`` every count of
    planner.spec.micro_batch_counts (each placement then at its fastest), else the job."""
    if not job.micro_batches_auto:
        return [job]
    return [job.with_micro_batches(n) for n in micro_batch_counts(job)]


def choice(rec: dict) -> str:
    """Loom's plan's method, and its micro-batch order where the update runs several."""
    k = rec.get("micro_batches", 1)
    loom = rec["placements"]["loom"]
    walk = "pipelined, 1F1B" if loom.get("one_f_one_b") else "pipelined"  # records before 1F1B have no such key
    order = f"; {k} micro-batches {walk if loom['pipelined'] else 'in order'}" if k > 1 else ""
    return loom["method"] + order


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary(records: list[dict]) -> dict:
    """Geometric mean speed-ups: on-policy (lag 0 everywhere), off-policy (lag 1 where a cell generates, every
    placement in that mode), and each side in its best mode (Loom's faster plan against the faster fitting baseline
    over both lags)."""
    cells = list(dict.fromkeys(r["cell"] for r in records))
    at = {(r["cell"], r["lag"]): r for r in records}
    out = {}
    for key, lag in (("on_policy", 0), ("off_policy", 1)):
        values = [(at.get((c, lag)) or at[(c, 0)])["speedup"] for c in cells]
        out[key] = geomean(values) if values and all(values) else None
    best = []
    for c in cells:
        recs = [r for r in records if r["cell"] == c]
        loom = min(r["placements"]["loom"]["iteration_s"] for r in recs)
        base = [r["placements"][p]["iteration_s"] for r in recs for p in ("colocated", "split")
                if p in r["placements"] and r["placements"][p]["fits"]]
        best.append(min(base) / loom if base else None)
    out["best_modes"] = geomean(best) if best and all(best) else None
    out["best_modes_cells"] = dict(zip(cells, best))
    return out


def markdown(records: list[dict]) -> str:
    runs = [r for r in records if r.get("runnable")]
    records = [r for r in records if not r.get("runnable")]
    lines = ["# RL iterations: Loom vs colocated (verl-style) vs split (OpenRLHF-style) role placements", "",
             "Predicted iteration time and peak memory per device under one cost model (analytic, H100 table) and one "
             "simulator (planner.simulator, weight hand-offs included); specs in bench/rl/*.yaml. The speed-up is over "
             "the better of colocated and split among those that fit in device memory; (!) marks a placement that "
             "does not fit. Lag 0: on-policy (each step's rollouts from the weights it starts from); lag 1: one step "
             "off-policy (`training.rollout_lag: 1`: step k's rollouts from the weights step k-1 started from, "
             "generated while step k-1 trains; planner.rolloutlag prices the pipeline's period, max(generation, the "
             "rest) + hand-off when the generation has devices of its own, as runtime.lagged runs it: the "
             "generating devices decode the next step's rows during the step in a thread, and keep those rows, not "
             "a second copy of the weights). At lag 1 colocated and split are their async variants (verl's one-step off-policy "
             "recipe, OpenRLHF's async training): every placement is priced by the same rule. IterComp's sample use "
             "keeps its last step's gradient, so it has no lagged mode. Split is the better of the split search "
             "(planner.rlbaselines.rl_schedules) and, when Loom's plan gives every role a pool of its own, the split at "
             "those pool sizes (marked 'at Loom's pools': a split the search did not simulate). Every role placement "
             "(colocated, split, Loom's) is searched twice, on the job's layouts and with uneven data-parallel row "
             "shares (planner.rows: any degree up to the batch, the first batch % dp ranks one row more, priced at "
             "the largest share; the runtime runs them), and keeps the better: a pool of any size trains on all its "
             "devices (12 trainers beside 4 generators at 7B/16). Placements the runtime cannot run (a pool starting "
             "mid-node whose tensor-parallel groups span nodes) are skipped for every placement alike.", "",
             "| cell | lag | devices | Loom | colocated | split | speed-up | Loom's choice | streamed rollouts |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(r: dict | None) -> str:
        if r is None:
            return "none possible"
        mark = "" if r["fits"] else " (!)"
        hidden = f", {r['lag_hidden_s']:.2f} s hidden" if r.get("lag_hidden_s") else ""
        same = " (at Loom's pools)" if r.get("at_loom_pools") else ""
        if r.get("micro_batches", 1) > 1:
            same += f", {r['micro_batches']} micro-batches"
        refused = " †" if r.get("refused") else ""
        return f"{r['iteration_s']:.2f} s, {r['peak_gib']:.1f} GiB{mark}{hidden}{same}{refused}"

    for rec in records:
        p = rec["placements"]
        speed = f"{rec['speedup']:.2f}x" if rec["speedup"] else "n/a"
        stream = rec.get("streamed")
        stream = f"{cell(stream)}, {stream['chunks']} chunks" if stream else "-" if rec["lag"] or rec.get(
            "micro_batches", 1) > 1 else "none fits"
        lines.append(f"| {rec['cell']} | {rec['lag']} | {rec['devices']} x {rec['device']} "
                     f"({rec['memory_gib']:.0f} GiB) | {cell(p['loom'])} | {cell(p.get('colocated'))} | "
                     f"{cell(p.get('split'))} | {speed} | {choice(rec)} | {stream} |")
    geo = summary(records)
    fmt = lambda v: f"**{v:.2f}x**" if v else "n/a"  # noqa: E731
    lines += ["", "Geometric mean speed-up over the better fitting baseline (4 cells): on-policy (lag 0 everywhere) "
                  f"{fmt(geo['on_policy'])}; one step off-policy (lag 1 in the GRPO cells, every placement in that "
                  f"mode) {fmt(geo['off_policy'])}; each side in its faster mode (Loom's faster plan against the "
                  f"fastest fitting baseline of either lag) {fmt(geo['best_modes'])} (" +
                  ", ".join(f"{c} {v:.2f}x" for c, v in geo["best_modes_cells"].items() if v) + ")."]
    lines += ["", "† the runtime refuses this placement's generation (planner.generation.modes_refused: a sample use "
              "at tensor_parallel > 1). Predicted only; the next section plans every placement as the runtime runs "
              "it. A decode at tensor_parallel > 1 runs (runtime.tp_decode) when each decoding device trains the "
              "policy in its decode TP group or trains none of it and receives its shard after each step "
              "(planner.generation.decode_refused); the planner skips every other placement "
              "(planner.candidates.runnable)."]
    lines += ceiling_section(records)
    if runs:
        lines += runnable_section(runs, cell, fmt)
    lines += ["", "Streamed rollouts (lag 0, cells of one micro-batch): the best fitting of Loom's role placements with "
              "the rows in 2 or 4 chunks, each decoded on its own, and generation on a pool of its own, so chunk i+1 "
              "is generated while chunk i is scored and trained (planner.streamed); evaluated, not adopted: every "
              "chunk's decode reads all the weights per token again, which costs more than the overlap saves here.",
              "", "Micro-batches (the GRPO cells: `training.grad_accum_steps: auto`; verl and OpenRLHF split the "
              "update into micro-batches of a size their users pick): Loom's plan is the fastest of its plans at 1, "
              "2, 4, ... micro-batches (planner.spec.MICRO_BATCH_COUNTS, each count the batch splits into whole "
              "sample groups), and colocated and split are searched at every one of those counts, each keeping its "
              "fastest that fits (the count follows each time above where it is more than one). The rollouts are "
              "decoded once, every micro-batch's rows together, and the update runs the micro-batches in order or "
              "pipelined over its stages (planner.generation.decode_batches, training.pipeline_micro_batches: auto); "
              "Loom's plan and both baselines take the faster order that fits, priced by the same simulator, and a "
              "pipelined one walks 1F1B (one forward, one backward, as Megatron-LM's schedule: fewer micro-batches' "
              "activations held) where that is no slower (planner.simulator.one_f_one_b_if_no_slower). The "
              "iteration bound of such a cell is the least of its bounds at those counts."]
    lines += ["", "## Pools (devices each role's MetaOps use) and weight hand-offs", "",
              "| cell | lag | placement | pools | hand-off |", "|---|---|---|---|---|"]
    for rec in records:
        for name, r in rec["placements"].items():
            pools = ", ".join(f"{k} {v}" for k, v in r["pools"].items())
            lines.append(f"| {rec['cell']} | {rec['lag']} | {name} | {pools} | {r['handoff_s'] * 1e3:.0f} ms |")
    def took(r: dict) -> str:
        return f"{r['cell']} (lag {r['lag']}) {r['planning_s']:.1f} s of {r['time_limit_s']:g}"

    lines += ["", "Planning time per cell (Loom's `plan_job`, baselines included; of the cell's "
              "`planner.time_limit_s`, which stops a role-placement search that has a placement that fits): "
              + ", ".join(map(took, records))
              + "; as the runtime runs: " + ", ".join(map(took, runs)) + "."]
    return "\n".join(lines) + "\n"


def ceiling_section(records: list[dict]) -> list[str]:
    """On-policy, the most any schedule could gain over the better fitting baseline: that baseline's iteration over
    the plan's iteration bound (planner.bound: every schedule of the step's DAG takes at least it; memory ignored).
    Lag 1 is left out: its pipeline overlaps two steps, which the bound of one step does not bound."""
    rows = []
    for rec in records:
        p = rec["placements"]
        fitting = [p[k]["iteration_s"] for k in ("colocated", "split") if k in p and p[k]["fits"]]
        if rec["lag"] or not fitting or not rec.get("bound_s"):
            continue
        rows.append((rec["cell"], min(fitting), rec["bound_s"], p["loom"]["iteration_s"]))
    if not rows:
        return []
    lines = ["", "## How much any on-policy plan could gain", "",
             "The plan's iteration bound (planner.bound.iteration_bound: a bound on the compute of the timeline's "
             "forward and backward passes, every micro-batch, on concave-hull speed-ups, or, where longer, the chain "
             "through the slice whose backward ends last at its device count, plus the optimizer step or that "
             "slice's gradient sync at the same count, which no schedule hides; memory, transfers and weight "
             "hand-offs ignored) holds for every schedule of the step, so the better fitting baseline over it is the "
             "largest speed-up any placement could reach under this cost model.", "",
             "| cell | better baseline | iteration bound | largest possible speed-up | Loom's | Loom / bound |",
             "|---|---|---|---|---|---|"]
    for name, base, bound, loom in rows:
        lines.append(f"| {name} | {base:.2f} s | {bound:.2f} s | {base / bound:.3f}x | {base / loom:.3f}x | "
                     f"{loom / bound:.3f} |")
    ceiling = geomean([base / bound for _, base, bound, _ in rows])
    lines += ["", f"Geometric mean of the largest possible speed-ups: {ceiling:.3f}x over {len(rows)} cells: no "
              "on-policy placements of these cells beat the better baselines by more on their geometric mean under "
              "this cost model."]
    return lines


def runnable_section(runs: list[dict], cell, fmt) -> list[str]:
    """The table of the placements planned as the runtime runs them (:func:`run_cell` with ``runnable``)."""
    lines = ["", "## As the runtime runs it", "",
             "Every placement planned again with the layouts the runtime runs for generate and sample uses "
             "(planner.generation.as_run: a decode at any allowed tensor_parallel, runtime.tp_decode; a sample use "
             "at tensor_parallel 1), Loom's plan "
             "and both baseline searches alike, so every number here is a placement `loom run` executes. "
             "'none possible': no placement fits.", "",
             "| cell | lag | Loom | colocated | split | speed-up | Loom's choice |", "|---|---|---|---|---|---|---|"]
    for rec in runs:
        p = rec["placements"]
        if not p:
            lines.append(f"| {rec['cell']} | {rec['lag']} | none possible: {rec.get('none_possible', '')} | - | - | "
                         "n/a | - |")
            continue
        speed = f"{rec['speedup']:.2f}x" if rec["speedup"] else "n/a"
        lines.append(f"| {rec['cell']} | {rec['lag']} | {cell(p['loom'])} | {cell(p.get('colocated'))} | "
                     f"{cell(p.get('split'))} | {speed} | {choice(rec)} |")
    planned = [r for r in runs if r["speedup"]]
    geo = summary(planned) if planned else {}
    cells = ", ".join(dict.fromkeys(r["cell"] for r in planned))
    lines += ["", f"Geometric mean over the cells with a runnable plan ({cells}): on-policy "
                  f"{fmt(geo.get('on_policy'))}; one step off-policy {fmt(geo.get('off_policy'))}."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="*", default=list(CELLS), choices=CELLS, help="cells to run (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    load = os.getloadavg()[0]  # planning times inflate with it; the predictions do not depend on it
    records = []
    for runnable in (False, True):
        for name in args.cells:
            for lag in lags(name):
                records.append(run_cell(name, lag, runnable))
                print(f"{name} (lag {lag}{', as run' if runnable else ''}): done in "
                      f"{records[-1]['planning_s']:.1f} s", flush=True)
    report = markdown(records) + (f"\nMachine load when the run started: {load:.0f} (1-minute load average on "
                                  f"{os.cpu_count()} CPUs): the planning times above inflate with it, the predicted "
                                  "iterations and memory do not depend on it.\n")
    print(report)
    if not args.no_write:
        write_results("rl", records, report, {"cells": list(args.cells), "cost_model": "analytic", "load": load})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
