"""The wave MILP (PuLP; HiGHS in-process by default, CBC as fallback), its MIP start and its diagnosis.

Variables, for each candidate (MetaOp m, wave k, device count n): binary z[m,k,n] (m runs in
wave k on n devices) and integer x[m,k,n] (how many of its layers); F_k, B_k >= 0 are wave k's
largest forward and largest backward (it lasts F_k + B_k: every forward runs before every backward, planner.timeline).
Constraint families, named the same in code, docstrings and the PuLP model:

- ``layers[m]``: sum over k, n of x[m,k,n] = L_m (every layer runs exactly once)
- ``one_slice[m,k]``: sum over n of z[m,k,n] <= 1 (a MetaOp never runs beside itself)
- ``link[m,k,n]``: x[m,k,n] <= L_m z[m,k,n]
- ``capacity[k]``: sum of n z[m,k,n] <= N
- ``duration[m,k,n]``: F_k >= F_m(n) x[m,k,n] and B_k >= B_m(n) x[m,k,n] (a layer's forward and backward seconds)
- ``memory[m,k,n]``: x[m,k,n] * bytes per layer at n <= device memory (optional)
- ``precedence[m,p,k]`` (full model only): L_p sum_n z[m,k,n] <= sum over k' < k, n of x[p,k',n]:
  m may run in wave k only when its predecessor p has finished all its layers before wave k.

Objective: minimise sum over k of F_k + B_k. The *packing* model restricts candidates to the waves of
the allocation LP (precedence then holds by construction of the stage windows); the *full* model
allows every (m, k, n) and is exact for at most K waves, which tests compare with brute force.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pulp

from planner.schedule import Problem, Schedule, Slice, Wave, merge_adjacent_waves

Candidate = tuple[int, int, int]  # (metaop, wave, num_devices)
FAMILIES = ("layers", "one_slice", "link", "capacity", "duration", "memory", "precedence")

_BANNER_SHOWN = False


def quiet_highs():
    """A silent highspy.Highs. The first one in a process prints a banner on fd 1 (before any option can turn
    output off): it goes to /dev/null, so that ``loom plan --output json`` keeps stdout clean and no command
    prints it on stderr either."""
    global _BANNER_SHOWN
    import highspy

    if _BANNER_SHOWN:
        h = highspy.Highs()
    else:
        sys.stdout.flush()
        saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
            h = highspy.Highs()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)
        _BANNER_SHOWN = True
    h.setOptionValue("output_flag", False)
    return h


@dataclass
class WaveMILP:
    model: pulp.LpProblem
    z: dict[Candidate, pulp.LpVariable]
    x: dict[Candidate, pulp.LpVariable]
    d: list[tuple[pulp.LpVariable, pulp.LpVariable]]  # per wave, its largest forward and largest backward


def build_wave_milp(problem: Problem, candidates: Iterable[Candidate], num_waves: int, *, precedence: bool,
                    layer_memory: Callable[[int, int], float] | None = None, memory_limit: float | None = None,
                    families: Sequence[str] = FAMILIES) -> WaveMILP:
    """Build the MILP over ``candidates``; ``families`` selects which constraint families are added
    (all by default; :func:`explain_infeasible` drops one at a time)."""
    model = pulp.LpProblem("loom_waves", pulp.LpMinimize)
    z: dict[Candidate, pulp.LpVariable] = {}
    x: dict[Candidate, pulp.LpVariable] = {}
    for m, k, n in sorted(set(candidates)):
        z[m, k, n] = model.add_variable(f"z_{m}_{k}_{n}", 0, 1, cat="Integer")
        x[m, k, n] = model.add_variable(f"x_{m}_{k}_{n}", 0, problem.layers(m), cat="Integer")
    d = [(model.add_variable(f"F_{k}", 0), model.add_variable(f"B_{k}", 0)) for k in range(num_waves)]
    model += pulp.lpSum(f + b for f, b in d)  # a wave lasts its largest forward plus its largest backward
    by_op: dict[int, list[Candidate]] = {}
    by_wave: dict[int, list[Candidate]] = {}
    for key in z:
        by_op.setdefault(key[0], []).append(key)
        by_wave.setdefault(key[1], []).append(key)
    on = set(families)
    if "layers" in on:
        for m in range(len(problem.graph)):
            model += pulp.lpSum(x[c] for c in by_op.get(m, [])) == problem.layers(m), f"layers[m={m}]"
    for k, keys in sorted(by_wave.items()):
        if "capacity" in on:
            model += pulp.lpSum(n * z[m, kk, n] for m, kk, n in keys) <= problem.num_devices, f"capacity[k={k}]"
        for m in sorted({c[0] for c in keys}):
            if "one_slice" in on:
                model += pulp.lpSum(z[c] for c in keys if c[0] == m) <= 1, f"one_slice[m={m},k={k}]"
        for m, kk, n in keys:
            if "link" in on:
                model += x[m, k, n] <= problem.layers(m) * z[m, k, n], f"link[m={m},k={k},n={n}]"
            if "duration" in on:
                for var, seconds, name in zip(d[k], problem.pass_times[m][n], ("forward", "backward")):
                    model += var >= seconds * x[m, k, n], f"duration_{name}[m={m},k={k},n={n}]"
            if "memory" in on and layer_memory is not None and memory_limit is not None:
                model += x[m, k, n] * layer_memory(m, n) <= memory_limit, f"memory[m={m},k={k},n={n}]"
    if precedence and "precedence" in on:
        _add_precedence(problem, model, z, x, by_op)
    return WaveMILP(model, z, x, d)


def _add_precedence(problem: Problem, model, z, x, by_op) -> None:
    for op in problem.graph.metaops:
        waves_of_m = sorted({c[1] for c in by_op.get(op.id, [])})
        for p in op.deps:
            for k in waves_of_m:
                before = [x[c] for c in by_op.get(p, []) if c[1] < k]
                running = [z[c] for c in by_op[op.id] if c[1] == k]
                model += problem.layers(p) * pulp.lpSum(running) <= pulp.lpSum(before), f"precedence[m={op.id},p={p},k={k}]"


def set_start(problem: Problem, milp: WaveMILP, start: Schedule) -> None:
    """MIP start from ``start``, whose wave k must map to the model's wave k (slices off-candidate are dropped)."""
    for var in list(milp.z.values()) + list(milp.x.values()):
        var.setInitialValue(0)
    durations = [[0.0, 0.0] for _ in milp.d]
    for k, wave in enumerate(start.waves[: len(milp.d)]):
        for s in wave.slices:
            key = (s.metaop, k, s.num_devices)
            if key in milp.z:
                milp.z[key].setInitialValue(1)
                milp.x[key].setInitialValue(s.num_layers)
                passes = problem.pass_times[s.metaop][s.num_devices]
                durations[k] = [max(have, p * s.num_layers) for have, p in zip(durations[k], passes)]
    for pair, values in zip(milp.d, durations):
        for var, value in zip(pair, values):
            var.setInitialValue(value)


