"""Role placements of RL frameworks as baselines: verl's colocated and OpenRLHF's split placement.

A job with generation, sampling or frozen scoring (a use whose mode is not ``train``) is shaped like an RL
iteration: *roles* (the policy's generation, the reward model, the reference, the policy's update, ...) run one
after another on the same samples. RL frameworks make the user choose where roles run:

- ``colocated`` (verl's hybrid engine): every role on all devices, in turn (one MetaOp after another in
  topological order, each on the largest valid count <= N of the first devices), all roles' weights resident on
  every device. No weight hand-off while the generating devices train every layer (no pipeline stages), but the
  memory of all roles adds up.
- ``split`` (OpenRLHF's Ray placement): the devices split into fixed pools, one per role; each role's MetaOps run
  on its pool in topological order, roles on different pools concurrently where the DAG allows. The policy's
  generation pool receives the updated weights after every step (a hand-off, planner.handoff). The split is
  searched: every vector of pool sizes in multiples of a grain (``N // SPLIT_GRAIN_PARTS`` devices, at least one,
  doubled until at most :data:`MAX_SPLIT_VECTORS` vectors remain) whose sum is at most N is ranked by a
  list-scheduled compute estimate; the :data:`SPLIT_SIMULATED` best are placed, simulated and memory-checked.

Both search what a user of those frameworks tunes until the roles fit (:func:`_search`): pipeline stages
(:func:`stage_plan`) and layout versions (:func:`tightened`); each keeps its fastest placement that fits (the
fastest of all when none does).

A role is a MetaOp's parameter group without its segment suffix: ``policy@generate`` (a generate use's copy),
``policy`` (its trained layers), ``reward``, ``reference``. Both are :class:`~planner.placement.PlacedSchedule`
values priced by the same simulator and memory ledger as every other baseline (planner.baselines), so Loom adopts
one when it is faster (planner.candidates). Loom's own role placement (:func:`role_candidate`, anything between the
two: a level's roles side by side on shares of the devices, generation on a share of them) joins the solver's
candidates (:func:`with_role_candidate`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from planner.baselines import _Builder, largest_count
from planner.costmodel import CostModel, Curve
from planner.placement import PlacedSchedule
from planner.schedule import Problem
from planner.simulator import Simulation, simulate

RL_BASELINES: tuple[str, ...] = ("colocated", "split")
SPLIT_GRAIN_PARTS = 32  # the split search moves devices in grains of N // 32 (at least 1)
SPLIT_SIMULATED = 8  # splits placed and simulated, the best by the compute estimate
MAX_SPLIT_ROLES = 16  # more roles than this: no split baseline
GEN_SHARES = (1.0, 0.5, 0.25)  # shares of the devices Loom's role placement tries for generation
STAGES = (1, 2, 4, 8)  # pipeline stages the baselines try for MetaOps too large for one group (verl/OpenRLHF: PP)
TIGHTER_SHARES = (1.0, 0.5, 0.25, 0.125)  # device memory shares the baselines' layouts are tightened to, in turn
MAX_SPLIT_VECTORS = 40_000  # pool-size vectors estimated at most (the grain doubles until they are fewer)


def rl_shaped(problem: Problem) -> bool:
    """Whether the job has a use that does not train (forward, generate, sample): an RL-shaped iteration."""
    return any(op.mode != "train" for op in problem.graph.metaops)


def role_of(problem: Problem, m: int) -> str:
    """MetaOp ``m``'s role: its parameter group without a segment suffix."""
    return problem.graph.metaops[m].param_group.split("#")[0]


def roles(problem: Problem) -> list[str]:
    """Roles in order of their first MetaOp."""
    return list(dict.fromkeys(role_of(problem, m) for m in range(len(problem.graph))))


