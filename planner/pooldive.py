"""Pool diving: whole waves from a pool of near-optimal patterns, for the solver's least-compute candidate.

The allocation LP (planner.patterns) repeats patterns fractionally; turning it into whole waves loses up to 6% on
Spindle's grid (clip-10@16: the LP 1.012x the per-level bound, its best rounding 1.060x), because the LP's support is
a few patterns whose whole repetitions cover the layers badly, and the packing ILP over those columns cannot do
better. This step gives the packing many more patterns to choose from, all nearly as good as the LP's:

1. **Pricing again.** The LP master of the best stage windows is priced again over :data:`CAPS` duration caps until
   no pattern prices out (the solver's :data:`planner.patterns.NUM_CAPS` caps stop column generation early).
2. **Pool.** Patterns priced at the LP's duals perturbed (each multiplied by ``exp(N(0, SIGMA))``, seeded), for
   :data:`POOL_ROUNDS` rounds; every pattern whose reduced cost at the true duals is within :data:`SLACK` of the LP's
   value joins the pool (hundreds to thousands on the grid).
3. **Dive.** The LP over the pool's patterns clipped to the layers still missing (a pattern's layers beyond what a
   MetaOp lacks are dropped, so a clipped pattern may be shorter); every pattern it runs at least once is fixed at its
   whole repetitions (none: one repetition of the one it runs most), the missing layers fall, and again, until at most
   :data:`FINISH_OPS` MetaOps or :data:`FINISH_SHARE` of the first LP's value are left, which a packing ILP over the
   :data:`FINISH_COLUMNS` best clipped patterns finishes (node-limited).

The waves go in stage order (each pattern's stage: the windows carry the dependencies), then local search
(planner.polish). Measured on every grid cell (session 34, from the solver's LP): within 1.03x of the per-level bound
in 14 of 17 (the solver's other candidates at best: 9), 0.05-0.3 CPU s a cell; the solver runs it up to
:data:`MAX_SIZE`. Deterministic (a seeded pool, node limits, no clock). The solver lists it as a candidate where it
saves compute (planner.solver.POOL_GAIN), searched apart (planner.leastcompute.LATE): a plan adopts it only where no
slower.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from planner.milp import quiet_highs
from planner.patterns import PatternMaster, candidate_caps, pattern_duration, price_patterns
from planner.schedule import Problem, Schedule, Slice, Wave, merge_adjacent_waves

CAPS = 150  # duration caps the LP is priced on again (the solver priced it on planner.patterns.NUM_CAPS)
PRICE_ROUNDS = 400  # column-generation rounds of that pricing at most
POOL_CAPS = 100  # caps of the perturbed pricing rounds
SIGMA = 0.25  # log-normal spread of the perturbed duals
SLACK = 0.03  # of the LP's value: the largest reduced cost (at the true duals) a pool pattern may have
POOL_ROUNDS, POOL_SEED = 30, 0  # perturbed pricing rounds, and the seed of their perturbations
FINISH_OPS = 6  # MetaOps left at which the packing ILP finishes the dive
FINISH_SHARE = 0.15  # of the first LP's value: residual LP value at which the packing ILP finishes the dive
FINISH_REDUCED = 0.01  # of the residual LP's value: the largest reduced cost of a pattern that ILP may use
FINISH_COLUMNS = 40  # patterns that ILP chooses from at most
FINISH_NODES = 30  # branch-and-bound nodes of that ILP (deterministic; its best incumbent, else the LP rounded up)
# MetaOps x devices up to which the step runs. On the grid it costs 0.05-0.3 CPU s a cell, and where it becomes a
# candidate its held-back search 0.3-0.45 s more: ofasys-7@8 (18 x 8) plans in 2.9 s instead of 2.1 s (2.5% faster),
# while clip-10@16 (20 x 16 = 320) would pass 3 s, and of the cells of 320 or more only clip-7@32 (448) gained, 0.6%,
# in one of session 34's configurations; the cost grows with both beyond (the sweep: 100 MetaOps on 128+ devices)
MAX_SIZE = 300


Pool = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # per pattern: layers, counts, a layer's
# forward and backward seconds, stage


def affordable(problem: Problem) -> bool:
    """Whether the job is small enough for this step: at most :data:`MAX_SIZE` MetaOps x devices."""
    return len(problem.graph) * problem.num_devices <= MAX_SIZE


def price_again(problem: Problem, master: PatternMaster) -> None:
    """Continue ``master``'s column generation over :data:`CAPS` caps per stage until no pattern prices out (at most
    :data:`PRICE_ROUNDS` rounds), for the whole demand."""
    master.caps = [candidate_caps(problem, ops, CAPS) if ops else np.zeros(0) for ops in master.eligible]
    master.work_budget = float("inf")
    master.set_demand(np.array([problem.layers(m) for m in range(len(problem.graph))], dtype=float))
    master.generate(PRICE_ROUNDS)


def pattern_pool(problem: Problem, master: PatternMaster) -> Pool:
    """``master``'s columns and the patterns priced at its duals perturbed (module docstring, step 2)."""
    rng = np.random.default_rng(POOL_SEED)
    value = master.solution()[0]
    duals = np.abs(np.array(master.h.getSolution().row_dual))
    limits = [problem.layers(m) for m in range(len(problem.graph))]
    caps = [candidate_caps(problem, ops, POOL_CAPS) if ops else np.zeros(0) for ops in master.eligible]
    found = {(c.stage, c.pattern) for c in master.columns}
    for _ in range(POOL_ROUNDS):
        noisy = duals * np.exp(rng.normal(0.0, SIGMA, len(duals)))
        for stage, ops in enumerate(master.eligible):
            for _, pattern in price_patterns(problem, noisy, ops, caps[stage], limits) if ops else ():
                if pattern_duration(problem, pattern) - sum(duals[m] * l for m, _, l in pattern) <= SLACK * value:
                    found.add((stage, pattern))
    pool = sorted(found)
    num_ops = len(problem.graph)
    layers, counts, forward, backward = (np.zeros((len(pool), num_ops)) for _ in range(4))
    for i, (_, pattern) in enumerate(pool):
        for m, n, l in pattern:
            layers[i, m], counts[i, m] = l, n
            forward[i, m], backward[i, m] = problem.pass_times[m][n]
    return layers, counts, forward, backward, np.array([stage for stage, _ in pool])