class _WarmHiGHS(pulp.HiGHS):
    """PuLP's HiGHS with a MIP start: the variables' initial values go to HiGHS before run()."""

    def createAndConfigureSolver(self, lp):
        super().createAndConfigureSolver(lp)
        quiet_highs()  # make sure the banner (once per process) was swallowed

    def callSolver(self, lp):
        variables = lp.variables()
        known = [(v.index, float(v.varValue)) for v in variables if v.varValue is not None]
        if known:
            idx, vals = zip(*known)
            lp.solverModel.setSolution(len(idx), np.array(idx, dtype=np.int32), np.array(vals))
        lp.solverModel.run()

    def findSolutionValues(self, lp):
        # PuLP 3.3.2 has no entry for HiGHS's node/solution limits; a stop there with an incumbent is
        # "integer feasible, not proven", like a time limit.
        import highspy

        status = lp.solverModel.getModelStatus()
        self.time_limited = status == highspy.HighsModelStatus.kTimeLimit  # the stop depended on the clock
        if status == highspy.HighsModelStatus.kSolutionLimit:
            has_point = lp.solverModel.getInfo().primal_solution_status == 2
            solution = lp.solverModel.getSolution()
            for var in lp.variables():
                var.varValue = solution.col_value[var.index]
            if has_point:
                return pulp.LpStatusOptimal, pulp.LpSolutionIntegerFeasible
            return pulp.LpStatusNotSolved, pulp.LpSolutionNoSolutionFound
        return super().findSolutionValues(lp)


