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
  doubled until at most :data:`MAX_SPLIT_VECTORS` vectors remain, or until their estimates fit the budget) whose
  sum is at most N is ranked by a list-scheduled compute estimate (:func:`split_estimates`, vectorised); the
  :data:`SPLIT_SIMULATED` best that use distinct devices (vectors whose pools run on the same devices are one
  placement) are placed, simulated and memory-checked.

Both search what a user of those frameworks tunes until the roles fit (:func:`_search`): pipeline stages
(:func:`stage_plan`) and layout versions (:func:`tightened`); each keeps its fastest placement that fits (the
fastest of all when none does). Every search (colocated, split, Loom's role placement) stops at a deterministic work
budget (:class:`Work`, :func:`rl_budget`: from the planner's time limit, never the clock), or, once it has a placement
that fits, at the planner's time limit (:class:`RoleBudget`'s deadline: a safety cap, as the solver's).

A role is a MetaOp's parameter group without its segment suffix: ``policy@generate`` (a generate use's copy),
``policy`` (its trained layers), ``reward``, ``reference``. Both are :class:`~planner.placement.PlacedSchedule`
values priced by the same simulator and memory ledger as every other baseline (planner.baselines), so Loom adopts
one when it is faster (planner.candidates). Loom's own role placement (:func:`role_candidate`, anything between the
two: a level's roles side by side on shares of the devices, generation on a share of them) joins the solver's
candidates (:func:`with_role_candidate`). planner.streamed prices the rollouts streamed in chunks, each decoded on its
own (bench.rl evaluates it; plans do not adopt it: with micro-batches the runtime decodes a step's rollouts at once).
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import dataclass, replace

import numpy as np

from planner.baselines import _Builder, largest_count
from planner.costmodel import CostModel, Curve
from planner.errors import PlanningError
from planner.generation import modes_refused
from planner.placement import PlacedSchedule, placed_ledger
from planner.refine import DEVICES_PER_UNIT
from planner.rolloutlag import lagged_generate
from planner.rows import uneven_rows
from planner.schedule import Problem
from planner.simulator import Simulation, one_f_one_b_if_no_slower, simulate

RL_BASELINES: tuple[str, ...] = ("colocated", "split")
SPLIT_GRAIN_PARTS = 32  # the split search moves devices in grains of N // 32 (at least 1)
SPLIT_SIMULATED = 8  # splits placed and simulated, the best by the compute estimate
MAX_SPLIT_ROLES = 16  # more roles than this: no split baseline
GEN_SHARES = (1.0, 0.5, 0.25)  # shares of the devices Loom's role placement tries for generation
POOL_SHARES = (0.5, 0.375, 0.25, 0.125)  # ... for a generation pool of its own, with training.rollout_lag 1
STAGES = (1, 2, 4, 8)  # pipeline stages the baselines try for MetaOps too large for one group (verl/OpenRLHF: PP)
TIGHTER_SHARES = (1.0, 0.5, 0.25, 0.125)  # device memory shares the baselines' layouts are tightened to, in turn
MAX_SPLIT_VECTORS = 40_000  # pool-size vectors estimated at most (the grain doubles until they are fewer)
RL_SEARCH_BUDGET = 3_000  # work units (Work) of each role-placement search at most: colocated, split, Loom's
RL_UNITS_PER_LIMIT_S = 60  # ... and at most this many per second of planner.time_limit_s (rl_budget)
ESTIMATES_PER_UNIT = 10_000  # MetaOp estimates of the split search that cost one work unit


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


def _op_seconds(problem: Problem, m: int, size: int, stages: int) -> float:
    """Compute seconds of MetaOp ``m`` on a pool of ``size`` devices in ``stages`` stages (one after another); inf
    when the pool is too small."""
    plan = stage_plan(problem, m, size, stages)
    return math.inf if plan is None else sum(problem.curves[m].time(n) * count for _, count, _, n in plan)


def _distinct(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` of non-negative integers (pool sizes), by counting instead of
    sorting: the split search asks it of tens of thousands of vectors, one role at a time."""
    distinct = np.flatnonzero(np.bincount(values))
    index = np.zeros(distinct[-1] + 1 if len(distinct) else 1, dtype=np.int64)
    index[distinct] = np.arange(len(distinct))
    return distinct, index[values]


def split_estimates(problem: Problem, sizes: np.ndarray, stages: int = 1) -> np.ndarray:
    """Compute makespan of :func:`split_schedule` for every row of ``sizes`` (pool sizes in role order, one row per
    vector), list-scheduled: a MetaOp starts after its predecessors and its role's previous MetaOp, its stages one
    after another (:func:`_op_seconds`); inf where a pool is too small. Vectorised over the rows (the split search
    estimates tens of thousands of vectors). With ``training.rollout_lag`` 1 a root generate MetaOp runs beside the
    rest (planner.rolloutlag): the estimate is the larger of its time and the others' makespan without it."""
    names = roles(problem)
    rows = sizes.shape[0]
    end = np.zeros((len(problem.graph), rows))
    free = np.zeros((len(names), rows))
    early = lagged_generate(problem.graph)
    ahead = np.zeros(rows)  # rollout_lag 1: the pools' time spent on the next step's rollouts (beside the rest)
    for m, op in enumerate(problem.graph.metaops):
        r = names.index(role_of(problem, m))
        distinct, at = _distinct(sizes[:, r])
        t = np.array([_op_seconds(problem, m, int(n), stages) for n in distinct])[at]
        if m in early:  # ready at the step's start; its own role's pool is busy with it for t
            ahead = np.maximum(ahead, t)
            continue
        start = np.max(np.vstack([free[r], *(end[d] for d in op.deps)]), axis=0)
        end[m] = start + t
        free[r] = end[m]
    return np.maximum(end.max(axis=0), ahead) if len(problem.graph) else np.zeros(rows)


def split_candidates(problem: Problem, stages: int = 1, work: Work | None = None, per_node: int = 0
                     ) -> list[dict[str, int]]:
    """Pool-size vectors (multiples of the grain, summing to at most N), best compute estimate first; at most
    :data:`SPLIT_SIMULATED`; with ``per_node`` (devices per node) only those the runtime can run (planner.candidates.
    runnable: no tensor-parallel group across nodes, which a pool starting mid-node would make). The grain doubles until at most :data:`MAX_SPLIT_VECTORS` vectors remain, and, with
    ``work``, until their estimates fit in what is left of its budget (a coarser split when the budget is short,
    while every role still gets a grain of its own)."""
    from planner.candidates import runnable  # local: planner.candidates imports this module

    names = roles(problem)
    if len(names) < 2 or len(names) > MAX_SPLIT_ROLES or len(names) > problem.num_devices:
        return []
    grain = max(1, problem.num_devices // SPLIT_GRAIN_PARTS)
    per_vector = len(problem.graph) / ESTIMATES_PER_UNIT  # work units of one vector's estimate
    while (math.comb(problem.num_devices // grain, len(names)) > MAX_SPLIT_VECTORS
           or (work is not None and grain * 2 * len(names) <= problem.num_devices
               and math.comb(problem.num_devices // grain, len(names)) * per_vector > work.left())):
        grain *= 2
    sizes = _grain_vectors(problem.num_devices // grain, len(names)) * grain
    if work is not None:
        work.spend(len(sizes) * per_vector)
    t = split_estimates(problem, sizes, stages)
    ok = np.flatnonzero(t < math.inf)
    # best estimate first, then more devices, then the pool sizes in role order (as a tuple sort would)
    keys = [sizes[ok, i] for i in reversed(range(len(names)))] + [-sizes[ok].sum(axis=1), t[ok]]
    used = _used_devices(problem, sizes, stages)
    best, seen = [], set()
    for i in ok[np.lexsort(keys)]:  # one vector per placement: pools that run on the same devices are one split
        if tuple(used[i]) not in seen:
            seen.add(tuple(used[i]))
            placed = split_schedule(problem, dict(zip(names, map(int, sizes[i]))), stages) if per_node else None
            if per_node and (placed is None or runnable(problem, placed, per_node) is not None):
                continue  # e.g. a pool starting mid-node whose tensor-parallel groups would span nodes
            best.append(i)
            if len(best) == SPLIT_SIMULATED:
                break
    return [{r: int(n) for r, n in zip(names, sizes[i])} for i in best]


@functools.lru_cache(maxsize=8)
def _grain_vectors(parts: int, roles: int) -> np.ndarray:
    """Every vector of ``roles`` positive counts of grains summing to at most ``parts``, one per row, in the order of
    their cuts (itertools.combinations). Remembered (read-only; at most :data:`MAX_SPLIT_VECTORS` rows, a few MB): every
    stage count and layout version of a search, and every count of micro-batches, asks for the same ones."""
    cuts = np.array(list(itertools.combinations(range(1, parts + 1), roles)), dtype=np.int64).reshape(-1, roles)
    out = np.diff(cuts, axis=1, prepend=0)
    out.setflags(write=False)
    return out


def _used_devices(problem: Problem, sizes: np.ndarray, stages: int) -> np.ndarray:
    """For every row of ``sizes`` and role, the devices of its pool its MetaOps use (:func:`stage_plan`: a pool of 38
    runs a MetaOp valid on 32 on 32): rows equal here are the same placement."""
    names = roles(problem)
    out = np.zeros_like(sizes)
    for r, name in enumerate(names):
        ops = [m for m in range(len(problem.graph)) if role_of(problem, m) == name]
        distinct, at = _distinct(sizes[:, r])
        used = []
        for n in distinct:
            plans = [stage_plan(problem, m, int(n), stages) for m in ops]
            used.append(max((p[-1][2] + p[-1][3] for p in plans if p), default=0))
        out[:, r] = np.array(used)[at]
    return out


def tightened(problem: Problem, cost_model: CostModel, stages: int = 1) -> list[Problem]:
    """``problem`` and versions of it whose layouts fit a pipeline stage's layers (``ceil(layers / stages)``) in all,
    half, a quarter and an eighth of a device (:meth:`CostModel._build_curve_within`, as planner.api.memory_tightened
    does for whole MetaOps), the least-memory layouts (:func:`least_memory_curve`): the layouts a user tries in
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


def tp1_generation_version(problem: Problem, cost_model: CostModel) -> Problem | None:
    """``problem`` with its generate and sample MetaOps on their tensor_parallel 1 curves: a curve keeps one layout
    per count, the fastest, so where that decodes tensor-parallel a data-parallel decode is never tried (at 7B on 64
    devices a generation pool spread over the nodes, 2 devices per node, cannot hold the TP-4 groups its curve picks,
    while TP 1 fits; a TP-1 decode also needs no trainer at the decode's degree, planner.generation.decode_refused).
    None when nothing changes or no such curve exists."""
    if not any(op.gen is not None for op in problem.graph.metaops):
        return None
    # the MetaOps themselves allow tensor_parallel 1 only, so the search's layout versions (tightened, least memory)
    # keep it too
    ops = tuple(replace(op, allowed_tp=(1,)) if op.gen is not None else op for op in problem.graph.metaops)
    try:
        curves = tuple(cost_model.curve(op) if op.gen is not None else curve for op, curve in zip(ops, problem.curves))
    except PlanningError:  # no count fits at tensor_parallel 1 (a 70B policy's generation)
        return None
    if curves == problem.curves:
        return None
    return replace(problem, graph=replace(problem.graph, metaops=ops), curves=curves)


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
    return Curve(tuple(counts), tuple(times), tuple(layouts), tuple(memory),
                 tuple(cost_model.forward_fraction(op, lay) for lay in layouts)) if counts else None


def rl_budget(limit_s: float) -> float:
    """Work units of each role-placement search under a planner time limit of ``limit_s`` CPU seconds: the limit's
    share (:data:`RL_UNITS_PER_LIMIT_S` per second; a unit costs ~1-7 ms of CPU on the bench cells), at most
    :data:`RL_SEARCH_BUDGET`. Derived from the limit, never the clock: the same job gets the same placements."""
    return min(RL_SEARCH_BUDGET, RL_UNITS_PER_LIMIT_S * limit_s)


@dataclass(frozen=True)
class RoleBudget:
    """What each role-placement search may spend: ``units`` of work (:class:`Work`), and CPU time of the planning
    thread up to ``deadline`` (``time.thread_time()``, the planner's time limit; None: no deadline) once it has a
    placement that fits. The units bind first on a job planned within its limit, so its placements do not depend on
    the clock; the deadline is the safety cap that keeps planning within ``planner.time_limit_s`` where they would
    not (``grad_accum_steps: auto`` plans every count on a share of the limit)."""

    units: float = RL_SEARCH_BUDGET
    deadline: float | None = None


class Work:
    """The work budget of one role-placement search (docs/planner.md, section 5's table): units of
    planner.refine.evaluation_cost (slices x started blocks of 64 devices) per placement simulated, and one per
    :data:`ESTIMATES_PER_UNIT` MetaOp estimates of the split search. Counted in work, so a job gets the same
    placements on a busy machine and an idle one. ``budget``'s units bound the search once it has found a placement
    that fits (``fits``); until then it may go on to :data:`RL_SEARCH_BUDGET` (a short time limit must not leave a job
    that fits only with pipeline stages without a plan). Once something fits, ``budget``'s deadline ends it too."""

    def __init__(self, budget: RoleBudget = RoleBudget()):
        self.given = budget
        self.spent = 0.0
        self.fits = False  # the search has found a placement that fits in device memory

    def spend(self, units: float) -> None:
        self.spent += units

    def left(self) -> float:
        """Units left: of ``budget`` once something fits (none past its deadline), else of the larger of it and
        :data:`RL_SEARCH_BUDGET`."""
        if self.fits and self.given.deadline is not None and time.thread_time() >= self.given.deadline:
            return 0.0
        units = self.given.units
        return max(0.0, (units if self.fits else max(units, RL_SEARCH_BUDGET)) - self.spent)


def _search(problem: Problem, cost_model: CostModel, build, work: Work | None = None
            ) -> tuple[PlacedSchedule, Simulation] | None:
    """The fitting placement with the shortest predicted iteration (else the fastest) among ``build(version, stages,
    work)`` (an iterable of placements, None for impossible ones) over pipeline stage counts (:data:`STAGES`, more
    only while none fits) and the layout versions for each (:func:`tightened`), until ``work`` (a fresh
    :class:`Work` by default) has nothing left; the first placement is always simulated. Every role placement
    (colocated, split, Loom's) searches twice, on the job's layouts and with uneven row shares as well
    (:func:`uneven_rows`, a fresh budget of the same size), and a third time when the generation's curve decodes
    tensor-parallel: uneven shares with the generation at tensor_parallel 1 (:func:`tp1_generation_version`), and
    keeps the best: the same freedom for all."""
    work = work or Work()
    budget = work.given
    found = [_search_versions(problem, cost_model, build, work)]
    with uneven_rows(cost_model):
        uneven = replace(problem, curves=tuple(cost_model.curve(op) for op in problem.graph.metaops))
        if uneven.curves != problem.curves:
            found.append(_search_versions(uneven, cost_model, build, Work(budget)))
        decoding = tp1_generation_version(uneven, cost_model)
        if decoding is not None:  # and with the generation at tensor_parallel 1, every layout version beside it
            found.append(_search_versions(decoding, cost_model, build, Work(budget)))
    found = [f for f in found if f is not None]  # on a tie, a placement the runtime runs (planner.generation)
    return min(found, key=lambda f: (max(f[1].peak_memory_bytes, default=0.0) > cost_model.hw.memory_bytes,
                                     f[1].iteration_time_s,
                                     modes_refused(problem.graph.metaops, f[0]) is not None)) if found else None


def _search_versions(problem: Problem, cost_model: CostModel, build, work: Work
                     ) -> tuple[PlacedSchedule, Simulation] | None:
    from planner.candidates import runnable  # local: planner.candidates imports this module

    best = None  # (predicted iteration, placed, simulation) of the fastest placement that fits
    unfit: list[PlacedSchedule] = []  # those that do not (by the ledger's peaks, the simulation's), in order
    blocks = -(-problem.num_devices // DEVICES_PER_UNIT)
    for stages in STAGES:
        for version in tightened(problem, cost_model, stages):
            for placed in build(version, stages, work):
                if (best is not None or unfit) and not work.left():
                    return _fastest(problem, cost_model, best, unfit)
                if placed is None:
                    continue
                work.spend(max(1, sum(len(w.slices) for w in placed.waves)) * blocks)
                if runnable(problem, placed, cost_model.hw.devices_per_node) is not None:
                    continue  # e.g. a pool starting mid-node whose tensor-parallel groups span nodes
                if max(placed_ledger(problem, placed, cost_model).peak(), default=0.0) > cost_model.hw.memory_bytes:
                    unfit.append(placed)  # simulated only if nothing fits: any placement that fits is preferred
                    continue
                work.fits = True
                sim = simulate(problem, placed, cost_model)
                if best is None or sim.iteration_time_s < best[0]:
                    best = (sim.iteration_time_s, placed, sim)
        if best is not None:
            break
    return _fastest(problem, cost_model, best, unfit)


def _fastest(problem: Problem, cost_model: CostModel, best, unfit: list[PlacedSchedule]
             ) -> tuple[PlacedSchedule, Simulation] | None:
    """The search's result: ``best`` (the fastest placement that fits) as (placed, simulation), else the fastest of
    ``unfit`` (the first on a tie), else None. The placements that do not fit are simulated here only: on the 70B GRPO
    cell nearly all a search places before its first fit (226 of 232 simulations, about half its planning time)."""
    if best is not None:
        return best[1], best[2]
    return min(((placed, simulate(problem, placed, cost_model)) for placed in unfit),
               key=lambda found: found[1].iteration_time_s, default=None)


def rl_schedules(problem: Problem, cost_model: CostModel, budget: RoleBudget = RoleBudget()
                 ) -> dict[str, tuple[PlacedSchedule, Simulation]]:
    """The colocated and best split placements of an RL-shaped job (empty otherwise), each with its simulation: for
    each, the fastest that fits over the job's layouts, their memory-tightened versions (:func:`tightened`) and
    pipeline stages (:func:`stage_plan`), each within ``budget`` (:class:`Work`)."""
    if not rl_shaped(problem):
        return {}
    out = {"colocated": _search(problem, cost_model, lambda p, k, w: [colocated_schedule(p, k)], Work(budget)),
           "split": _search(problem, cost_model,
                            lambda p, k, w: (split_schedule(p, sizes, k) for sizes in
                                                            split_candidates(p, k, w, cost_model.hw.devices_per_node)),
                            Work(budget))}
    return {name: walked(problem, cost_model, found) for name, found in out.items() if found is not None}


def walked(problem: Problem, cost_model: CostModel, found: tuple[PlacedSchedule, Simulation]
           ) -> tuple[PlacedSchedule, Simulation]:
    """A baseline placement's pipelined micro-batches walked 1F1B where that is no slower, as Loom's plan is
    (planner.simulator.one_f_one_b_if_no_slower; verl's and OpenRLHF's Megatron backends pipeline their update
    1F1B): the same freedom for all."""
    placed, sim = found
    if cost_model.in_flight == 1:
        return found
    return placed, one_f_one_b_if_no_slower(problem, cost_model, placed, sim)[1]


def split_at(problem: Problem, cost_model: CostModel, sizes: dict[str, int], budget: RoleBudget = RoleBudget()
             ) -> tuple[PlacedSchedule, Simulation] | None:
    """The split placement with the pools ``sizes`` (every role named, summing to at most N), the fastest fitting
    over stages and layout versions as :func:`rl_schedules` searches; None when the sizes are not a split. bench.rl
    prices the split at the pools of Loom's plan with it: where Loom's plan is itself a split, the split search
    must not lose to it for want of simulating that vector."""
    if sorted(sizes) != sorted(roles(problem)) or sum(sizes.values()) > problem.num_devices:
        return None
    found = _search(problem, cost_model, lambda p, k, w: [split_schedule(p, sizes, k)], Work(budget))
    return None if found is None else walked(problem, cost_model, found)


def pool_order(num_devices: int, n_gen: int, per_node: int = 0) -> tuple[int, ...] | None:
    """The devices in the order :func:`level_split_schedule` cuts pools from: the generation's ``n_gen`` first, then
    the others. Plain order (devices 0..N-1), or spread over nodes of ``per_node`` devices (when not 0): the first
    ``n_gen / nodes`` devices of every node first, so every node keeps devices of the other roles beside its
    generators (a hand-off from a holder in the same node comes over NVLink, planner.handoff). None when spread and
    ``n_gen`` is not a multiple of the nodes, or there is one node."""
    n_all = num_devices
    if not per_node:
        return tuple(range(n_all))
    nodes = n_all // per_node
    if nodes < 2 or n_gen % nodes or n_gen >= n_all:
        return None
    g = n_gen // nodes
    gen = [node * per_node + i for node in range(nodes) for i in range(g)]
    return tuple(gen) + tuple(d for d in range(n_all) if d % per_node >= g)


def level_split_schedule(problem: Problem, stages: int = 1, trained_alone: bool = False,
                         gen_share: float = 1.0, gen_pool: bool = False, spread: int = 0
                         ) -> PlacedSchedule | None:
    """Loom's role placement between colocated and split: the MetaLevels in order; a level's MetaOps (e.g. the
    reward model and the reference, both reading the rollouts) split the N devices in proportion to their work
    (planner.baselines.split_level: DistMM's rule), a level of one MetaOp (the generation, the update) takes them all;
    with ``trained_alone`` a level's MetaOps with a backward pass run first, each alone on all devices, and the rest
    split them. With ``gen_share`` < 1 the generate and sample MetaOps run on the first ``gen_share`` of the devices
    and the forward-only MetaOps split the others (so no device holds a generation copy and a scorer); with
    ``gen_pool`` every other MetaOp (the trainer too) runs on the others, so the generating devices do nothing else
    (what planner.streamed needs for chunks to overlap); with ``spread`` (devices per node) the generating
    devices are a share of every node rather than the first devices (:func:`pool_order`). Each MetaOp in ``stages``
    pipeline stages over its devices. None when some stage's devices are too few."""
    from planner.baselines import split_level  # local: a sibling's helper, used only here

    builder = _Builder(problem)
    after = -1
    ops = problem.graph.metaops
    n_all = problem.num_devices
    n_gen = max(1, int(n_all * gen_share))
    order = pool_order(n_all, n_gen, spread)
    if order is None:
        return None
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
            elif n_gen < n_all and (gen_pool or all(ops[m].backward_factor == 0 for m in group)):
                offset, width = n_gen, n_all - n_gen
            else:
                offset, width = 0, n_all
            for stage in split_level(problem, group, width):
                start = end
                for m, devices in stage:
                    first = offset + (devices[0] if len(stage) > 1 else 0)
                    size = len(devices) if len(stage) > 1 else width
                    k = _put(builder, m, order[first:first + size], stages, start)
                    if k is None:
                        return None
                    end = max(end, k)
        after = end
    return builder.placed()


def role_candidate(problem: Problem, cost_model: CostModel, budget: RoleBudget = RoleBudget()
                   ) -> tuple[PlacedSchedule, Simulation] | None:
    """Loom's own role placement of an RL-shaped job (None otherwise, or when nothing fits): the fastest fitting
    :func:`level_split_schedule` over pipeline stages and layout versions (with ``training.rollout_lag`` 1 also
    with the generation on a pool of its own, :data:`POOL_SHARES` of the devices, planner.rolloutlag), for the jobs whose solver candidates do
    not fit (a 70B policy needs pipeline stages to train beside its generation copy); within ``budget``
    (:class:`Work`)."""
    if not rl_shaped(problem):
        return None
    shapes = [(alone, share, False, 0) for alone in (False, True) for share in GEN_SHARES]
    if problem.graph.rollout_lag:  # the generation on a pool of its own can run beside the previous step, the pool
        # at the first devices or spread over the nodes (its hand-off over NVLink from trainers in its nodes)
        shapes += [(alone, share, True, spread) for spread in (0, cost_model.hw.devices_per_node)
                   for share in POOL_SHARES for alone in (False, True)]
    found = _search(problem, cost_model, lambda p, k, w: (level_split_schedule(p, k, alone, share, pool, spread)
                                                          for alone, share, pool, spread in shapes), Work(budget))
    if found is None or max(found[1].peak_memory_bytes, default=0.0) > cost_model.hw.memory_bytes:
        return None
    return found


def with_role_candidate(problem: Problem, cost_model: CostModel, chosen, bound_s: float,
                        budget: RoleBudget = RoleBudget()):
    """``chosen`` (the solver's ``(SolveResult, placed, simulation)``, or None when none fits) or Loom's role
    placement (:func:`role_candidate`) when that fits and is predicted faster; the SolveResult's method then reads
    ``role placement``."""
    from planner.candidates import schedule_of  # local: planner.candidates imports this module
    from planner.solver import SolveResult

    found = role_candidate(problem, cost_model, budget)
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