def _solve(cost: np.ndarray, cover: np.ndarray, demand: np.ndarray, integer: bool
           ) -> tuple[np.ndarray, np.ndarray] | None:
    """min cost . y subject to cover . y >= demand, y >= 0 (integer: whole, at most FINISH_NODES nodes): y and the
    reduced costs (an LP's); None when HiGHS finds no solution."""
    import highspy

    h = quiet_highs()
    h.setOptionValue("threads", 1)
    h.setOptionValue("random_seed", 0)
    lp = highspy.HighsLp()
    rows, cols = cover.shape
    lp.num_col_, lp.num_row_ = cols, rows
    lp.col_cost_ = cost.astype(float)
    lp.col_lower_ = np.zeros(cols)
    lp.col_upper_ = np.full(cols, float(demand.max()) if integer else highspy.kHighsInf)
    lp.row_lower_ = demand.astype(float)
    lp.row_upper_ = np.full(rows, highspy.kHighsInf)
    col, row = np.nonzero(cover.T)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.concatenate([[0], np.cumsum(np.bincount(col, minlength=cols))]).astype(np.int32)
    lp.a_matrix_.index_ = row.astype(np.int32)
    lp.a_matrix_.value_ = cover.T[col, row].astype(float)
    if integer:
        lp.integrality_ = [highspy.HighsVarType.kInteger] * cols
        h.setOptionValue("mip_max_nodes", FINISH_NODES)
    h.passModel(lp)
    h.run()
    if h.getInfo().primal_solution_status != 2:  # no feasible point
        return None
    solution = h.getSolution()
    return np.array(solution.col_value), np.array(solution.col_dual)