def make_solver(name: str, time_limit_s: float, mip_gap: float, max_nodes: int):
    """A PuLP solver: HiGHS (one thread, fixed seed, node limit: deterministic) or CBC."""
    if name == "cbc":
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=mip_gap, warmStart=True, threads=1,
                                 options=[f"maxNodes {max_nodes}", "randomSeed 1"])
    quiet_highs()
    return _WarmHiGHS(msg=False, timeLimit=time_limit_s, gapRel=mip_gap, threads=1, mip_max_nodes=max_nodes,
                      random_seed=0)


@dataclass(frozen=True)
class MILPResult:
    schedule: Schedule | None
    status: str  # optimal, feasible, infeasible, not solved
    gap: float  # relative MIP gap reported by the solver (nan when unknown)
    bound: float  # the solver's dual bound on its own model (nan when unknown)


def solve_wave_milp(problem: Problem, milp: WaveMILP, solver) -> MILPResult:
    milp.model.solve(solver)
    if milp.model.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return MILPResult(None, pulp.LpStatus[milp.model.status].lower(), float("nan"), float("nan"))
    gap, bound = _gap_and_bound(milp.model)
    status = "optimal" if milp.model.sol_status == pulp.LpSolutionOptimal else "feasible"
    slices: list[list[Slice]] = [[] for _ in milp.d]
    for (m, k, n), var in sorted(milp.x.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        layers = int(round(var.varValue or 0))
        if layers > 0:
            slices[k].append(Slice(m, layers, n))
    return MILPResult(Schedule(merge_adjacent_waves(problem, [Wave(tuple(s)) for s in slices])), status, gap, bound)


def _gap_and_bound(model) -> tuple[float, float]:
    info = getattr(getattr(model, "solverModel", None), "getInfo", None)
    if info is None:  # CBC: only "proven or not"
        return (0.0, pulp.value(model.objective)) if model.sol_status == pulp.LpSolutionOptimal else (float("nan"),) * 2
    data = info()
    return float(data.mip_gap), float(data.mip_dual_bound)


def explain_infeasible(problem: Problem, build: Callable[[Sequence[str]], WaveMILP], solver) -> str:
    """One sentence naming the constraint family whose removal makes the model feasible.

    ``build(families)`` must rebuild the same model with only ``families``. Families are dropped one at
    a time, the side constraints first and the demand (``layers``, which any model satisfies once it
    is gone) last, so the family named is the most specific one that binds."""
    for family in ("precedence", "memory", "capacity", "one_slice", "link", "duration", "layers"):
        rest = [f for f in FAMILIES if f != family]
        milp = build(rest)
        milp.model.solve(solver)
        if milp.model.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            return (f"the wave model is infeasible because of the `{family}` constraints: without them a schedule "
                    f"exists. {_FIXES[family]}")
    return "the wave model is infeasible even after dropping any one constraint family; check the job's sizes."


_FIXES = {
    "layers": "Some MetaOp cannot place all its layers in the available waves; allow more waves.",
    "one_slice": "A MetaOp would need two slices in one wave; allow more waves.",
    "link": "Layers were assigned without devices; this is an internal error, please report it.",
    "capacity": "A wave needs more devices than the cluster has; add devices or lower the batch size.",
    "duration": "Wave durations cannot cover the slices; this is an internal error, please report it.",
    "memory": "Some MetaOp's layers do not fit in device memory; add devices, allow tensor_parallel, or lower the batch.",
    "precedence": "The dependency chain is longer than the number of waves; allow more waves.",
}