def stage_plan(problem: Problem, m: int, pool: int, stages: int) -> list[tuple[int, int, int, int]] | None:
    """How MetaOp ``m`` runs on a pool of ``pool`` devices in ``stages`` pipeline stages (layer ranges run one after
    another on disjoint sub-pools of ``pool // stages`` devices, as a pipeline-parallel framework holds a model too
    large for one group): ``(first_layer, num_layers, offset in the pool, devices)`` per stage. A generate or
    sample MetaOp (one layer) and a MetaOp with fewer layers than stages use fewer stages. None when a sub-pool is
    too small for the MetaOp."""
    op = problem.graph.metaops[m]
    k = max(1, min(stages, op.num_layers, pool))
    n = largest_count(problem, m, pool // k)
    if n is None:
        return None
    out, first = [], 0
    for c in range(k):
        count = op.num_layers // k + (1 if c < op.num_layers % k else 0)
        out.append((first, count, c * (pool // k), n))
        first += count
    return out


def _put(builder: _Builder, m: int, pool: tuple[int, ...], stages: int, after: int) -> int | None:
    """MetaOp ``m`` on ``pool`` in ``stages`` stages (:func:`stage_plan`) after wave ``after``; its last wave."""
    plan = stage_plan(builder.problem, m, len(pool), stages)
    if plan is None:
        return None
    for first, count, offset, n in plan:
        after = builder.put_slice(m, first, count, pool[offset:offset + n], after)
    return after


def colocated_schedule(problem: Problem, stages: int = 1) -> PlacedSchedule | None:
    """verl-style: every MetaOp in topological order, one after another, on the first devices (its largest valid
    count <= N, or ``stages`` pipeline stages over all N: :func:`stage_plan`); one phase. None when a stage's
    devices are too few for its MetaOp."""
    builder = _Builder(problem)
    k: int | None = -1
    for m in range(len(problem.graph)):
        k = _put(builder, m, tuple(range(problem.num_devices)), stages, k)
        if k is None:
            return None
    return builder.placed()


def split_schedule(problem: Problem, sizes: dict[str, int], stages: int = 1) -> PlacedSchedule | None:
    """OpenRLHF-style: role r on its own contiguous pool of ``sizes[r]`` devices (in role order); its MetaOps in
    topological order (each in ``stages`` pipeline stages over its pool), each after its predecessors and the role's
    previous MetaOp. None when a pool is too small for one of its MetaOps or the pools exceed N."""
    names = roles(problem)
    if sum(sizes[r] for r in names) > problem.num_devices:
        return None
    pools, start = {}, 0
    for r in names:
        pools[r] = tuple(range(start, start + sizes[r]))
        start += sizes[r]
    builder = _Builder(problem)
    last: dict[str, int] = {}
    for m in range(len(problem.graph)):
        r = role_of(problem, m)
        k = _put(builder, m, pools[r], stages, last.get(r, -1))
        if k is None:
            return None
        last[r] = k
    return builder.placed()


def split_estimate(problem: Problem, sizes: dict[str, int], stages: int = 1) -> float:
    """Compute makespan of :func:`split_schedule` (list-scheduled: a MetaOp starts after its predecessors and its
    role's previous MetaOp, its stages one after another); inf when a pool is too small."""
    end = [0.0] * len(problem.graph)
    free: dict[str, float] = {}
    for m, op in enumerate(problem.graph.metaops):
        r = role_of(problem, m)
        plan = stage_plan(problem, m, sizes[r], stages)
        if plan is None:
            return math.inf
        start = max([free.get(r, 0.0), *(end[d] for d in op.deps)])
        end[m] = start + sum(problem.curves[m].time(n) * count for _, count, _, n in plan)
        free[r] = end[m]
    return max(end, default=0.0)


def split_candidates(problem: Problem, stages: int = 1) -> list[dict[str, int]]:
    """Pool-size vectors (multiples of the grain, summing to at most N), best compute estimate first; at most
    :data:`SPLIT_SIMULATED`."""
    names = roles(problem)
    if len(names) < 2 or len(names) > MAX_SPLIT_ROLES or len(names) > problem.num_devices:
        return []
    grain = max(1, problem.num_devices // SPLIT_GRAIN_PARTS)
    while math.comb(problem.num_devices // grain, len(names)) > MAX_SPLIT_VECTORS:
        grain *= 2
    parts = problem.num_devices // grain
    scored = []
    for cut in itertools.combinations(range(1, parts + 1), len(names)):  # increasing cut points: sizes sum <= parts
        bounds = (0, *cut)
        sizes = {r: (bounds[i + 1] - bounds[i]) * grain for i, r in enumerate(names)}
        t = split_estimate(problem, sizes, stages)
        if t < math.inf:
            scored.append((t, -sum(sizes.values()), tuple(sizes.values()), sizes))
    scored.sort(key=lambda x: x[:3])
    return [s for *_, s in scored[:SPLIT_SIMULATED]]


def tightened(problem: Problem, cost_model: CostModel, stages: int = 1) -> list[Problem]:
    """``problem`` and versions of it whose layouts fit a pipeline stage's layers (``ceil(layers / stages)``) in all,
    half, a quarter and an eighth of a device (:meth:`CostModel._build_curve_within`, as planner.api.memory_tightened
    does for whole MetaOps), and the least-memory layouts (:func:`least_memory_curve`): the layouts a user tries in
    turn (larger tensor-parallel degrees, wider optimizer shards) until the roles fit beside each other."""
    out = [problem]
    for share in TIGHTER_SHARES:
        curves = []
        for op, curve in zip(problem.graph.metaops, problem.curves):
            k = max(1, min(stages, op.num_layers))
            limit = share * cost_model.hw.memory_bytes / math.ceil(op.num_layers / k)
            tight = cost_model._build_curve_within(op, limit)
            curves.append(curve if tight is None else tight)
        if all(tuple(curves) != p.curves for p in out):
            out.append(replace(problem, curves=tuple(curves)))
    leanest = tuple(least_memory_curve(cost_model, op, problem.num_devices) or curve
                    for op, curve in zip(problem.graph.metaops, problem.curves))
    if all(leanest != p.curves for p in out):
        out.append(replace(problem, curves=leanest))
    return out


def least_memory_curve(cost_model: CostModel, op, num_devices: int) -> Curve | None:
    """Every count that has a layout for ``op``, each at its layout of least memory per device (the fastest among
    equals): the last resort of a user fitting roles beside each other. Times need not fall with the count (the
    baselines pick counts by pool size, not by speed). None when no count has a layout."""
    counts, times, layouts, memory = [], [], [], []
    for n in range(1, num_devices + 1):
        options = [(cost_model.layer_memory(op, lay), cost_model.layout_time(op, lay), lay)
                   for lay in cost_model.layouts(op, n)]
        if options:
            mem, t, lay = min(options, key=lambda o: o[:2])
            counts.append(n)
            times.append(t)
            layouts.append(lay)
            memory.append(mem)
    return Curve(tuple(counts), tuple(times), tuple(layouts), tuple(memory)) if counts else None


def _simulated(problem: Problem, cost_model: CostModel, placed: PlacedSchedule | None):
    """(does not fit, predicted iteration, placed, simulation) of ``placed``; None for None."""
    if placed is None:
        return None
    sim = simulate(problem, placed, cost_model)
    return (max(sim.peak_memory_bytes, default=0.0) > cost_model.hw.memory_bytes, sim.iteration_time_s, placed, sim)


def _search(problem: Problem, cost_model: CostModel, build) -> tuple[PlacedSchedule, Simulation] | None:
    """The fitting placement with the shortest predicted iteration (else the fastest) among ``build(version, stages)``
    (placements, None for impossible ones) over pipeline stage counts (:data:`STAGES`, more only while none fits) and
    the layout versions for each (:func:`tightened`)."""
    best = None
    for stages in STAGES:
        for version in tightened(problem, cost_model, stages):
            for x in (_simulated(problem, cost_model, p) for p in build(version, stages)):
                if x is not None and (best is None or x[:2] < best[:2]):
                    best = x
        if best is not None and not best[0]:
            break
    return None if best is None else (best[2], best[3])


def rl_schedules(problem: Problem, cost_model: CostModel) -> dict[str, tuple[PlacedSchedule, Simulation]]:
    """The colocated and best split placements of an RL-shaped job (empty otherwise), each with its simulation: for
    each, the fastest that fits over the job's layouts, their memory-tightened versions (:func:`tightened`) and
    pipeline stages (:func:`stage_plan`)."""
    if not rl_shaped(problem):
        return {}
    out = {"colocated": _search(problem, cost_model, lambda p, k: [colocated_schedule(p, k)]),
           "split": _search(problem, cost_model,
                            lambda p, k: [split_schedule(p, sizes, k) for sizes in split_candidates(p, k)])}
    return {name: found for name, found in out.items() if found is not None}


def level_split_schedule(problem: Problem, stages: int = 1, trained_alone: bool = False,
                         gen_share: float = 1.0) -> PlacedSchedule | None:
    """Loom's role placement between colocated and split: the MetaLevels in order; a level's MetaOps (e.g. the
    reward model and the reference, both reading the rollouts) split the N devices in proportion to their work
    (planner.baselines.split_level: DistMM's rule), a level of one MetaOp (the generation, the update) takes them all;
    with ``trained_alone`` a level's MetaOps with a backward pass run first, each alone on all devices, and the rest
    split them. With ``gen_share`` < 1 the generate and sample MetaOps run on the first ``gen_share`` of the devices
    and the forward-only MetaOps split the others (so no device holds a generation copy and a scorer). Each MetaOp
    in ``stages`` pipeline stages over its devices. None when some stage's devices are too few."""
    from planner.baselines import split_level  # local: a sibling's helper, used only here

    builder = _Builder(problem)
    after = -1
    ops = problem.graph.metaops
    n_all = problem.num_devices
    n_gen = max(1, int(n_all * gen_share))
    for level in problem.graph.levels:
        groups = [list(level)]
        if trained_alone:
            alone = [m for m in level if ops[m].backward_factor > 0]
            rest = [m for m in level if ops[m].backward_factor == 0]
            groups = [[m] for m in alone] + ([rest] if rest else [])
        end = after
        for group in groups:
            if all(ops[m].gen is not None for m in group):
                offset, width = 0, n_gen
            elif n_gen < n_all and all(ops[m].backward_factor == 0 for m in group):
                offset, width = n_gen, n_all - n_gen
            else:
                offset, width = 0, n_all
            for stage in split_level(problem, group, width):
                start = end
                for m, devices in stage:
                    first = offset + (devices[0] if len(stage) > 1 else 0)
                    size = len(devices) if len(stage) > 1 else width
                    k = _put(builder, m, tuple(range(first, first + size)), stages, start)
                    if k is None:
                        return None
                    end = max(end, k)
        after = end
    return builder.placed()


def role_candidate(problem: Problem, cost_model: CostModel) -> tuple[PlacedSchedule, Simulation] | None:
    """Loom's own role placement of an RL-shaped job (None otherwise, or when nothing fits): the fastest fitting
    :func:`level_split_schedule` over pipeline stages and layout versions, for the jobs whose solver candidates do
    not fit (a 70B policy needs pipeline stages to train beside its generation copy)."""
    if not rl_shaped(problem):
        return None
    found = _search(problem, cost_model, lambda p, k: [level_split_schedule(p, k, alone, share)
                                                       for alone in (False, True) for share in GEN_SHARES])
    if found is None or max(found[1].peak_memory_bytes, default=0.0) > cost_model.hw.memory_bytes:
        return None
    return found


def with_role_candidate(problem: Problem, cost_model: CostModel, chosen, bound_s: float):
    """``chosen`` (the solver's ``(SolveResult, placed, simulation)``, or None when none fits) or Loom's role
    placement (:func:`role_candidate`) when that fits and is predicted faster; the SolveResult's method then reads
    ``role placement``."""
    from planner.candidates import schedule_of  # local: planner.candidates imports this module
    from planner.solver import SolveResult

    found = role_candidate(problem, cost_model)
    if found is None or (chosen is not None and found[1].iteration_time_s >= chosen[2].iteration_time_s):
        return chosen
    placed, sim = found
    compute = sim.compute_s
    gap = (compute - bound_s) / compute if compute > 0 else 0.0
    result = SolveResult(schedule_of(placed), chosen[0].solver if chosen else "roles", "heuristic", compute, bound_s,
                         max(gap, 0.0), "role placement")
    return result, placed, sim


def pool_sizes(problem: Problem, placed: PlacedSchedule) -> dict[str, int]:
    """Devices each role's slices use in ``placed`` (for reports)."""
    used: dict[str, set[int]] = {}
    for wave in placed.waves:
        for s in wave.slices:
            used.setdefault(role_of(problem, s.metaop), set()).update(s.devices)
    return {r: len(d) for r, d in used.items()}