def dive(problem: Problem, pool: Pool) -> list[tuple[int, np.ndarray, np.ndarray]] | None:
    """Waves ``(stage, layers, counts)`` covering every MetaOp's layers (module docstring, step 3); None if an LP
    finds no solution (never: the pool holds every MetaOp alone)."""
    layers, counts, forward, backward, stages = pool
    missing = np.array([problem.layers(m) for m in range(len(problem.graph))], dtype=float)
    waves: list[tuple[int, np.ndarray, np.ndarray]] = []
    first = None

    def take(j: int, times: int) -> None:
        nonlocal missing
        for _ in range(times):
            clipped = np.minimum(layers[j], missing)
            if not clipped.any():
                return
            waves.append((int(stages[j]), clipped, counts[j]))
            missing = missing - clipped

    while missing.any():
        clipped = np.minimum(layers, missing[None, :])
        durations = (forward * clipped).max(axis=1) + (backward * clipped).max(axis=1)  # Problem.duration
        live = np.nonzero(durations > 0)[0]
        keys = np.concatenate([clipped[live], counts[live] * (clipped[live] > 0), stages[live, None]], axis=1)
        live = live[np.sort(np.unique(keys, axis=0, return_index=True)[1])]  # clipped patterns, each once
        rows = np.nonzero(missing > 0)[0]
        cover, cost = clipped[live][:, rows].T, durations[live]
        solved = _solve(cost, cover, missing[rows], integer=False)
        if solved is None:
            return None
        y, reduced = solved
        value = float(cost @ y)
        first = value if first is None else first
        if len(rows) <= FINISH_OPS or value <= FINISH_SHARE * first:
            near = np.nonzero((y > 1e-9) | (reduced <= FINISH_REDUCED * value))[0]  # the ILP's columns:
            near = near[np.lexsort((near, reduced[near], y[near] <= 1e-9))][:FINISH_COLUMNS]  # used, then cheapest
            whole = _solve(cost[near], cover[:, near], missing[rows], integer=True)
            times = np.zeros(len(live))
            times[near] = np.round(whole[0]) if whole is not None else np.ceil(y[near] - 1e-9)
            for j, t in zip(live, times.astype(int)):
                take(j, t)
            continue  # a rounding that left layers (never, by the rows): dive again
        fixed = [(j, int(np.floor(v + 1e-6))) for j, v in zip(live, y) if v >= 1 - 1e-6]
        for j, times in fixed or [(live[int(np.argmax(y))], 1)]:
            take(j, times)
    return waves


def waves_schedule(problem: Problem, waves: list[tuple[int, np.ndarray, np.ndarray]]) -> Schedule:
    """The dive's waves in stage order, the longest first within a stage."""
    def duration(layers: np.ndarray, counts: np.ndarray) -> float:
        return problem.duration((int(m), int(counts[m]), int(layers[m])) for m in np.nonzero(layers)[0])

    ordered = sorted(waves, key=lambda w: (w[0], -duration(w[1], w[2])))
    out = [Wave(tuple(Slice(int(m), int(layers[m]), int(counts[m])) for m in np.nonzero(layers)[0]))
           for _, layers, counts in ordered]
    return Schedule(merge_adjacent_waves(problem, out))


def pool_dive(problem: Problem, master: PatternMaster, polish: Callable[[Schedule], Schedule]) -> Schedule | None:
    """The dive's schedule, polished by ``polish`` (a local search); None above :data:`MAX_SIZE`."""
    if not affordable(problem):
        return None
    price_again(problem, master)
    waves = dive(problem, pattern_pool(problem, master))
    return None if waves is None else polish(waves_schedule(problem, waves))
